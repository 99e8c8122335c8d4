"""The GPU path's decisions, exercised on a CPU: autocast dtype, GradScaler use, DDP backend,
pinned memory / non_blocking flags, evaluation workers, and the fp16 step logic with a fake scaler."""

import types
from pathlib import Path

import pytest
import torch
from torch import nn

from products10k.common import ConfigError, Products10kError
from products10k.dist.devices import (
    amp_dtype,
    ddp_backend,
    eval_workers,
    host_cores,
    host_transfer,
    needs_grad_scaler,
    resolve_device,
    train_workers,
)
from products10k.dist.group import DistInfo
from products10k.training.loop import optimizer_step
from tests.helpers import config

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_autocast_dtype_selection():
    assert amp_dtype("auto", CPU) is None  # slower than fp32 on CPUs without native bf16
    assert amp_dtype("auto", CUDA, bf16_supported=True) == torch.bfloat16
    assert amp_dtype("auto", CUDA, bf16_supported=False) == torch.float16  # pre-Ampere GPUs
    assert amp_dtype("off", CUDA, bf16_supported=True) is None
    assert amp_dtype("fp16", CPU) == torch.float16 and amp_dtype("bf16", CUDA) == torch.bfloat16
    with pytest.raises(ConfigError, match="'fp8'"):
        amp_dtype("fp8", CUDA)


def test_grad_scaler_only_for_fp16():
    assert needs_grad_scaler(torch.float16)
    assert not needs_grad_scaler(torch.bfloat16) and not needs_grad_scaler(None)


def test_ddp_backend_choice():
    assert ddp_backend("auto", cuda=True) == "nccl"
    assert ddp_backend("auto", cuda=False) == "gloo"
    assert ddp_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(ConfigError, match="nccl.*no CUDA"):
        ddp_backend("nccl", cuda=False)


def test_pinned_memory_and_non_blocking_only_towards_cuda():
    assert host_transfer(CUDA) == {"pin_memory": True, "non_blocking": True}
    assert host_transfer(CPU) == {"pin_memory": False, "non_blocking": False}


def test_device_and_eval_workers():
    assert resolve_device("auto", cuda_available=True).type == "cuda"
    assert resolve_device("auto", cuda_available=False).type == "cpu"
    with pytest.raises(ConfigError, match="evaluate.device is 'cuda'"):
        resolve_device("cuda", cuda_available=False)
    assert eval_workers("auto", CPU, cores=16) == 0
    assert eval_workers("auto", CUDA, cores=16) == 8 and eval_workers("auto", CUDA, cores=4) == 3
    assert eval_workers(3, CPU, cores=2) == 3


def test_training_workers_feed_a_gpu_from_every_core_of_its_rank(monkeypatch):
    assert train_workers("auto", CPU, cores=16) == 0  # on CPU the cores train
    assert train_workers("auto", CUDA, cores=16) == 15 and train_workers("auto", CUDA, cores=1) == 1
    assert train_workers(2, CUDA, cores=16) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert host_cores() == 12 and host_cores(local_world=1) == 96  # 8 GPU ranks share 96 cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "200")
    assert host_cores() == 1


@pytest.mark.parametrize("bad", [-1, "many", 1.5])
def test_training_workers_are_a_count_or_auto(bad):
    with pytest.raises(ConfigError, match="train.num_workers"):
        config("train", num_workers=bad)
    assert config("train", num_workers="auto").num_workers == "auto"


class FakeScaler:
    """GradScaler's interface as the loop uses it under fp16; records what the loop asked of it."""

    def __init__(self, enabled: bool):
        self.enabled, self.calls = enabled, []

    def is_enabled(self):
        return self.enabled

    def unscale_(self, optimizer):
        self.calls.append("unscale_")

    def step(self, optimizer):
        self.calls.append("step")
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):  # the real scaler skips it on inf/NaN gradients
            optimizer.step()

    def update(self):
        self.calls.append("update")


def _runner(scaler_enabled: bool, grad: float, clip=None):
    """The state optimizer_step reads, around a one-parameter model with the given gradient."""
    model = nn.Linear(1, 1, bias=False)
    model.weight.grad = torch.full_like(model.weight, grad)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    net = types.SimpleNamespace(
        raw=model,
        optimizer=opt,
        scaler=FakeScaler(scaler_enabled),
        scheduler=types.SimpleNamespace(step_update=lambda step: None),
        ema=None,
    )
    runner = types.SimpleNamespace(
        cfg=types.SimpleNamespace(clip_grad=clip),
        net=net,
        info=DistInfo(),
        progress=types.SimpleNamespace(global_step=0),
        phase="train",
        name="train@m0",
        paths=types.SimpleNamespace(out=Path("models/m0/train")),
    )
    return runner


def test_fp16_overflow_is_left_to_the_scaler_but_a_nan_loss_stops():
    # fp16: an inf gradient with finite losses is the scaler's routine overflow - step, no stop
    runner = _runner(scaler_enabled=True, grad=float("inf"), clip=1.0)
    optimizer_step(runner, torch.tensor(-1), epoch=0, step=3)
    assert runner.net.scaler.calls == ["unscale_", "step", "update"] and runner.progress.global_step == 1
    # a NaN loss flagged at step 2 stops the run before the optimizer step, naming that step
    runner = _runner(scaler_enabled=True, grad=1.0)
    with pytest.raises(Products10kError, match="loss is NaN/inf at epoch 1, step 3"):
        optimizer_step(runner, torch.tensor(2), epoch=0, step=3)
    assert "step" not in runner.net.scaler.calls and runner.progress.global_step == 0


def test_without_a_scaler_a_non_finite_gradient_stops():
    runner = _runner(scaler_enabled=False, grad=float("nan"))
    with pytest.raises(Products10kError, match="gradients are NaN/inf"):
        optimizer_step(runner, torch.tensor(-1), epoch=1, step=0)
    runner = _runner(scaler_enabled=False, grad=0.5)
    optimizer_step(runner, torch.tensor(-1), epoch=0, step=0)
    assert runner.net.scaler.calls == ["step", "update"] and runner.progress.global_step == 1


def test_the_head_computes_in_float32_under_autocast():
    from products10k.models.model import create_model

    model = create_model(config("model", arch="resnet10t"), 7, pretrained=False).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.float32


def test_gradient_clipping_bounds_the_step():
    runner = _runner(scaler_enabled=False, grad=10.0, clip=1.0)
    before = runner.net.raw.weight.detach().clone()
    optimizer_step(runner, torch.tensor(-1), epoch=0, step=0)
    # SGD lr 0.1 on a single weight: the clipped gradient (norm 1) moves it by 0.1, not by 1.0
    assert float((before - runner.net.raw.weight.detach()).abs().sum()) == pytest.approx(0.1, rel=1e-5)


def test_auto_amp_takes_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    asked = []

    def bf16(including_emulation=True):  # torch's default counts emulated bf16 (T4, V100) as support
        asked.append(including_emulation)
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert amp_dtype("auto", CUDA) == torch.float16 and asked == [False]


def test_more_processes_than_gpus_is_a_params_error():
    from products10k.dist.group import _check_gpu_count

    _check_gpu_count(1, 2)
    with pytest.raises(ConfigError, match=r"dist.nproc_per_node.*process 2 on a node with 2 visible GPU"):
        _check_gpu_count(2, 2)


def test_cuda_runs_take_timms_speed_flags_and_cpu_runs_none():
    from products10k.dist.devices import configure_cuda

    saved = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    try:  # torch's flags are process-wide: set here, restored after
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        configure_cuda(CPU)
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        configure_cuda(CUDA)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved
