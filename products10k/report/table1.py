"""The paper's Table 1 from your own runs, in one command, with seeds and confidence intervals.

    python -m products10k.report.table1 run          # queue + run the experiments, then `report`
    python -m products10k.report.table1 report       # the report from experiments already run
    python -m products10k.report.table1 show [EXP ...]   # Table 1 of the workspace / named experiments

``run`` queues, for each of ``table1.seeds`` seeds (``train.seed`` = 0, 1, ...), two DVC
experiments of the current workspace (HEAD plus uncommitted changes and params.yaml):

- ``high``: the pipeline as configured, up to the evaluate stages of the three phases: the
  high-resolution ``train`` row and its two finetune rows;
- ``low``: ``train.resolution`` x 224/448 (the paper's baseline; 224 under the paper preset), up
  to ``evaluate@<member>-train`` only.

and, for the long-tail methods of ``table1.methods``, the rows that show what each does on top of
the high-resolution ``train`` row (the gain of these rows is against it):

- ``logit_adjust``: post-hoc logit adjustment (Menon et al. 2021) of the ``high`` experiment's
  ``train`` predictions, no new experiment: one row with tau fitted on val's estimate over
  ``submit.tau_grid`` (as the submit stage fits it), one with tau = 1 (the Bayes-optimal correction
  for a balanced test, not fitted);
- ``balanced_softmax``: an experiment training with ``train.loss=balanced_softmax``;
- ``class_balanced``: the balanced finetune on every train image with class-balanced sampling
  (``balance.per_class=null``, ``finetune_balanced.sampler=class_balanced``) beside the paper's
  <= 5-per-SKU subset;
- ``crt``: classifier re-training (Kang et al. 2020) as the balanced phase: the head re-initialised
  and trained alone, backbone frozen, class-balanced over every image, at train's lr and epochs.

``dvc queue start -j <table1.jobs>`` runs them (one at a time by default); DVC's run cache restores
every stage whose inputs it has seen (the data stages after the first experiment). Experiment names carry a
fingerprint of HEAD, the uncommitted diff and params.yaml (``t1-<fp>-s<seed>-<high|low>``), so
re-running with nothing changed finds every experiment done and recomputes nothing; a change
makes new ones.

``report`` reads each experiment's ``metrics/<member>/<phase>.json`` and predictions file (the
single centre crop's top-1 per test image, the paper's protocol) and writes
``reports/table1.{md,json,png}``: per row the test top-1 mean ± standard deviation over seeds,
all / head / tail SKUs, each step's gain with a bootstrap interval over seeds and test images
(``products10k.report.stats``), and the paper's published number beside it. The per-image hits are
checked against the metrics files: a report never disagrees with ``dvc metrics show``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from products10k import choose, common
from products10k.common import Products10kError
from products10k.config import (
    EvaluateConfig,
    PhaseConfig,
    SubmitConfig,
    Table1Config,
    load_yaml,
    member_names,
    section,
)
from products10k.estimate import log_train_prior
from products10k.report.chart import draw_table1, seeds_text
from products10k.report.experiments import (
    PAPER,
    PAPER_TITLES,
    Experiment,
    Row,
    experiment_revs,
    low_resolution,
    plan,
    run_experiments,
    table_rows,
)
from products10k.report.stats import paired_bootstrap, seed_spread
from products10k.scores import SINGLE_TOP1, Predictions, load_predictions

log = logging.getLogger("products10k.table1")

# --- collecting and reporting ---------------------------------------------------------------


def _read(path: str, rev: str | None, mode: str = "r"):
    import dvc.api

    if rev is None:
        return Path(path).read_bytes() if mode == "rb" else Path(path).read_text()
    with dvc.api.open(path, rev=rev, mode=mode) as f:
        return f.read()


def load_run(rev: str | None, member: str, phase: str) -> tuple[dict, np.ndarray, Predictions]:
    """(metrics, single-crop top-1 labels, the whole predictions file) of one phase of one experiment
    (or the workspace), its predictions file read once."""
    metrics = json.loads(_read(f"metrics/{member}/{phase}.json", rev))
    data = _read(f"predictions/{phase}/{member}.npz", rev, "rb")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if SINGLE_TOP1 not in npz.files:
            raise Products10kError(
                f"predictions/{phase}/{member}.npz at {rev or 'the workspace'} has no single-crop labels "
                "(written by an older evaluate stage): re-run the experiments"
            )
        single = npz[SINGLE_TOP1].astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.npz"
        path.write_bytes(data)
        return metrics, single, load_predictions(path, member)


@dataclass(frozen=True)
class Adjustment:
    """What a logit-adjusted row needs: the target mix val is weighted to and the tau grid."""

    target_prior: str
    tau_grid: tuple[float, ...]


def adjusted_hits(scores: Predictions, label_map: pd.DataFrame, tau, adjustment: Adjustment):
    """(test top-1 hits after logit adjustment, the tau used, val's estimate at that tau):
    ``auto`` fits tau on val's estimate over the grid, exactly as the submit stage does
    (products10k/choose.py)."""
    log_prior = log_train_prior(label_map)
    target = choose.target_prior(adjustment.target_prior, label_map)
    weights = choose.row_weights(scores.val.labels, target)
    grid = adjustment.tau_grid if tau == "auto" else (float(tau),)
    scored = choose.score_taus(
        "row", scores.val.topk_labels, scores.val.topk_probs(), scores.val.labels, weights, log_prior, grid
    )
    pick = choose.best(scored)
    top1 = choose.adjust(scores.test.topk_labels, scores.test.topk_probs(), log_prior, pick.tau)[0][:, 0]
    return top1 == scores.test.labels, pick.tau, pick.val_estimate


def collect(
    experiments: list[Experiment], rows: list[Row], member: str, adjustment: Adjustment
) -> dict[str, np.ndarray]:
    """Row key -> (seeds, test images) hits; checked against each experiment's metrics file.
    ``_taus``: per logit-adjusted row, the tau each seed used."""
    revs = experiment_revs()
    missing = [e.name for e in experiments if e.name not in revs]
    if missing:
        raise Products10kError(
            f"experiment {missing[0]} has not run: `python -m products10k.report.table1 run`"
        )
    by_role: dict[str, list[Experiment]] = {}
    for exp in sorted(experiments, key=lambda e: e.seed):
        by_role.setdefault(exp.role, []).append(exp)
    # the label map of the data the experiments ran on (not the workspace's, which may differ or be absent)
    label_map_csv = _read("data/prepared/label_map.csv", revs[experiments[0].name])
    label_map = pd.read_csv(io.StringIO(label_map_csv))
    hits, taus, val, labels0 = {}, {}, {}, None
    runs: dict[tuple[str, str], tuple] = {}  # (experiment, phase): read once for all its rows
    for row in rows:
        per_seed = []
        for exp in by_role[row.role]:
            key = (exp.name, row.phase)
            if key not in runs:
                runs[key] = load_run(revs[exp.name], member, row.phase)
            metrics, pred, scores = runs[key]
            labels = scores.test.labels.astype(np.int64)
            if labels0 is None:
                labels0 = labels
            elif not np.array_equal(labels, labels0):
                raise Products10kError(f"{exp.name}: its test rows differ from the other experiments'")
            hit = pred == labels
            if not np.isclose(hit.mean(), metrics["test"]["top1"], atol=1e-9):
                raise Products10kError(f"{exp.name}/{row.phase}: predictions disagree with its metrics file")
            # val's estimate of the test metric beside it: does val rank the rows as test does?
            adjusted, tau, estimate = adjusted_hits(scores, label_map, row.tau or 0.0, adjustment)
            if row.tau is not None:
                hit = adjusted
                taus.setdefault(row.key, []).append(tau)
            val.setdefault(row.key, []).append(estimate)
            per_seed.append(hit)
        hits[row.key] = np.stack(per_seed)
    hits["_labels"] = labels0
    hits["_label_map"] = label_map_csv
    hits["_taus"] = taus
    hits["_val"] = val
    return hits


def build_report(
    hits: dict,
    rows: list[Row],
    tail_mask: np.ndarray,
    cfg: Table1Config,
    names: list[str],
    taus: dict[str, list[float]] | None = None,
    val: dict[str, list[float]] | None = None,
) -> dict:
    """Numbers of the report: per row and part (all/head/tail), mean ± sd and the interval of the
    gain over the row it builds on (``Row.base``)."""
    masks = {"all": np.ones_like(tail_mask), "head": ~tail_mask, "tail": tail_mask}
    taus = taus or {}
    out_rows = []
    for row in rows:
        entry = {"key": row.key, "title": row.title, "base": row.base}
        if row.key in PAPER:
            entry |= {"paper": PAPER[row.key], "paper_title": PAPER_TITLES[row.key]}
        if row.key in taus:
            entry["tau"] = taus[row.key]
        if val and row.key in val and np.isfinite(val[row.key]).all():
            entry["val_estimate"] = float(np.mean(val[row.key]))
        for part, mask in masks.items():
            if not mask.any():
                continue
            mean, std = seed_spread(hits[row.key][:, mask])
            entry[part] = {"top1": mean, "std": std, "n": int(mask.sum())}
            if row.base is not None:
                ci = paired_bootstrap(
                    hits[row.key][:, mask],
                    hits[row.base][:, mask],
                    resamples=cfg.bootstrap,
                    confidence=cfg.confidence,
                    seed=0,
                )
                entry[part]["gain"] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high}
        if row.key in PAPER and row.base in PAPER:
            entry["paper_gain"] = round(PAPER[row.key] - PAPER[row.base], 2)
        out_rows.append(entry)
    return {
        "seeds": len(next(iter(hits.values()))),
        "test_images": int(len(tail_mask)),
        "tail_images": int(tail_mask.sum()),
        "bootstrap": cfg.bootstrap,
        "confidence": cfg.confidence,
        "experiments": names,
        "rows": out_rows,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _gain(g: dict | None) -> str:
    if g is None:
        return ""
    mark = " *" if g["low"] > 0 or g["high"] < 0 else ""
    return f"{100 * g['estimate']:+.1f} [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]{mark}"


def markdown(report: dict) -> str:
    conf = round(100 * report["confidence"])
    lines = [
        f"Test top-1 (%), single centre crop; mean ± sd over {seeds_text(report['seeds'])}; "
        f"gain vs the row it builds on (the row above for the paper's rows; `train` for the long-tail "
        f"methods below them) with its {conf}% interval from {report['bootstrap']} bootstrap "
        f"resamples of both the seeds and the {report['test_images']} test images: it covers "
        "seed-to-seed and test-sample variation, and * marks a gain whose interval excludes 0 "
        f"(the step's sign is not explained by either). Tail: {report['tail_images']} images. "
        "Val estimate: val top-1 weighted to evaluate.target_prior, what every choice on val is made "
        "on (mean over seeds; val covers only the SKUs it has images of).",
        "",
        "| row | top-1 | gain [CI] | head | tail | tail gain [CI] | val estimate | paper | paper gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        title = r["title"]
        if "tau" in r:
            title += " [τ " + ", ".join(f"{t:g}" for t in r["tau"]) + "]"
        cells = [title]
        for part in ("all",):
            cells += [f"**{_pct(r[part]['top1'])}** ± {_pct(r[part]['std'])}", _gain(r[part].get("gain"))]
        head, tail = r.get("head"), r.get("tail")
        cells.append(f"{_pct(head['top1'])} ± {_pct(head['std'])}" if head else "")
        cells.append(f"{_pct(tail['top1'])} ± {_pct(tail['std'])}" if tail else "")
        cells.append(_gain(tail.get("gain")) if tail else "")
        cells.append(_pct(r["val_estimate"]) if "val_estimate" in r else "")
        cells += [
            f"{r['paper']:.2f} ({r['paper_title']})" if "paper" in r else "",
            f"{r['paper_gain']:+.2f}" if "paper_gain" in r else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> None:
    common.write_json(out_dir / "table1.json", report)
    common.write_text(out_dir / "table1.md", markdown(report))
    common.write_bytes(out_dir / "table1.png", draw_table1(report))


def tail_mask_of(labels: np.ndarray, label_map_csv: str, tail_max_images: int) -> np.ndarray:
    """Test rows whose SKU has at most ``tail_max_images`` training images (unknown SKUs: 0)."""
    label_map = pd.read_csv(io.StringIO(label_map_csv))
    n_train = pd.Series(label_map["n_train"].to_numpy(), index=label_map["label"].to_numpy())
    counts = pd.Series(labels).map(n_train).fillna(0).to_numpy()
    return counts <= tail_max_images


# --- the terminal view ----------------------------------------------------------------------


def show(revs: dict[str, str | None], member: str, phases) -> str:
    """Table 1 of the workspace (rev None) or named experiments, ~60 columns wide."""
    lines = []
    for name, rev in revs.items():
        lines.append(f"{name}  ({member}; test top-1 %, single centre crop)")
        lines.append(f"  {'phase':<20} {'test':>6} {'head':>6} {'tail':>6} {'TTA':>6} {'val':>6}")
        for phase in phases:
            try:
                m = json.loads(_read(f"metrics/{member}/{phase}.json", rev))
            except (FileNotFoundError, OSError):
                lines.append(f"  {phase:<20} {'(not run)':>6}")
                continue
            t = m.get("test", {})
            cells = [t.get("top1"), t.get("head", {}).get("top1"), t.get("tail", {}).get("top1")]
            cells += [t.get("tta", {}).get("top1"), m.get("val", {}).get("top1")]
            lines.append(
                f"  {phase:<20} "
                + " ".join(f"{100 * c:6.1f}" if c is not None else f"{'-':>6}" for c in cells)
            )
        lines.append("")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m products10k.report.table1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=("run", "report", "show"))
    p.add_argument("experiments", nargs="*", help="show: experiment names (default: the workspace)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--out", type=Path, default=Path("reports"), help="report: output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    params = load_yaml(args.params)
    cfg = section(params, "table1", Table1Config, where=args.params)
    evaluate = section(params, "evaluate", EvaluateConfig, where=args.params)
    member = member_names(params, args.params)[0]
    if args.command == "show":
        revs: dict[str, str | None] = {"workspace": None}
        if args.experiments:
            known = {**experiment_revs(all_commits=True), **experiment_revs()}
            unknown = [e for e in args.experiments if e not in known]
            if unknown:
                raise Products10kError(f"no experiment named '{unknown[0]}' (see `dvc exp list`)")
            revs = {e: known[e] for e in args.experiments}
        print(show(revs, member, evaluate.phases))
        return
    high = section(params, "train", PhaseConfig, where=args.params).resolution
    rows = table_rows(high, low_resolution(high), cfg.methods)
    experiments = plan(params, args.params, cfg, member)
    if args.command == "run":
        run_experiments(experiments, cfg.jobs)
    submit = section(params, "submit", SubmitConfig, where=args.params)
    adjustment = Adjustment(evaluate.target_prior, tuple(submit.tau_grid))
    hits = collect(experiments, rows, member, adjustment)
    labels, label_map, taus = hits.pop("_labels"), hits.pop("_label_map"), hits.pop("_taus")
    val = hits.pop("_val")
    tail = tail_mask_of(labels, label_map, evaluate.tail_max_images)
    report = build_report(hits, rows, tail, cfg, [e.name for e in experiments], taus, val)
    write_report(report, args.out)
    print(markdown(report))
    log.info("wrote %s/table1.md, table1.json, table1.png", args.out)


if __name__ == "__main__":
    main()
