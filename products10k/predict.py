"""Batched inference with TTA over prepared images: averaged logits plus a per-view report.

Each image is decoded once; every base view (scale x crop) is produced from that decode and the
flipped copies are made on the batch tensor. The averaged logits are the only (N, K) array kept:
per-view and leave-one-view-out top-1 predictions are reduced to an argmax per batch, so the
report on what each view adds costs N integers per view, not N x K floats (55k x 9.7k test
logits are already 2 GB in float32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from products10k.datasets import PreparedImageDataset
from products10k.errors import ConfigError
from products10k.tta import View, base_views

log = logging.getLogger(__name__)


class ViewsDataset(Dataset):
    """Rows of a prepared CSV as ``{base view name: CHW tensor}`` (one decode per image)."""

    def __init__(self, df: pd.DataFrame, images_root: str | Path, views: list[View]):
        self.bases = base_views(views)
        # decode at reduced JPEG scale when even the smallest view is far below the stored size
        min_side = min(b.resize for b in self.bases)
        self.images = PreparedImageDataset(df, images_root, transform=None, min_side=min_side)
        self.transforms = [(b.name, b.transform()) for b in self.bases]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images.load(index)
        return {name: tf(image) for name, tf in self.transforms}


@dataclass
class Prediction:
    """TTA result for one split: mean logits over views, per-view and leave-one-out argmax."""

    logits: np.ndarray  # (N, K) float32, mean over all views
    view_top1: dict[str, np.ndarray] = field(default_factory=dict)  # view -> (N,) argmax alone
    without_top1: dict[str, np.ndarray] = field(default_factory=dict)  # view -> argmax of the rest

    def tta_report(self, labels: np.ndarray) -> dict:
        """Top-1 of each view alone, of all views but one, and of all views together."""
        labels = np.asarray(labels)
        report = {"all": float((self.logits.argmax(1) == labels).mean())}
        for name, pred in self.view_top1.items():
            report[name] = float((pred == labels).mean())
        for name, pred in self.without_top1.items():
            report[f"without_{name}"] = float((pred == labels).mean())
        return report


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params.yaml: evaluate.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    df: pd.DataFrame,
    images_root: str | Path,
    views: list[View],
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "predict",
) -> Prediction:
    """Run ``model`` over the rows of ``df`` with every view; logits are averaged over views."""
    device = torch.device(device)
    model = model.to(device).eval()
    dataset = ViewsDataset(df, images_root, views)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    n = len(dataset)
    names = [v.name for v in views]
    total: np.ndarray | None = None
    view_top1 = {v: np.empty(n, dtype=np.int64) for v in names}
    without_top1 = {v: np.empty(n, dtype=np.int64) for v in names} if len(views) > 1 else {}
    start = 0
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        per_view = []
        for view in views:
            x = batch[view.base.name].to(device, non_blocking=True)
            if view.flip:
                x = torch.flip(x, dims=[-1])
            per_view.append(model(x).float())
        stacked = torch.stack(per_view)  # (V, B, K)
        summed = stacked.sum(0)
        stop = start + stacked.shape[1]
        for name, logits in zip(names, stacked, strict=True):
            view_top1[name][start:stop] = logits.argmax(1).cpu().numpy()
        if without_top1:
            for name, logits in zip(without_top1, stacked, strict=True):
                without_top1[name][start:stop] = (summed - logits).argmax(1).cpu().numpy()
        mean = (summed / len(views)).cpu().numpy()
        if total is None:
            total = np.empty((n, mean.shape[1]), dtype=np.float32)
        total[start:stop] = mean
        start = stop
    if total is None:
        raise ValueError(f"{desc}: no rows to predict")
    return Prediction(total, view_top1, without_top1)
