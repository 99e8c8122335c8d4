"""One training phase (train / finetune_balanced / finetune_accuracy), single-process or DDP.

``train_phase`` is what ``stages/train.py`` calls: params.yaml read once, the process group joined,
then ``run_phase`` per model (one, or under cv each fold's and the refit). ``run_phase`` reads as
the phase does: build the state
(data, model, optimizer, resume point), then per epoch ``train_one_epoch``, ``validate`` and, on
rank 0, ``best.pt`` / ``last.pt`` written atomically and the epoch logged with DVCLive.
``best.pt`` is the phase's output, the weights the next phase and evaluation read: the epoch with
the best val estimate of the test metric (``checkpoint: best``) or the final epoch (``checkpoint:
last``). The parts: state.py (building the state), epoch.py (an epoch's steps and validation),
resume.py (checkpoints and resume), live.py (DVCLive and the log).

Determinism and resume: every random stream of an epoch (sampler order, DataLoader worker
seeds, albumentations' own generator, dropout) is re-seeded from ``(seed, epoch, rank)`` at the
start of the epoch, so a run resumed from ``last.pt`` (end of the last complete epoch) follows
the same path as an uninterrupted one. ``last.pt`` carries the optimizer/scheduler/scaler/EMA
state and a fingerprint of the settings; a checkpoint made with other settings is not resumed.
"""

from __future__ import annotations

import logging

import pandas as pd

from products10k.config.stage import StageParams
from products10k.dist.group import DistInfo, process_group
from products10k.folds import check_folds, fold_plan
from products10k.training.epoch import freeze_batchnorm, optimizer_step, train_one_epoch, validate
from products10k.training.live import LiveLog, log_epoch, log_start
from products10k.training.optim import current_lr
from products10k.training.resume import checkpoint, resume, save_epoch
from products10k.training.state import (
    Callbacks,
    PhasePaths,
    PhaseSettings,
    PhaseState,
    build_state,
    fingerprint,
)

log = logging.getLogger(__name__)

# what the stage script, the tests and callbacks use, importable from here as before the split
__all__ = [
    "Callbacks",
    "PhasePaths",
    "PhaseSettings",
    "PhaseState",
    "checkpoint",
    "fingerprint",
    "freeze_batchnorm",
    "optimizer_step",
    "run_phase",
    "train_phase",
    "train_one_epoch",
    "validate",
]


def run_phase(
    settings: PhaseSettings, paths: PhasePaths, info: DistInfo, callbacks: Callbacks | None = None
) -> dict:
    """Train one phase of one ensemble member on this rank; see the module docstring."""
    callbacks = callbacks or Callbacks()
    state = build_state(settings, paths, info)
    start = resume(state)
    live = LiveLog(paths.live, info.is_main)
    for row in state.progress.history:  # a resumed run's curves start at epoch 1, not at the resume
        live.log_epoch(row)
    log_start(state)
    for epoch in range(start, state.cfg.epochs):
        # lr as the epoch starts (the schedule is stepped per update within the epoch)
        row = {"epoch": epoch + 1, "lr": current_lr(state.net.optimizer)}
        row.update(train_one_epoch(state, epoch, callbacks.on_batch))
        # checkpoint: last, or no val split (prepare.val_fraction: 0): best.pt = the last epoch
        improved = True
        if len(state.data.val_ds):
            row.update(validate(state))
            if state.cfg.checkpoint == "best":
                # the best epoch by val's estimate of the test metric (val weighted to
                # evaluate.target_prior), not by val top-1, which follows train's SKU mix
                improved = row["val/estimate"] > state.progress.best_estimate
            state.progress.best_top1 = max(state.progress.best_top1, row["val/top1"])
            state.progress.best_estimate = max(state.progress.best_estimate, row["val/estimate"])
            row["val/best_top1"] = state.progress.best_top1
            row["val/best_estimate"] = state.progress.best_estimate
        state.progress.history.append(row)
        if info.is_main:
            save_epoch(state, epoch, row, improved)
            live.log_epoch(row)
            log_epoch(state, epoch, row)
        if callbacks.on_epoch_end is not None:
            callbacks.on_epoch_end(state, epoch)
    if callbacks.on_end is not None:
        callbacks.on_end(state)
    live.end()
    return {
        "best_val_top1": state.progress.best_top1,
        "history": state.progress.history,
        "is_main": info.is_main,
    }


def train_phase(
    params: StageParams, phase: str, member: str, paths: PhasePaths, callbacks: Callbacks | None = None
) -> dict:
    """Train the phase on ``params`` (read once by the stage script, the member's overrides applied)
    inside the process group (one process unless torchrun started this one): its one model, or under
    cv each fold's model and then the refit on every image (products10k/folds.py). A run killed in
    fold i resumes there: the folds before it find their last epoch done."""
    tree, where = params.tree, params.where
    with process_group(params.section("dist"), tree, where) as info:
        # typed after the ranks compared their params: a value one node alone holds is named there
        settings = PhaseSettings.from_params(tree, phase, member, where)
        folds = params.section("cv").folds
        check_folds(pd.read_csv(paths.val_csv), folds, paths.val_csv)
        results = []
        for fold in fold_plan(folds):
            if fold is not None or folds:
                log.info(
                    "%s@%s: %s", phase, member, f"fold {fold} of {folds}" if fold is not None else "the refit"
                )
            results.append(run_phase(settings, paths.for_fold(fold), info, callbacks))
        return {**results[-1], "folds": results[:-1]}
