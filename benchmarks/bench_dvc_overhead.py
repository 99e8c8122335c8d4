"""DVC overhead of tracking prepared images: 20k small files vs the same bytes in shards.

    .venv/bin/python benchmarks/bench_dvc_overhead.py [--files 20000] [--kb 40] [--prepare-ips N]

In a temporary git+dvc repo (the project's cache link types), writes ``--files`` files of about
``--kb`` KiB (incompressible, like JPEG) into one folder, and the same bytes packed into 256 MiB
shards (storage.ShardWriter) into another, then times for each folder

- ``dvc add`` (hash every file, move it into the cache, link it back: what ``dvc repro`` does to
  a stage's outputs after the command ran), and
- ``dvc status`` right after (the check every later ``dvc repro``/``status`` pays),

and extrapolates both linearly to Products-10K's 197,307 images (DVC's fixed start-up cost,
measured on one tiny file, is not scaled). They are compared with the
prepare stage's own time at that scale, from its throughput (``--prepare-ips``, or measured here
with bench_prepare on 200 800x800 JPEGs with warm workers).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe
from tqdm import tqdm

from products10k.contracts.shards import ShardWriter

ROOT = Path(__file__).resolve().parents[1]
FULL = 197_307


def sh(cwd: Path, *args: str) -> float:
    """Run a command in ``cwd``; return its wall time; fail loudly with its output."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b")
    env |= {"GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
    t0 = time.perf_counter()
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def dvc(cwd: Path, *args: str) -> float:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def make_data(repo: Path, n_files: int, kb: int, seed: int = 0) -> int:
    """``files/`` with n_files blobs and ``prepared/images/`` with the same bytes in shards."""
    rng = np.random.default_rng(seed)
    files = repo / "files"
    files.mkdir()
    total = 0
    with ShardWriter(repo / "prepared", shard_mb=256) as writer:
        for i in tqdm(range(n_files), desc="write files + shards", unit="file", mininterval=1.0):
            blob = rng.bytes(int(rng.integers(kb * 768, kb * 1280)))  # kb +- 25 %
            (files / f"{i}.jpg").write_bytes(blob)
            writer.add(blob)
            total += len(blob)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--kb", type=int, default=40)
    parser.add_argument("--prepare-ips", type=float, default=None, help="prepare throughput, images/s")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_dvc-") as tmp:
        repo = Path(tmp)
        sh(repo, "git", "init", "-q")
        dvc(repo, "init", "-q")
        shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
        # DVC's fixed per-command cost (start-up, repo scan), measured on one tiny file, is not
        # scaled up with the data.
        (repo / "tiny.txt").write_text("x")
        fixed = {"add": dvc(repo, "add", "tiny.txt"), "status": dvc(repo, "status", "tiny.txt.dvc")}
        total = make_data(repo, args.files, args.kb)
        n_shards = len(list((repo / "prepared" / "images").iterdir()))
        t = {
            "add_files": dvc(repo, "add", "files"),
            "status_files": dvc(repo, "status", "files.dvc"),
            "add_shards": dvc(repo, "add", "prepared/images"),
            "status_shards": dvc(repo, "status", "prepared/images.dvc"),
        }
        cache_type = (repo / ".dvc" / "config").read_text().split("type =")[-1].splitlines()[0].strip()

    if args.prepare_ips is None:
        import bench_prepare

        args.prepare_ips = bench_prepare.run(200, 800, 800)["ours_warm"]
    scale = FULL / args.files
    prepare_full = FULL / args.prepare_ips
    print(describe())
    print(
        f"{args.files:,} files, {total / 2**20:,.0f} MiB ({total / args.files / 1024:.0f} KiB each) vs"
        f" {n_shards} shard(s); cache type {cache_type}; extrapolated x{scale:.2f} to {FULL:,} images;"
        f" prepare at {args.prepare_ips:.0f} images/s\n"
    )
    k = f"{args.files // 1000}k"
    print(f"| layout | dvc add, {k} | dvc status, {k} | dvc add, 197k (extrap.) | dvc status, 197k (extrap.)"
          " | add as share of prepare time |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for layout, key in (("one file per image", "files"), ("256 MiB shards", "shards")):
        add, status = t[f"add_{key}"], t[f"status_{key}"]
        add_full = fixed["add"] + max(0.0, add - fixed["add"]) * scale
        status_full = fixed["status"] + max(0.0, status - fixed["status"]) * scale
        print(
            f"| {layout} | {add:.1f} s | {status:.1f} s | {add_full / 60:.1f} min | {status_full:.1f} s"
            f" | {add_full / prepare_full:.0%} |"
        )
    print(f"\nfixed cost per dvc command (one tiny file): add {fixed['add']:.1f} s,", end=" ")
    print(f"status {fixed['status']:.1f} s")
    print(f"\nprepare stage itself at {FULL:,} images: {prepare_full / 60:.1f} min")


if __name__ == "__main__":
    main()
