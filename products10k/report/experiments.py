"""Table 1's rows and the DVC experiments behind them: which experiments a seed needs (``plan``),
running them through DVC's queue (``run_experiments``) and finding the finished ones
(``experiment_revs``, from ``dvc exp show --json``). The report itself: ``table1.py``."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from products10k.common import Products10kError
from products10k.config import (
    PHASES,
    EvaluateConfig,
    PhaseConfig,
    Table1Config,
    section,
)

log = logging.getLogger("products10k.table1")  # the command's one logger

#: what every Table 1 experiment sets, so that its paper rows are the paper's recipe whatever the
#: project's defaults (which may tail-cover val or train with balanced softmax)
PAPER_PROTOCOL = ("prepare.val_tail_images=0", "++train.loss=ce")

#: the long-tail methods ``table1.methods`` may name (see table1.py's docstring)
METHODS = ("logit_adjust", "balanced_softmax", "class_balanced", "crt")

#: the paper's Table 1 (EfficientNet-B3, ImageNet-pretrained, real Products-10K, single centre crop)
PAPER = {"baseline": 60.04, "train": 62.98, "finetune_balanced": 63.36, "finetune_accuracy": 64.12}
PAPER_TITLES = {
    "baseline": "EfficientNet-B3, 224×224",
    "train": "EfficientNet-B3, 448×448",
    "finetune_balanced": "+ balanced subset finetune",
    "finetune_accuracy": "+ accuracy (metric) loss",
}


@dataclass(frozen=True)
class Row:
    key: str  # baseline | train | finetune_balanced | finetune_accuracy | a long-tail method's row
    role: str  # low | high | a method's experiment: which experiment of a seed
    phase: str  # whose metrics and predictions
    title: str
    base: str | None = None  # the row whose hits the gain is measured against
    tau: float | str | None = None  # post-hoc logit adjustment of the predictions: a tau or "auto"


@dataclass(frozen=True)
class Experiment:
    name: str
    role: str
    seed: int
    overrides: tuple[str, ...]  # -S key=value
    targets: tuple[str, ...]  # stages to reproduce (all when empty)


def table_rows(high: int, low: int, methods=()) -> list[Row]:
    rows = [
        Row("baseline", "low", "train", f"train @ {low} px (baseline)"),
        Row("train", "high", "train", f"train @ {high} px", base="baseline"),
        Row("finetune_balanced", "high", "finetune_balanced", "+ finetune_balanced", base="train"),
        Row("finetune_accuracy", "high", "finetune_accuracy", "+ finetune_accuracy", "finetune_balanced"),
    ]
    adjusted = "train + logit adjustment"
    method_rows = {
        "logit_adjust": [
            Row("logit_adjust", "high", "train", f"{adjusted} (τ fitted on val)", "train", "auto"),
            Row("logit_adjust_1", "high", "train", f"{adjusted} (τ = 1)", "train", 1.0),
        ],
        "balanced_softmax": [Row("balanced_softmax", "bsm", "train", "train with balanced softmax", "train")],
        "class_balanced": [
            Row("class_balanced", "cb", "finetune_balanced", "+ class-balanced finetune, all images", "train")
        ],
        "crt": [Row("crt", "crt", "finetune_balanced", "+ cRT (head re-trained, backbone frozen)", "train")],
    }
    for method in methods:
        rows += method_rows[method]
    return rows


def method_experiments(train: PhaseConfig, member: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Method -> (overrides, targets) of its experiment; logit adjustment needs none."""
    # `++`: set the key whether or not the finetune section already has it (a plain -S of a key
    # the section inherits from `train` is refused by DVC's Hydra parser)
    every_image = ("balance.per_class=null", "++finetune_balanced.sampler=class_balanced")
    balanced = (f"evaluate@{member}-finetune_balanced",)
    crt = (
        "++finetune_balanced.freeze_backbone=true",
        "++finetune_balanced.reset_head=true",
        # a re-initialised head learns from nothing: train's schedule, not the finetune's 10x lower lr
        f"++finetune_balanced.lr={train.lr}",
        f"++finetune_balanced.epochs={train.epochs}",
        f"++finetune_balanced.warmup_epochs={train.warmup_epochs}",
    )
    return {
        "bsm": (("++train.loss=balanced_softmax",), (f"evaluate@{member}-train",)),
        "cb": (every_image, balanced),
        "crt": (every_image + crt, balanced),
    }


def low_resolution(high: int) -> int:
    """The baseline resolution: the paper's 224 for 448, the same ratio for any other."""
    return max(8, round(high * 224 / 448))


# --- experiments ----------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def _dvc(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Products10kError(f"dvc {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def fingerprint(params_path: Path) -> str:
    """What the experiments are of: HEAD, the uncommitted diff of tracked files, params.yaml."""
    h = hashlib.sha1()
    h.update(_git("rev-parse", "HEAD").encode())
    h.update(_git("diff", "HEAD", "--binary").encode())
    h.update(params_path.read_bytes())
    return h.hexdigest()[:7]


