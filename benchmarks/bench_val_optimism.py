"""Does val read above test, and why? Val's top-1 against what test's own per-SKU accuracies predict
for val's rows, per output, per photo domain, and per how val chose the output's weights.

    .venv/bin/python benchmarks/bench_val_optimism.py            # after `make repro`
    .venv/bin/python benchmarks/bench_val_optimism.py --predictions P/predictions --prepared P/data/prepared
    .venv/bin/python benchmarks/bench_val_optimism.py --seeds 0 1 2 [--data digits]   # ~7 (4) min a seed

``--seeds`` runs the pipeline in a fresh clone of HEAD (commit first) once per seed through the real
``dvc exp run -S prepare.seed=S -S train.seed=S`` (a new val split and a new training each time) and
pools: the mean optimism over seeds with the interval of that mean (each seed's bootstrap draws
averaged draw by draw: the seeds are independent runs). One val of ~100 rows reads to +-0.10; three
seeds to +-0.06, which is what tells a real gap of a few points from one run's noise.

For each predictions file (every phase of ``evaluate.phases``, the kNN and the fusion of member m0):

- **val read**: val top-1 as evaluate computes it;
- **val expected**: the mean over val's rows of test's top-1 on that row's SKU (and, per domain, on
  that SKU's test photos of the row's domain where test has some, else the SKU's overall): what val
  would read if its photos were as hard as test's, SKU for SKU; val's own SKU mix is kept, so the
  SKU mix explains nothing of the difference;
- **optimism** = read - expected, with a 95% interval from a bootstrap that resamples val's rows and
  each SKU's test rows (``--bootstrap`` draws).

An optimism of zero within its interval: val is as hard as test once SKU mix is accounted for. Above
zero for every output alike: val's photos are easier (a shoot shared with training photos, the
domain mix). Above zero for the ``train`` phase alone, whose best epoch val chose, and not for the
finetunes (their last epoch): selection. Results: benchmarks/results/val_optimism.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, clone_head, digits_overrides, params, run_tool, write_results  # noqa: E402

from products10k.scores import load_predictions  # noqa: E402


def per_sku_accuracy(hit: np.ndarray, skus: np.ndarray) -> dict:
    """Top-1 rate of each SKU's rows."""
    frame = pd.DataFrame({"sku": skus, "hit": hit})
    return frame.groupby("sku")["hit"].mean().to_dict()


def expected_val(val: pd.DataFrame, test: pd.DataFrame, by_domain: bool) -> np.ndarray:
    """Each val row's expected hit: test's top-1 on its SKU (of its domain, where test has that)."""
    overall = per_sku_accuracy(test["hit"].to_numpy(), test["sku"].to_numpy())
    out = val["sku"].map(overall).to_numpy(dtype=float)
    if by_domain:
        keyed = test.groupby(["sku", "domain"])["hit"].mean().to_dict()
        own = np.array([keyed.get((s, d), np.nan) for s, d in zip(val["sku"], val["domain"], strict=True)])
        out = np.where(np.isnan(own), out, own)
    return out


def optimism(val: pd.DataFrame, test: pd.DataFrame, by_domain: bool, draws: int, seed: int = 0) -> dict:
    """Val read, val expected and their difference with a bootstrap interval (val rows resampled,
    test rows resampled within each SKU); ``draws`` holds the bootstrap's differences, for pooling."""
    val = val[val["sku"].isin(set(test["sku"]))].reset_index(drop=True)
    read = float(val["hit"].mean())
    expected = float(np.nanmean(expected_val(val, test, by_domain)))
    rng = np.random.default_rng(seed)
    test = test.reset_index(drop=True)
    groups = list(test.groupby("sku").indices.values())
    diffs = np.empty(draws)
    for b in range(draws):
        v = val.iloc[rng.integers(0, len(val), len(val))]
        rows = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        diffs[b] = v["hit"].mean() - np.nanmean(expected_val(v, test.iloc[rows], by_domain))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {"val_rows": len(val), "val_read": round(read, 4), "val_expected": round(expected, 4),
            "optimism": round(read - expected, 4),
            "ci95": [round(float(low), 4), round(float(high), 4)], "draws": diffs}  # fmt: skip


def pooled(rows: list[dict]) -> dict:
    """The mean over independent runs of each figure, its interval from the runs' bootstrap draws
    averaged draw by draw, and how many runs read above zero."""
    mean_draws = np.mean([r["draws"] for r in rows], axis=0)
    low, high = np.quantile(mean_draws, [0.025, 0.975])
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 4)  # noqa: E731
    return {"runs": len(rows), "val_rows": sum(r["val_rows"] for r in rows), "val_read": mean("val_read"),
            "val_expected": mean("val_expected"), "optimism": mean("optimism"),
            "ci95": [round(float(low), 4), round(float(high), 4)],
            "runs_above_zero": sum(r["optimism"] > 0 for r in rows), "draws": mean_draws}  # fmt: skip


