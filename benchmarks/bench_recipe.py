"""A candidate training recipe against the default, run by run: the whole pipeline per seed, every
output's val estimate (what the submit stage chooses on) beside its test top-1 (recorded, never
used to choose), and the candidate's gain on each.

    .venv/bin/python benchmarks/bench_recipe.py --seeds 1 2 \\
        --set train.sampler=pk --set train.metric_loss_weight=1 --set train.freeze_bn=true

Each seed runs ``dvc exp run -S prepare.seed=S -S train.seed=S`` (a new val split and a new training)
in a fresh clone of HEAD (commit first), once as params.yaml has it and once with the ``--set``
overrides on top; about 4 min a run on 2 CPU cores. ``--common KEY=VALUE`` sets a key for both
recipes, for example ``--common cv.folds=5`` to choose on the out-of-fold estimate (every training
photo read, not ~100 val rows; six trainings a phase, 18-27 min a run). One val of ~100 rows
reads an output to about +-0.10, one test of 960 to +-0.03: a gain says something only as far as it
holds over the seeds.
Results: benchmarks/results/recipe.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, clone_head, params, parse_sets, run_tool, write_results  # noqa: E402


def outputs(project: Path) -> dict:
    """Each output the submit stage compared (tau 0): its val estimate, val top-1 and test top-1;
    and what it submitted."""
    report = json.loads((project / "metrics" / "submission.json").read_text())
    choice = report["choice"]
    out = {
        c["candidate"]: {k: c[k] for k in ("val_estimate", "val_top1", "test_top1")}
        for c in choice["candidates"]
        if c["tau"] == 0.0
    }
    submitted = {"candidate": choice["candidate"], "tau": choice["tau"]}
    out["submitted"] = {**submitted, "test_top1": report["test"]["top1"]}
    return out


def as_args(sets: dict) -> list[str]:
    return [arg for key, value in sets.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def compare(seeds: list[int], sets: dict, work: Path, common: dict | None = None) -> dict:
    project = clone_head(work)
    # the default run sets the candidate's keys to params.yaml's values: `dvc exp run -S` leaves
    # the workspace's params.yaml as the last experiment had it
    tree = params(path=project / "params.yaml")
    default = {key: _dotted(tree, key) for key in sets}
    common = common or {}
    runs = {}
    for seed in seeds:
        seeded = ["-S", f"prepare.seed={seed}", "-S", f"train.seed={seed}", *as_args(common)]
        runs[str(seed)] = {}
        for recipe, args in (("default", as_args(default)), ("candidate", as_args(sets))):
            seconds = run_tool(["dvc", "exp", "run", *seeded, *args], project)
            runs[str(seed)][recipe] = outputs(project)
            print(f"seed {seed}, {recipe}: {seconds / 60:.1f} min", flush=True)
    report = {"seeds": seeds, "common": common, "default": default, "candidate": sets}
    return {**report, "runs": runs, "gains": gains(runs)}


def _dotted(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def gains(runs: dict) -> dict:
    """Per output: the candidate's gain on val's estimate and on test, seed by seed and their mean."""
    names = [n for n in next(iter(runs.values()))["default"] if n != "submitted"]
    out = {}
    for name in [*names, "submitted"]:
        key = ("test_top1",) if name == "submitted" else ("val_estimate", "test_top1")
        out[name] = {}
        for k in key:
            per_seed = [r["candidate"][name][k] - r["default"][name][k] for r in runs.values()]
            mean = round(float(np.mean(per_seed)), 4)
            out[name][k] = {"per_seed": [round(g, 4) for g in per_seed], "mean": mean}
    return out


def table(report: dict) -> str:
    lines = [
        "| output | val estimate: default → candidate, per seed | test: default → candidate, per seed | "
        "mean gain: val estimate | mean gain: test |",
        "|---|---|---|---|---|",
    ]
    runs = report["runs"].values()

    def pairs(name: str, key: str) -> str:
        return ", ".join(f"{r['default'][name][key]:.3f} → {r['candidate'][name][key]:.3f}" for r in runs)

    for name, gain in report["gains"].items():
        val = pairs(name, "val_estimate") if "val_estimate" in gain else "–"
        val_gain = f"{gain['val_estimate']['mean']:+.3f}" if "val_estimate" in gain else "–"
        cells = [name, val, pairs(name, "test_top1"), val_gain, f"{gain['test_top1']['mean']:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a candidate's override")
    p.add_argument("--common", action="append", default=[], metavar="KEY=VALUE", help="set for both recipes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recipe.json")
    args = p.parse_args()
    sets, common = parse_sets(args.set), parse_sets(args.common)
    if not sets:
        p.error("name the candidate recipe with --set KEY=VALUE")
    if set(sets) & set(common):
        p.error(f"--set and --common both name {sorted(set(sets) & set(common))}")
    with tempfile.TemporaryDirectory() as tmp:
        report = compare(args.seeds, sets, Path(tmp), common)
    write_results(args.out, report)
    print(table(report))


if __name__ == "__main__":
    main()
