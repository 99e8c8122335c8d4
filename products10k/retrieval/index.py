"""The index stage's work: one member's checkpoint -> gallery index, kNN and fused predictions.

1. Embed every training image (``embed_rows``) into an exact inner-product Faiss index, saved
   with its labels, the label -> SKU map and the checkpoint it came from (``models/<m>/index``).
2. Embed val and test and classify them by kNN over that gallery.
3. Fuse the kNN probabilities with the classifier's (the evaluate stage's TTA'd predictions of the
   same member and phase), the weight fitted on val; write the fused predictions in the evaluate
   stage's file format (``predictions/fused/<m>.npz``), which ``submit.phase: fused`` reads. A
   second weight is fitted on val for deploy: on the classifier's single centre crop, computed in
   the embedding pass, which is what ``products10k-predict --mode fused`` has (the index's
   meta.json ``fusion_weight``).
4. Metrics: classifier, kNN and fused top-1/top-5, head and tail SKUs, val and test, and both
   fitted weights (``metrics/<m>/retrieval.json``). Val's fused predictions are cross-fitted: each
   tenth of val is fused with the weight fitted on the other nine (test: the weight of all val), so
   the submit stage reads the fused candidate's val estimate out of sample, as the classifier's;
   ``fusion_weight_cross_fit`` shows the parts' weights and val's top-1 both ways.

Val queries are never in the gallery (it is the training split only), so the weight is fitted on
images the index has not seen, as test images are. SKUs below ``prepare.val_min_images`` give no
val images (prepare keeps every image of them for training), so the weight is fitted mostly on head
SKUs; the test metrics report the tail (<= ``evaluate.tail_max_images`` images in train.csv)
separately.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from products10k import common
from products10k.config import EvaluateConfig, RetrievalConfig
from products10k.config.stage import StageFiles, option
from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared
from products10k.contracts.shards import ImageStore
from products10k.dist.devices import amp_dtype, eval_workers, host_cores, resolve_device
from products10k.dist.group import DistInfo, gather_rows, shard_of
from products10k.estimate import paired_gain, val_weights
from products10k.folds import check_folds, fold_dir, fold_view, out_of_fold
from products10k.imaging.images import MAX_PIXELS_CEILING, ImageLimits
from products10k.knn import (
    VOTES,
    Gallery,
    Prototypes,
    build_gallery,
    knn_scores,
    knn_search,
    save_gallery,
    thumbnail_jpeg,
    voted,
)
from products10k.metrics import split_metrics
from products10k.models.checkpoint import load_member_checkpoint
from products10k.retrieval.embed import embed_rows
from products10k.retrieval.fusion import fused_predictions, fusion_weight
from products10k.scores import (
    SplitScores,
    TopKWriter,
    concat_scores,
    load_predictions,
    mean_scores,
    save_predictions,
)

log = logging.getLogger(__name__)


@dataclass
class IndexFiles(StageFiles):
    """The index stage's files (its command line: stages/index.py)."""

    checkpoint: Path = option("best.pt of retrieval.phase")
    label_map: Path = option("prepared label_map.csv")
    train: Path = option("train CSV: the gallery")
    val: Path = option("val CSV: fits the fusion weight")
    test: Path = option("test CSV")
    images_root: Path = option("folder holding images/shard-*.bin")
    classifier: Path = option("evaluate's predictions of the same member and retrieval.phase")
    index: Path = option("output folder: index.faiss, gallery.npz, meta.json")
    fused: Path = option("output: fused predictions (.npz)")
    metrics: Path = option("output: metrics JSON")
    knn: Path | None = option("output: the kNN's own predictions (.npz), a candidate of submit.phase: auto",
                              optional=True)  # fmt: skip


