"""The evaluate stage's work: one member's checkpoint of one phase -> metrics, logits, plots.

Outputs (paths come from the stage's command line):

- metrics JSON: ``val.*``, ``test.*`` of the single centre crop at the training resolution (the
  paper's protocol, so ``test.top1`` compares with Table 1), with ``test.public.*``/
  ``test.private.*`` (the local Kaggle leaderboard), head/tail and in-shop/customer slices; and
  ``val.tta.*``/``test.tta.*`` of the TTA average the submission uses, with ``tta.views``: top-1
  of every view alone, of all views but one, and of all together. One file per member and phase, so
  ``dvc metrics show`` lists base -> +balanced finetune -> +accuracy loss as rows: Table 1.
- predictions ``.npz``: the top-k of the TTA-averaged val and test logits with names, labels and
  the label -> SKU map, the ensemble's input (``products10k.scores``: bounded at any class
  count; metrics, gallery and plots are computed from the same exact top-k).
- plots: per-group accuracy and the most confused SKU pairs (CSV for ``dvc plots``), and a PNG
  gallery of the most confident test errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from products10k import common
from products10k.config import EvaluateConfig, TTAConfig
from products10k.config.stage import StageFiles, option
from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared
from products10k.contracts.shards import ImageStore
from products10k.dist.devices import amp_dtype, eval_workers, host_cores, resolve_device
from products10k.dist.group import DistInfo
from products10k.evaluation.gallery import draw_gallery, encode_png, worst_errors
from products10k.evaluation.predict import predict_sharded
from products10k.evaluation.views import build_views
from products10k.folds import check_folds, fold_dir, held_out, out_of_fold
from products10k.metrics import confused_pairs, per_group_table, split_metrics
from products10k.models.checkpoint import load_member_checkpoint
from products10k.scores import SplitScores, concat_scores, mean_scores, save_predictions

log = logging.getLogger(__name__)


def tta_metrics(pred, rows: pd.DataFrame, n_train: dict, tail_max_images: int) -> dict:
    """The TTA average's headline figures and what each view adds (``<split>.tta.*``)."""
    full = split_metrics(pred.scores.topk_labels, rows, n_train, tail_max_images)
    out = {k: full[k] for k in ("top1", "top5")}
    for part in ("public", "private", "head", "tail"):
        if part in full:
            out[part] = {"top1": full[part]["top1"]}
    out["views"] = pred.tta_report(rows["label"].to_numpy())
    return out


@dataclass
class EvalFiles(StageFiles):
    """The evaluate stage's files (its command line: stages/evaluate.py)."""

    checkpoint: Path = option("best.pt of the phase")
    label_map: Path = option("prepared label_map.csv")
    train: Path = option("train CSV (gallery exemplars of each SKU)")
    val: Path = option("val CSV")
    test: Path = option("test CSV")
    images_root: Path = option("folder holding images/shard-*.bin")
    metrics: Path = option("output: metrics JSON")
    predictions: Path = option("output: predictions .npz (val and test)")
    per_group: Path = option("output: per-group CSV")
    confused: Path = option("output: most confused pairs CSV")
    gallery: Path = option("output: error gallery PNG")


def evaluate_phase(
    member: str,
    phase: str,
    files: EvalFiles,
    cfg: EvaluateConfig,
    tta: TTAConfig,
    folds: int,
    info: DistInfo | None = None,
) -> dict | None:
    """Evaluate one member's checkpoint of one phase; write every output; return the metrics.

    Under cv (``folds`` K >= 2) val is out of fold: each fold's model predicts the val rows it held
    out (products10k/folds.py), and test is the K fold models' average; the refit
    (``checkpoint`` itself) is scored on test alone (``test_refit``: the model the index and export
    use). Under torchrun (``info``) every rank predicts its shard of val and test; rank 0 merges
    them, computes the metrics and writes every output, and the other ranks return None.
    """
    info = info or DistInfo()
    checkpoint, label_map_path, images_root = files.checkpoint, files.label_map, files.images_root
    val_path, test_path = files.val, files.test
    label_map = read_label_map(label_map_path, LABEL_MAP_ALL_COLUMNS)
    val = read_prepared(val_path, label_map, allow_empty=True)
    check_folds(val, folds, val_path)
    val = out_of_fold(val, folds)
    test = read_prepared(test_path, label_map, usage=True, allow_empty=True)
    run = _Run(member, phase, label_map, images_root, cfg, tta, info)
    splits = {"val": (val, val_path), "test": (test, test_path)}
    if folds:
        scores, meta, extra = _cross_validated(run, checkpoint, label_map_path, splits, folds)
        blocks = None
    else:
        results, meta = run.predict(checkpoint, label_map_path, splits)
        scores = {s: r[:2] for s, r in results.items()}
        blocks, extra = {s: r[2] for s, r in results.items()}, {}  # one model: with the views report
    if not info.is_main:
        return None
    if blocks is None:
        blocks = {s: run.metrics(scores[s], splits[s][0]) for s in scores}
    (val_scores, _), (test_scores, test_single) = scores["val"], scores["test"]
    metrics = {
        **blocks,
        **extra,
        "views": len(run.views(meta)),
        "epoch": int(meta.get("epoch", -1)),
        "resolution": int(meta["resolution"]),
    }
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    single_top1 = test_single.topk_labels[:, 0] if len(test_single) else None
    save_predictions(files.predictions, val=val_scores, test=test_scores, skus=skus, single_top1=single_top1)

    _write_plots(files, test_single, test, label_map, cfg, f"{member}/{phase}")

    common.write_json(files.metrics, metrics)
    log.info(
        "%s/%s: val top1 %.4f, test top1 %.4f single crop / %.4f TTA (public %.4f, private %.4f)%s",
        member,
        phase,
        metrics["val"].get("top1", float("nan")),
        metrics["test"].get("top1", float("nan")),
        metrics["test"]["tta"].get("top1", float("nan")),
        metrics["test"].get("public", {}).get("top1", float("nan")),
        metrics["test"].get("private", {}).get("top1", float("nan")),
        f"; val out of {folds} folds, test their average, the refit alone {extra['test_refit']['top1']:.4f}"
        if folds
        else "",
    )
    return metrics


@dataclass
class _Run:
    """What every model of one evaluate stage is predicted with: the views, the loader settings."""

    member: str
    phase: str
    label_map: pd.DataFrame
    images_root: str | Path
    cfg: EvaluateConfig
    tta: TTAConfig
    info: DistInfo

    def views(self, meta: dict):
        return build_views(self.tta, int(meta["resolution"]), meta.get("resize"), meta.get("normalize"))

    def predict(self, checkpoint, label_map_path, splits: dict, fold: int | None = None):
        """One checkpoint's (TTA scores, single-crop scores, metrics) per split, and its metadata."""
        model, meta = load_member_checkpoint(
            checkpoint, self.member, self.phase, self.label_map, label_map_path
        )
        resolution = int(meta["resolution"])
        normalize = meta.get("normalize")  # None in checkpoints from before it was stored: ImageNet's
        views = self.views(meta)
        # the paper's protocol: one centre crop at the training resolution, no flip
        single = build_views(
            TTAConfig(scales=(1.0,), crops="center", flip=False), resolution, meta.get("resize"), normalize
        )[0]
        name = f"{self.member}/{self.phase}" + (f"/fold{fold}" if fold is not None else "")
        log.info("%s: %d TTA views: %s", name, len(views), ", ".join(v.name for v in views))
        return _predict_splits(
            model, splits, self.label_map, self.images_root, views, single, self.cfg, name, self.info
        ), meta

    def metrics(self, scores: tuple, rows: pd.DataFrame) -> dict:
        """A split's metrics block from several models' merged scores: the single crop's, with the
        TTA average's under ``tta`` (the views report is per model: left out)."""
        tta_scores, single = scores
        if not len(rows):
            return {"n": 0}
        n_train = dict(zip(self.label_map["label"], self.label_map["n_train"], strict=True))
        out = split_metrics(single.topk_labels, rows, n_train, self.cfg.tail_max_images)
        full = split_metrics(tta_scores.topk_labels, rows, n_train, self.cfg.tail_max_images)
        out["tta"] = {k: full[k] for k in ("top1", "top5")}
        out["tta"] |= {
            part: {"top1": full[part]["top1"]}
            for part in ("public", "private", "head", "tail")
            if part in full
        }
        return out


