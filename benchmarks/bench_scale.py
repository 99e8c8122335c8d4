"""The full-cardinality rehearsal, stage by stage: time, throughput, peak memory, disk.

    .venv/bin/python benchmarks/bench_scale.py [--workdir /tmp/p10k-scale] [--preset scale]
        [--set data.synthetic.num_skus=969 ...] [--out benchmarks/results/scale.json]

Clones this repository's committed tree into ``--workdir`` (a fresh git repo), applies the preset
(``presets/scale.yaml``: 9,691 SKUs, 141,931 train and 55,376 test images, a 3-member ensemble)
and any ``--set`` overrides, then runs every stage with ``dvc repro --single-item <stage>`` in
pipeline order. Per stage it reports

- wall time and images/s (the images the stage reads or writes: generated, prepared, trained on
  over all epochs, predicted over all TTA views, or embedded);
- peak memory of the whole process tree (dvc, torchrun, the stage, DataLoader workers), sampled
  every 0.2 s with psutil: the sum over processes of their PSS (proportional set size: pages a
  forked DataLoader worker shares with its parent counted once, not per process), maximised; and
  the largest single process's peak RSS (``ru_maxrss`` of the children);
- the disk size of the stage's outputs and of the DVC cache after it;

then the time of a no-op ``dvc repro`` and of ``dvc status`` on the finished workspace, the
checkpoint sizes and whether the prepared shards are links into the cache (no copy per
``dvc exp run``). Stage logs go to ``<workdir>/bench-logs/<stage>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml
from harness import params as load_params
from harness import parse_sets, write_params, write_results
from machine import describe

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, log: Path | None = None) -> None:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()


def measured(cmd: list[str], cwd: Path, log: Path) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in bytes summed over its process tree)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            root = psutil.Process(proc.pid)
            while not done.is_set():
                total = 0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        try:
                            total += p.memory_full_info().pss
                        except psutil.Error:
                            pass  # a worker that just exited
                except psutil.Error:
                    break
                peak = max(peak, total)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        done.set()
        sampler.join()
        wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return wall, peak


def du(path: Path) -> int:
    """Bytes of the distinct files under ``path`` (hard links counted once)."""
    if path.is_file():
        return path.stat().st_size
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def stage_outputs(work: Path, stage: str) -> list[Path]:
    """The cached outputs of ``stage``, as dvc.lock records them."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"][stage]
    return [work / o["path"] for o in lock.get("outs", [])]


def stage_names(params: dict) -> list[str]:
    members = list(params["ensemble"]["members"])
    phases = list(params["evaluate"]["phases"])
    names = ["download", "prepare", "balance"]
    for phase in ("train", "finetune_balanced", "finetune_accuracy"):
        names += [f"{phase}@{m}" for m in members]
    names += [f"evaluate@{m}-{p}" for m in members for p in phases]
    names += [f"index@{m}" for m in members]
    return names + ["submit", "export"]


def images_of(work: Path, stage: str, params: dict) -> int:
    """How many images a stage handles (for images/s)."""
    prepared = work / "data" / "prepared"

    def rows(name: str) -> int:
        path = prepared / name
        return sum(1 for _ in open(path)) - 1 if path.is_file() else 0

    if stage in ("download", "prepare"):
        raw = work / "data" / "raw"
        return sum(sum(1 for _ in open(raw / f)) - 1 for f in ("train.csv", "test_kaggletest.csv"))
    if stage == "balance":
        return rows("train.csv")
    if "@" in stage and stage.split("@")[0] in ("train", "finetune_balanced", "finetune_accuracy"):
        phase = stage.split("@")[0]
        epochs = params["train"]["epochs"] if phase == "train" else params[phase].get("epochs")
        epochs = epochs if epochs is not None else params["train"]["epochs"]
        n = rows("train.csv") if phase == "train" else rows("balanced.csv")
        return epochs * (n + rows("val.csv"))  # every epoch trains, then validates
    if stage.startswith("evaluate@"):
        tta = params["tta"]
        views = len(tta["scales"]) * (5 if tta["crops"] == "five" else 1) * (2 if tta["flip"] else 1)
        return views * (rows("val.csv") + rows("test.csv"))
    if stage.startswith("index@"):  # embeds the gallery (every train image), then val and test
        return rows("train.csv") + rows("val.csv") + rows("test.csv")
    if stage == "export":  # the images run through both PyTorch and onnxruntime
        return min(params["export"]["check_images"], rows("test.csv"))
    return rows("test.csv")