def output_rows(path: Path, prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Val's and test's rows of one predictions file with their SKU, domain and top-1 hit."""
    preds = load_predictions(path)
    out = []
    for split, scores in (("val", preds.val), ("test", preds.test)):
        rows = pd.read_csv(prepared / f"{split}.csv", dtype={"name": str}).set_index("name")
        frame = rows.loc[scores.names, ["sku", "domain"]].reset_index()
        frame["hit"] = scores.topk_labels[:, 0] == scores.labels
        out.append(frame[scores.labels >= 0])
    return out[0], out[1]


def measure(predictions: Path, prepared: Path, member: str, outputs: list[str], draws: int) -> dict:
    """Every output's optimism on one run: by SKU, by SKU and domain, and per domain."""
    report = {}
    for name in outputs:
        path = predictions / name / f"{member}.npz"
        if not path.is_file():
            continue
        val, test = output_rows(path, prepared)
        row = {"sku": optimism(val, test, False, draws), "sku_domain": optimism(val, test, True, draws)}
        for domain in ("inshop", "customer"):
            part = val[val["domain"] == domain]
            if len(part):
                row[domain] = optimism(part, test, True, draws)
        report[name] = row
    return report


def over_seeds(data: str, seeds: list[int], member: str, draws: int, work: Path) -> dict:
    """The pipeline once per seed in a fresh clone (a new val split and training each time), each
    run measured, and every output's figures pooled over the runs."""
    project = clone_head(work, reuse=True)
    overrides = digits_overrides(work) if data == "digits" else []
    outputs = [*params(path=project / "params.yaml")["evaluate"]["phases"], "knn", "fused"]
    runs = {}
    for seed in seeds:
        sets = ["-S", f"prepare.seed={seed}", "-S", f"train.seed={seed}"]
        seconds = run_tool(["dvc", "exp", "run", *sets, *overrides], project)
        prepared = project / "data" / "prepared"
        runs[str(seed)] = measure(project / "predictions", prepared, member, outputs, draws)
        print(f"seed {seed}: {seconds / 60:.1f} min", flush=True)
    pool = {}
    for name in outputs:
        per_run = [run[name] for run in runs.values() if name in run]
        pool[name] = {key: pooled([r[key] for r in per_run]) for key in ("sku", "sku_domain")}
    return {"data": data, "seeds": seeds, "outputs": pool, "runs": runs}


def print_table(outputs: dict) -> None:
    print("| output | val rows | val read | val expected (SKU) | optimism [95%] | by SKU and domain [95%] |")
    print("|---|---|---|---|---|---|")
    for name, row in outputs.items():
        s, d = row["sku"], row["sku_domain"]
        print(f"| {name} | {s['val_rows']} | {s['val_read']:.3f} | {s['val_expected']:.3f} | "
              f"{s['optimism']:+.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] | "
              f"{d['optimism']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")  # fmt: skip


def without_draws(tree):
    """The report as JSON holds figures, not the bootstrap's arrays."""
    if isinstance(tree, dict):
        return {k: without_draws(v) for k, v in tree.items() if k != "draws"}
    return tree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", type=Path, default=ROOT / "predictions")
    p.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    p.add_argument("--member", default="m0")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", help="run the pipeline once per seed in a fresh clone")
    p.add_argument("--data", choices=("default", "digits"), default="default", help="with --seeds")
    p.add_argument(
        "--work",
        type=Path,
        help="with --seeds: keep the clone here, or reuse the one an earlier "
        "run kept (default: a temp folder)",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.seeds:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            report = over_seeds(args.data, args.seeds, args.member, args.bootstrap, args.work)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                report = over_seeds(args.data, args.seeds, args.member, args.bootstrap, Path(tmp))
        out = args.out or ROOT / "benchmarks" / "results" / f"val_optimism_seeds_{args.data}.json"
    else:
        outputs = [*params()["evaluate"]["phases"], "knn", "fused"]
        measured = measure(args.predictions, args.prepared, args.member, outputs, args.bootstrap)
        report = {"predictions": str(args.predictions), "outputs": measured}
        out = args.out or ROOT / "benchmarks" / "results" / "val_optimism.json"
    report["bootstrap"] = args.bootstrap
    print_table(report["outputs"])
    write_results(out, without_draws(report))


if __name__ == "__main__":
    main()
