"""What a phase tells its user: DVCLive's curves (rank 0; a resumed run replays its history, so the
curves start at epoch 1) and a log line at the start and per epoch."""

from __future__ import annotations

import logging
from pathlib import Path

from products10k.training.state import PhaseState

log = logging.getLogger("products10k.training.loop")  # one logger for the whole loop, as before its split


class LiveLog:
    """DVCLive on rank 0; a no-op elsewhere. Never edits dvc.yaml or creates experiments."""

    def __init__(self, path: Path | None, enabled: bool):
        self.live = None
        if path is not None and enabled:
            from dvclive import Live

            self.live = Live(dir=str(path), dvcyaml=False, save_dvc_exp=False)

    def log_epoch(self, row: dict) -> None:
        if self.live is None:
            return
        for key, value in row.items():
            if key != "epoch":
                self.live.log_metric(key, value)
        self.live.next_step()

    def end(self) -> None:
        if self.live is not None:
            self.live.end()


def log_start(state: PhaseState) -> None:
    cfg, info = state.cfg, state.info
    log.info(
        "%s: %d train / %d val images, %d classes, %s at %d (resize %d), "
        "%d epoch(s), batch %d = %d rank(s) x %d x accum %d, device %s, amp %s, %d loader worker(s) per rank",
        state.name,
        len(state.data.train_ds),
        len(state.data.val_ds),
        len(state.data.label_map),
        state.model_cfg.arch,
        cfg.resolution,
        state.data.resize,
        cfg.epochs,
        cfg.batch_size,
        info.world,
        state.data.micro_batch,
        cfg.grad_accum,
        info.device,
        state.net.amp_dtype,
        state.data.num_workers,
    )


def log_epoch(state: PhaseState, epoch: int, row: dict) -> None:
    log.info(
        "%s epoch %d/%d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f estimate %.4f "
        "(best %.4f) | lr %.2e | %.1f img/s, data wait %.0f%%",
        state.name,
        epoch + 1,
        state.cfg.epochs,
        row["train/loss"],
        row["train/top1"],
        row.get("val/loss", float("nan")),
        row.get("val/top1", float("nan")),
        row.get("val/estimate", float("nan")),
        state.progress.best_estimate,
        row["lr"],
        row["throughput"],
        100 * row["data_wait"],
    )