def build_index(
    member: str,
    files: IndexFiles,
    cfg: RetrievalConfig,
    evaluate: EvaluateConfig,
    folds: int,
    info: DistInfo | None = None,
) -> dict | None:
    """Run the stage for one member; write index, fused predictions and metrics; return the metrics.

    Under cv (``folds`` K >= 2), val's kNN is out of fold: each fold's model searches the val rows it
    held out in a gallery of its own training rows, and test's kNN is the K folds' average; the
    saved index is the refit's (``checkpoint``), embedding every training image. Under torchrun
    (``info``) every rank embeds its shard of train, val and test; rank 0 merges the vectors, builds
    the index, searches and writes every output; the other ranks return None.
    """
    info = info or DistInfo()
    label_map = read_label_map(files.label_map, LABEL_MAP_ALL_COLUMNS)
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    splits = _read_splits(files, label_map)
    check_folds(splits["val"], folds, files.val)
    splits["val"] = out_of_fold(splits["val"], folds)
    classifier = load_predictions(files.classifier, member)
    searched = _fold_knn(member, files, splits, label_map, cfg, evaluate, folds, info) if folds else None
    model, meta = load_member_checkpoint(files.checkpoint, member, cfg.phase, label_map, files.label_map)
    embed = _embedder(model, meta, files.images_root, cfg, evaluate, f"{member}/{cfg.phase}", info)

    # every rank embeds its shard (a single process: all rows); rank 0 gets them all and builds the
    # gallery before the queries are embedded, so the train vectors are held once at a time
    gallery = _gallery(embed, splits["train"], skus, _index_meta(member, files.checkpoint, meta, cfg), info)
    if searched is None:
        # the classifier's single centre crop of val, from the embedding pass: what predict computes
        val_vectors, single_val = embed(splits["val"], "val", with_logits=True)
        test_vectors, _ = embed(splits["test"], "test")
        if info.is_main:
            knn, nearest = {}, {}
            for split, vectors in (("val", val_vectors), ("test", test_vectors)):
                knn[split], nearest[split] = _search(gallery, vectors, splits[split], cfg)
                _check_same_rows(classifier, split, knn[split], files.classifier)  # before the next search
    elif info.is_main:
        knn, single_val, nearest = searched
        for split in knn:
            _check_same_rows(classifier, split, knn[split], files.classifier)
    if not info.is_main:
        return None

    # Two weights: the pipeline fuses kNN with the evaluate stage's TTA-averaged scores, deploy with
    # one centre crop of the exported model, whose scores are less smooth: each is fitted on its own.
    # fitted on val weighted to the SKU mix test follows (evaluate.target_prior), as every val choice
    row_weight = val_weights(knn["val"].labels, label_map, evaluate.target_prior)
    weight = fusion_weight(classifier.val, knn["val"], member, "TTA", row_weight, cfg.unfitted_weight)
    deploy_weight = fusion_weight(
        single_val, knn["val"], member, "single-crop", row_weight, cfg.unfitted_weight
    )
    gallery.meta["fusion_weight"] = deploy_weight  # what products10k-predict --mode fused applies
    gallery.meta["fusion_weight_fitted_on"] = "val, single centre crop (as products10k-predict)"
    fused, cross_fit = fused_predictions(classifier, knn, weight, row_weight, len(skus), evaluate.top_k)

    metrics = {
        "fusion_weight": weight,
        "fusion_weight_single_crop": deploy_weight,
        "fusion_weight_cross_fit": cross_fit,
        "gallery": int(gallery.index.ntotal),
        "dim": int(gallery.index.d),
        **_split_metrics(classifier, knn, fused, splits, label_map, evaluate.tail_max_images),
        "nearest_train_similarity": _closeness(nearest, splits),
    }
    if searched is None and cfg.enrol_check_skus:  # under cv the refit's gallery has no val to query
        metrics["enrolment"] = enrolment_check(
            gallery, val_vectors, splits["val"], splits["train"], cfg, row_weight
        )
    save_gallery(gallery, files.index, thumbs=_thumbnails(splits["train"], files.images_root, skus))
    _write_scores(files, fused, knn, skus)
    common.write_json(files.metrics, metrics)
    _log_summary(member, metrics)
    return metrics


def _log_summary(member: str, metrics: dict) -> None:
    test = metrics["test"]
    if "top1" in test["knn"]:
        log.info(
            "%s: test top-1 classifier %.4f, kNN %.4f, fused %.4f (kNN weight %.3f)",
            member,
            test["classifier"]["top1"],
            test["knn"]["top1"],
            test["fused"]["top1"],
            metrics["fusion_weight"],
        )
    for kind, rule in metrics.get("enrolment", {}).get("by_vote", {}).items():
        log.info(
            "%s: enrolment check, %s vote: SKUs cut to %d photos named %.3f, the others %.3f",
            member,
            kind,
            metrics["enrolment"]["shots"],
            rule["enrolled"]["top1"],
            rule["trained"]["top1"],
        )


def _gallery(embed, rows, skus: np.ndarray, meta: dict, info: DistInfo):
    """The Faiss gallery of ``rows``' embeddings, on rank 0 (None elsewhere)."""
    vectors, _ = embed(rows, "train")
    if not info.is_main:
        return None
    gallery = build_gallery(vectors, rows["label"], rows["name"], skus, meta)
    log.info(
        "%s: index of %d training images x %d dims", meta["member"], gallery.index.ntotal, gallery.index.d
    )
    return gallery