def _cross_validated(run: _Run, checkpoint, label_map_path, splits: dict, folds: int):
    """Each fold's model on the val rows it held out and on test; the refit on test. Rank 0 gets
    the out-of-fold val scores, the fold ensemble's test scores and the refit's test metrics."""
    val, val_path = splits["val"]
    parts, meta = [], None
    for fold in range(folds):
        fold_splits = {"val": (held_out(val, fold), val_path), "test": splits["test"]}
        results, meta = run.predict(fold_dir(Path(checkpoint), fold), label_map_path, fold_splits, fold)
        parts.append(results)
    refit, refit_meta = run.predict(checkpoint, label_map_path, {"test": splits["test"]})
    if not run.info.is_main:
        return None, meta, None
    num_classes, k = len(run.label_map), run.cfg.top_k
    scores = {
        "val": tuple(concat_scores([p["val"][i] for p in parts]) for i in (0, 1)),
        "test": tuple(mean_scores([p["test"][i] for p in parts], num_classes, k) for i in (0, 1)),
    }
    test_refit = refit["test"][2]
    extra = {
        "cv": {
            "folds": folds,
            "val": "out of fold",
            "test": f"the mean of the {folds} fold models",
            # each fold model alone on test: what the mean adds over its members
            "test_fold_top1": [round(p["test"][2].get("top1", float("nan")), 6) for p in parts],
        },
        "test_refit": {
            key: test_refit[key] for key in ("top1", "top5", "public", "private") if key in test_refit
        },
    }
    return scores, refit_meta, extra


def _predict_splits(
    model, splits: dict, label_map, images_root, views, single, cfg: EvaluateConfig, name: str, info: DistInfo
):
    """Per split: (TTA scores, single-crop scores, metrics); an empty val split gets empty scores.
    Rank 0 gets every split's merged results; other ranks get an empty dict."""
    device = resolve_device(cfg.device)
    cores = host_cores()  # ranks share the host
    kw = dict(
        top_k=cfg.top_k,
        batch_size=cfg.batch_size,
        num_workers=eval_workers(cfg.num_workers, device, cores),
        device=device,
        amp=amp_dtype(cfg.amp, device),
        single=single,
        info=info,
        num_classes=len(label_map),
    )
    n_train = dict(zip(label_map["label"], label_map["n_train"], strict=True))
    results = {}
    for split, (rows, path) in splits.items():
        if split == "val" and not len(rows):  # prepare.val_fraction: 0; the ensemble uses equal weights
            log.info("%s: no %s rows; its metrics are left out", path, split)
            empty = SplitScores.from_logits([], [], np.zeros((0, len(label_map)), np.float32), cfg.top_k)
            results[split] = (empty, empty, {"n": 0})
            continue
        pred = predict_sharded(model, rows, images_root, views, desc=f"{name} {split}", where=str(path), **kw)
        if pred is None:  # not rank 0: its shard went to rank 0
            continue
        # test.top1 etc: the single centre crop (comparable with the paper); test.tta.*: the TTA average
        block = split_metrics(pred.single.topk_labels, rows, n_train, cfg.tail_max_images)
        block["tta"] = tta_metrics(pred, rows, n_train, cfg.tail_max_images)
        results[split] = (pred.scores, pred.single, block)
    return results


def _write_plots(files: EvalFiles, test_single, test, label_map, cfg, name: str):
    """Per-group top-1, confused pairs and the error gallery, all of the single centre crop (the
    figure test.top1 reports)."""
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    test_top = test_single.topk_labels
    common.write_csv(files.per_group, per_group_table(test_top, test))
    sku_group = dict(zip(label_map["sku"], label_map["group"], strict=True))
    pairs = confused_pairs(test_top[:, 0], test["label"].to_numpy(), skus, sku_group, top=cfg.top_confused)
    common.write_csv(files.confused, pairs)

    train = read_prepared(files.train, label_map)
    exemplars = train.drop_duplicates("label", keep="first").set_index("label")
    errors = worst_errors(test_single, cfg.gallery_size)
    title = f"{name}: {len(errors)} most confident test errors"
    image = draw_gallery(
        errors, test, exemplars, skus, ImageStore(files.images_root), cfg.gallery_tile, title
    )
    common.write_bytes(files.gallery, encode_png(image))
