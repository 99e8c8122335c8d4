"""Checkpoints: round trip, clear errors, never executing code on load."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from products10k.common import Products10kError
from products10k.config import ModelConfig
from products10k.models import checkpoint as ckpt_lib
from products10k.models.checkpoint import save_torch
from products10k.models.model import create_model, model_config_dict
from tests.helpers import config


def _save_ckpt(path: Path, model, cfg: ModelConfig, labels: list[int]) -> None:
    save_torch(
        path,
        {
            "model": model.state_dict(),
            "model_config": model_config_dict(cfg, len(labels)),
            "labels": labels,
            "phase": "train",
            "member": "m0",
            "epoch": 1,
            "resolution": 32,
            "resize": 37,
            "val_top1": 0.5,
        },
    )


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create ``marker`` if unpickling were allowed to call it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_model_round_trip_and_clear_errors(tmp_path):
    cfg = config("model", arch="resnet10t", pretrained=False, pool="gem", head="cosface")
    torch.manual_seed(0)
    model = create_model(cfg, 3).eval()
    path = tmp_path / "best.pt"
    _save_ckpt(path, model, cfg, [11, 22, 33])
    loaded, meta = ckpt_lib.load_model(path)
    assert not loaded.training
    assert meta["labels"] == [11, 22, 33] and meta["model_config"]["arch"] == "resnet10t"
    assert "model" not in meta
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    with pytest.raises(Products10kError, match="'resnet10t'.*'resnet18'"):
        ckpt_lib.check_arch(meta, "resnet18", path)
    label_map = pd.DataFrame({"label": [0, 1, 2], "sku": [11, 22, 34]})
    with pytest.raises(Products10kError, match=r"best\.pt.*label_map\.csv.*label 2 is SKU 33"):
        ckpt_lib.check_labels(meta, label_map, path, "data/label_map.csv")
    ckpt_lib.check_labels(meta, label_map.assign(sku=[11, 22, 33]), path)
    with pytest.raises(Products10kError, match="not found"):
        ckpt_lib.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Products10kError, match="junk.pt"):
        ckpt_lib.load_model(tmp_path / "junk.pt")


def test_read_checkpoint_never_executes_code(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(Products10kError, match=r"evil\.pt: not a readable checkpoint"):
        ckpt_lib.read_checkpoint(path)
    assert not marker.exists()