def clone(work: Path, preset: str, overrides: dict) -> Path:
    """A fresh clone of the repository at ``work`` with ``preset`` applied and ``overrides`` set,
    committed; its package (not the editable install's) and the venv's tools first on the paths."""
    if work.exists():
        shutil.rmtree(work)
    run(["git", "clone", "-q", str(ROOT), str(work)], cwd=ROOT)
    venv_bin = Path(sys.executable).parent
    os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ['PATH']}"  # dvc.yaml's python/torchrun
    os.environ["PYTHONPATH"] = str(work)  # the clone's package, not the editable install's
    apply = [sys.executable, "-m", "products10k.config.presets", "apply", preset, "--params", "params.yaml"]
    run(apply, work)
    if overrides:
        write_params(work / "params.yaml", load_params(overrides, path=work / "params.yaml"))
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam", "scale"], work)
    return work


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/p10k-scale"))
    p.add_argument("--preset", default="scale")
    p.add_argument("--set", action="append", default=[], help="extra dotted override, key=yaml-value")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = p.parse_args()
    work = clone(args.workdir.resolve(), args.preset, parse_sets(args.set))
    params = load_params(path=work / "params.yaml")
    logs = work / "bench-logs"
    logs.mkdir()

    print(describe())
    import torch

    dvc_version = subprocess.check_output(["dvc", "--version"], text=True).strip()
    print(f"torch {torch.__version__}, dvc {dvc_version}")
    results = []
    columns = ("wall s", "img/s", "peak GiB", "max1 GiB", "outs MB", "cache MB")
    print(f"{'stage':34s} " + " ".join(f"{c:>9s}" for c in columns))
    for stage in stage_names(params):
        wall, peak = measured(["dvc", "repro", "--single-item", stage], work, logs / f"{stage}.log")
        # the largest single descendant's peak RSS so far (monotone over the run: read per stage)
        max1 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        outs = sum(du(o) for o in stage_outputs(work, stage) if o.exists())
        cache = du(work / ".dvc" / "cache")
        n = images_of(work, stage, params)
        row = {"stage": stage, "wall_s": wall, "images": n, "images_per_s": n / wall, "peak_pss": peak,
               "max_single_rss_so_far": max1, "outs_bytes": outs, "cache_bytes": cache}  # fmt: skip
        results.append(row)
        values = (wall, n / wall, peak / 2**30, max1 / 2**30, outs / 1e6, cache / 1e6)
        print(f"{stage:34s} " + " ".join(f"{v:9.2f}" for v in values))

    t = time.perf_counter()
    run(["dvc", "repro"], work, logs / "noop-repro.log")
    noop = time.perf_counter() - t
    t = time.perf_counter()
    run(["dvc", "status"], work, logs / "status.log")
    status = time.perf_counter() - t
    shard = next((work / "data" / "prepared" / "images").glob("shard-*.bin"))
    links = shard.stat().st_nlink
    ckpts = {str(p.relative_to(work)): p.stat().st_size for p in sorted((work / "models").glob("m0/*/*.pt"))}
    preds = {
        str(p.relative_to(work)): p.stat().st_size for p in sorted((work / "predictions").glob("*/m0.npz"))
    }
    summary = {
        "machine": describe(),
        "torch": torch.__version__,
        "stages": results,
        "noop_repro_s": noop,
        "status_s": status,
        "shard_link_count": links,  # > 1: the workspace file is a hard link into the cache
        "checkpoints": ckpts,
        "predictions": preds,
        "total_wall_s": sum(r["wall_s"] for r in results),
        "max_peak_pss": max(r["peak_pss"] for r in results),
    }
    print(f"no-op dvc repro {noop:.1f} s, dvc status {status:.1f} s, shard link count {links}")
    print(f"checkpoints: {json.dumps(ckpts)}")
    print(f"predictions: {json.dumps(preds)}")
    total_min, peak_gib = summary["total_wall_s"] / 60, summary["max_peak_pss"] / 2**30
    print(f"total {total_min:.1f} min, max peak memory (PSS, process tree) {peak_gib:.2f} GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, summary)


if __name__ == "__main__":
    main()
