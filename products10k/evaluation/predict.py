"""Batched inference with TTA over prepared images, streamed into top-k scores.

Each image is decoded once; every base view (scale x crop) is produced from that decode and the
flipped copies are made on the batch tensor. Nothing (N, K)-sized is ever held: each batch's
view-averaged logits are reduced at once to their top-k, log-sum-exp and true-label log-prob
(``products10k.predictions.TopKWriter``), and the per-view and leave-one-view-out reports to an
argmax per row. Memory is O(batch x K + N x k) whatever the class count (55k x 9.7k test logits
would be 2.1 GB in float32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from products10k.common import DataError
from products10k.data.datasets import PreparedImageDataset
from products10k.dist.devices import host_transfer, to_inference, to_model_input
from products10k.dist.group import DistInfo, gather_rows, shard_of
from products10k.evaluation.views import View, base_views
from products10k.scores import SplitScores, TopKWriter


class ViewsDataset(Dataset):
    """Rows of a prepared CSV as ``{base view name: CHW tensor}`` (one decode per image)."""

    def __init__(self, df: pd.DataFrame, images_root: str | Path, views: list[View]):
        self.bases = base_views(views)  # distinct base views, each computed once per image
        # A reduced JPEG decode is allowed only down to the LARGEST view's resize: every view is
        # then made by downscaling, never by upsampling a decode that was too small for it.
        min_side = max(b.resize for b in self.bases)
        self.images = PreparedImageDataset(df, images_root, transform=None, min_side=min_side)
        self.transforms = [(b.name, b.transform()) for b in self.bases]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images.load(index)
        return {name: tf(image) for name, tf in self.transforms}


@dataclass
class Prediction:
    """One split: top-k of the mean logits over the TTA views, of the single centre crop, and
    the per-view and leave-one-out argmax."""

    scores: SplitScores  # the TTA average
    single: SplitScores | None = None  # the single view asked for (the paper's centre crop)
    view_top1: dict[str, np.ndarray] = field(default_factory=dict)  # view -> (N,) argmax alone
    without_top1: dict[str, np.ndarray] = field(default_factory=dict)  # view -> argmax of the rest

    def tta_report(self, labels: np.ndarray) -> dict:
        """Top-1 of each view alone, of all views but one, and of all views together."""
        labels = np.asarray(labels)
        report = {"all": float((self.scores.topk_labels[:, 0] == labels).mean())}
        for name, pred in self.view_top1.items():
            report[name] = float((pred == labels).mean())
        for name, pred in self.without_top1.items():
            report[f"without_{name}"] = float((pred == labels).mean())
        return report


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    df: pd.DataFrame,
    images_root: str | Path,
    views: list[View],
    *,
    top_k: int,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    desc: str = "predict",
    where: str = "",
    single: View | None = None,
    progress: bool = True,
) -> Prediction:
    """Run ``model`` over the rows of ``df`` (``name``, ``label``, image location) with every view.

    ``single``: one more view whose own top-k is kept as well (the paper's single centre crop at
    the training resolution); it costs no extra forward pass when it is one of ``views``.

    ``amp``: an autocast dtype (bf16/fp16 on CUDA) for the backbone; the model's head computes
    in float32 (``Products10kNet``), so rankings over thousands of close logits are not rounded.
    """
    if len(df) == 0:
        raise DataError(f"{where or desc}: no rows to predict (the split is empty)")
    device = torch.device(device)
    flags = host_transfer(device)
    model = to_inference(model, device)
    extra = single is not None and single not in views
    dataset = ViewsDataset(df, images_root, [*views, single] if extra else views)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=flags["pin_memory"],
        persistent_workers=False,
    )
    n = len(dataset)
    labels = df["label"].to_numpy(dtype=np.int64)
    names = [v.name for v in views]
    writer: TopKWriter | None = None
    single_writer: TopKWriter | None = None
    view_top1 = {v: np.empty(n, dtype=np.int64) for v in names}
    without_top1 = {v: np.empty(n, dtype=np.int64) for v in names} if len(views) > 1 else {}
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    start = 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=not progress)
    for batch in bar:
        stacked = _view_logits(model, batch, views, device, flags, autocast)  # (V, B, K) on the device
        summed = stacked.sum(0)
        stop = start + stacked.shape[1]
        for name, logits in zip(names, stacked, strict=True):
            view_top1[name][start:stop] = logits.argmax(1).cpu().numpy()
        if without_top1:
            for name, logits in zip(without_top1, stacked, strict=True):
                without_top1[name][start:stop] = (summed - logits).argmax(1).cpu().numpy()
        mean = (summed / len(views)).cpu().numpy()
        if writer is None:
            writer = TopKWriter(n, top_k, mean.shape[1])
            single_writer = TopKWriter(n, top_k, mean.shape[1]) if single is not None else None
        writer.add(start, mean, labels[start:stop])
        if single_writer is not None:
            if extra:
                one = _view_logits(model, batch, [single], device, flags, autocast)[0]
            else:
                one = stacked[views.index(single)]
            single_writer.add(start, one.cpu().numpy(), labels[start:stop])
        start = stop
    names = df["name"].astype(str).to_numpy()
    single_scores = single_writer.result(names, labels) if single_writer is not None else None
    return Prediction(writer.result(names, labels), single_scores, view_top1, without_top1)


def _view_logits(model, batch: dict, views: list[View], device, flags: dict, autocast) -> torch.Tensor:
    """The float32 logits of every view of one batch, stacked: (views, batch, classes)."""
    per_view = []
    for view in views:
        x = to_model_input(batch[view.base.name], device, flags)
        if view.flip:
            x = torch.flip(x, dims=[-1])
        with autocast:
            per_view.append(model(x).float())
    return torch.stack(per_view)


def predict_sharded(
    model: torch.nn.Module,
    df: pd.DataFrame,
    images_root: str | Path,
    views: list[View],
    *,
    info: DistInfo,
    num_classes: int,
    top_k: int,
    batch_size: int,
    single: View | None = None,
    **kw,
) -> Prediction | None:
    """:func:`predict` over this rank's shard of ``df``, merged on rank 0 (None on other ranks).

    Under torchrun each rank runs whole batches of its own contiguous rows (``shard_of``); rank 0
    receives the others' top-k and argmax rows and returns the Prediction of all of ``df``, the
    same arrays one process computes. A single process predicts everything itself.
    """
    rows = df.iloc[shard_of(len(df), batch_size, info)]
    common = dict(top_k=top_k, batch_size=batch_size, single=single, progress=info.is_main, **kw)
    if len(rows):
        pred = predict(model, rows, images_root, views, **common)
    else:  # a rank past the last batch still takes part in the merge, with no rows
        pred = _empty_prediction(views, single, top_k, num_classes)
    if not info.enabled:
        return pred
    merged = gather_rows(_prediction_arrays(pred), len(df), batch_size, info)
    return None if merged is None else _prediction_from_arrays(merged, df, pred)


def _empty_prediction(views: list[View], single: View | None, top_k: int, num_classes: int) -> Prediction:
    def empty() -> SplitScores:
        return TopKWriter(0, top_k, num_classes).result(np.array([], dtype=object), np.array([], np.int64))

    names = [v.name for v in views]
    without = {v: np.empty(0, np.int64) for v in names} if len(views) > 1 else {}
    return Prediction(
        empty(), empty() if single is not None else None, {v: np.empty(0, np.int64) for v in names}, without
    )


_SCORE_ARRAYS = ("topk_labels", "topk_logits", "logsumexp", "label_logprob", "prob_error")


def _prediction_arrays(pred: Prediction) -> dict[str, np.ndarray]:
    """A Prediction's per-row arrays by name (names and labels are rank 0's own ``df``)."""
    out = {}
    for part in ("scores", "single"):
        scores = getattr(pred, part)
        if scores is not None:
            out.update({f"{part}.{a}": getattr(scores, a) for a in _SCORE_ARRAYS})
    out.update({f"view_top1.{v}": a for v, a in pred.view_top1.items()})
    out.update({f"without_top1.{v}": a for v, a in pred.without_top1.items()})
    return out


def _prediction_from_arrays(arrays: dict[str, np.ndarray], df: pd.DataFrame, like: Prediction) -> Prediction:
    """The Prediction of all of ``df`` from the merged arrays, keyed and ordered as ``like`` (the
    views' order is the metrics' key order)."""
    names = np.asarray(df["name"].astype(str).to_numpy()).astype(str)  # as TopKWriter.result
    labels = df["label"].to_numpy(dtype=np.int64)

    def scores(part: str) -> SplitScores | None:
        if f"{part}.topk_labels" not in arrays:
            return None
        return SplitScores(names, labels, **{a: arrays[f"{part}.{a}"] for a in _SCORE_ARRAYS})

    def per_view(prefix: str) -> dict[str, np.ndarray]:
        return {v: arrays[f"{prefix}.{v}"] for v in getattr(like, prefix)}

    return Prediction(scores("scores"), scores("single"), per_view("view_top1"), per_view("without_top1"))
