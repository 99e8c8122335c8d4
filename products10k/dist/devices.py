"""Device choices shared by training and evaluation: device, autocast dtype, DDP backend, loader flags.

Each is a small pure function of its inputs (the CUDA facts are arguments with the live values
as defaults), so every branch of the GPU path is tested on a CPU-only machine.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from products10k.common import ConfigError, process_cores


def resolve_device(name: str, cuda_available: bool | None = None) -> torch.device:
    """``auto`` = CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if name == "cuda" and not cuda:
        raise ConfigError("params.yaml: evaluate.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """None (full precision) or the autocast dtype; ``auto`` = bf16 (fp16 before Ampere) on CUDA, off on CPU.

    On CPU, autocast is only worth it on cores with native bf16 (AMX/avx512_bf16); elsewhere it
    is slower than fp32 (see benchmarks/bench_train.py), hence off for ``auto``.
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        if bf16_supported is None:
            # native bf16 only (Ampere on): torch's default also counts emulated bf16, which is far
            # slower on a T4 or V100 than fp16 with loss scaling
            bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if bf16_supported else torch.float16
    if mode not in ("bf16", "fp16"):
        raise ConfigError(f"amp is {mode!r}, expected auto, off, bf16 or fp16")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def needs_grad_scaler(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return dtype == torch.float16


def ddp_backend(configured: str, cuda: bool) -> str:
    """``auto`` = NCCL on CUDA, gloo on CPU; an explicit choice is kept (nccl needs CUDA)."""
    if configured == "auto":
        return "nccl" if cuda else "gloo"
    if configured == "nccl" and not cuda:
        raise ConfigError("params.yaml: dist.backend is 'nccl' but no CUDA device is available (use gloo)")
    return configured


def host_transfer(device: torch.device) -> dict:
    """DataLoader / ``.to()`` flags: pinned host memory and asynchronous copies only towards CUDA."""
    cuda = device.type == "cuda"
    return {"pin_memory": cuda, "non_blocking": cuda}


def to_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device`` in eval mode and channels-last memory: convolutions on NHWC run
    1.7x faster on CPU (tf_efficientnet_lite0 at 128 px, 2 cores: 195 vs 117 img/s) and use the
    tensor cores' layout on GPU. Inputs follow with ``to_model_input``."""
    return model.to(device, memory_format=torch.channels_last).eval()


def to_model_input(x: torch.Tensor, device: torch.device, flags: dict) -> torch.Tensor:
    """An image batch on ``device`` in the layout ``to_inference`` gives the model."""
    x = x.to(device, non_blocking=flags["non_blocking"])
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def configure_cuda(device: torch.device) -> None:
    """On CUDA, what timm's train.py sets too: cuDNN picks the fastest convolution algorithms for
    the run's fixed input shapes (benchmarked once per shape), and float32 matmuls may use TF32.
    GPU runs are then not bit-reproducible, which they are not across GPUs anyway."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True


def host_cores(local_world: int | None = None) -> int:
    """The cores this rank may use: the process's share (a container's or taskset's) divided among
    the ranks of its node (``LOCAL_WORLD_SIZE``, torchrun's)."""
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, process_cores() // max(1, local_world))


def eval_workers(configured: int | str, device: torch.device, cores: int) -> int:
    """DataLoader workers for evaluation: ``auto`` = 0 on CPU (decode shares the cores with the
    model), up to 8 on CUDA (JPEG decode of 4 TTA views must keep a GPU fed)."""
    if configured == "auto":
        return min(8, max(1, cores - 1)) if device.type == "cuda" else 0
    return int(configured)


def train_workers(configured: int | str, device: torch.device, cores: int) -> int:
    """DataLoader workers per training rank: ``auto`` = 0 on CPU (two torch threads beat one thread
    and a worker on 2 cores), every core of the rank but its own on CUDA: decoding and augmenting
    a 448-px crop costs a core several milliseconds, while a GPU trains B3 on hundreds of images a
    second. The count changes speed only (each sample carries its own augmentation seed)."""
    if configured == "auto":
        return max(1, cores - 1) if device.type == "cuda" else 0
    return int(configured)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch from one integer."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
