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
figures go into the metrics (products10k/choose.py).
Test images the prepare stage excluded (``--report``) have no prediction: they get the most
frequent training SKU, with a warning, and are counted in ``test.fallback_rows`` (see
products10k/submission/submit.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k.common import run_stage
from products10k.config import member_names
from products10k.config.stage import StageParams, stage_parser
from products10k.submission.run import SubmitFiles, submit

log = logging.getLogger("stages.submit")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, SubmitFiles).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    params = StageParams(args.params)
    submit_cfg = params.section("submit")
    # the phase the submission reads (or, for auto, its reference) must have been evaluated; the kNN
    # and the fusion are the index stage's
    key = "submit.reference" if submit_cfg.phase == "auto" else "submit.phase"
    named = submit_cfg.reference if submit_cfg.phase == "auto" else submit_cfg.phase
    checked = [key] if named not in ("fused", "knn") else []
    s = params.typed("submit", "ensemble", "evaluate", "data", evaluated=checked)
    submit(SubmitFiles.of(args), s, member_names(params.tree, params.where))


if __name__ == "__main__":
    main()
