"""One training phase (train / finetune_balanced / finetune_accuracy), single-process or DDP.

``run_phase`` is what ``stages/train.py`` calls. Per epoch it trains on the phase's CSV,
validates on val.csv (sharded across ranks, counts all-reduced), and on rank 0 writes
``best.pt`` / ``last.pt`` atomically and logs loss, top-1, lr and throughput with DVCLive.

Determinism and resume: every random stream of an epoch (sampler order, DataLoader worker
seeds, albumentations' own generator, dropout) is re-seeded from ``(seed, epoch, rank)`` at the
start of the epoch, so a run resumed from ``last.pt`` (end of the last complete epoch) follows
the same path as an uninterrupted one. ``last.pt`` carries the optimizer/scheduler/scaler/EMA
state and a fingerprint of the settings; a checkpoint made with other settings is not resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from products10k.common import ConfigError, Products10kError, save_torch, seed_everything, write_json
from products10k.config import (
    DistConfig,
    ModelConfig,
    PhaseConfig,
    load_yaml,
    member_params,
    phase_config,
    section,
)
from products10k.prepared.contract import read_label_map, read_prepared
from products10k.training import checkpoint as ckpt_lib
from products10k.training.data import (
    ClassBalancedSampler,
    EpochSampler,
    PreparedImageDataset,
)
from products10k.training.devices import amp_dtype, host_transfer, needs_grad_scaler
from products10k.training.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from products10k.training.losses import PhaseLoss
from products10k.training.model import create_model, input_normalization, model_config_dict
from products10k.training.optim import create_optimizer, create_scheduler, current_lr
from products10k.training.transforms import eval_transform, resolve_resize, train_transform

log = logging.getLogger(__name__)

#: settings that may change between a kill and a resume without changing the result
RESUME_SAFE_KEYS = ("num_workers", "compile", "eval_batch_size")
#: progress-bar refresh, in steps: reading the running loss is a host-device sync
BAR_EVERY = 50


@dataclass(frozen=True)
class PhasePaths:
    """Every file a phase reads or writes (all from the stage's command line)."""

    train_csv: Path
    val_csv: Path
    label_map: Path
    images: Path
    out: Path
    live: Path | None = None
    init: Path | None = None  # checkpoint to start from (finetune phases)
    debug_dir: Path | None = None  # test hook: per-rank seen indices and probe logits


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(
    phase: str, member: str, cfg: PhaseConfig, model_cfg: ModelConfig, world: int, paths: PhasePaths
) -> str:
    """Hash of everything a resumed run must share with the killed one."""
    phase_dict = cfg.model_dump(exclude=set(RESUME_SAFE_KEYS))
    blob = {
        "phase": phase,
        "member": member,
        "cfg": phase_dict,
        "model": model_cfg.model_dump(),
        "world": world,
        "train_csv": _sha256(paths.train_csv),
        "label_map": _sha256(paths.label_map),
        "init": _sha256(paths.init) if paths.init else None,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of a model in train mode back into eval mode; return how many.

    Eval-mode BN normalises with (and never updates) its running statistics, while its affine
    weight and bias still get gradients: the standard remedy for finetuning on few images.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)


def _worker_init(worker_id: int) -> None:
    # albumentations keeps its own RNG: without this every worker would replay the same stream
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % (2**32))


class _Live:
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


