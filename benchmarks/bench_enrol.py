"""New SKUs without retraining, measured: hold K SKUs out of training entirely, enrol them into
the kNN index from at most ``--shots`` images each, and score their test images.

On the embedded default (params.yaml's synthetic data and training recipe):

1. generate and prepare the data (the download and prepare stages, in a temporary folder);
2. pick ``--holdout`` SKUs at random (``--seed``) among those with >= ``--shots`` training
   images; drop every one of their training and val images; relabel the rest;
3. train the ``train`` phase on what is left (the stage script, params.yaml's recipe);
4. build the index of the remaining training images, fit the fusion weight on val (as the
   index stage does), then enrol the held-out SKUs from their first ``--shots`` training images;
5. score every test image: top-1 of the classifier, kNN and fusion on the SKUs the model was
   trained on, and of kNN and fusion on the held-out SKUs (the classifier cannot name them).

Steps 3-5 run once per ``--rows`` entry, each a way to get the embedding:

- ``imagenet``: the pretrained backbone as it comes, no training at all (the zero-training
  reference; its classifier head is untrained, so only kNN counts, and no fusion weight is fitted);
- ``linear``: params.yaml's recipe as it is (the default head);
- ``arcface`` / ``cosface``: the same with ``model.head`` set to that margin head.

Writes benchmarks/results/enrol.json and prints the table for the README.

    python benchmarks/bench_enrol.py --holdout 8 --shots 5 --rows imagenet,linear,arcface
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

from benchmarks.machine import describe  # noqa: E402
from products10k.data.datasets import PreparedImageDataset  # noqa: E402
from products10k.knn import build_gallery, enrol, fit_fusion_weight, fuse, knn_scores  # noqa: E402
from products10k.models.checkpoint import load_model  # noqa: E402
from products10k.prepared.contract import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared  # noqa: E402
from products10k.retrieval.embed import embed_rows, embedding_transform  # noqa: E402
from products10k.scores import SplitScores  # noqa: E402


def run(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, *args], cwd=cwd, check=True)


def prepare_data(work: Path) -> Path:
    run(
        str(ROOT / "stages/download.py"),
        "--params",
        str(ROOT / "params.yaml"),
        "--out",
        str(work / "raw"),
        cwd=work,
    )
    run(str(ROOT / "stages/prepare.py"), "--params", str(ROOT / "params.yaml"), "--raw", str(work / "raw"),
        "--out", str(work / "prepared"), cwd=work)  # fmt: skip
    return work / "prepared"


def hold_out(prepared: Path, out: Path, k: int, shots: int, seed: int):
    """Reduced train/val/label map without ``k`` random SKUs; their enrolment rows."""
    label_map = read_label_map(prepared / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    train = pd.read_csv(prepared / "train.csv", dtype={"name": str})
    val = pd.read_csv(prepared / "val.csv", dtype={"name": str})
    counts = train["sku"].value_counts()
    eligible = np.sort(counts[counts >= shots].index.to_numpy())
    held = np.sort(np.random.default_rng(seed).choice(eligible, size=k, replace=False))
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
    row_params = json.loads(json.dumps(params))
    if row != "linear":
        row_params["model"]["head"] = row
    params_file = work / f"params-{row}.yaml"
    params_file.write_text(__import__("yaml").safe_dump(row_params))
    run(str(ROOT / "stages/train.py"), "--phase", "train", "--member", "m0",
        "--params", str(params_file), "--train-csv", str(reduced / "train.csv"),
        "--val-csv", str(reduced / "val.csv"), "--label-map", str(reduced / "label_map.csv"),
        "--images", str(prepared), "--out", str(work / f"model-{row}"), cwd=work)  # fmt: skip
    return load_model(work / f"model-{row}" / "best.pt")


def score_row(model, meta, params, prepared, reduced, held, shots_rows) -> dict:
    """Top-1 of classifier, kNN and fusion on trained and held-out SKUs' test images, after enrolment."""
    retrieval = params["retrieval"]
    label_map = read_label_map(reduced / "label_map.csv", LABEL_MAP_ALL_COLUMNS)
    train = read_prepared(reduced / "train.csv", label_map)
    val = read_prepared(reduced / "val.csv", label_map)

    def embed(df):
        return embed_rows(model, meta, df, prepared, batch_size=64)

    vote = dict(k=retrieval["k"], kind=retrieval["vote"], temperature=retrieval["temperature"],
                smoothing=retrieval["smoothing"], batch=retrieval["search_batch"])  # fmt: skip
    gallery = build_gallery(embed(train), train["label"], train["name"], label_map["sku"], {})
    num_known = gallery.num_classes
    # the fusion weight as the index stage fits it: on val, before any enrolment
    val_cls = classifier_scores(model, meta, val, prepared, num_known)
    val_knn = knn_scores(gallery, embed(val), val["name"], val["label"], **vote)
    weight = fit_fusion_weight(val_cls, val_knn)
    enrol(gallery, embed(shots_rows), shots_rows["sku"].to_numpy(), shots_rows["name"].to_numpy())

    test = pd.read_csv(prepared / "test.csv", dtype={"name": str})
    label_of = {int(s): i for i, s in enumerate(gallery.skus)}
    test["label"] = test["sku"].map(lambda s: label_of.get(int(s), -1)).astype(int)
    scores = {
        "classifier": classifier_scores(model, meta, test, prepared, gallery.num_classes),
        "knn": knn_scores(gallery, embed(test), test["name"], test["label"], **vote),
    }
    scores["fused"] = fuse(scores["classifier"], scores["knn"], weight, gallery.num_classes, 5)
    is_held = test["sku"].isin(held).to_numpy()
    result = {
        "fusion_weight": weight,
        "trained_skus": {"n_images": int((~is_held).sum())},
        "held_out_skus": {"n_images": int(is_held.sum())},
    }
    for name, s in scores.items():
        hit = s.topk_labels[:, 0] == test["label"].to_numpy()
        result["trained_skus"][name] = float(hit[~is_held].mean())
        result["held_out_skus"][name] = float(hit[is_held].mean())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--holdout", type=int, default=8, help="SKUs left out of training")
    p.add_argument("--shots", type=int, default=5, help="enrolment images per held-out SKU (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default="imagenet,linear,arcface",
                   help="comma-separated: imagenet (no training), linear, arcface, cosface")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "enrol.json")
    args = p.parse_args()
    rows = args.rows.split(",")
    unknown = set(rows) - {"imagenet", "linear", "arcface", "cosface"}
    if unknown:
        p.error(f"unknown --rows entries: {', '.join(sorted(unknown))}")
    params = __import__("yaml").safe_load((ROOT / "params.yaml").read_text())
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepared = prepare_data(work)
        held, shots_rows, reduced = hold_out(prepared, work / "reduced", args.holdout, args.shots, args.seed)
        for row in rows:
            model, meta = train_row(row, params, reduced, prepared, work)
            results[row] = score_row(model, meta, params, prepared, reduced, held, shots_rows)
            if row == "imagenet":  # an untrained head: its classifier and fusion mean nothing
                for part in ("trained_skus", "held_out_skus"):
                    results[row][part]["classifier"] = results[row][part]["fused"] = None
                results[row]["fusion_weight"] = None
    report = {
        "machine": describe(),
        "torch": torch.__version__,
        "arch": params["model"]["arch"],
        "pretrained": params["model"]["pretrained"],
        "holdout": args.holdout,
        "shots": args.shots,
        "seed": args.seed,
        "held_out_sku_ids": [int(s) for s in held],
        "enrolled_images": int(len(shots_rows)),
        "seconds": round(time.time() - started, 1),
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print("\n| embedding | trained SKUs: classifier | kNN | fused | held-out SKUs: kNN | fused |")
    print("|---|---|---|---|---|---|")

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    for row, r in results.items():
        t, h = r["trained_skus"], r["held_out_skus"]
        cells = [t["classifier"], t["knn"], t["fused"], h["knn"], h["fused"]]
        print(f"| {row} | " + " | ".join(f(x) for x in cells) + " |")


if __name__ == "__main__":
    main()