def _fold_knn(member: str, files: IndexFiles, splits: dict, label_map, cfg, evaluate, folds: int, info):
    """Under cv: each fold's model embeds its own training rows as a gallery and searches the val rows
    it held out and test. Rank 0 gets the out-of-fold val kNN and single-crop classifier scores (val's
    order: products10k/folds.py) and the folds' mean test kNN; other ranks None."""
    skus = label_map["sku"].to_numpy(dtype=np.int64)
    found, nearest, single_val = {"val": [], "test": []}, {"val": [], "test": []}, []
    for fold in range(folds):
        checkpoint = fold_dir(files.checkpoint, fold)
        model, meta = load_member_checkpoint(checkpoint, member, cfg.phase, label_map, files.label_map)
        name = f"{member}/{cfg.phase}/fold{fold}"
        embed = _embedder(model, meta, files.images_root, cfg, evaluate, name, info)
        gallery_rows, held_out = fold_view(splits["train"], splits["val"], fold)
        gallery = _gallery(embed, gallery_rows, skus, _index_meta(member, checkpoint, meta, cfg), info)
        val_vectors, single = embed(held_out, "val", with_logits=True)
        test_vectors, _ = embed(splits["test"], "test")
        if info.is_main:
            for part, (scores, sims) in (
                ("val", _search(gallery, val_vectors, held_out, cfg)),
                ("test", _search(gallery, test_vectors, splits["test"], cfg)),
            ):
                found[part].append(scores)
                nearest[part].append(sims)
            single_val.append(single)
    if not info.is_main:
        return None
    knn = {
        "val": concat_scores(found["val"]),
        "test": mean_scores(found["test"], len(skus), found["test"][0].k),
    }
    log.info("%s: kNN of val out of %d folds (%d rows), test the folds' mean", member, folds, len(knn["val"]))
    # test's closeness: its median over the folds' galleries, each the size of val's
    test_sims = np.median(np.stack(nearest["test"]), axis=0)
    return knn, concat_scores(single_val), {"val": np.concatenate(nearest["val"]), "test": test_sims}


def enrolment_check(
    gallery, val_vectors: np.ndarray, val, train, cfg: RetrievalConfig, row_weight=None, seed: int = 0
) -> dict:
    """Enrolled-vs-trained top-1 on val, for each vote rule: ``cfg.enrol_check_skus`` SKUs chosen at
    random (``seed``) among those with more than ``cfg.enrol_shots`` training images and a val image
    are cut to their first ``enrol_shots`` gallery images (the others masked out of the search, not
    copied), as SKUs enrolled from a few photos would be; every val image is then searched. The
    model was trained on these SKUs, so their figure is optimistic for SKUs it never saw.

    ``row_weight`` (the val estimate's, to ``evaluate.target_prior``) weighs the rows as every val
    choice does: val follows train's SKU mix, where SKUs with many photos are most rows, and a rule
    that judges SKUs by a few photos costs those most; unweighted, the trained figure reads the
    head. Each rate also gives the unweighted ``top1_raw``."""
    shots = cfg.enrol_shots
    n_train = train["label"].value_counts()
    eligible = np.intersect1d(n_train[n_train > shots].index.to_numpy(), val["label"].unique())
    chosen = np.sort(
        np.random.default_rng(seed).choice(eligible, min(cfg.enrol_check_skus, len(eligible)), False)
    )
    if not len(chosen):
        return {"skus": 0, "note": f"no SKU has more than {shots} training images and a val image"}
    positions = np.arange(len(train))
    is_chosen = train["label"].isin(chosen).to_numpy()
    order = train.assign(position=positions)[is_chosen].sort_values(["label", "name"])
    masked = order.groupby("label").cumcount().to_numpy() >= shots  # beyond each one's first shots
    hidden = order["position"].to_numpy()[masked].astype(np.int64)
    keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(hidden))
    k = min(cfg.k, gallery.index.ntotal - len(hidden))
    sims, ids = gallery.index.search(
        np.ascontiguousarray(val_vectors), k, params=faiss.SearchParameters(sel=keep)
    )
    labels = val["label"].to_numpy()
    weight = np.ones(len(labels)) if row_weight is None else np.asarray(row_weight, dtype=np.float64)
    enrolled = np.isin(labels, chosen)
    out = {"skus": int(len(chosen)), "shots": shots, "val_rows": {"enrolled": int(enrolled.sum()),
           "trained": int((~enrolled).sum())}, "by_vote": {}}  # fmt: skip
    cut = _cut_prototypes(gallery, hidden)
    for kind in VOTES:
        rule = dict(temperature=cfg.temperature, smoothing=cfg.smoothing, names=val["name"], labels=labels)
        if kind == "centroid":
            scores = knn_scores(cut, val_vectors, k=cfg.k, kind=kind, batch=cfg.search_batch, **rule)
        else:
            scores = voted(gallery, gallery, val_vectors, sims, ids, kind=kind, shots=cfg.vote_shots,
                           hidden=hidden, **rule)  # fmt: skip
        hit = scores.topk_labels[:, 0] == labels
        parts = (("enrolled", enrolled), ("trained", ~enrolled))
        rates = {part: _rate(hit[rows], weight[rows]) for part, rows in parts}
        ratio = rates["enrolled"]["top1"] / rates["trained"]["top1"] if rates["trained"]["top1"] else None
        out["by_vote"][kind] = {**rates, "ratio": None if ratio is None else round(ratio, 3)}
    return out