class PhaseRunner:
    """State of one phase on one rank; ``run()`` trains to the end or raises."""

    def __init__(self, params_path: str | Path, phase: str, member: str, paths: PhasePaths):
        where = str(params_path)
        params = member_params(load_yaml(params_path), member, where)
        self.phase, self.member, self.paths = phase, member, paths
        self.model_cfg = section(params, "model", ModelConfig, where)
        self.cfg = phase_config(params, phase, where)
        self.dist_cfg = section(params, "dist", DistConfig, where)
        if phase != "train" and paths.init is None:
            raise ConfigError(f"phase '{phase}' needs --init (the previous phase's best.pt)")
        self.info: DistInfo = init_distributed(self.dist_cfg)
        self.resize = resolve_resize(self.cfg.resolution, self.cfg.resize)
        per_step = self.info.world * self.cfg.grad_accum
        if self.cfg.batch_size % per_step:
            raise ConfigError(
                f"{where}: {phase}.batch_size={self.cfg.batch_size} is not divisible by "
                f"dist.nproc_per_node ({self.info.world}) x {phase}.grad_accum ({self.cfg.grad_accum})"
            )
        self.micro_batch = self.cfg.batch_size // per_step
        self.amp_dtype = amp_dtype(self.cfg.amp, self.info.device)
        self.non_blocking = host_transfer(self.info.device)["non_blocking"]  # async copies to CUDA only

    # ----------------------------------------------------------------------------------- data
    def _load_data(self) -> None:
        p = self.paths
        self.label_map = read_label_map(p.label_map)
        self.labels = [int(s) for s in self.label_map["sku"]]
        self.train_df = read_prepared(p.train_csv, self.label_map)
        # no val rows (prepare.val_fraction: 0): every epoch is "best", so best.pt = the last epoch
        self.val_df = read_prepared(p.val_csv, self.label_map, allow_empty=True)
        # the backbone's own input normalisation (timm's pretrained config), kept in checkpoints
        self.normalize = input_normalization(self.model_cfg.arch)
        self.train_ds = PreparedImageDataset(
            self.train_df, p.images, train_transform(self.cfg, self.normalize), min_side=self.resize
        )
        val_tf = eval_transform(self.resize, self.cfg.resolution, self.normalize)
        self.val_ds = PreparedImageDataset(self.val_df, p.images, val_tf, min_side=self.resize)
        info = self.info
        mb = self.micro_batch
        batching = {"batch_size": mb, "global_batch": self.cfg.batch_size if self.cfg.drop_last else None}
        if self.cfg.sampler == "class_balanced":
            self.train_sampler = ClassBalancedSampler(
                self.train_ds.labels, info.rank, info.world, self.cfg.seed, **batching
            )
        else:
            self.train_sampler = EpochSampler(
                len(self.train_ds), info.rank, info.world, True, self.cfg.seed, **batching
            )
        # eval mode uses running BN statistics: a 1-sample batch is fine there
        self.val_sampler = EpochSampler(len(self.val_ds), info.rank, info.world, shuffle=False)
        self.batches_per_epoch = math.ceil(len(self.train_sampler) / self.micro_batch)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / self.cfg.grad_accum)

    def _loader(self, ds, sampler, batch_size: int, seed: int) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=host_transfer(self.info.device)["pin_memory"],
            drop_last=False,  # the training sampler keeps whole global batches (train.drop_last)
            worker_init_fn=_worker_init if workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
            persistent_workers=False,  # fresh, epoch-seeded workers: resume-exact augmentation
        )

    # ---------------------------------------------------------------------------------- model
    def _build_model(self) -> None:
        cfg, info = self.cfg, self.info
        seed_everything(cfg.seed)  # identical initial weights on every rank
        k = len(self.labels)
        init_meta = None
        if self.paths.init is not None:
            init = ckpt_lib.read_checkpoint(self.paths.init)
            init_meta = ckpt_lib.metadata(init)
            ckpt_lib.check_arch(init_meta, self.model_cfg.arch, self.paths.init)
            ckpt_lib.check_labels(init_meta, self.label_map, self.paths.init, self.paths.label_map)
            # the init checkpoint holds all weights: ImageNet weights are not needed
            model = create_model(self.model_cfg, k, pretrained=False)
            ckpt_lib.load_state(model, init["model"], self.paths.init, self.model_cfg.arch)
            log.info(
                "initialised from %s (phase %s, epoch %s, val top-1 %.4f)",
                self.paths.init,
                init_meta.get("phase"),
                init_meta.get("epoch"),
                init_meta.get("val_top1", float("nan")),
            )
        else:
            model = create_model(self.model_cfg, k)
        if self.dist_cfg.sync_bn and info.enabled and info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(info.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.raw = model
        self.optimizer = create_optimizer(model, cfg)
        self.scheduler = create_scheduler(self.optimizer, cfg, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=needs_grad_scaler(self.amp_dtype))
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            # timm's warm-up: decay = min(ema_decay, 1 - (1 + step)^-2/3) with the step counted from
            # this phase's start, so a 3-epoch finetune's EMA moves (a fixed 0.998 from step 0 would
            # keep ~96% of the initial weights over ~20 updates)
            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
        wrapped: nn.Module = model
        if info.enabled:
            wrapped = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if cfg.compile:
            wrapped = torch.compile(wrapped)
        self.model = wrapped
        self.criterion = PhaseLoss(cfg.label_smoothing, cfg.accuracy_loss_weight)

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as ``model``: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.raw

    # --------------------------------------------------------------------------- checkpoints
    def _checkpoint(self, epoch: int, val_top1: float, with_state: bool) -> dict:
        ck = {
            "model": {k: v.detach().cpu() for k, v in self.eval_model.state_dict().items()},
            "model_config": model_config_dict(self.model_cfg, len(self.labels)),
            "labels": list(self.labels),
            "phase": self.phase,
            "member": self.member,
            "epoch": epoch,
            "epochs": self.cfg.epochs,
            "resolution": self.cfg.resolution,
            "resize": self.resize,
            "normalize": dict(self.normalize),
            "val_top1": float(val_top1),
            "best_val_top1": float(self.best_top1),
            "phase_config": self.cfg.model_dump(),
            "history": list(self.history),
            "fingerprint": self.fp,
        }
        if with_state:
            ck["train_state"] = {
                # the raw weights only when they differ from ck["model"] (EMA): without EMA the
                # evaluated weights are the raw ones, and a second copy would add 100 MB at 9.7k SKUs
                "model": self.raw.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                # no RNG states: every random stream is re-seeded per epoch (see the docstring)
                "global_step": int(self.global_step),
            }
        return ck

    def _try_resume(self) -> int:
        """Load ``last.pt`` when it is an incomplete run of the same settings; return start epoch."""
        last = self.paths.out / "last.pt"
        if self.info.is_main and self.paths.out.is_dir():
            # temp files of a save interrupted by SIGKILL (atomic_path names them .<name>.*)
            for stale in self.paths.out.glob(".*.pt.*"):
                stale.unlink(missing_ok=True)
        if not last.is_file():
            return 0
        try:
            ck = ckpt_lib.read_checkpoint(last, map_location=self.info.device)
        except Products10kError as exc:
            log.warning("not resuming: %s", exc)
            return 0
        if ck.get("fingerprint") != self.fp or "train_state" not in ck:
            log.info("%s was made with other settings/data: starting the phase afresh", last)
            return 0
        if ck["epoch"] >= self.cfg.epochs:
            # killed after its final last.pt but before DVC recorded the stage: nothing to redo
            log.info("%s is this phase's finished run (epoch %d): keeping it", last, ck["epoch"])
            self.history = list(ck.get("history", []))
            self.best_top1 = float(ck.get("best_val_top1", -1.0))
            return int(ck["epoch"])
        st = ck["train_state"]
        self.raw.load_state_dict(st["model"] if st.get("model") is not None else ck["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.global_step = int(st["global_step"])
        self.scheduler.step_update(self.global_step)
        self.history = list(ck.get("history", []))
        self.best_top1 = float(ck.get("best_val_top1", -1.0))
        log.info("resuming %s@%s from %s after epoch %d", self.phase, self.member, last, ck["epoch"])
        return int(ck["epoch"])

    # -------------------------------------------------------------------------------- epochs
    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.info.device, non_blocking=self.non_blocking)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def _stop_non_finite(self, what: str, epoch: int, step: int) -> None:
        raise Products10kError(
            f"{self.phase}@{self.member}: {what} NaN/inf at epoch {epoch + 1}, step {step + 1} "
            f"(global step {self.global_step}); stopped before the optimizer step. The last good "
            f"checkpoint is kept in {self.paths.out / 'last.pt'}. Lower {self.phase}.lr, enable "
            "clip_grad or use amp: off."
        )

    def _train_epoch(self, epoch: int, seen: list[int] | None) -> dict:
        cfg, info = self.cfg, self.info
        seed = _epoch_seed(cfg.seed, epoch, info.rank)
        torch.manual_seed(seed)
        np.random.seed(seed)
        self.train_sampler.set_epoch(epoch)
        self.train_ds.transform.set_random_seed(seed)  # used when num_workers == 0
        loader = self._loader(self.train_ds, self.train_sampler, self.micro_batch, seed)
        self.model.train()
        if cfg.freeze_bn:
            freeze_batchnorm(self.raw)
        loss_sum = correct = count = 0.0
        t0 = time.perf_counter()
        bar = tqdm(
            loader,
            total=self.batches_per_epoch,
            desc=f"{self.phase}@{self.member} epoch {epoch + 1}/{cfg.epochs}",
            disable=not info.is_main,
            leave=False,
            mininterval=1.0,
        )
        self.optimizer.zero_grad(set_to_none=True)
        pending = 0
        # first step of this update whose loss was NaN/inf (-1: none), kept on the device: it is
        # read only once per update, and only when the update has to stop
        bad_step = torch.full((), -1, dtype=torch.long, device=info.device)
        # running sums stay on the device: reading them every step would sync the host with the
        # GPU each step; they are read for the progress bar every BAR_EVERY steps and at the end
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss*w, correct*w, w
        update_sizes = self.train_sampler.update_sizes(self.micro_batch, cfg.grad_accum)
        data_wait = 0.0  # seconds blocked on the DataLoader: the loader starves the GPU if large
        batches = iter(bar)
        for step in range(self.batches_per_epoch):
            t_wait = time.perf_counter()
            try:
                images, target, index, weight = next(batches)
            except StopIteration:
                break
            data_wait += time.perf_counter() - t_wait
            images = self._to_device(images)
            target = target.to(info.device, non_blocking=self.non_blocking)
            weight = weight.to(info.device, dtype=torch.float32, non_blocking=self.non_blocking)
            last_micro = (pending + 1) == cfg.grad_accum or (step + 1) == self.batches_per_epoch
            sync = contextlib.nullcontext()
            if info.enabled and not last_micro:
                sync = self.model.no_sync()  # accumulate locally, all-reduce on the last micro-step
            with sync:
                with self._autocast():
                    logits = self.model(images, target)
                    loss_sum = self.criterion(logits, target, weight, reduction="sum")
                finite = torch.isfinite(loss_sum.detach())
                bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
                # A NaN/inf loss poisons its gradients (x NaN; exactly x 1.0 otherwise), so the
                # DDP all-reduce makes them non-finite on every rank and all ranks stop at once.
                poison = torch.where(finite, 1.0, float("nan")).to(loss_sum.dtype)
                # / the update's global sample count x world (DDP averages over ranks): the step's
                # gradient is the mean over that update's samples, however they are distributed
                scale = info.world / max(float(update_sizes[step // cfg.grad_accum]), 1.0)
                self.scaler.scale(loss_sum * poison * scale).backward()
            pending += 1
            if last_micro:
                self._optimizer_step(bad_step, epoch, step)
                bad_step.fill_(-1)
                pending = 0
            with torch.no_grad():
                w_sum = weight.sum()
                hits = ((logits.argmax(1) == target).float() * weight).sum()
                sums += torch.stack([loss_sum.detach().double(), hits.double(), w_sum.double()])
            if seen is not None:
                seen.extend(int(i) for i, w in zip(index, weight.cpu(), strict=True) if w > 0)
            if info.is_main and step % BAR_EVERY == 0:
                running_loss, _, running_count = sums.tolist()
                bar.set_postfix(
                    loss=f"{running_loss / max(running_count, 1):.3f}", lr=f"{current_lr(self.optimizer):.2e}"
                )
        bar.close()
        elapsed = time.perf_counter() - t0
        loss_sum, correct, count, data_wait = all_reduce_sum([*sums.tolist(), data_wait], info)
        return {
            "train/loss": loss_sum / max(count, 1.0),
            "train/top1": correct / max(count, 1.0),
            "throughput": count / max(elapsed, 1e-9),  # images/s over all ranks
            "epoch_time_s": elapsed,
            # share of the epoch spent waiting for batches (mean over ranks): near 0 = compute-bound
            "data_wait": data_wait / info.world / max(elapsed, 1e-9),
        }

    def _optimizer_step(self, bad_step: torch.Tensor, epoch: int, step: int) -> None:
        """Clip, check finiteness (one host sync per update), step; stop on NaN/inf.

        The gradients are DDP-averaged, so their norm - and the decision to stop - is the same on
        every rank without another collective. With fp16 loss scaling an inf gradient is the
        scaler's routine overflow (it skips the step and lowers the scale), so there only a
        NaN/inf loss stops; its flag is all-reduced as the loss is local to a rank.
        """
        cfg = self.cfg
        params = [p for p in self.raw.parameters() if p.grad is not None]
        norm = None
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        if self.scaler.is_enabled():
            stop = all_reduce_sum([float(bad_step >= 0)], self.info)[0] > 0
        else:
            if norm is None:
                norm = nn.utils.get_total_norm([p.grad for p in params])
            stop = not bool(torch.isfinite(norm))
        if stop:
            first_bad = int(bad_step)
            if first_bad >= 0:
                self._stop_non_finite("loss is", epoch, first_bad)
            self._stop_non_finite("another rank's loss or the gradients are", epoch, step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        if self.ema is not None:
            self.ema.update(self.raw, step=self.global_step)

    @torch.no_grad()
    def _validate(self) -> dict:
        info = self.info
        model = self.eval_model
        model.eval()
        eval_bs = self.cfg.eval_batch_size or 2 * self.micro_batch * self.cfg.grad_accum
        loader = self._loader(self.val_ds, self.val_sampler, eval_bs, self.cfg.seed)
        ce = nn.CrossEntropyLoss(reduction="none")
        sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # on the device: no per-step sync
        for images, target, _, weight in tqdm(
            loader, desc="validate", disable=not info.is_main, leave=False, mininterval=1.0
        ):
            images = self._to_device(images)
            target = target.to(info.device)
            weight = weight.to(info.device, dtype=torch.float32)
            with self._autocast():
                logits = model(images)  # the head computes in float32 (Products10kNet.forward)
            loss = (ce(logits.float(), target) * weight).sum()
            hits = ((logits.argmax(1) == target).float() * weight).sum()
            sums += torch.stack([loss.double(), hits.double(), weight.sum().double()])
        loss_sum, correct, count = all_reduce_sum(sums.tolist(), info)
        return {"val/loss": loss_sum / max(count, 1.0), "val/top1": correct / max(count, 1.0)}

    def _write_debug(self, epoch: int, seen: list[int]) -> None:
        d = self.paths.debug_dir
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / f"seen-rank{self.info.rank}-epoch{epoch + 1}.json", sorted(seen))

    def _write_probe(self) -> None:
        """Logits of the evaluated model on a fixed input: lets a test compare ranks/checkpoints."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, self.cfg.resolution, self.cfg.resolution, generator=g).to(self.info.device)
        model = self.eval_model
        model.eval()
        with torch.no_grad():
            logits = model(x).float().cpu()
        digest = hashlib.sha256()
        for _, p in sorted(self.raw.named_parameters()):  # DDP keeps parameters identical on ranks
            digest.update(p.detach().cpu().numpy().tobytes())
        probe = {"input": x.cpu(), "logits": logits, "param_digest": digest.hexdigest()}
        save_torch(self.paths.debug_dir / f"probe-rank{self.info.rank}.pt", probe)

    def run(self) -> dict:
        info = self.info
        try:
            self._load_data()
            self.fp = fingerprint(self.phase, self.member, self.cfg, self.model_cfg, info.world, self.paths)
            self._build_model()
            self.global_step = 0
            self.history: list[dict] = []
            self.best_top1 = -1.0
            start = self._try_resume()
            live = _Live(self.paths.live, info.is_main)
            for row in self.history:  # a resumed run's curves start at epoch 1, not at the resume
                live.log_epoch(row)
            log.info(
                "%s@%s: %d train / %d val images, %d classes, %s at %d (resize %d), "
                "%d epoch(s), batch %d = %d rank(s) x %d x accum %d, device %s, amp %s",
                self.phase,
                self.member,
                len(self.train_ds),
                len(self.val_ds),
                len(self.labels),
                self.model_cfg.arch,
                self.cfg.resolution,
                self.resize,
                self.cfg.epochs,
                self.cfg.batch_size,
                info.world,
                self.micro_batch,
                self.cfg.grad_accum,
                info.device,
                self.amp_dtype,
            )
            for epoch in range(start, self.cfg.epochs):
                seen = [] if self.paths.debug_dir is not None else None
                # lr as the epoch starts (the schedule is stepped per update within the epoch)
                row = {"epoch": epoch + 1, "lr": current_lr(self.optimizer)}
                row.update(self._train_epoch(epoch, seen))
                if len(self.val_ds):
                    row.update(self._validate())
                    improved = row["val/top1"] > self.best_top1
                    self.best_top1 = max(self.best_top1, row["val/top1"])
                    row["val/best_top1"] = self.best_top1
                else:
                    improved = True  # no val split: the latest epoch is the one to keep
                self.history.append(row)
                if seen is not None:
                    self._write_debug(epoch, seen)
                if info.is_main:
                    self.paths.out.mkdir(parents=True, exist_ok=True)
                    top1 = row.get("val/top1", float("nan"))
                    if improved:
                        save_torch(self.paths.out / "best.pt", self._checkpoint(epoch + 1, top1, False))
                    # last.pt is written last: its presence marks the epoch as complete
                    save_torch(self.paths.out / "last.pt", self._checkpoint(epoch + 1, top1, True))
                    live.log_epoch(row)
                    log.info(
                        "%s@%s epoch %d/%d: train loss %.4f top-1 %.4f | val loss %.4f top-1 %.4f "
                        "(best %.4f) | lr %.2e | %.1f img/s, data wait %.0f%%",
                        self.phase,
                        self.member,
                        epoch + 1,
                        self.cfg.epochs,
                        row["train/loss"],
                        row["train/top1"],
                        row.get("val/loss", float("nan")),
                        top1,
                        self.best_top1,
                        row["lr"],
                        row["throughput"],
                        100 * row["data_wait"],
                    )
            if self.paths.debug_dir is not None:
                self._write_probe()
            live.end()
            return {"best_val_top1": self.best_top1, "history": self.history}
        finally:
            cleanup(info)


def run_phase(params_path: str | Path, phase: str, member: str, paths: PhasePaths) -> dict:
    """Train one phase of one ensemble member; see the module docstring."""
    return PhaseRunner(params_path, phase, member, paths).run()
