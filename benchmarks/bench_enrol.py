"""New SKUs without retraining, measured: hold K SKUs out of training entirely, enrol them into
the kNN index from at most ``--shots`` images each, and score their test images.

On the embedded default (params.yaml's synthetic data and training recipe) or, with ``--data
digits``, on real images (scikit-learn's handwritten digits, benchmarks/digits_data.py):

1. generate and prepare the data (the download and prepare stages, in a temporary folder);
2. pick ``--holdout`` SKUs at random (``--seed``) among those with >= ``--shots`` training
   images; drop every one of their training and val images; relabel the rest;
3. train the ``train`` phase on what is left (the stage script, params.yaml's recipe);
4. build the index of the remaining training images, fit the fusion weight on val (as the
   index stage does, once per vote rule), then enrol the held-out SKUs from their first
   ``--shots`` training images;
5. score every test image: top-1 and top-5 of the classifier on the SKUs the model was trained
   on, and of kNN and fusion (``knn.fuse_with_enrolled``, what products10k-predict and the service
   run) under each vote rule (``softmax``, ``count``, ``best``: knn.py) on the trained and on the
   held-out SKUs (the classifier cannot name those), each with a 95% interval; and what the
   enrolment costs the trained SKUs, split into the enrolled SKUs' group-mates and the rest
   (``cost_by_group``).

Steps 3-5 run once per ``--rows`` entry, each a way to get the embedding:

- ``imagenet``: the pretrained backbone as it comes, no training at all (the zero-training
  reference; its classifier head is untrained, so only kNN counts, and no fusion weight is fitted);
- ``linear``: params.yaml's recipe as it is (the default head);
- ``arcface`` / ``cosface``: the same with ``model.head`` set to that margin head;
- ``supcon``: ``linear`` plus the supervised contrastive loss on the embedding
  (``train.metric_loss_weight: 1``) over P x K batches (``train.sampler: pk``, 4 images per SKU):
  a metric-learning embedding, as PaddleClas PP-ShiTu trains its own; ``supcon@W`` at loss weight
  W; ``pk``: the same batches without the loss (what the sampler alone does); ``supcon-random``: the
  loss on the default's random batches; ``supcon-pairs``: on batches of 2 photos per SKU;
  ``frozen-bn``, ``pk-frozen-bn``, ``supcon-frozen-bn``: ``linear``, ``pk`` and ``supcon`` with
  BatchNorm's running statistics kept at ImageNet's (``train.freeze_bn``, params.yaml's value now:
  results files from before ran ``linear`` with it off); ``trained-bn``: with it off;
  ``supcon-group``: ``supcon`` with half of each batch's SKUs from its first SKU's product group
  (``train.pk_group_share: 0.5``: look-alikes side by side, hard negatives for the loss);
- ``concat``: ``linear``'s embedding beside ImageNet's (each unit vector scaled by 1/sqrt(2), so a
  cosine is the mean of the two), its classifier ``linear``'s.
- ``linear-stage`` / ``imagenet-stage``: that model's embedding taken one step earlier, from its
  backbone's last stage before the head convolution (timm ``forward_intermediates``; 320 channels
  against 1,280 for tf_efficientnet_lite0), average-pooled: less specialised to the trained SKUs.

Vote rules: votes.py's ``softmax``, ``count``, ``best``, ``centroid`` (each SKU by the cosine to
its prototype, the mean of its gallery vectors: one vector per SKU whatever its photo count) and
``expected_best`` (each SKU by the expected best match of ``retrieval.vote_shots`` of its photos),
and two this benchmark alone measures: ``expected_best@20`` (20 photos) and ``normalised[@k]`` (each
SKU among the k nearest photos' SKUs by its best match less its impostor baseline,
impostor_baseline: cohort score normalisation).

Writes benchmarks/results/enrol.json (``--out``) and prints the table for docs/retrieval.md.

    python benchmarks/bench_enrol.py --holdout 8 --shots 5 --rows imagenet,linear,arcface
    python benchmarks/bench_enrol.py --data digits --holdout 2 --out benchmarks/results/enrol_digits.json
    # a new product line, no trained group-mate left:
    python benchmarks/bench_enrol.py --whole-groups --rows imagenet,linear \\
        --out benchmarks/results/enrol_groups.json
    # every row at a higher resolution (the code that tells group-mates apart: ~5 px at 128)
    python benchmarks/bench_enrol.py --set train.resolution=192 --rows linear,frozen-bn \
        --out benchmarks/results/enrol_192.json
    # a larger synthetic set (192 SKUs, 96 twin pairs; --set reaches the data stages too), or the
    # user's own Products-10K folder (data.source=dir)
    python benchmarks/bench_enrol.py --set data.synthetic.num_groups=24 --rows linear \
        --out benchmarks/results/enrol_scale.json
    python benchmarks/bench_enrol.py --set data.source=dir --set data.dir=/data/products10k --rows linear
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.enrol_rules import (  # noqa: E402
    PHOTO_BUCKETS,
    RULES,
    doubt,
    doubt_of,
    gated,
    impostor_baseline,
    normalised_best,
    novelty,
    rates,
)
from benchmarks.enrol_tables import table  # noqa: E402
from benchmarks.harness import params as load_params  # noqa: E402
from benchmarks.harness import parse_sets, write_params, write_results  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from products10k.config import apply_overrides  # noqa: E402
from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared  # noqa: E402
from products10k.data.datasets import PreparedImageDataset  # noqa: E402
from products10k.data.transforms import embedding_transform  # noqa: E402
from products10k.ensemble import fit_fusion_weight  # noqa: E402
from products10k.knn import build_gallery, enrol, fuse_with_enrolled, knn_scores, search  # noqa: E402
from products10k.models.checkpoint import load_model  # noqa: E402
from products10k.retrieval.embed import embed_rows  # noqa: E402
from products10k.scores import SplitScores  # noqa: E402
from products10k.votes import FlatVectors  # noqa: E402


def run(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, *args], cwd=cwd, check=True)


def prepare_data(work: Path, data: str, params: dict) -> Path:
    """The download and prepare stages in ``work``: ``params``' synthetic data (``--set`` included:
    ``data.synthetic.num_groups=24`` generates a larger set), or the digits."""
    tree = json.loads(json.dumps(params))
    if data == "digits":
        from benchmarks.digits_data import write_digits

        write_digits(work / "digits")
        tree["data"].update({"source": "dir", "dir": str(work / "digits")})
    params_file = work / "params-data.yaml"
    write_params(params_file, tree)
    run(str(ROOT / "stages/download.py"), "--params", str(params_file), "--out", str(work / "raw"), cwd=work)
    run(str(ROOT / "stages/prepare.py"), "--params", str(params_file), "--raw", str(work / "raw"),
        "--out", str(work / "prepared"), cwd=work)  # fmt: skip
    return work / "prepared"


def hold_out(prepared: Path, out: Path, k: int, shots: int, seed: int, whole_groups: bool = False):
    """Reduced train/val/label map without ``k`` random SKUs (``whole_groups``: every SKU of random
    groups, until there are at least ``k``: a new product line, no trained look-alike of the same
    group left); their enrolment rows."""
    label_map = read_label_map(prepared / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    train = pd.read_csv(prepared / "train.csv", dtype={"name": str})
    val = pd.read_csv(prepared / "val.csv", dtype={"name": str})
    rng = np.random.default_rng(seed)
    if whole_groups:
        groups = rng.permutation(np.sort(train["group"].unique()))
        sizes = train.groupby("group")["sku"].nunique()[groups].cumsum().to_numpy()
        chosen = groups[: int(np.searchsorted(sizes, k)) + 1]
        held = np.sort(train.loc[train["group"].isin(chosen), "sku"].unique())
    else:
        counts = train["sku"].value_counts()
        eligible = np.sort(counts[counts >= shots].index.to_numpy())
        held = np.sort(rng.choice(eligible, size=k, replace=False))
    kept = label_map[~label_map["sku"].isin(held)].reset_index(drop=True)
    new_label = dict(zip(kept["sku"], range(len(kept)), strict=True))
    kept = kept.assign(label=range(len(kept)))
    out.mkdir(parents=True, exist_ok=True)
    kept[LABEL_MAP_ALL_COLUMNS].to_csv(out / "label_map.csv", index=False)
    for name, df in (("train", train), ("val", val)):
        df = df[~df["sku"].isin(held)].copy()
        df["label"] = df["sku"].map(new_label)
        df.to_csv(out / f"{name}.csv", index=False)
    shots_rows = train[train["sku"].isin(held)].sort_values("name").groupby("sku").head(shots)
    return held, shots_rows, out


def classifier_scores(model, meta, df, prepared: Path, num_classes: int) -> SplitScores:
    """Single centre-crop softmax over ``num_classes`` labels (enrolled ones get -inf logits)."""
    transform, resize = embedding_transform(meta)
    ds = PreparedImageDataset(df, prepared, transform, min_side=resize)
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    logits = []
    with torch.inference_mode():
        for x, *_ in loader:
            logits.append(model(x).float().numpy())
    logits = np.concatenate(logits)
    padded = np.full((len(df), num_classes), -np.inf, dtype=np.float32)
    padded[:, : logits.shape[1]] = logits
    return SplitScores.from_logits(df["name"], df["label"], padded, num_classes)


def train_row(row: str, params: dict, reduced: Path, prepared: Path, work: Path):
    """The model and its metadata for one row: trained by the stage script, or ImageNet's as it comes."""
    if row == "imagenet":
        from products10k.config import ModelConfig
        from products10k.models.model import create_model, input_normalization

        cfg = ModelConfig(**params["model"])
        if not cfg.pretrained:
            raise SystemExit("--rows imagenet needs model.pretrained: true in params.yaml")
        num_classes = len(pd.read_csv(reduced / "label_map.csv"))
        model = create_model(cfg, num_classes).eval()
        meta = {"resolution": params["train"]["resolution"], "resize": params["train"]["resize"],
                "normalize": input_normalization(cfg.arch)}  # fmt: skip
        return model, meta
    if (work / f"model-{row}" / "best.pt").is_file():  # trained for an earlier row (concat's linear)
        return load_model(work / f"model-{row}" / "best.pt")
    overrides = row_overrides(row)
    row_params = apply_overrides(params, overrides, f"--rows {row}")
    params_file = work / f"params-{row}.yaml"
    write_params(params_file, row_params)
    run(str(ROOT / "stages/train.py"), "--phase", "train", "--member", "m0",
        "--params", str(params_file), "--train-csv", str(reduced / "train.csv"),
        "--val-csv", str(reduced / "val.csv"), "--label-map", str(reduced / "label_map.csv"),
        "--images", str(prepared), "--out", str(work / f"model-{row}"), cwd=work)  # fmt: skip
    return load_model(work / f"model-{row}" / "best.pt")


