"""Checkpoints and resume: ``best.pt`` (the phase's output) and ``last.pt`` (the resume point, with
the optimizer, scheduler, scaler and EMA state), written atomically by rank 0, and the resume of a
killed run of the same settings (its fingerprint) on every rank."""

from __future__ import annotations

import logging

from products10k.common import Products10kError
from products10k.dist.group import (
    broadcast_object,
)
from products10k.models import checkpoint as ckpt_lib
from products10k.models.model import model_config_dict
from products10k.training.state import PhaseState

log = logging.getLogger("products10k.training.loop")  # one logger for the whole loop, as before its split


def save_epoch(state: PhaseState, epoch: int, row: dict, improved: bool) -> None:
    """Rank 0: ``best.pt`` if val improved (every epoch with ``checkpoint: last``), then ``last.pt``
    (its presence marks the epoch complete)."""
    state.paths.out.mkdir(parents=True, exist_ok=True)
    top1 = row.get("val/top1", float("nan"))
    if improved:
        ckpt_lib.save_torch(state.paths.out / "best.pt", checkpoint(state, epoch + 1, top1, with_state=False))
    ckpt_lib.save_torch(state.paths.out / "last.pt", checkpoint(state, epoch + 1, top1, with_state=True))


#: the per-epoch figures that measure the machine, not the model
TIMINGS = ("throughput", "epoch_time_s", "data_wait")


def _without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMINGS}


def checkpoint(state: PhaseState, epoch: int, val_top1: float, with_state: bool) -> dict:
    """The checkpoint contract (products10k.models.checkpoint) of ``state`` after ``epoch``."""
    ck = {
        "model": {k: v.detach().cpu() for k, v in state.net.eval_model.state_dict().items()},
        "model_config": model_config_dict(state.model_cfg, len(state.data.label_map)),
        "labels": state.labels,
        "phase": state.phase,
        "member": state.member,
        "epoch": epoch,
        "epochs": state.cfg.epochs,
        "resolution": state.cfg.resolution,
        "resize": state.data.resize,
        "normalize": dict(state.data.normalize),
        "val_top1": float(val_top1),
        "best_val_top1": float(state.progress.best_top1),
        "best_val_estimate": float(state.progress.best_estimate),
        "phase_config": state.cfg.model_dump(),
        # last.pt keeps the whole history (a resume replays it into DVCLive); best.pt, the published
        # model, leaves out the wall-clock figures, so that the same training gives the same bytes:
        # its hash names the model in the next phase's resume fingerprint, preprocess.json and the
        # index's meta.json
        "history": [row if with_state else _without_timings(row) for row in state.progress.history],
        "fingerprint": state.fingerprint,
    }
    if with_state:
        ck["train_state"] = {
            # the raw weights only when they differ from ck["model"] (EMA): without EMA the
            # evaluated weights are the raw ones, and a second copy would add 100 MB at 9.7k SKUs
            "model": state.net.raw.state_dict() if state.net.ema is not None else None,
            "optimizer": state.net.optimizer.state_dict(),
            "scheduler": state.net.scheduler.state_dict(),
            "scaler": state.net.scaler.state_dict(),
            "ema": state.net.ema.state_dict() if state.net.ema is not None else None,
            # no RNG states: every random stream is re-seeded per epoch (see the docstring)
            "global_step": int(state.progress.global_step),
        }
    return ck


def resume(state: PhaseState) -> int:
    """Load ``last.pt`` into ``state`` when it is a run of the same settings; return the start epoch.

    Rank 0 reads and checks it and broadcasts it: every rank resumes from the same state, including
    those on nodes that never held the file (an elastic restart on several nodes).
    """
    last = state.paths.out / "last.pt"
    ck = broadcast_object(_resume_checkpoint(state) if state.info.is_main else None, state.info)
    if ck is None:
        return 0
    state.progress.history = list(ck.get("history", []))
    state.progress.best_top1 = float(ck.get("best_val_top1", -1.0))
    state.progress.best_estimate = float(ck.get("best_val_estimate", -1.0))
    if ck["epoch"] >= state.cfg.epochs:
        # killed after its final last.pt but before DVC recorded the stage: nothing to redo
        log.info("%s is this phase's finished run (epoch %d): keeping it", last, ck["epoch"])
        return int(ck["epoch"])
    st = ck["train_state"]
    state.net.raw.load_state_dict(st["model"] if st.get("model") is not None else ck["model"])
    state.net.optimizer.load_state_dict(st["optimizer"])
    state.net.scheduler.load_state_dict(st["scheduler"])
    state.net.scaler.load_state_dict(st["scaler"])
    if state.net.ema is not None and st.get("ema") is not None:
        state.net.ema.load_state_dict(st["ema"])
    state.progress.global_step = int(st["global_step"])
    state.net.scheduler.step_update(state.progress.global_step)
    log.info("resuming %s from %s after epoch %d", state.name, last, ck["epoch"])
    return int(ck["epoch"])


def _resume_checkpoint(state: PhaseState) -> dict | None:
    """Rank 0: ``last.pt`` if it is a run of these settings (its fingerprint), else None."""
    out = state.paths.out
    last = out / "last.pt"
    if out.is_dir():
        # temp files of a save interrupted by SIGKILL (atomic_path names them .<name>.*)
        for stale in out.glob(".*.pt.*"):
            stale.unlink(missing_ok=True)
    if not last.is_file():
        return None
    try:
        ck = ckpt_lib.read_checkpoint(last)
    except Products10kError as exc:
        log.warning("not resuming: %s", exc)
        return None
    if ck.get("fingerprint") != state.fingerprint or "train_state" not in ck:
        log.info("%s was made with other settings/data: starting the phase afresh", last)
        return None
    return ck
