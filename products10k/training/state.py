"""The state of one training phase and how it is built: data, model, optimizer, schedule, loss.

``PhaseSettings`` holds the typed sections of params.yaml a phase reads: the stage script reads the
file once and passes them in. ``build_state`` reads the phase's CSVs and label map, makes the model
(ImageNet weights, or the previous phase's ``best.pt``, broadcast from rank 0), applies cRT's
switches (``reset_head``, ``freeze_backbone``), wraps it for DDP / ``torch.compile`` and builds the
optimizer, schedule and loss (balanced softmax offsets the logits by the sampled SKU mix).
``fingerprint`` hashes what a resumed run must share with the killed one."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from products10k.common import ConfigError, file_sha256
from products10k.config import (
    DistConfig,
    EvaluateConfig,
    ModelConfig,
    PhaseConfig,
    phase_config,
    section,
)
from products10k.config.stage import StageFiles, option
from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared
from products10k.contracts.preprocessing import resolve_resize
from products10k.data.datasets import ClassBalancedSampler, EpochSampler, PKSampler, PreparedImageDataset
from products10k.data.transforms import eval_transform, train_transform
from products10k.dist.devices import (
    amp_dtype,
    host_cores,
    host_transfer,
    needs_grad_scaler,
    seed_everything,
    train_workers,
)
from products10k.dist.group import (
    DistInfo,
    broadcast_object,
)
from products10k.estimate import val_weights
from products10k.folds import fold_dir, fold_view
from products10k.models import checkpoint as ckpt_lib
from products10k.models.model import create_model, input_normalization, sync_batchnorm
from products10k.training.losses import PhaseLoss, log_prior
from products10k.training.optim import create_scheduler

log = logging.getLogger("products10k.training.loop")  # one logger for the whole loop, as before its split

#: settings that may change between a kill and a resume without changing the result; num_workers
#: too: each sample is augmented from a seed of its own, whichever worker (or none) loads it
RESUME_SAFE_KEYS = ("compile", "eval_batch_size", "num_workers")
#: part of the resume fingerprint: a last.pt whose optimizer state is laid out otherwise (the
#: parameter groups before timm's create_optimizer_v2) is not resumed
OPTIMIZER_LAYOUT = "timm-v2"


@dataclass(frozen=True)
class PhaseSettings:
    """The params one phase of one member trains with, as typed sections (read once, by the stage)."""

    phase: str
    member: str
    cfg: PhaseConfig  # the phase's section, a finetune's on top of train's
    model: ModelConfig
    dist: DistConfig
    target_prior: str  # evaluate.target_prior: what checkpoint: best's val estimate weights val to
    where: str  # the params file, named in errors

    @classmethod
    def from_params(cls, params: dict, phase: str, member: str, where: str) -> PhaseSettings:
        """``params``: the member's params (:func:`products10k.config.member_params`)."""
        return cls(
            phase=phase,
            member=member,
            cfg=phase_config(params, phase, where),
            model=section(params, "model", ModelConfig, where),
            dist=section(params, "dist", DistConfig, where),
            target_prior=section(params, "evaluate", EvaluateConfig, where).target_prior,
            where=where,
        )

    @property
    def name(self) -> str:
        return f"{self.member}/{self.phase}"


@dataclass(frozen=True)
class PhasePaths(StageFiles):
    """Every file a phase reads or writes: the train stage's command line (stages/train.py)."""

    train_csv: Path = option("train.csv or balanced.csv")
    val_csv: Path = option("val CSV")
    label_map: Path = option("prepared label_map.csv")
    images: Path = option("prepared root holding images/shard-*.bin")
    out: Path = option("checkpoint folder (best.pt, last.pt)")
    live: Path | None = option("DVCLive folder (rank 0 logs there)", optional=True)
    init: Path | None = option("checkpoint to start from (finetunes)", optional=True)
    fold: int | None = None  # under cv: the fold this model holds out; None: the refit or the single split

    def for_fold(self, fold: int | None) -> PhasePaths:
        """Fold ``fold``'s paths under cv: its checkpoints, curves and init in ``fold<i>/`` inside the
        phase's folders (products10k/folds.py); None: the refit's, these paths."""
        return replace(
            self,
            out=fold_dir(self.out, fold),
            live=fold_dir(self.live, fold) if self.live is not None else None,
            init=fold_dir(self.init, fold) if self.init is not None else None,
            fold=fold,
        )


