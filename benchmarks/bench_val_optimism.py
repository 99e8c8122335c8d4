"""Does val read above test, and why? Val's top-1 against what test's own per-SKU accuracies predict
for val's rows, per output, per photo domain, and per how val chose the output's weights.

    .venv/bin/python benchmarks/bench_val_optimism.py            # after `make repro`
    .venv/bin/python benchmarks/bench_val_optimism.py --predictions P/predictions --prepared P/data/prepared

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
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, params, write_results  # noqa: E402

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
    test rows resampled within each SKU)."""
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
            "ci95": [round(float(low), 4), round(float(high), 4)]}  # fmt: skip


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", type=Path, default=ROOT / "predictions")
    p.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    p.add_argument("--member", default="m0")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "val_optimism.json")
    args = p.parse_args()
    outputs = [*params()["evaluate"]["phases"], "knn", "fused"]
    report = {"predictions": str(args.predictions), "bootstrap": args.bootstrap, "outputs": {}}
    print("| output | val rows | val read | val expected (SKU) | optimism [95%] | by SKU and domain [95%] |")
    print("|---|---|---|---|---|---|")
    for name in outputs:
        path = args.predictions / name / f"{args.member}.npz"
        if not path.is_file():
            continue
        val, test = output_rows(path, args.prepared)
        row = {
            "sku": optimism(val, test, False, args.bootstrap),
            "sku_domain": optimism(val, test, True, args.bootstrap),
        }
        for domain in ("inshop", "customer"):
            part = val[val["domain"] == domain]
            if len(part):
                row[domain] = optimism(part, test, True, args.bootstrap)
        report["outputs"][name] = row
        s, d = row["sku"], row["sku_domain"]
        print(f"| {name} | {s['val_rows']} | {s['val_read']:.3f} | {s['val_expected']:.3f} | "
              f"{s['optimism']:+.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}] | "
              f"{d['optimism']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |")  # fmt: skip
    write_results(args.out, report)


if __name__ == "__main__":
    main()
