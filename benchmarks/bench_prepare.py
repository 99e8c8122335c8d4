"""Prepare throughput (images/s): the prepare stage vs the plain approach, each in a fresh process.

    .venv/bin/python benchmarks/bench_prepare.py [--n 400 2000] [--sizes 800x800] [--repeat 3]

For each source size and image count, writes ``n`` photo-like JPEGs into a ``train.zip`` (official
layout) and times, each run in a fresh Python process (cold: no warm-up, nothing cached from an
earlier run), the variants interleaved and repeated ``--repeat`` times (figures are medians):

- plain: one process, Pillow decode + ``exif_transpose`` + RGB + resize (shorter side 512,
  Pillow's default antialiased bicubic) + JPEG encode, reading from the same zip;
- ours: the whole ``products10k.prepare.prepare`` call (CSV validation, zip index, decode with
  reduced JPEG decode where exact, resize, encode, shard writing, CSVs, report), with ``n_jobs=1``
  and with all cores (``n_jobs=-1``; thread-pool start-up included).

The first table times the work itself (the call, after the imports); the second the whole child
process (interpreter start-up and imports included: about a second of pandas/OpenCV imports for
ours, which a 197k-image run amortises). The all-cores output is checked byte-identical to n_jobs=1.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
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

log = logging.getLogger("bench_prepare")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 512
QUALITY = 93
VARIANTS = {"plain": None, "ours_1": 1, "ours_all": -1}


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
    from products10k.config import PrepareConfig, load_section
    from products10k.prepared.prepare import prepare

    cfg = load_section(ROOT / "params.yaml", "prepare", PrepareConfig).model_copy(
        update={"size": SIZE, "jpeg_quality": QUALITY, "n_jobs": n_jobs, "val_fraction": 0.0}
    )
    t0 = time.perf_counter()
    prepare(raw, out, cfg)
    return time.perf_counter() - t0


def child(variant: str, raw: Path, out: Path) -> None:
    """Run one variant in this (fresh) process; print its seconds as JSON on the last line."""
    logging.basicConfig(level=logging.WARNING)  # keep the stage's INFO lines out of the output
    if variant == "plain":
        seconds = plain(raw / "train.zip")[0]
    else:
        seconds = ours(raw, out, VARIANTS[variant])
    print(json.dumps({"seconds": seconds}))


def spawn(variant: str, raw: Path, out: Path) -> tuple[float, float]:
    """(seconds of the work, seconds of the whole child process) for one variant in a fresh process."""
    cmd = [sys.executable, __file__, "--child", variant, "--raw", str(raw), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"], wall


def run(n: int, w: int, h: int, repeat: int) -> dict:
    work: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        raw = make_raw(Path(tmp), n, w, h)
        for i in range(repeat):
            for variant in VARIANTS:  # interleaved, so that load from other processes hits all alike
                t_work, t_wall = spawn(variant, raw, Path(tmp) / f"{variant}-{i}")
                work[variant].append(t_work)
                wall[variant].append(t_wall)
        one = (Path(tmp) / "ours_1-0" / "images").glob("*.bin")
        for shard in one:
            other = Path(tmp) / "ours_all-0" / "images" / shard.name
            assert shard.read_bytes() == other.read_bytes(), f"{shard.name}: n_jobs changed the bytes"
    row = {"source": f"{w}x{h}", "n": n}
    for variant in VARIANTS:
        row[variant] = n / statistics.median(work[variant])
        row[variant + "_wall"] = n / statistics.median(wall[variant])
        row[variant + "_range"] = (n / max(work[variant]), n / min(work[variant]))
    return row


def table(rows: list[dict], suffix: str) -> None:
    header = ["source", "images", "plain (Pillow, 1 process)", "ours, n_jobs=1", "ours, all cores"]
    print("| " + " | ".join([*header, "speed-up all cores"]) + " |")
    print("|---" * (len(header) + 1) + "|")
    for r in rows:
        cells = []
        for v in VARIANTS:
            cell = f"{r[v + suffix]:.1f}"
            if not suffix:
                lo, hi = r[v + "_range"]
                cell += f" ({lo:.0f}-{hi:.0f})"
            cells.append(cell)
        speedup = r["ours_all" + suffix] / r["plain" + suffix]
        print(f"| {r['source']} | {r['n']} | {' | '.join(cells)} | {speedup:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[400, 2000], help="images per run")
    parser.add_argument("--sizes", nargs="+", default=["800x800"], help="source sizes WxH")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant (figures are medians)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.raw, args.out)
        return
    load_before = os.getloadavg()
    rows = [run(n, *map(int, s.split("x")), args.repeat) for s in args.sizes for n in args.n]
    load_after = os.getloadavg()
    print(describe())
    print(
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after;"
        f" medians of {args.repeat} fresh-process runs each\n"
    )
    print(f"prepare to shorter side {SIZE}, JPEG quality {QUALITY}; images/s (higher is better)\n")
    print(
        "The work (the prepare() call / the plain loop), cold, in a fresh process; (min-max of the runs):\n"
    )
    table(rows, "")
    print("\nThe whole process (interpreter start-up and imports included):\n")
    table(rows, "_wall")


if __name__ == "__main__":
    main()
