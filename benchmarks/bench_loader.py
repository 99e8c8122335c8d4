"""Training data loading (images/s): our loader vs torchvision ImageFolder on the original JPEGs.

    .venv/bin/python benchmarks/bench_loader.py [--n 256] [--resolution 448 128] [--workers 2]

Writes ``n`` photo-like 800x800 JPEGs twice: as an ImageFolder tree (the usual Kaggle start:
original files, one per image) and as our prepare output (pre-resized to a 512 shorter side,
packed into a shard, CSV rows with shard/offset/length). Then, for each resolution, one full pass
of each loader with the same batch size, worker count and output (a ``resolution`` random crop of
the ``resolution * 8/7`` resize, flip, normalise, float CHW tensor):

- ours: ``products10k.datasets.PreparedImageDataset`` + ``train_transform`` (memory-mapped shard,
  OpenCV decode at reduced DCT scale where exact, albumentations) in a torch DataLoader;
- baseline: ``torchvision.datasets.ImageFolder`` (Pillow open + decode of the 800 px file) with
  ``Resize``, ``RandomCrop``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``.

Worker start-up is included (one pass per epoch is what training does); figures are the median
of ``--repeat`` passes.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from products10k.config import PhaseConfig, load_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from products10k.contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, resolve_resize  # noqa: E402
from products10k.contracts.shards import ShardWriter  # noqa: E402
from products10k.data.datasets import PreparedImageDataset  # noqa: E402
from products10k.data.transforms import train_transform  # noqa: E402

log = logging.getLogger("bench_loader")


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth gradients, shapes and noise: compresses like a photo, not like flat colour."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x * 255, y * 255, (1 - x) * 200], axis=-1)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        p = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, p, int(rng.integers(20, size // 4)), c, -1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def build(root: Path, n: int, classes: int = 8, size: int = 800) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    folder, prepared = root / "imagefolder", root / "prepared"
    rows = []
    with ShardWriter(prepared, shard_mb=256.0) as writer:
        for i in range(n):
            label = i % classes
            img = photo_like(rng, size)
            bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"c{label}" / f"{i}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
            small = cv2.resize(bgr, (512, 512), interpolation=cv2.INTER_AREA)  # what prepare stores
            ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 93])
            shard, offset, length = writer.add(buf.tobytes())
            rows.append((f"{i}.jpg", label, label, shard, offset, length, 512, 512))
    cols = ["name", "label", "sku", "shard", "offset", "length", "width", "height"]
    pd.DataFrame(rows, columns=cols).to_csv(prepared / "train.csv", index=False)
    return folder, prepared


def one_pass(loader: DataLoader) -> float:
    t0 = time.perf_counter()
    count = 0
    for batch in loader:
        count += batch[0].shape[0]
    return count / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--resolution", type=int, nargs="+", default=[448, 128])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, prepared = build(Path(tmp), args.n)
        df = pd.read_csv(prepared / "train.csv")
        results = []
        # params.yaml's train recipe without colour jitter and erasing: the torchvision twin's steps
        plain = load_section(ROOT / "params.yaml", "train", PhaseConfig).model_copy(
            update={"color_jitter": 0.0, "random_erasing": 0.0}
        )
        for res in args.resolution:
            resize = resolve_resize(res, None)
            ours = PreparedImageDataset(
                df, prepared, train_transform(plain.model_copy(update={"resolution": res})), min_side=resize
            )
            tv = datasets.ImageFolder(
                str(folder),
                T.Compose(
                    [
                        T.Resize(resize),
                        T.RandomCrop(res),
                        T.RandomHorizontalFlip(),
                        T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                    ]
                ),
            )
            assert ours[0][0].shape == tv[0][0].shape, (ours[0][0].shape, tv[0][0].shape)
            speeds = {"ours": [], "imagefolder": []}
            for _ in range(args.repeat):  # interleaved, so load changes hit both alike
                for name, ds in (("ours", ours), ("imagefolder", tv)):
                    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers)
                    speeds[name].append(one_pass(loader))
            a, b = statistics.median(speeds["ours"]), statistics.median(speeds["imagefolder"])
            results.append((res, resize, a, b))
    log.info("machine: %s", describe())
    log.info(
        "%d images of 800x800 (ours: pre-resized 512, packed), batch %d, %d workers, median of %d passes",
        *(args.n, args.batch, args.workers, args.repeat),
    )
    log.info("")
    log.info("| output | ours (img/s) | torchvision ImageFolder + Pillow (img/s) | speed-up |")
    log.info("|---|---|---|---|")
    for res, resize, a, b in results:
        log.info("| %d crop of %d resize | %.0f | %.0f | %.1fx |", res, resize, a, b, a / b)


if __name__ == "__main__":
    main()