def plan(params: dict, params_path: Path, cfg: Table1Config, member: str) -> list[Experiment]:
    missing = [
        p for p in PHASES if p not in section(params, "evaluate", EvaluateConfig, where=params_path).phases
    ]
    if missing:
        raise Products10kError(f"{params_path}: evaluate.phases lacks '{missing[0]}', a row of Table 1")
    member_overrides = ((params.get("ensemble") or {}).get("members") or {}).get(member) or {}
    varied = [key for key in ("train.seed", "train.resolution") if key in member_overrides]
    if varied:
        # the member's override would win over the experiment's -S: every seed would train the
        # same seed, or the low-resolution row would not be low
        raise Products10kError(
            f"{params_path}: ensemble.members.{member} sets {varied[0]}, which Table 1 varies itself "
            "(train.seed per seed, train.resolution for the baseline row): remove it from the member"
        )
    high = section(params, "train", PhaseConfig, where=params_path).resolution
    low = low_resolution(high)
    fp = fingerprint(params_path)
    # only the stages the table reads: no index, export or submit in these experiments
    high_targets = tuple(f"evaluate@{member}-{phase}" for phase in PHASES)
    train = section(params, "train", PhaseConfig, where=params_path)
    roles = {row.role for row in table_rows(high, low, cfg.methods)}
    extra = {role: spec for role, spec in method_experiments(train, member).items() if role in roles}
    out = []
    for seed in range(cfg.seeds):
        # the paper's protocol whatever the defaults: every training image (no val leave-out of the
        # tail) and cross-entropy; a long-tail method's experiment changes only its own keys
        base = (f"train.seed={seed}", *PAPER_PROTOCOL)
        out.append(Experiment(f"t1-{fp}-s{seed}-high", "high", seed, base, high_targets))
        out.append(
            Experiment(
                f"t1-{fp}-s{seed}-low",
                "low",
                seed,
                (*base, f"train.resolution={low}"),
                (f"evaluate@{member}-train",),
            )
        )
        for role, (overrides, targets) in extra.items():
            own = {_key(o) for o in overrides}
            kept = tuple(o for o in base if _key(o) not in own)  # one value per key: the method's
            out.append(Experiment(f"t1-{fp}-s{seed}-{role}", role, seed, (*kept, *overrides), targets))
    return out


def _key(override: str) -> str:
    """The dotted key of a ``-S`` override (``++train.loss=ce`` -> ``train.loss``)."""
    return override.split("=", 1)[0].lstrip("+")


def dvc_experiments(all_commits: bool = False) -> dict[str, dict]:
    """Experiment name -> {"rev": full commit, "state": queued | running | failed | success}.

    From ``dvc exp show --json``, DVC's documented machine-readable output (the experiments of HEAD;
    of every commit with ``all_commits``), never its private ref layout or its tables for people:
    a DVC upgrade that changes either cannot silently break the report. A finished experiment
    carries no executor record, hence "success".
    """
    baselines = json.loads(_dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else [])))
    out: dict[str, dict] = {}
    for baseline in baselines:
        for exp_range in baseline.get("experiments") or []:
            state = ((exp_range.get("executor") or {}).get("state") or "success").lower()
            for exp in (exp_range.get("revs") or [])[:1]:  # the tip; more only for legacy checkpoints
                name = exp.get("name") or exp_range.get("name")
                if name:
                    out.setdefault(name, {"rev": exp["rev"], "state": state})
    return out


def experiment_revs(all_commits: bool = False) -> dict[str, str]:
    """Experiment name -> commit of the finished experiments (of HEAD, or of every commit)."""
    return {name: e["rev"] for name, e in dvc_experiments(all_commits).items() if e["state"] == "success"}


def run_experiments(experiments: list[Experiment], jobs: int = 1, poll_s: float = 10.0) -> None:
    """Queue the experiments not yet done, run the queue one at a time, wait for every one."""
    done = experiment_revs()
    todo = [e for e in experiments if e.name not in done]
    for exp in experiments:
        if exp.name in done:
            log.info("%s: already run (nothing changed since): reused", exp.name)
    if not todo:
        return
    for exp in todo:
        args = ["exp", "run", "--queue", "-n", exp.name]
        for override in exp.overrides:
            args += ["-S", override]
        _dvc(*args, *exp.targets)
        log.info("queued %s (%s)", exp.name, ", ".join(exp.overrides))
    # `queue start` may return at once or only when its worker is done (the worker can hold the
    # pipes this call reads): the clock starts before it, and the loop below waits either way.
    started = time.time()
    _dvc("queue", "start", "-j", str(jobs))
    names = {e.name for e in todo}
    while True:
        status = {n: e["state"] for n, e in dvc_experiments().items() if n in names}
        failed = sorted(n for n, state in status.items() if state == "failed")
        if failed:
            raise Products10kError(
                f"experiment {failed[0]} failed: see `dvc queue logs {failed[0]}` "
                "(fix the cause and run again: finished experiments are reused)"
            )
        finished = {n for n, state in status.items() if state == "success"}
        if finished == names:
            log.info("all %d experiments ran in %.0f s", len(names), time.time() - started)
            return
        if not any(state in ("queued", "running") for state in status.values()):
            missing = sorted(names - finished)
            raise Products10kError(f"the queue stopped before {missing[0]} ran: see `dvc queue status`")
        time.sleep(poll_s)
