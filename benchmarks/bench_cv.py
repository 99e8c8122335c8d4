"""What K-fold cross-validation buys and costs: the pipeline with prepare's single split and with
``cv.folds`` folds, on the embedded default and on a second set of real images (scikit-learn's
digits, benchmarks/digits_data.py), each output's test top-1 and what each setting submits.

Each data set runs in a fresh clone of this repository's HEAD (commit first), through the real
``dvc exp run``: the single split first (its time includes download and prepare), then every fold
count on the same prepared data (its time is from the folds stage on). Per run: each phase's test
top-1 (single centre crop; under cv the fold models' average) and the refit's, kNN and fused, the
submission and its choice (reference, the gain's interval on val, the highest estimate a plain
argmax would have taken), and every output's test gain over the submission with its 95% paired
interval (test rows, ``estimate.paired_gain``).

    python benchmarks/bench_cv.py --data default --folds 0 5     # ~40 min on 2 cores
    python benchmarks/bench_cv.py --data digits --folds 0 5      # ~30 min

Writes benchmarks/results/cv_<data>.json and prints a markdown table (docs/pipeline.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import clone_head, digits_overrides, run_tool, write_results  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from products10k.estimate import paired_gain  # noqa: E402
from products10k.scores import load_predictions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PHASES = ("train", "finetune_balanced", "finetune_accuracy")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _outputs(project: Path) -> dict:
    """Every output's test top-1 and what was submitted, with test gains over the submission."""
    out = {}
    for phase in PHASES:
        m = _json(project / "metrics" / "m0" / f"{phase}.json")
        out[phase] = {"test_top1": m["test"]["top1"], "test_tta_top1": m["test"]["tta"]["top1"]}
        if "test_refit" in m:
            out[phase]["test_refit_top1"] = m["test_refit"]["top1"]
        out[phase]["val_n"] = m["val"].get("n", 0)
    retrieval = _json(project / "metrics" / "m0" / "retrieval.json")
    for name in ("knn", "fused"):
        out[name] = {"test_top1": retrieval["test"][name]["top1"]}
    submission = _json(project / "metrics" / "submission.json")
    choice = submission["choice"]
    top = choice["highest_estimate"]
    argmax = next(
        c for c in choice["candidates"] if (c["candidate"], c["tau"]) == (top["candidate"], top["tau"])
    )
    out["submission"] = {
        "test_top1": submission["test"]["top1"],
        "candidate": choice["candidate"],
        "tau": choice["tau"],
        "val_gain": choice["gain"],
        "val_gain_interval": choice["gain_interval"],
        "val_rows": choice["val_rows"],
        "val_effective_rows": choice["val_effective_rows"],
        "argmax_would_take": {**top, "test_top1": argmax.get("test_top1")},
    }
    out["test_gain_over_submission"] = _test_gains(project)
    return out


def _test_gains(project: Path) -> dict:
    """Each output (tau 0) against the submission on the test rows: gain and 95% paired interval."""
    sub = pd.read_csv(project / "submissions" / "submission.csv", dtype={"name": str}).set_index("name")
    truth = pd.read_csv(project / "data" / "raw" / "test_kaggletest.csv", dtype={"name": str}).set_index(
        "name"
    )
    gains = {}
    for name in (*PHASES, "knn", "fused"):
        loaded = load_predictions(project / "predictions" / name / "m0.npz")
        pred, skus = loaded.test, loaded.skus
        names = pred.names
        known = pred.labels >= 0
        hits = skus[pred.topk_labels[:, 0]] == truth.loc[names, "class"].to_numpy()
        sub_hits = sub.loc[names, "class"].to_numpy() == truth.loc[names, "class"].to_numpy()
        gain, se = paired_gain(hits, sub_hits, known.astype(float))
        gains[name] = {
            "gain": round(gain, 4),
            "interval": [round(gain - 1.96 * se, 4), round(gain + 1.96 * se, 4)],
        }
    return gains


def bench(data: str, folds: list[int], work: Path) -> dict:
    project = clone_head(work)
    overrides = digits_overrides(work) if data == "digits" else []
    runs = {}
    for k in folds:
        seconds = run_tool(["dvc", "exp", "run", "-S", f"cv.folds={k}", *overrides], project)
        runs[str(k)] = {"seconds": round(seconds, 1), **_outputs(project)}
        print(f"cv.folds={k}: {seconds / 60:.1f} min, submission {runs[str(k)]['submission']}", flush=True)
    return {"data": data, "machine": describe(), "runs": runs}


def table(report: dict) -> str:
    names = (*PHASES, "knn", "fused")
    lines = [
        "| cv.folds | time | "
        + " | ".join(names)
        + " | submitted (val gain [interval]) | submission | best output - submission [95%] |",
        "|---" * (len(names) + 5) + "|",
    ]
    for k, run in report["runs"].items():
        sub = run["submission"]
        best = max(names, key=lambda n: run[n]["test_top1"])
        gain = run["test_gain_over_submission"][best]
        low, high = sub["val_gain_interval"]
        lines.append(
            f"| {k} | {run['seconds'] / 60:.1f} min | "
            + " | ".join(f"{run[n]['test_top1']:.3f}" for n in names)
            + f" | {sub['candidate']} tau {sub['tau']:g} ({sub['val_gain']:+.3f} [{low:+.3f}, {high:+.3f}]) "
            f"| **{sub['test_top1']:.3f}** | {best} {gain['gain']:+.3f} "
            f"[{gain['interval'][0]:+.3f}, {gain['interval'][1]:+.3f}] |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("default", "digits"), default="default")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 5])
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the clone here (default: a temp folder)"
    )
    args = parser.parse_args()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        report = bench(args.data, args.folds, args.work)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = bench(args.data, args.folds, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"cv_{args.data}.json"
    write_results(path, report)
    print(report["machine"])
    print(table(report))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
