"""Checkpoints: ``models/<member>/<phase>/{best,last}.pt``, written atomically by rank 0.

A checkpoint is a ``torch.save``d dict with at least:

- ``model``: state_dict of the unwrapped model *as evaluated* (the EMA weights when EMA is on);
- ``model_config``: ModelConfig fields plus ``num_classes`` (enough to rebuild the model);
- ``labels``: SKU ids, index = contiguous label; ``phase``, ``member``, ``epoch`` (1-based, last
  completed), ``resolution``, ``resize``, ``val_top1``;

and, for resuming, ``train_state`` (raw weights, optimizer, scheduler, scaler, EMA, global step)
plus ``history`` and ``fingerprint`` (hash of the settings a resume must match).

Checkpoints hold only tensors, dicts, lists/tuples and str/int/float/bool/None (configs as
dicts, no numpy scalars), so they are read with ``torch.load(weights_only=True)``: loading a
checkpoint can never execute code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from products10k.common import Products10kError, atomic_path
from products10k.config import ModelConfig, from_dict

#: keys holding tensors/optimizer state; everything else is metadata
STATE_KEYS = ("model", "train_state")


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """``torch.load`` a checkpoint with a clear error when it is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        raise Products10kError(f"{path}: checkpoint not found (run the phase that writes it first)")
    try:
        # weights_only: tensors and plain containers/scalars only, so loading never runs code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise Products10kError(f"{path}: not a readable checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise Products10kError(f"{path}: not a products10k checkpoint (no 'model'/'model_config')")
    return ckpt


def metadata(ckpt: dict) -> dict:
    """The checkpoint without its tensors."""
    return {k: v for k, v in ckpt.items() if k not in STATE_KEYS}


def model_config_of(meta: dict, path: str | Path) -> tuple[ModelConfig, int]:
    cfg = dict(meta["model_config"])
    num_classes = cfg.pop("num_classes", None)
    if num_classes is None:
        raise Products10kError(f"{path}: checkpoint model_config has no num_classes")
    return from_dict(ModelConfig, cfg, where=str(path), prefix="model_config"), int(num_classes)


def check_arch(meta: dict, arch: str, path: str | Path) -> None:
    """Fail naming both architectures when the checkpoint was made for another ``model.arch``."""
    have = meta["model_config"].get("arch")
    if have != arch:
        raise Products10kError(
            f"{path}: checkpoint architecture is '{have}' but params model.arch is '{arch}'; "
            "re-run the earlier phase with this arch or set model.arch back"
        )


def check_labels(meta: dict, label_map_df: pd.DataFrame, path: str | Path, label_map_path=None) -> None:
    """Fail naming the checkpoint and the label map when their SKU lists differ."""
    where = f"label map {label_map_path}" if label_map_path else "the label map"
    expected = [int(s) for s in label_map_df.sort_values("label")["sku"].tolist()]
    have = [int(s) for s in meta.get("labels", [])]
    if have == expected:
        return
    if len(have) != len(expected):
        detail = f"{len(have)} labels in the checkpoint, {len(expected)} in {where}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(have, expected, strict=True)) if a != b)
        detail = f"label {i} is SKU {have[i]} in the checkpoint but SKU {expected[i]} in {where}"
    raise Products10kError(
        f"checkpoint {path} was trained on a different label map than {where}: {detail}. "
        "Re-run training after prepare, or use the matching data."
    )


def build_model(meta: dict, path: str | Path) -> nn.Module:
    from products10k.models.model import create_model

    cfg, num_classes = model_config_of(meta, path)
    # the checkpoint holds all weights: never fetch/load ImageNet weights for a rebuild
    return create_model(cfg, num_classes, pretrained=False)


def load_state(model: nn.Module, state: dict, path: str | Path, arch: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise Products10kError(
            f"{path}: weights do not fit a '{arch}' model built from its model_config: {exc}"
        ) from exc


def load_model(path: str | Path, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint in eval mode; return ``(model, metadata)``."""
    ckpt = read_checkpoint(path, map_location)
    meta = metadata(ckpt)
    model = build_model(meta, path)
    load_state(model, ckpt["model"], path, meta["model_config"].get("arch"))
    model.eval()
    return model, meta


def load_member_checkpoint(path: str | Path, member: str, phase: str, label_map: pd.DataFrame, map_path):
    """Load a checkpoint; a missing one or one trained on another label map is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise Products10kError(
            f"ensemble member '{member}', phase '{phase}': checkpoint {path} not found "
            f"(run `dvc repro {phase}@{member}`)"
        )
    model, meta = load_model(path, map_location="cpu")
    check_labels(meta, label_map, path, map_path)
    return model, meta


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically (a killed run leaves no half checkpoint)."""
    # through a file object: given a path, torch.save names the archive's root folder after the file,
    # here a random temporary name, and the same checkpoint would differ byte by byte between runs
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
