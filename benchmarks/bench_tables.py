"""Validation + split of a Products-10K-sized metadata table: time and peak memory.

    .venv/bin/python benchmarks/bench_tables.py

Writes a synthetic ``train.csv`` (141,931 rows, 9,691 SKUs, long-tailed, 360 groups) and
``test_kaggletest.csv`` (55,376 rows): 197,307 rows in all, the real dataset's sizes. A fresh
subprocess then loads and validates both (tables.py), splits train/val and builds the label map,
as the prepare stage does before touching images. Peak RSS is the child's ``VmHWM`` (the
high-water mark of its own address space; ``ru_maxrss`` would also count the parent's pages a
fork copied before exec); the same child with imports only gives the interpreter + pandas baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from machine import describe

N_TRAIN, N_TEST, N_SKUS, N_GROUPS = 141_931, 55_376, 9_691, 360


def make_tables(root: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    # Long tail: every SKU has >= 2 images (a few have 1), the rest is spread by a power law.
    weights = (np.arange(N_SKUS) + 1.0) ** -0.7
    counts = 2 + rng.multinomial(N_TRAIN - 2 * N_SKUS, weights / weights.sum())
    ones = rng.choice(N_SKUS, 200, replace=False)
    counts[ones] -= 1
    counts[0] += N_TRAIN - counts.sum()
    sku_ids = rng.choice(np.arange(1, 100_000), N_SKUS, replace=False)
    sku_group = rng.integers(0, N_GROUPS, N_SKUS)
    idx = rng.permutation(np.repeat(np.arange(N_SKUS), counts))
    train = pd.DataFrame(
        {"name": [f"{i}.jpg" for i in range(1, N_TRAIN + 1)], "class": sku_ids[idx], "group": sku_group[idx]}
    )
    test_idx = rng.integers(0, N_SKUS, N_TEST)
    test_names = rng.choice(np.arange(1_000_000, 9_999_999), N_TEST, replace=False)
    test = pd.DataFrame(
        {
            "name": [f"{i}.jpg" for i in test_names],
            "class": sku_ids[test_idx],
            "Usage": np.where(rng.random(N_TEST) < 0.5, "Public", "Private"),
        }
    )
    train_csv, test_csv = root / "train.csv", root / "test_kaggletest.csv"
    train.to_csv(train_csv, index=False)
    test.to_csv(test_csv, index=False)
    return train_csv, test_csv


def peak_rss_mib() -> float:
    """This process's peak resident memory, from /proc (Linux) or getrusage elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(train_csv: str, test_csv: str, imports_only: bool) -> None:
    from products10k.prepared.tables import load_test_table, load_train_table, make_label_map, split_train_val

    if imports_only:
        print(json.dumps({"peak_rss": peak_rss_mib()}))
        return
    t0 = time.perf_counter()
    train = load_train_table(train_csv)
    t1 = time.perf_counter()
    test = load_test_table(test_csv, train)
    t2 = time.perf_counter()
    is_val = split_train_val(train["sku"], 0.15, seed=0)
    t3 = time.perf_counter()
    label_map = make_label_map(train, train)
    t4 = time.perf_counter()
    print(
        json.dumps(
            {
                "load_train": t1 - t0,
                "load_test": t2 - t1,
                "split": t3 - t2,
                "label_map": t4 - t3,
                "total": t4 - t0,
                "rows": len(train) + len(test),
                "skus": len(label_map),
                "groups": int(label_map["group"].nunique()),
                "val": int(is_val.sum()),
                "peak_rss": peak_rss_mib(),
            }
        )
    )


def run_child(train_csv: Path, test_csv: Path, imports_only: bool) -> tuple[dict, float]:
    """Run the child in a fresh process; returns (its figures, its peak RSS in MiB)."""
    args = [sys.executable, __file__, "--child", str(train_csv), str(test_csv)]
    proc = subprocess.run(args + (["--imports-only"] if imports_only else []), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    figures = json.loads(proc.stdout)
    return figures, figures["peak_rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("TRAIN_CSV", "TEST_CSV"), help=argparse.SUPPRESS)
    parser.add_argument("--imports-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, imports_only=args.imports_only)
        return
    with tempfile.TemporaryDirectory(prefix="bench_tables-") as tmp:
        train_csv, test_csv = make_tables(Path(tmp))
        _, base_rss = run_child(train_csv, test_csv, imports_only=True)
        wall = time.perf_counter()
        figures, peak_rss = run_child(train_csv, test_csv, imports_only=False)
        wall = time.perf_counter() - wall
    print(describe())
    print(
        f"table: {figures['rows']:,} rows ({N_TRAIN:,} train + {N_TEST:,} test), {figures['skus']:,} SKUs,"
        f" {figures['groups']} groups; val rows at 0.15: {figures['val']:,}\n"
    )
    print("| step | seconds |")
    print("|---|---|")
    for key in ("load_train", "load_test", "split", "label_map", "total"):
        print(f"| {key.replace('_', ' ')} | {figures[key]:.2f} |")
    print(f"| whole child process incl. interpreter + imports | {wall:.2f} |")
    print(f"\npeak RSS: {peak_rss:.0f} MiB (interpreter + pandas imports alone: {base_rss:.0f} MiB)")


if __name__ == "__main__":
    main()