def _cut_prototypes(gallery: Gallery, hidden: np.ndarray) -> Gallery:
    """``gallery`` whose SKU prototypes leave out the vectors at ``hidden`` (the centroid rule's view
    of the SKUs cut to a few photos); only the prototypes are searched in it."""
    whole = gallery.prototypes()
    vectors = gallery.index.reconstruct_batch(hidden) if len(hidden) else np.zeros((0, gallery.index.d))
    out = Prototypes.of(vectors, gallery.labels[hidden], gallery.num_classes)
    cut = Prototypes(whole.sums - out.sums, whole.counts - out.counts)
    return Gallery(gallery.index, gallery.labels, gallery.names, gallery.skus, {}).with_prototypes(cut)


def _rate(hit: np.ndarray, weight: np.ndarray) -> dict:
    """top-1 of ``hit`` weighted by ``weight`` with its standard error (paired_gain's sandwich
    variance against nothing), and the unweighted rate."""
    top1, se = paired_gain(hit, np.zeros(len(hit)), weight) if (weight > 0).any() else (0.0, 0.0)
    raw = float(hit.mean()) if len(hit) else 0.0
    se = round(se, 4) if np.isfinite(se) else None  # one row read wrong: no spread to measure
    return {"top1": round(top1, 4), "se": se, "top1_raw": round(raw, 4)}


def _read_splits(files: IndexFiles, label_map) -> dict:
    """train (the gallery), val (fits the fusion weight) and test, checked against the label map."""
    return {
        "train": read_prepared(files.train, label_map),
        "val": read_prepared(files.val, label_map, allow_empty=True),
        "test": read_prepared(files.test, label_map, usage=True, allow_empty=True),
    }


def _write_scores(files: IndexFiles, fused: dict, knn: dict, skus: np.ndarray) -> None:
    """The fused predictions (the submit stage's candidate) and, if asked for, the kNN's own."""
    save_predictions(files.fused, val=fused["val"], test=fused["test"], skus=skus)
    if files.knn is not None:
        save_predictions(files.knn, val=knn["val"], test=knn["test"], skus=skus)


def _search(gallery, vectors: np.ndarray, rows, cfg: RetrievalConfig) -> tuple[SplitScores, np.ndarray]:
    """One split's kNN scores (its vectors searched in the gallery, the neighbours' votes) and each
    query's cosine similarity to its nearest training image."""
    return knn_search(
        gallery,
        vectors,
        rows["name"],
        rows["label"],
        k=cfg.k,
        kind=cfg.vote,
        temperature=cfg.temperature,
        smoothing=cfg.smoothing,
        batch=cfg.search_batch,
        shots=cfg.vote_shots,
    )


def _closeness(nearest: dict, splits: dict) -> dict:
    """How close val's and test's images sit to their nearest training image in this model's
    embedding (cosine; overall and per domain). Val drawn from the same photo sessions as train
    would sit closer than test and read optimistic: the number that shows it (docs/retrieval.md)."""
    out = {}
    for split, sims in nearest.items():
        if not len(sims):
            continue
        domain = splits[split]["domain"].astype(str).to_numpy()
        out[split] = {
            "median": round(float(np.median(sims)), 4),
            "p90": round(float(np.quantile(sims, 0.9)), 4),
        }
        for name in ("inshop", "customer"):
            if (domain == name).any():
                out[split][f"{name}_median"] = round(float(np.median(sims[domain == name])), 4)
    return out


