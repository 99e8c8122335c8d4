"""How the embedded default's recipe was chosen: val curves of the training phases over the swept
settings, from the ImageNet-pretrained EfficientNet-Lite0 (never test: val only).

Each run is ``stages/train.py`` on the default's prepared data (``dvc repro balance`` first) with
params.yaml plus the run's dotted overrides, which name every swept key, so a run means the same
thing whatever params.yaml's current values of those keys are. The finetune runs start from the
``train`` run named in ``INIT`` and keep the last epoch (4 epochs, to see the trend past the 3 the
default runs).

    python benchmarks/sweep_default.py            # runs every sweep (~15 min on 2 cores), then plots
    python benchmarks/sweep_default.py --plot     # the chart from benchmarks/results/default_sweep.json

Writes benchmarks/results/default_sweep.json and reports/default_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import params as load_params  # noqa: E402
from benchmarks.harness import write_params, write_results  # noqa: E402
from benchmarks.machine import describe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "default_sweep.json"
CHART = ROOT / "reports" / "default_sweep.png"


#: name -> (phase, the run whose last.pt it starts from, overrides)
def _train(lr: float, epochs: int = 10, resolution: int = 128) -> tuple[str, None, dict]:
    return ("train", None, {"train.lr": lr, "train.epochs": epochs, "train.resolution": resolution})


RUNS: dict[str, tuple[str, str | None, dict]] = {
    **{f"train lr {lr}": _train(float(lr)) for lr in ("1e-4", "3e-4", "1e-3")},
    "train lr 3e-4, 15 epochs": _train(3e-4, epochs=15),
    **{f"train {res} px": _train(3e-4, resolution=res) for res in (96, 160)},
    **{
        f"balanced lr {lr}, BN {bn}": (
            "finetune_balanced",
            "train lr 3e-4",
            {
                "finetune_balanced.lr": float(lr),
                "finetune_balanced.epochs": 4,
                "finetune_balanced.checkpoint": "last",
                "finetune_balanced.freeze_bn": bn == "frozen",
            },
        )  # fmt: skip
        for lr, bn in (
            ("1e-5", "frozen"),
            ("3e-5", "frozen"),
            ("1e-4", "frozen"),
            ("3e-4", "frozen"),
            ("3e-5", "trained"),
            ("1e-4", "trained"),
        )  # fmt: skip
    },
}


def run_one(name: str, phase: str, init: Path | None, overrides: dict, work: Path) -> dict:
    folder = work / name.replace(" ", "_").replace(",", "")
    folder.mkdir(parents=True)
    write_params(folder / "params.yaml", load_params(overrides))
    prepared = ROOT / "data" / "prepared"
    csv = "train.csv" if phase == "train" else "balanced.csv"
    cmd = [sys.executable, str(ROOT / "stages/train.py"), "--phase", phase, "--member", "m0",
           "--params", str(folder / "params.yaml"), "--train-csv", str(prepared / csv),
           "--val-csv", str(prepared / "val.csv"), "--label-map", str(prepared / "label_map.csv"),
           "--images", str(prepared), "--out", str(folder / "ckpt")]  # fmt: skip
    if init is not None:
        cmd += ["--init", str(init)]
    started = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    import torch

    history = torch.load(folder / "ckpt" / "last.pt", map_location="cpu", weights_only=False)["history"]
    return {
        "phase": phase,
        "init": None if init is None else str(init),
        "overrides": overrides,
        "seconds": round(time.time() - started, 1),
        "val_top1": [round(row["val/top1"], 4) for row in history],
        "train_top1": [round(row["train/top1"], 4) for row in history],
    }


def sweep() -> dict:
    if not (ROOT / "data" / "prepared" / "balanced.csv").is_file():
        raise SystemExit("run `dvc repro balance` first: the sweep trains on the default's prepared data")
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (phase, init_run, overrides) in RUNS.items():
            init = None
            if init_run is not None:
                init = work / init_run.replace(" ", "_").replace(",", "") / "ckpt" / "last.pt"
            results[name] = run_one(name, phase, init, overrides, work)
            print(json.dumps({name: results[name]}))
    return {"machine": describe(), "torch": torch.__version__, "runs": results}


def plot(report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("train: learning rate and epochs (128 px)", lambda n: n.startswith("train lr")),
        ("train: resolution (lr 3e-4, 10 epochs)", lambda n: n == "train lr 3e-4" or n.endswith(" px")),
        ("finetune_balanced from train lr 3e-4 (val: head SKUs)", lambda n: n.startswith("balanced")),
    )
    for ax, (title, keep) in zip(axes, panels, strict=True):
        for name, r in runs.items():
            if keep(name):
                label = name if "px" not in name else f"{name} ({r['seconds']:.0f} s)"
                if name == "train lr 3e-4" and "resolution" in title:
                    label = f"train 128 px ({r['seconds']:.0f} s)"
                ax.plot(range(1, len(r["val_top1"]) + 1), r["val_top1"], marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = f"Val curves behind the default's recipe (tf_efficientnet_lite0, ImageNet); {report['machine']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    CHART.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(CHART, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--plot", action="store_true", help="only draw the chart from the saved results")
    args = parser.parse_args()
    if args.plot:
        report = json.loads(RESULTS.read_text())
    else:
        report = sweep()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_results(RESULTS, report)
    plot(report)
    print(f"wrote {CHART}")


if __name__ == "__main__":
    main()