@dataclass
class Callbacks:
    """Observers of a running phase; the stage passes none, tests watch the phase through them."""

    on_batch: Callable[[PhaseState, torch.Tensor, torch.Tensor], None] | None = None  # index, weight
    on_epoch_end: Callable[[PhaseState, int], None] | None = None  # after epoch (0-based)
    on_end: Callable[[PhaseState], None] | None = None


@dataclass
class PhaseData:
    """What the phase reads: its images, their order, and how they are cut into batches."""

    label_map: pd.DataFrame
    normalize: dict  # the backbone's input normalisation (timm's pretrained config), kept in checkpoints
    resize: int
    micro_batch: int  # per rank and forward pass: batch_size / (world x grad_accum)
    num_workers: int  # DataLoader workers per rank: train.num_workers, auto resolved for the device
    # computed once: len(sampler) shards the whole epoch's order (O(images)), too slow per step
    batches_per_epoch: int
    train_ds: PreparedImageDataset
    val_ds: PreparedImageDataset
    train_sampler: EpochSampler | ClassBalancedSampler | PKSampler
    val_sampler: EpochSampler
    # per val row: its weight in the val estimate of the test metric (products10k/estimate.py)
    val_weight: torch.Tensor
    # built at the first epoch, kept for the phase: its workers persist across epochs
    train_loader: DataLoader | None = None


@dataclass
class PhaseNet:
    """The model and what steps it: optimiser, schedule, loss, mixed precision."""

    raw: nn.Module  # the model itself: what is saved, EMA'd and clipped
    model: nn.Module  # what runs forward: raw, DDP-wrapped and/or compiled
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    criterion: PhaseLoss
    amp_dtype: torch.dtype | None
    non_blocking: bool  # asynchronous host-to-device copies (CUDA only)

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved as ``model``: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.raw


@dataclass
class PhaseProgress:
    """How far the phase has come: what ``last.pt`` carries to a resumed run."""

    global_step: int = 0
    best_top1: float = -1.0
    best_estimate: float = -1.0  # what checkpoint: best selects on
    history: list[dict] = field(default_factory=list)


@dataclass
class PhaseState:
    """Everything one rank holds while it trains a phase, in named parts; built by :func:`build_state`."""

    phase: str
    member: str
    paths: PhasePaths
    cfg: PhaseConfig
    model_cfg: ModelConfig
    info: DistInfo
    fingerprint: str  # the settings a resumed run must share (rank 0's; "" on the others)
    data: PhaseData
    net: PhaseNet
    progress: PhaseProgress = field(default_factory=PhaseProgress)

    @property
    def labels(self) -> list[int]:
        """The SKU id of every label, in label order."""
        return [int(s) for s in self.data.label_map["sku"]]

    @property
    def name(self) -> str:
        return f"{self.phase}@{self.member}"