def _split_metrics(classifier, knn: dict, fused: dict, splits: dict, label_map, tail_max_images: int) -> dict:
    """Val's and test's metrics of the classifier, the kNN and the fusion of both."""
    n_train = dict(zip(label_map["label"], label_map["n_train"], strict=True))
    metrics = {}
    for split in ("val", "test"):
        scores = {"classifier": getattr(classifier, split), "knn": knn[split], "fused": fused[split]}
        metrics[split] = {
            name: _brief(split_metrics(s.topk_labels, splits[split], n_train, tail_max_images))
            for name, s in scores.items()
        }
    return metrics


def _thumbnails(train, images_root, skus: np.ndarray) -> dict[int, bytes]:
    """One small JPEG per SKU, from its first training image: what products10k-serve's page shows."""
    store = ImageStore(images_root)
    first = train.drop_duplicates("label")
    # the prepared images are the project's own JPEGs (already within params.yaml's limits): these
    # limits only have to admit them
    own = ImageLimits(max_pixels=MAX_PIXELS_CEILING, max_aspect_ratio=1000.0, max_file_bytes=1 << 30)
    return {
        int(skus[row.label]): thumbnail_jpeg(bytes(store.read_bytes(row.shard, row.offset, row.length)), own)
        for row in first.itertuples()
    }


def _embedder(model, meta, images_root, cfg: RetrievalConfig, evaluate: EvaluateConfig, name: str, info):
    """``embed(rows, split, with_logits)``: the (N, D) unit vectors of ``rows`` and, with
    ``with_logits``, the classifier's single-crop SplitScores of the same forward pass; each rank
    embeds its shard of whole batches, rank 0 gets all rows, the other ranks (None, None)."""
    device = resolve_device(evaluate.device)
    cores = host_cores()  # ranks share the host
    kw = dict(
        batch_size=cfg.batch_size,
        num_workers=eval_workers(evaluate.num_workers, device, cores),
        device=device,
        amp=amp_dtype(evaluate.amp, device),
        progress=info.is_main,
    )
    dim = int(model.backbone.num_features)
    num_classes = int(model.num_classes)

    def embed(rows, split: str, with_logits: bool = False):
        part = rows.iloc[shard_of(len(rows), cfg.batch_size, info)]
        labels = part["label"].to_numpy()
        writer = TopKWriter(len(part), evaluate.top_k, num_classes) if with_logits else None

        def on_logits(start: int, logits: np.ndarray) -> None:
            writer.add(start, logits, labels[start : start + len(logits)])

        arrays = {"vectors": np.zeros((0, dim), np.float32)}  # a rank with no rows, or an empty split
        if len(part):
            hook = on_logits if writer is not None else None
            desc = f"{name} embed {split}"
            arrays["vectors"] = embed_rows(model, meta, part, images_root, desc=desc, on_logits=hook, **kw)
        if writer is not None:
            arrays.update({a: getattr(writer, a) for a in _WRITER_ARRAYS})
        merged = gather_rows(arrays, len(rows), cfg.batch_size, info)
        if merged is None:
            return None, None
        if writer is None:
            return merged["vectors"], None
        single = TopKWriter(0, evaluate.top_k, num_classes)
        for a in _WRITER_ARRAYS:
            setattr(single, a, merged[a])
        return merged["vectors"], single.result(rows["name"], rows["label"])

    return embed


_WRITER_ARRAYS = ("topk_labels", "topk_logits", "logsumexp", "label_logprob")


def _index_meta(member: str, checkpoint: Path, meta: dict, cfg: RetrievalConfig) -> dict:
    """What the index was built from and how it votes: predict and enrol check and reuse it."""
    return {
        "member": member,
        "phase": cfg.phase,
        "checkpoint_sha256": common.file_sha256(checkpoint),
        "resolution": int(meta["resolution"]),
        "resize": meta.get("resize"),
        "normalize": meta.get("normalize"),
        "k": cfg.k,
        "vote": cfg.vote,
        "vote_shots": cfg.vote_shots,
        "temperature": cfg.temperature,
        "smoothing": cfg.smoothing,
    }


def _check_same_rows(classifier, split: str, knn: SplitScores, path: Path) -> None:
    names = getattr(classifier, split).names
    if not np.array_equal(names, knn.names):
        raise common.DataError(
            f"{path}: its {split} rows are not those of the prepared {split}.csv "
            "(an evaluate output from other data? re-run its evaluate stage)"
        )


def _brief(block: dict) -> dict:
    """top1/top5 and head/tail top-1 of a split_metrics block: three of them side by side stay readable."""
    out = {k: block[k] for k in ("top1", "top5") if k in block}
    for part in ("head", "tail"):
        if part in block:
            out[part] = {"top1": block[part]["top1"]}
    return out
