"""Step 3 of the GPU box check (benchmarks/gpu_check.py): the project's train stage beside timm's own
``train.py`` on the same ImageFolder, model, resolution, batch, workers, bf16 and channels-last."""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from pathlib import Path

from gpu_run import TINY, dvclive_epochs, make_project, outcome, run_timed, write_params


def write_imagefolder(prepared: Path, dest: Path) -> dict:
    """train/ and val/ of the prepared set as ``<split>/<label>/<name>``: the very JPEG bytes the
    project's loader decodes (the shards hold them as written), so both sides read the same files."""
    import pandas as pd

    from products10k.contracts.shards import ImageStore

    store = ImageStore(prepared)
    counts = {}
    for split in ("train", "val"):
        df = pd.read_csv(prepared / f"{split}.csv")
        for row in df.itertuples():
            folder = dest / split / f"{row.label:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / Path(row.name).name).write_bytes(
                bytes(store.read_bytes(row.shard, row.offset, row.length))
            )
        counts[split] = len(df)
    return counts


def timm_epochs(lines: list[str], batch: int) -> list[dict]:
    """img/s and data-wait share of each epoch from timm's last "Train: E [..]" line of it:
    the epoch's mean update time and mean data time (its AverageMeters restart every epoch)."""
    pattern = re.compile(
        r"Train: (\d+) \[.*?Time: [\d.]+s,\s+[\d.]+/s\s+\(([\d.]+)s,.*?Data: [\d.]+ \(([\d.]+)\)"
    )
    last: dict[int, tuple[float, float]] = {}
    for line in lines:
        m = pattern.search(line)
        if m:
            last[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return [{"throughput": batch / t, "data_wait": d / t} for _, (t, d) in sorted(last.items()) if t > 0]


def steady(epochs: list[float]) -> float | None:
    """The median over the epochs after the first (which pays for autotuning and worker start)."""
    rest = epochs[1:] or epochs
    return round(statistics.median(rest), 4) if rest else None


def peer(args, env: dict, timeout: float, work: Path) -> dict:
    """Prepare a synthetic set, then train it through the project's train stage and, with
    ``--timm-train``, through timm's train.py: each side's steady img/s and data wait."""
    deadline = time.perf_counter() + timeout
    s = peer_settings(args)
    per_sku = s["images"] // s["classes"]
    overrides = {**(TINY if args.tiny else {}), "data.synthetic.train_images": s["images"]}
    overrides["data.synthetic.train_min_per_sku"] = max(2, per_sku // 2)
    overrides["data.synthetic.train_max_per_sku"] = 2 * per_sku
    overrides["data.synthetic.test_images"] = s["classes"]
    overrides["prepare.val_min_images"] = 2
    project = make_project(work / "peer", overrides, env)
    prep_cmd = [sys.executable, "-m", "dvc", "repro", "prepare"]
    prep = run_timed(prep_cmd, project, env, deadline - time.perf_counter(), work / "peer_prepare.log")
    report: dict = {"settings": s, "prepare": outcome(prep, timeout)}
    if prep["code"] != 0:
        report["status"] = "prepare failed"
        return report
    prepared = project / "data" / "prepared"
    report["images"] = write_imagefolder(prepared, work / "imagefolder")

    # the project's train stage, with the augmentation timm's train.py applies by default
    write_params(project, {**overrides, **peer_overrides(s)})
    share = (deadline - time.perf_counter()) / (2 if args.timm_train else 1)
    report["ours"] = _ours(prepared, project, env, share, timeout, work)
    if not args.timm_train:
        report["timm"] = {"status": "not run: no --timm-train (timm's train.py from its repository)"}
        report["status"] = report["ours"]["status"]
        return report
    report["timm"] = _timm(args, s, env, deadline - time.perf_counter(), timeout, work)
    if report["ours"]["img_per_s"] and report["timm"]["img_per_s"]:
        report["ratio"] = round(report["ours"]["img_per_s"] / report["timm"]["img_per_s"], 2)
    report["status"] = "ok" if report["ours"]["status"] == report["timm"]["status"] == "ok" else "failed"
    return report


def _ours(prepared: Path, project: Path, env: dict, budget: float, timeout: float, work: Path) -> dict:
    """The project's train stage on the prepared set: its outcome and DVCLive's per-epoch figures."""
    cmd = [sys.executable, "stages/train.py", "--phase", "train", "--member", "m0", "--params", "params.yaml"]
    cmd += ["--train-csv", str(prepared / "train.csv"), "--val-csv", str(prepared / "val.csv")]
    cmd += ["--label-map", str(prepared / "label_map.csv"), "--images", str(prepared)]
    cmd += ["--out", str(work / "ours_ckpt"), "--live", str(work / "ours_live")]
    result = run_timed(cmd, project, env, budget, work / "peer_ours.log")
    epochs = dvclive_epochs(work / "ours_live")
    return {
        **outcome(result, timeout),
        "epochs": epochs,
        "img_per_s": steady(epochs.get("throughput", [])),
        "data_wait": steady(epochs.get("data_wait", [])),
    }


def _timm(args, s: dict, env: dict, budget: float, timeout: float, work: Path) -> dict:
    """timm's train.py on the ImageFolder with the same settings: its outcome and per-epoch figures."""
    cmd = [sys.executable, str(args.timm_train.resolve()), str(work / "imagefolder")]
    cmd += ["--train-split", "train", "--val-split", "val", "--model", s["arch"]]
    cmd += ["--num-classes", str(s["classes"]), "--img-size", str(s["resolution"])]
    cmd += ["-b", str(s["batch"]), "--epochs", str(s["epochs"])]
    cmd += ["--opt", "adam", "--lr", "3e-4", "--weight-decay", "1e-4"]
    cmd += ["--sched", "cosine", "--warmup-epochs", "0"]
    cmd += ["-j", str(s["workers"]), "--pin-mem", "--log-interval", "10", "--output", str(work / "timm_out")]
    cmd += ["--device", args.device, "--seed", "0", "--checkpoint-hist", "1"]
    if s["amp"]:
        cmd += ["--amp", "--amp-dtype", "bfloat16"]
    if s["channels_last"]:
        cmd.append("--channels-last")
    result = run_timed(cmd, work, env, budget, work / "peer_timm.log")
    epochs = timm_epochs([line for _, line in result["lines"]], s["batch"])
    return {
        **outcome(result, timeout),
        "command": " ".join(cmd[1:]),
        "epochs": {k: [round(e[k], 4) for e in epochs] for k in ("throughput", "data_wait")},
        "img_per_s": steady([e["throughput"] for e in epochs]),
        "data_wait": steady([e["data_wait"] for e in epochs]),
    }


def peer_settings(args) -> dict:
    workers = max(1, min(15, len(os.sched_getaffinity(0)) - 1))
    if args.tiny:
        return {
            "arch": "resnet10t",
            "resolution": 32,
            "batch": 8,
            "epochs": 2,
            "workers": min(2, workers),
            "images": 48,
            "classes": 6,
            "amp": args.device == "cuda",
            "channels_last": True,
        }
    return {
        "arch": "efficientnet_b3",
        "resolution": 448,
        "batch": 64,
        "epochs": args.peer_epochs,
        "workers": workers,
        "images": args.peer_images,
        "classes": 48,
        "amp": args.device == "cuda",
        "channels_last": True,
    }


def peer_overrides(s: dict) -> dict:
    """The project's train phase set as timm's train.py runs by default: RandomResizedCrop(0.08-1),
    flip, colour jitter 0.4, no erasing, label smoothing 0.1, Adam, cosine, no warm-up."""
    return {
        "model.arch": s["arch"], "model.pretrained": False, "model.drop_rate": 0.0,
        "train.resolution": s["resolution"], "train.resize": None, "train.batch_size": s["batch"],
        "train.epochs": s["epochs"], "train.num_workers": s["workers"], "train.crop": "random_resized",
        "train.rrc_scale": [0.08, 1.0], "train.color_jitter": 0.4, "train.random_erasing": 0.0,
        "train.label_smoothing": 0.1, "train.warmup_epochs": 0, "train.schedule": "cosine",
        "train.amp": "bf16" if s["amp"] else "off", "train.channels_last": s["channels_last"],
    }  # fmt: skip
