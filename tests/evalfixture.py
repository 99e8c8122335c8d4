"""A tiny prepared dataset and checkpoint for the evaluate/TTA tests (made in the test, no network).

Four SKUs in two groups; every image is a coloured canvas with an off-centre bar, so crops and
flips give different inputs. The checkpoint follows products10k.checkpoint's format: a timm model
(resnet10t, random init) saved with model_config, labels (SKU per label), phase, member, epoch,
resolution and resize.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from products10k import atomic
from products10k.models import create_model, model_config_dict
from products10k.params import ModelConfig
from products10k.storage import ShardWriter

SKUS = [1001, 1002, 2001, 2002]
GROUPS = [1, 1, 2, 2]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def _image(label: int, seed: int, size=(48, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), COLOURS[label], dtype=np.uint8)
    img = np.clip(img + rng.integers(-20, 20, size=img.shape), 0, 255).astype(np.uint8)
    x = 5 + 10 * label
    img[:, x : x + 6] = 255  # an off-centre bar: flips and corner crops see different pixels
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def make_prepared(root: Path) -> Path:
    """Write images/shard-*.bin, train/val/test CSVs and label_map.csv under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": [], "test": []}
    counts = {"train": 3, "val": 1, "test": 2}
    seed = 0
    with ShardWriter(root, shard_mb=0.01) as writer:  # tiny shards: reads cross shard files
        for split, n in counts.items():
            for label in range(4):
                for j in range(n):
                    seed += 1
                    shard, offset, length = writer.add(_image(label, seed))
                    rows[split].append(
                        {
                            "name": f"{split}_{label}_{j}.jpg",
                            "label": label,
                            "sku": SKUS[label],
                            "group": GROUPS[label],
                            "domain": "customer" if j % 2 else "inshop",
                            "shard": shard,
                            "offset": offset,
                            "length": length,
                            "width": 64,
                            "height": 48,
                        }
                    )
        # a test image of a SKU the training set lacks: label -1, always an error
        seed += 1
        shard, offset, length = writer.add(_image(0, seed))
        rows["test"].append(
            {
                "name": "test_unknown.jpg",
                "label": -1,
                "sku": 9999,
                "group": 3,
                "domain": "customer",
                "shard": shard,
                "offset": offset,
                "length": length,
                "width": 64,
                "height": 48,
            }
        )
    for split, data in rows.items():
        df = pd.DataFrame(data)
        if split == "test":
            df["Usage"] = ["Public" if i % 2 else "Private" for i in range(len(df))]
        df.to_csv(root / f"{split}.csv", index=False)
    pd.DataFrame({"label": range(4), "sku": SKUS, "group": GROUPS, "n_train": [3, 3, 3, 3]}).to_csv(
        root / "label_map.csv", index=False
    )
    return root


def make_checkpoint(path: Path, skus=SKUS, resolution: int = 32, resize: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="resnet10t")
    model = create_model(cfg, len(skus), pretrained=False).eval()
    atomic.save_torch(
        path,
        {
            "model": model.state_dict(),
            "model_config": model_config_dict(cfg, len(skus)),
            "labels": list(skus),
            "phase": "train",
            "member": "m0",
            "epoch": 1,
            "resolution": resolution,
            "resize": resize,
            "val_top1": 0.0,
        },
    )
    return model
