"""The submit stage's work from its files and settings: the candidates it chooses among, the
submission written and scored (submit.py), the Kaggle upload if asked (leaderboard.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from products10k import common
from products10k.common import Products10kError
from products10k.config.stage import StageFiles, option
from products10k.submission.leaderboard import kaggle_submit
from products10k.submission.submit import ChoiceSpec, make_submission

log = logging.getLogger(__name__)


@dataclass
class SubmitFiles(StageFiles):
    """The submit stage's files (its command line: stages/submit.py)."""

    predictions: Path = option("the predictions folder: <phase>/<member>.npz, knn/ and fused/<member>.npz")
    label_map: Path = option("prepared label_map.csv")
    test_list: Path = option("the official test_kaggletest.csv")
    report: Path = option("prepare's report.json (the excluded test images)")
    out: Path = option("output: submission CSV (name,class)")
    top_k: Path = option("output: top-k SKU ids with scores per test image")
    metrics: Path = option("output: metrics JSON")


def submit(files: SubmitFiles, settings, members: list[str]) -> dict:
    """Choose among the candidates ``submit.phase`` names (every evaluated phase, the kNN and the
    fusion for ``auto``), write and score the submission, upload it if ``submit.kaggle`` says so.

    ``settings``: the typed ``submit``, ``ensemble``, ``evaluate`` and ``data`` sections."""
    cfg, evaluate = settings.submit, settings.evaluate
    names = [*evaluate.phases, "knn", "fused"] if cfg.phase == "auto" else [cfg.phase]
    candidates = {name: {m: files.predictions / name / f"{m}.npz" for m in members} for name in names}
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
        choice=ChoiceSpec(evaluate.target_prior, taus, cfg.reference, cfg.confidence, cfg.rerank_k),
        weights_spec=settings.ensemble.weights,
        label_map_path=files.label_map,
        test_list_path=files.test_list,
        out=files.out,
        top_k_out=files.top_k,
        top_k=cfg.top_k,
        report_path=files.report,
    )
    common.write_json(files.metrics, metrics)
    test = metrics["test"]
    if "top1" in test:  # an unlabelled test list cannot be scored locally
        log.info(
            "submission top1 %.4f (public %.4f, private %.4f)",
            test["top1"],
            test.get("public", {}).get("top1", float("nan")),
            test.get("private", {}).get("top1", float("nan")),
        )
    if cfg.kaggle.enabled:
        kaggle_submit(settings.data.kaggle.competition, files.out, cfg.kaggle.message, cfg.kaggle.timeout_s)
    return metrics
