"""Ensemble the members' predictions into the Kaggle submission, score it, optionally upload it.

Run::

    python stages/submit.py --params params.yaml --predictions predictions \
        --label-map data/prepared/label_map.csv --test-list data/raw/test_kaggletest.csv \
        --report data/prepared/report.json \
        --out submissions/submission.csv --top-k submissions/top5.csv \
        --metrics metrics/submission.json

``--predictions`` holds a folder per phase (one ``<member>.npz`` per ensemble member, written by
the evaluate stages), ``knn/`` and ``fused/`` (the members' kNN predictions and their classifier
+ kNN fusion, written by the index stages). ``submit.phase`` names one of them, or ``auto``: each
is scored on val by the estimate of ``evaluate.target_prior``, with every logit-adjustment tau of
``submit.tau_grid`` (``submit.logit_adjust: auto``), and the best is submitted; every candidate's
figures go into the metrics (products10k/submission/choose.py).
Test images the prepare stage excluded (``--report``) have no prediction: they get the most
frequent training SKU, with a warning, and are counted in ``test.fallback_rows`` (see
products10k/submission/submit.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k import common
from products10k.common import Products10kError, run_stage
from products10k.config import (
    DataConfig,
    EnsembleConfig,
    EvaluateConfig,
    SubmitConfig,
    load_yaml,
    member_names,
    section,
)
from products10k.scores import require_evaluated_phase
from products10k.submission.leaderboard import kaggle_submit
from products10k.submission.submit import ChoiceSpec, make_submission

log = logging.getLogger("stages.submit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", required=True, type=Path)
    p.add_argument(
        "--predictions",
        required=True,
        help="the predictions folder: <phase>/<member>.npz and fused/<member>.npz",
    )
    p.add_argument("--label-map", required=True)
    p.add_argument("--test-list", required=True, help="the official test_kaggletest.csv")
    p.add_argument("--report", required=True, help="prepare's report.json (the excluded test images)")
    p.add_argument("--out", required=True, help="submission CSV (name,class)")
    p.add_argument("--top-k", required=True, help="top-k SKU ids with scores per test image")
    p.add_argument("--metrics", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    params = load_yaml(args.params)
    cfg = section(params, "submit", SubmitConfig, where=args.params)
    ens = section(params, "ensemble", EnsembleConfig, where=args.params)
    members = member_names(params, args.params)
    evaluate = section(params, "evaluate", EvaluateConfig, where=args.params)
    phases = evaluate.phases
    competition = section(params, "data", DataConfig, where=args.params).kaggle.competition
    if cfg.phase not in ("fused", "knn", "auto"):
        require_evaluated_phase(cfg.phase, phases, args.params, key="submit.phase")
    if cfg.phase == "auto" and cfg.reference not in ("fused", "knn"):
        require_evaluated_phase(cfg.reference, phases, args.params, key="submit.reference")
    root = Path(args.predictions)
    names = [*phases, "knn", "fused"] if cfg.phase == "auto" else [cfg.phase]
    candidates = {name: {m: root / name / f"{m}.npz" for m in members} for name in names}
    missing = [str(p) for paths in candidates.values() for p in paths.values() if not p.is_file()]
    if missing:
        raise Products10kError(
            f"no predictions file {', '.join(missing[:3])}: run the evaluate and index stages"
        )
    taus = tuple(cfg.tau_grid) if cfg.logit_adjust == "auto" else (float(cfg.logit_adjust),)
    metrics = make_submission(
        members=members,
        candidates=candidates,
        # with a phase named, the choice is among its taus, against its plain output
        choice=ChoiceSpec(evaluate.target_prior, taus, cfg.reference, cfg.confidence),
        weights_spec=ens.weights,
        label_map_path=args.label_map,
        test_list_path=args.test_list,
        out=args.out,
        top_k_out=args.top_k,
        top_k=cfg.top_k,
        report_path=args.report,
    )
    common.write_json(args.metrics, metrics)
    test = metrics["test"]
    if "top1" in test:  # an unlabelled test list cannot be scored locally
        log.info(
            "submission top1 %.4f (public %.4f, private %.4f)",
            test["top1"],
            test.get("public", {}).get("top1", float("nan")),
            test.get("private", {}).get("top1", float("nan")),
        )
    if cfg.kaggle.enabled:
        kaggle_submit(competition, args.out, cfg.kaggle.message, cfg.kaggle.timeout_s)


if __name__ == "__main__":
    main()
