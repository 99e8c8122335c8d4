"""The evaluate stage's work: one member's checkpoint of one phase -> metrics, logits, plots.

Outputs (paths come from the stage's command line):

- metrics JSON: ``val.*``, ``test.*`` (with ``test.public.*``/``test.private.*``, the local
  Kaggle leaderboard), head/tail and in-shop/customer slices, and ``tta.*`` (val top-1 of every
  view alone, of all views but one, and of all together). One file per member and phase, so
  ``dvc metrics show`` lists base -> +balanced finetune -> +accuracy loss as rows: Table 1.
- predictions ``.npz``: TTA-averaged val and test logits with names, labels and the label -> SKU
  map, the ensemble's input.
- plots: per-group accuracy and the most confused SKU pairs (CSV for ``dvc plots``), and a PNG
  gallery of the most confident test errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from products10k import atomic
from products10k.checkpoint import check_labels, load_model
from products10k.errors import DataError, Products10kError
from products10k.gallery import draw_gallery, encode_png, worst_errors
from products10k.metrics import confused_pairs, per_group_table, split_metrics, topk_indices
from products10k.params import EvaluateConfig, TTAConfig
from products10k.predict import predict, resolve_device
from products10k.predictions import read_label_map, save_predictions
from products10k.storage import ImageStore
from products10k.tta import build_views

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("name", "label", "sku", "group", "domain", "shard", "offset", "length", "width", "height")


def _plain(value):
    """A numpy scalar as the Python value it holds (error messages show 7, not np.int64(7))."""
    return value.item() if isinstance(value, np.generic) else value


def read_split(path: str | Path, label_map: pd.DataFrame, usage: bool = False) -> pd.DataFrame:
    """A prepared val/test CSV, checked against the label map.

    ``label`` must be a label of the map, or -1 for a test SKU the training set lacks (such rows
    count as errors); ``sku`` must agree with the map's SKU of that label.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared CSV not found (run the prepare stage)")
    df = pd.read_csv(path, dtype={"name": str})
    need = list(SPLIT_COLUMNS) + (["Usage"] if usage else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (have: {', '.join(df.columns)})")
    labels = pd.to_numeric(df["label"], errors="coerce")
    bad = np.flatnonzero(
        labels.isna().to_numpy() | (labels < -1).to_numpy() | (labels >= len(label_map)).to_numpy()
    )
    if len(bad):
        raise DataError(
            f"{path}: row {bad[0] + 2} column 'label' is {_plain(df['label'].iloc[bad[0]])!r}, "
            f"expected -1 or a label 0..{len(label_map) - 1} of the label map"
        )
    df["label"] = labels.astype(np.int64)
    known = df["label"].to_numpy() >= 0
    map_sku = label_map["sku"].to_numpy()[df["label"].to_numpy()[known]]
    mismatch = np.flatnonzero(map_sku != df["sku"].to_numpy()[known])
    if len(mismatch):
        row = int(np.flatnonzero(known)[mismatch[0]])
        raise DataError(
            f"{path}: row {row + 2}: label {df['label'].iloc[row]} has sku {df['sku'].iloc[row]}, "
            f"but the label map says sku {map_sku[mismatch[0]]} (prepared files from different runs?)"
        )
    return df


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


@dataclass
class EvalOutputs:
    metrics: Path
    predictions: Path
    per_group: Path
    confused: Path
    gallery: Path


def evaluate_phase(
    *,
    member: str,
    phase: str,
    checkpoint: str | Path,
    label_map_path: str | Path,
    train_path: str | Path,
    val_path: str | Path,
    test_path: str | Path,
    images_root: str | Path,
    outputs: EvalOutputs,
    cfg: EvaluateConfig,
    tta: TTAConfig,
) -> dict:
    """Evaluate one member's checkpoint of one phase; write every output; return the metrics."""
    label_map = read_label_map(label_map_path)
    val = read_split(val_path, label_map)
    test = read_split(test_path, label_map, usage=True)
    model, meta = load_member_checkpoint(checkpoint, member, phase, label_map, label_map_path)

    resolution = int(meta["resolution"])
    views = build_views(tta, resolution, meta.get("resize"))
    log.info("%s/%s: %d TTA views: %s", member, phase, len(views), ", ".join(v.name for v in views))
    device = resolve_device(cfg.device)
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    val_pred = predict(model, val, images_root, views, desc=f"{member}/{phase} val", **kw)
    test_pred = predict(model, test, images_root, views, desc=f"{member}/{phase} test", **kw)

    n_train = dict(zip(label_map["label"], label_map["n_train"], strict=True))
    val_top = topk_indices(val_pred.logits, 5)
    test_top = topk_indices(test_pred.logits, 5)
    metrics = {
        "val": split_metrics(val_top, val, n_train, cfg.tail_max_images),
        "test": split_metrics(test_top, test, n_train, cfg.tail_max_images),
        "tta": {"val": val_pred.tta_report(val["label"].to_numpy()), "views": len(views)},
        "epoch": int(meta.get("epoch", -1)),
        "resolution": resolution,
    }

    skus = label_map["sku"].to_numpy(dtype=np.int64)
    save_predictions(
        outputs.predictions,
        val_logits=val_pred.logits,
        val_names=val["name"].astype(str).to_numpy(),
        val_labels=val["label"].to_numpy(),
        test_logits=test_pred.logits,
        test_names=test["name"].astype(str).to_numpy(),
        test_labels=test["label"].to_numpy(),
        skus=skus,
    )

    atomic.write_csv(outputs.per_group, per_group_table(test_top, test))
    sku_group = dict(zip(label_map["sku"], label_map["group"], strict=True))
    pairs = confused_pairs(test_top[:, 0], test["label"].to_numpy(), skus, sku_group, top=cfg.top_confused)
    atomic.write_csv(outputs.confused, pairs)

    train = pd.read_csv(train_path, dtype={"name": str})
    for col in ("label", "shard", "offset", "length"):
        if col not in train.columns:
            raise DataError(f"{train_path}: missing column '{col}' (have: {', '.join(train.columns)})")
    exemplars = train.drop_duplicates("label", keep="first").set_index("label")
    errors = worst_errors(test_pred.logits, test["label"].to_numpy(), cfg.gallery_size)
    title = f"{member}/{phase}: {len(errors)} most confident test errors"
    image = draw_gallery(errors, test, exemplars, skus, ImageStore(images_root), cfg.gallery_tile, title)
    atomic.write_bytes(outputs.gallery, encode_png(image))

    atomic.write_json(outputs.metrics, metrics)
    log.info(
        "%s/%s: val top1 %.4f, test top1 %.4f (public %.4f, private %.4f)",
        member,
        phase,
        metrics["val"].get("top1", float("nan")),
        metrics["test"].get("top1", float("nan")),
        metrics["test"].get("public", {}).get("top1", float("nan")),
        metrics["test"].get("private", {}).get("top1", float("nan")),
    )
    return metrics
