"""Prepare throughput (images/s): the prepare stage vs the plain approach.

    .venv/bin/python benchmarks/bench_prepare.py [--n 400] [--sizes 800x800 1600x1200]

For each source size, writes ``n`` photo-like JPEGs into a ``train.zip`` (official layout) and times

- plain: one process, Pillow decode + ``exif_transpose`` + RGB + resize (shorter side 512,
  Pillow's default antialiased bicubic) + JPEG encode, reading from the same zip;
- ours: the whole ``products10k.prepare.prepare`` (CSV validation, zip index, decode with
  reduced JPEG decode where exact, resize, encode, shard writing, CSVs), with ``n_jobs=1``, with
  all cores from a cold start (joblib worker start-up included) and again with warm workers.
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from machine import describe
from PIL import Image, ImageOps
from tqdm import tqdm

from products10k.params import PrepareConfig
from products10k.prepare import prepare

log = logging.getLogger("bench_prepare")
SIZE = 512
QUALITY = 93


def photo_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Smooth colour fields + edges + text + sensor noise: compresses like a product photo."""
    img = cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(8):
        x, y = int(rng.integers(0, w - 50)), int(rng.integers(0, h - 50))
        cv2.rectangle(
            img,
            (x, y),
            (x + int(rng.integers(20, w // 3)), y + int(rng.integers(20, h // 3))),
            rng.integers(0, 256, 3).tolist(),
            -1,
        )
        cv2.putText(img, f"SKU {rng.integers(1e5)}", (x, y), cv2.FONT_HERSHEY_SIMPLEX, w / 600,
                    rng.integers(0, 256, 3).tolist(), 2, cv2.LINE_AA)  # fmt: skip
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_raw(root: Path, n: int, w: int, h: int, seed: int = 0) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"{i + 1}.jpg" for i in range(n)]
    with zipfile.ZipFile(raw / "train.zip", "w", compression=zipfile.ZIP_STORED) as zf:  # JPEGs don't deflate
        for name in tqdm(names, desc=f"make {w}x{h} JPEGs", unit="img"):
            ok, buf = cv2.imencode(".jpg", photo_like(rng, w, h), [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            zf.writestr("train/" + name, buf.tobytes())
    with zipfile.ZipFile(raw / "test.zip", "w"):
        pass
    skus = np.arange(n) // 4
    pd.DataFrame({"name": names, "class": skus, "group": skus // 10}).to_csv(raw / "train.csv", index=False)
    (raw / "test_kaggletest.csv").write_text("name,class,Usage\n")
    return raw


def plain(zip_path: Path) -> tuple[float, int]:
    """The plain approach; returns (seconds, total JPEG bytes)."""
    t0 = time.perf_counter()
    total = 0
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            with Image.open(io.BytesIO(zf.read(info))) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                scale = SIZE / min(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=QUALITY)
                total += len(buf.getvalue())
    return time.perf_counter() - t0, total


def ours(raw: Path, out: Path, n_jobs: int) -> float:
    cfg = PrepareConfig(size=SIZE, jpeg_quality=QUALITY, n_jobs=n_jobs, val_fraction=0.0)
    t0 = time.perf_counter()
    prepare(raw, out, cfg)
    return time.perf_counter() - t0


def run(n: int, w: int, h: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        raw = make_raw(Path(tmp), n, w, h)
        t_plain, _ = plain(raw / "train.zip")
        t_one = ours(raw, Path(tmp) / "out1", n_jobs=1)
        t_all = ours(raw, Path(tmp) / "outN", n_jobs=-1)
        # joblib keeps its worker processes: a second run shows the steady-state rate that a
        # 197k-image run sees (where the ~1-2 s worker start-up is amortised).
        t_warm = ours(raw, Path(tmp) / "outW", n_jobs=-1)
    return {
        "source": f"{w}x{h}",
        "n": n,
        "plain": n / t_plain,
        "ours_1": n / t_one,
        "ours_all": n / t_all,
        "ours_warm": n / t_warm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images per source size")
    parser.add_argument("--sizes", nargs="+", default=["800x800"], help="source sizes WxH")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # keep the stage's INFO lines out of the figures
    rows = [run(args.n, *map(int, s.split("x"))) for s in args.sizes]
    print(describe())
    print(f"prepare to shorter side {SIZE}, JPEG quality {QUALITY}; images/s (higher is better)\n")
    print(
        "| source | images | plain (Pillow, 1 process) | ours, n_jobs=1 | ours, all cores, cold"
        " | ours, all cores, warm workers | speed-up cold / warm |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['source']} | {r['n']} | {r['plain']:.1f} | {r['ours_1']:.1f} | {r['ours_all']:.1f}"
            f" | {r['ours_warm']:.1f} | {r['ours_all'] / r['plain']:.2f}x"
            f" / {r['ours_warm'] / r['plain']:.2f}x |"
        )


if __name__ == "__main__":
    main()
