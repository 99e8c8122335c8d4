"""Tiny prepared datasets for the training tests, written with the real ShardWriter.

Each class is a coloured shape on a noisy background, so a small model learns it in an epoch or
two on CPU; the CSVs follow the prepared-data contract (train/val/test/label_map/balanced).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from products10k.storage import ShardWriter

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (200, 40, 200), (30, 200, 210)]


def _image(label: int, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    colour = COLOURS[label % len(COLOURS)]
    cx, cy = int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6))
    r = int(min(h, w) * rng.uniform(0.25, 0.35))
    if (label // len(COLOURS)) % 2 == 0:
        cv2.circle(img, (cx, cy), r, colour, -1)
    else:
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    return img


def make_prepared(
    root: Path,
    num_classes: int = 4,
    train_per_class: int = 8,
    val_per_class: int = 3,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
) -> Path:
    """Write ``root/{images,train.csv,val.csv,test.csv,label_map.csv,balanced.csv}``; return root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    skus = [1000 + 7 * k for k in range(num_classes)]
    rows = {"train": [], "val": [], "test": []}
    counter = 0
    with ShardWriter(root, shard_mb=0.05) as writer:  # tiny shards: several shards get exercised
        for split, per in (("train", train_per_class), ("val", val_per_class), ("test", val_per_class)):
            for label in range(num_classes):
                for _ in range(per):
                    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(_image(label, rng, size), cv2.COLOR_RGB2BGR))
                    assert ok
                    shard, offset, length = writer.add(buf.tobytes())
                    counter += 1
                    rows[split].append(
                        {
                            "name": f"{counter}.jpg",
                            "label": label,
                            "sku": skus[label],
                            "group": label // 2,
                            "domain": "inshop",
                            "shard": shard,
                            "offset": offset,
                            "length": length,
                            "width": size[1],
                            "height": size[0],
                        }
                    )
    for split, data in rows.items():
        df = pd.DataFrame(data)
        if split == "test":
            df["Usage"] = "Public"
        df.to_csv(root / f"{split}.csv", index=False)
    train = pd.DataFrame(rows["train"])
    train.groupby("label").head(3).to_csv(root / "balanced.csv", index=False)
    pd.DataFrame(
        {
            "label": range(num_classes),
            "sku": skus,
            "group": [k // 2 for k in range(num_classes)],
            "n_train": [train_per_class] * num_classes,
        }
    ).to_csv(root / "label_map.csv", index=False)
    return root


TINY_MODEL = {"arch": "resnet10t", "pretrained": False}
TINY_TRAIN = {
    "seed": 0,
    "epochs": 2,
    "batch_size": 8,
    "resolution": 32,
    "resize": None,
    "lr": 3.0e-3,
    "num_workers": 0,
    "hflip": 0.5,
}


def write_params(path: Path, model: dict | None = None, train: dict | None = None, **sections) -> Path:
    """A params.yaml for the tiny fixture: ``train``/``model`` updated, finetune sections given."""
    params = {
        "model": {**TINY_MODEL, **(model or {})},
        "train": {**TINY_TRAIN, **(train or {})},
        "finetune_balanced": {"epochs": 1, "lr": 1.0e-3},
        "finetune_accuracy": {"epochs": 1, "lr": 1.0e-3, "accuracy_loss_weight": 1.0},
        # one thread: tests share 2 cores with other tests, and OpenMP barriers stall when oversubscribed
        "dist": {"nproc_per_node": 1, "threads": 1},
        "ensemble": {"members": {"m0": {}}},
    }
    params.update(sections)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def phase_args(data: Path, out: Path, phase: str = "train", csv: str = "train.csv", init: Path | None = None):
    """Command-line arguments of stages/train.py for the fixture dataset."""
    args = [
        "--phase", phase, "--member", "m0",
        "--train-csv", str(data / csv), "--val-csv", str(data / "val.csv"),
        "--label-map", str(data / "label_map.csv"), "--images", str(data),
        "--out", str(out / "models" / phase), "--live", str(out / "dvclive" / phase),
    ]  # fmt: skip
    if init is not None:
        args += ["--init", str(init)]
    return args


def train_stage_main():
    """``main`` of stages/train.py (a script, not a package module), for in-process runs."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "stages" / "train.py"
    spec = importlib.util.spec_from_file_location("stages_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