class LastStage(torch.nn.Module):
    """``model`` whose embedding is its backbone's last stage before the head convolution, pooled: the
    classifier is the model's own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.model.backbone.forward_intermediates(x, indices=1, intermediates_only=True)[-1]
        return maps.float().mean(dim=(2, 3))


#: each row's trained model (a row that only embeds differently reuses it)
ROW_MODEL = {"concat": "linear", "linear-stage": "linear", "imagenet-stage": "imagenet"}
#: a trained row's params.yaml overrides, where its name is not a ``model.head``
ROW_PARAMS = {
    "supcon": {"train.sampler": "pk", "train.metric_loss_weight": 1.0},
    "pk": {"train.sampler": "pk"},  # supcon's batches without its loss: what the sampler alone does
    "supcon-random": {"train.metric_loss_weight": 1.0},  # the loss on random batches (few positives)
    # pairs: 16 SKUs in a batch of 32 instead of 8
    "supcon-pairs": {"train.sampler": "pk", "train.pk_images": 2, "train.metric_loss_weight": 1.0},
    # BatchNorm's running statistics kept at ImageNet's (a P x K batch's statistics are 8 SKUs'),
    # with the default's random batches, P x K batches alone and with the loss
    "frozen-bn": {"train.freeze_bn": True},  # params.yaml's own since recipe_frozen_bn_cv5.json
    "trained-bn": {"train.freeze_bn": False},  # the default before it
    # supcon with half of each batch's SKUs from one product group: look-alikes as hard negatives
    "supcon-group": {"train.sampler": "pk", "train.metric_loss_weight": 1.0, "train.pk_group_share": 0.5},
    "pk-frozen-bn": {"train.sampler": "pk", "train.freeze_bn": True},
    "supcon-frozen-bn": {"train.sampler": "pk", "train.metric_loss_weight": 1.0, "train.freeze_bn": True},
}


def row_overrides(row: str) -> dict:
    """A trained row's params.yaml overrides: ``ROW_PARAMS``'s, ``supcon@W`` with the loss weight W,
    or a ``model.head``."""
    name, _, weight = row.partition("@")
    if name in ROW_PARAMS:
        return {**ROW_PARAMS[name], **({"train.metric_loss_weight": float(weight)} if weight else {})}
    return {"model.head": row} if row != "linear" else {}


def embedder(model, meta, prepared: Path, also=None):
    """Unit embeddings of a prepared CSV's rows by ``model``; with ``also`` (a second (model, meta)),
    both models' unit embeddings side by side, scaled by 1/sqrt(2): the cosine of the concatenation is
    the mean of the two cosines."""

    def embed(df):
        vectors = embed_rows(model, meta, df, prepared, batch_size=64)
        if also is None:
            return vectors
        second = embed_rows(*also, df, prepared, batch_size=64)
        return np.concatenate([vectors, second], axis=1) / np.sqrt(2.0)

    return embed


def score_row(model, meta, embed, params, prepared, reduced, held, shots_rows) -> dict:
    """Top-1 and top-5 of the classifier, and of kNN and fusion under each vote rule, on the trained
    and the held-out SKUs' test images after enrolment (each with a 95% interval)."""
    retrieval = params["retrieval"]
    label_map = read_label_map(reduced / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    train = read_prepared(reduced / "train.csv", label_map)
    val = read_prepared(reduced / "val.csv", label_map)

    gallery = build_gallery(embed(train), train["label"], train["name"], label_map["sku"], {})
    num_known = gallery.num_classes
    val_cls = classifier_scores(model, meta, val, prepared, num_known)
    val_vectors = embed(val)
    weights = {}  # the fusion weight as the index stage fits it: on val, before any enrolment, per rule
    for rule in RULES:
        val_knn = _knn(gallery, val_vectors, val["name"], val["label"], retrieval, rule)
        weights[rule] = fit_fusion_weight(val_cls, val_knn)
    test = pd.read_csv(prepared / "test.csv", dtype={"name": str})
    is_held = test["sku"].isin(held).to_numpy()
    test_vectors = embed(test)
    # the trained SKUs' kNN top-1 before the enrolment: what enrolling costs them
    before = {}
    trained_rows = test[~is_held]
    known = (
        trained_rows["sku"]
        .map({int(s): i for i, s in enumerate(gallery.skus)})
        .fillna(-1)
        .astype(int)
        .to_numpy()
    )
    before_hit = {}  # per trained photo, named right before the enrolment
    for rule in RULES:
        knn = _knn(gallery, test_vectors[~is_held], trained_rows["name"], known, retrieval, rule)
        before[rule] = rates(knn.topk_labels[:, :5], known, np.ones(len(known), bool))
        before_hit[rule] = knn.topk_labels[:, 0] == known
    nearest, _ = search(gallery.index, test_vectors, 1, retrieval["search_batch"], progress=False)
    enrol(gallery, embed(shots_rows), shots_rows["sku"].to_numpy(), shots_rows["name"].to_numpy())

    label_of = {int(s): i for i, s in enumerate(gallery.skus)}
    test["label"] = test["sku"].map(lambda s: label_of.get(int(s), -1)).astype(int)
    truth = test["label"].to_numpy()
    logits = classifier_logits(model, meta, test, prepared)
    classifier = np.argsort(-logits, axis=1)[:, :5]
    result = {
        "trained_skus": {
            "n_images": int((~is_held).sum()),
            "classifier": rates(classifier, truth, ~is_held),
        },
        "held_out_skus": {"n_images": int(is_held.sum()), "classifier": rates(classifier, truth, is_held)},
        "fusion_weight": weights,
        "novelty": novelty(logits, nearest[:, 0], is_held),
        "trained_by_gallery_photos": {},  # kNN top-1 of the trained SKUs by their gallery photo count
        "cost_by_group": {},  # the trained SKUs' loss, split: group-mates of an enrolled SKU, the rest
    }
    mates = group_mates(prepared, trained_rows["sku"], held)
    photos = np.bincount(gallery.labels, minlength=gallery.num_classes)[np.maximum(truth, 0)]
    tops = {}
    for kind in RULES:
        knn = _knn(gallery, test_vectors, test["name"], test["label"], retrieval, kind)
        tops[kind] = knn.topk_labels[:, :5]
        fused, _ = fuse_with_enrolled(logits, knn, weights[kind], gallery.num_classes, 5)
        for part, rows in (("trained_skus", ~is_held), ("held_out_skus", is_held)):
            result[part][f"knn_{kind}"] = rates(knn.topk_labels[:, :5], truth, rows)
            result[part][f"fused_{kind}"] = rates(fused, truth, rows)
        # what enrolling costs the trained SKUs, directly: their photos named as an enrolled SKU
        to_enrolled = knn.topk_labels[~is_held, 0] >= num_known
        result["trained_skus"][f"knn_{kind}_named_enrolled"] = round(float(to_enrolled.mean()), 4)
        result["trained_skus"][f"knn_{kind}_before_enrolment"] = before[kind]
        after_hit = knn.topk_labels[~is_held, 0] == truth[~is_held]
        result["cost_by_group"][kind] = cost_split(before_hit[kind], after_hit, mates)
        result["trained_by_gallery_photos"][kind] = {
            f"{low}-{high}": {"n_images": int(rows.sum()), **rates(knn.topk_labels[:, :5], truth, rows)}
            for low, high in PHOTO_BUCKETS
            if (rows := ~is_held & (photos >= low) & (photos <= high)).any()
        }
    result["gated"] = gated(tops, doubt_of(val_cls), doubt(logits), truth, is_held, num_known)
    return result


def group_mates(prepared: Path, skus: pd.Series, held) -> np.ndarray:
    """Per photo of ``skus``: is its SKU in the product group (label_map.csv's ``group``, every SKU
    before the hold-out) of a held-out SKU? Its look-alikes are those an enrolment can take photos from."""
    label_map = read_label_map(prepared / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    group_of = dict(zip(label_map["sku"], label_map["group"], strict=True))
    held_groups = {group_of[int(s)] for s in held}
    return skus.map(group_of).isin(held_groups).to_numpy()


def cost_split(before_hit: np.ndarray, after_hit: np.ndarray, mates: np.ndarray) -> dict:
    """The trained SKUs' kNN top-1 before and after the enrolment, and the points lost, for the
    group-mates of an enrolled SKU and for the rest."""
    out = {}
    for part, rows in (("group_mates", mates), ("others", ~mates)):
        if rows.any():
            b, a = float(before_hit[rows].mean()), float(after_hit[rows].mean())
            out[part] = {"n_images": int(rows.sum()), "before": round(b, 4), "after": round(a, 4),
                         "points_lost": round(100 * (b - a), 1)}  # fmt: skip
    return out


def _knn(gallery, vectors, names, labels, retrieval: dict, rule: str) -> SplitScores:
    """The kNN scores of ``rule`` (a vote of votes.py, or ``normalised[@k]``)."""
    if not rule.startswith("normalised"):
        return knn_scores(gallery, vectors, names, labels, **_vote(retrieval, rule))
    k = int(rule.partition("@")[2] or retrieval["k"])
    baseline = impostor_baseline(FlatVectors(gallery.index).views[0], gallery.labels, gallery.num_classes)
    sims, ids = search(gallery.index, vectors, k, retrieval["search_batch"], progress=False)
    return normalised_best(sims, gallery.labels[ids], baseline, gallery.num_classes,
                           temperature=retrieval["temperature"], smoothing=retrieval["smoothing"],
                           names=names, labels=labels)  # fmt: skip


def _vote(retrieval: dict, rule: str) -> dict:
    kind, _, shots = rule.partition("@")
    return dict(k=retrieval["k"], kind=kind, temperature=retrieval["temperature"],
                smoothing=retrieval["smoothing"], batch=retrieval["search_batch"],
                shots=int(shots or retrieval["vote_shots"]))  # fmt: skip


def classifier_logits(model, meta, df, prepared: Path) -> np.ndarray:
    """The classifier's single centre-crop logits over the SKUs it was trained on, (N, K0)."""
    transform, resize = embedding_transform(meta)
    ds = PreparedImageDataset(df, prepared, transform, min_side=resize)
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    with torch.inference_mode():
        return np.concatenate([model(x).float().numpy() for x, *_ in loader])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("default", "digits"), default="default",
                   help="the embedded default, or scikit-learn's digits (digits_data.py)")  # fmt: skip
    p.add_argument("--holdout", type=int, default=8, help="SKUs left out of training")
    p.add_argument("--shots", type=int, default=5, help="enrolment images per held-out SKU (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whole-groups", action="store_true",
                   help="hold out whole groups (a new product line), not SKUs among trained "
                        "group-mates")  # fmt: skip
    p.add_argument("--rows", default="imagenet,linear,arcface",
                   help="comma-separated: imagenet (no training), linear, arcface, cosface, supcon "
                        "(linear + the supervised contrastive loss on P x K batches; supcon@W: at "
                        "weight W), pk (those batches alone), supcon-random (the loss on random "
                        "batches), supcon-pairs (on batches of 2 photos per SKU), frozen-bn, "
                        "pk-frozen-bn, supcon-frozen-bn (BatchNorm statistics frozen), trained-bn, "
                        "supcon-group (half a batch's SKUs from one product group), concat "
                        "(linear's embedding beside ImageNet's), linear-stage, imagenet-stage (their "
                        "last stage before the head convolution)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a params.yaml override for every row, e.g. train.resolution=192")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "enrol.json")
    args = p.parse_args()
    rows = args.rows.split(",")
    known = {"imagenet", "linear", "arcface", "cosface", *ROW_MODEL, *ROW_PARAMS}
    unknown = {r for r in rows if r not in known and not (r.startswith("supcon@") and _number(r[7:]))}
    if unknown:
        p.error(f"unknown --rows entries: {', '.join(sorted(unknown))}")
    sets = parse_sets(args.set)
    params = apply_overrides(load_params(), sets, "--set")
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare_data(work, args.data, params)
        held, shots_rows, reduced = hold_out(
            prepared, work / "reduced", args.holdout, args.shots, args.seed, args.whole_groups
        )
        for row in rows:
            model, meta = train_row(ROW_MODEL.get(row, row), params, reduced, prepared, work)
            if row.endswith("-stage"):
                model = LastStage(model)
            also = train_row("imagenet", params, reduced, prepared, work) if row == "concat" else None
            embed = embedder(model, meta, prepared, also)
            results[row] = score_row(model, meta, embed, params, prepared, reduced, held, shots_rows)
            if row.startswith("imagenet"):  # an untrained head: its classifier and fusion mean nothing
                for part in ("trained_skus", "held_out_skus"):
                    for key in [k for k in results[row][part] if k == "classifier" or k.startswith("fused")]:
                        results[row][part][key] = None
                results[row]["fusion_weight"] = None
                results[row]["novelty"].pop("classifier_doubt_auroc", None)  # its doubt is noise
                results[row]["gated"] = {}
    report = {
        "machine": describe(),
        "torch": torch.__version__,
        "data": args.data,
        "arch": params["model"]["arch"],
        "pretrained": params["model"]["pretrained"],
        "holdout": args.holdout,
        "whole_groups": args.whole_groups,
        "shots": args.shots,
        "seed": args.seed,
        "set": sets,
        "held_out_sku_ids": [int(s) for s in held],
        "enrolled_images": int(len(shots_rows)),
        "seconds": round(time.time() - started, 1),
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, report)
    print(table(results))


def _number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


if __name__ == "__main__":
    main()