def build_state(settings: PhaseSettings, paths: PhasePaths, info: DistInfo) -> PhaseState:
    """Read the data, build the model, optimizer and schedule of the phase on this rank."""
    cfg, model_cfg, phase = settings.cfg, settings.model, settings.phase
    if phase != "train" and paths.init is None:
        raise ConfigError(f"phase '{phase}' needs --init (the previous phase's best.pt)")
    per_step = info.world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"{settings.where}: {phase}.batch_size={cfg.batch_size} is not divisible by "
            f"dist.nproc_per_node ({info.world}) x {phase}.grad_accum ({cfg.grad_accum})"
        )
    micro_batch = cfg.batch_size // per_step
    resize = resolve_resize(cfg.resolution, cfg.resize)
    normalize = input_normalization(model_cfg.arch)
    label_map = read_label_map(paths.label_map, LABEL_MAP_ALL_COLUMNS)
    data = _phase_data(cfg, paths, label_map, normalize, resize, settings.target_prior)
    train_sampler, val_sampler = _samplers(cfg, data, micro_batch, info, label_map)
    batches_per_epoch = math.ceil(len(train_sampler) / micro_batch)
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)

    raw = _initial_model(model_cfg, label_map, paths, cfg.seed, info)
    _prepare_head(raw, cfg, state_name=settings.name)
    if settings.dist.sync_bn and info.enabled and info.device.type == "cuda":
        raw = sync_batchnorm(raw)
    raw.to(info.device)
    if cfg.channels_last:
        raw.to(memory_format=torch.channels_last)
    # timm's factory: no weight decay on biases, norm parameters and GeM's p (ndim <= 1)
    optimizer = create_optimizer_v2(
        raw, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    # timm's EMA warm-up: decay = min(ema_decay, 1 - (1 + step)^-2/3) counted from this phase's
    # start, so a 3-epoch finetune's EMA moves (a fixed 0.998 from step 0 would keep ~96% of the
    # initial weights over ~20 updates)
    ema = ModelEmaV3(raw, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    model: nn.Module = raw
    if info.enabled:
        model = DDP(raw, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    dtype = amp_dtype(cfg.amp, info.device)
    return PhaseState(
        phase=phase,
        member=settings.member,
        paths=paths,
        cfg=cfg,
        model_cfg=model_cfg,
        info=info,
        # rank 0 alone resumes and writes checkpoints: only its node need hold the input files
        fingerprint=fingerprint(settings, info.world, paths, info.device.type, dtype) if info.is_main else "",
        data=PhaseData(
            label_map=label_map,
            normalize=normalize,
            resize=resize,
            micro_batch=micro_batch,
            num_workers=train_workers(cfg.num_workers, info.device, host_cores()),
            batches_per_epoch=batches_per_epoch,
            train_ds=data.train_ds,
            val_ds=data.val_ds,
            train_sampler=train_sampler,
            val_sampler=val_sampler,
            val_weight=data.val_weight,
        ),
        net=PhaseNet(
            raw=raw,
            model=model,
            ema=ema,
            optimizer=optimizer,
            scheduler=create_scheduler(optimizer, cfg, updates_per_epoch),
            scaler=torch.amp.GradScaler(info.device.type, enabled=needs_grad_scaler(dtype)),
            # on the device: balanced softmax's logit offset would be copied there at every step
            criterion=_criterion(cfg, data.train_ds.labels, len(label_map), settings.name).to(info.device),
            amp_dtype=dtype,
            non_blocking=host_transfer(info.device)["non_blocking"],
        ),
    )


@dataclass(frozen=True)
class _PhaseData:
    train_ds: PreparedImageDataset
    val_ds: PreparedImageDataset
    # per val row: its weight in the val estimate of the test metric (products10k/estimate.py)
    val_weight: torch.Tensor


def _phase_data(
    cfg: PhaseConfig,
    paths: PhasePaths,
    label_map: pd.DataFrame,
    normalize: dict,
    resize: int,
    target_spec: str,
) -> _PhaseData:
    """The phase's train and val images with their transforms, and val's weights in the estimate."""
    train_df, val_df = fold_view(
        read_prepared(paths.train_csv, label_map),
        read_prepared(paths.val_csv, label_map, allow_empty=True),
        paths.fold,
    )
    train_ds = PreparedImageDataset(train_df, paths.images, train_transform(cfg, normalize), min_side=resize)
    val_tf = eval_transform(resize, cfg.resolution, normalize)
    val_ds = PreparedImageDataset(val_df, paths.images, val_tf, min_side=resize)
    val_weight = torch.as_tensor(val_weights(val_df["label"].to_numpy(), label_map, target_spec))
    return _PhaseData(train_ds, val_ds, val_weight)


def _samplers(
    cfg: PhaseConfig, data: _PhaseData, micro_batch: int, info: DistInfo, label_map: pd.DataFrame
) -> tuple[EpochSampler | ClassBalancedSampler | PKSampler, EpochSampler]:
    """This rank's share of each epoch: train's order (shuffled, class-balanced or P x K), val's rows."""
    batching = {"batch_size": micro_batch, "global_batch": cfg.batch_size if cfg.drop_last else None}
    if cfg.sampler == "class_balanced":
        train = ClassBalancedSampler(data.train_ds.labels, info.rank, info.world, cfg.seed, **batching)
    elif cfg.sampler == "pk":
        product_groups = np.zeros(int(label_map["label"].max()) + 1, dtype=np.int64)  # by label
        product_groups[label_map["label"].to_numpy()] = label_map["group"].to_numpy()
        train = PKSampler(
            data.train_ds.labels, cfg.pk_images, info.rank, info.world, cfg.seed, **batching,
            product_groups=product_groups, group_share=cfg.pk_group_share,
        )  # fmt: skip
        if micro_batch % cfg.pk_images:
            log.warning(
                "sampler pk: the per-rank micro-batch (%d) is not a multiple of pk_images (%d), so "
                "some SKU groups are split over two batches", micro_batch, cfg.pk_images,
            )  # fmt: skip
    else:
        train = EpochSampler(len(data.train_ds), info.rank, info.world, True, cfg.seed, **batching)
    # eval mode uses running BN statistics: a 1-sample batch is fine there
    return train, EpochSampler(len(data.val_ds), info.rank, info.world, shuffle=False)


def _initial_model(
    model_cfg: ModelConfig, label_map: pd.DataFrame, paths: PhasePaths, seed: int, info: DistInfo
) -> nn.Module:
    """A new model (ImageNet weights if configured) or, for a finetune, the previous phase's: read
    by rank 0 and broadcast, as another node need not hold the previous phase's checkpoint."""
    seed_everything(seed)  # identical initial weights on every rank
    if paths.init is None:
        return create_model(model_cfg, len(label_map))
    init = broadcast_object(ckpt_lib.read_checkpoint(paths.init) if info.is_main else None, info)
    meta = ckpt_lib.metadata(init)
    ckpt_lib.check_arch(meta, model_cfg.arch, paths.init)
    ckpt_lib.check_labels(meta, label_map, paths.init, paths.label_map)
    # the init checkpoint holds all weights: ImageNet weights are not needed
    model = create_model(model_cfg, len(label_map), pretrained=False)
    ckpt_lib.load_state(model, init["model"], paths.init, model_cfg.arch)
    log.info(
        "initialised from %s (phase %s, epoch %s, val top-1 %.4f)",
        paths.init,
        meta.get("phase"),
        meta.get("epoch"),
        meta.get("val_top1", float("nan")),
    )
    return model


def _prepare_head(raw: nn.Module, cfg: PhaseConfig, state_name: str) -> None:
    """cRT's two switches: a re-initialised head (from the phase's seed, the same on every rank)
    and a fixed backbone, whose parameters then get no gradient and no optimizer state."""
    if cfg.reset_head:
        raw.head.reset_parameters()
        log.info("%s: head re-initialised", state_name)
    if cfg.freeze_backbone:
        frozen = 0
        for name, p in raw.named_parameters():
            if not name.startswith("head."):
                p.requires_grad_(False)
                frozen += p.numel()
        trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        log.info("%s: backbone frozen (%d parameters fixed, %d trained)", state_name, frozen, trained)


def _criterion(cfg: PhaseConfig, labels, num_classes: int, state_name: str) -> PhaseLoss:
    """The phase's loss; balanced softmax offsets the logits by the log of the SKU mix the sampler
    draws (train's counts under ``random``; uniform, so no offset, under ``class_balanced``)."""
    offset = None
    if cfg.loss == "balanced_softmax":
        if cfg.sampler == "class_balanced":
            log.info("%s: balanced_softmax under class_balanced sampling (a uniform mix) is CE", state_name)
        else:
            offset = log_prior(labels, num_classes)
    if cfg.metric_loss_weight > 0 and cfg.sampler != "pk":
        log.warning(
            "%s: metric_loss_weight %g without sampler pk: a random batch holds few images of one SKU, "
            "and an image without another of its SKU in the batch adds no metric loss",
            state_name, cfg.metric_loss_weight,
        )  # fmt: skip
    return PhaseLoss(
        cfg.label_smoothing, cfg.accuracy_loss_weight, offset, cfg.metric_loss_weight, cfg.metric_temperature
    )


def fingerprint(
    settings: PhaseSettings,
    world: int,
    paths: PhasePaths,
    device: str = "cpu",
    amp: torch.dtype | None = None,
) -> str:
    """Hash of everything a resumed run must share with the killed one: the settings, the inputs,
    and what ``auto`` settings resolved to here (a CPU run's last.pt, without loss-scaler state, is
    not resumed on a GPU where ``amp: auto`` means fp16)."""
    blob = {
        "device": device,
        "amp_dtype": str(amp),
        "target_prior": settings.target_prior,  # the best epoch's criterion
        "phase": settings.phase,
        "member": settings.member,
        "cfg": settings.cfg.model_dump(exclude=set(RESUME_SAFE_KEYS)),
        "model": settings.model.model_dump(),
        "world": world,
        "optimizer_layout": OPTIMIZER_LAYOUT,
        "train_csv": file_sha256(paths.train_csv),
        "label_map": file_sha256(paths.label_map),
        "init": file_sha256(paths.init) if paths.init else None,
        **({"fold": paths.fold} if paths.fold is not None else {}),  # the fold's rows of one table
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()
