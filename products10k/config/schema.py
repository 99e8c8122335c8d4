"""Frozen dataclasses, one per params.yaml section; field defaults equal the embedded default.

Load with ``products10k.config.load_section(path, "prepare", PrepareConfig)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SyntheticConfig:
    """Products-10K-like data generated deterministically (``data.synthetic``).

    The default (8 groups x 5 SKUs, ~660 train / 240 test images at 512 px) is sized so that a small
    CNN trained from scratch on CPU learns it in minutes; see ``products10k.raw.synthetic``.
    """

    seed: int = 0
    num_groups: int = 8
    skus_per_group: int | None = 5  # SKUs of a group share shape and base colour; distinct cues up to 16
    num_skus: int | None = None  # instead of skus_per_group: this many SKUs dealt over the groups
    image_size: int = 512  # 512: the fine print survives the 512 resize, lost at 224; >= 32 allowed
    train_images: int | None = None  # exact train total, log-normal per SKU (real: 141,931)
    test_images: int | None = None  # exact test total, spread evenly over SKUs (real: 55,376)
    train_max_per_sku: int = 90  # long tail: SKU of rank k gets about max * (k+1)^-tail_power images
    train_min_per_sku: int = 5
    tail_power: float = 0.7
    train_inshop_fraction: float = 0.4  # share of clean in-shop images in train
    test_per_sku: int = 6
    test_customer_fraction: float = 0.85  # the test set is mostly customer images
    public_fraction: float = 0.5  # Usage=Public share of the test rows
    customer_difficulty: float = 1.0  # scales rotation, perspective, blur, occlusion, lighting
    n_jobs: int = -1  # render threads, -1 = all cores; the bytes written never depend on it

    @property
    def n_skus(self) -> int:
        return self.num_skus if self.num_skus is not None else self.num_groups * self.skus_per_group

    def validate(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if (self.skus_per_group is None) == (self.num_skus is None):
            raise ValueError("set exactly one of skus_per_group and num_skus (the other null)")
        for name in ("num_groups", "skus_per_group", "num_skus", "train_max_per_sku", "test_per_sku"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        n_skus = self.n_skus
        if self.num_skus is not None and self.num_skus < self.num_groups:
            raise ValueError(f"num_skus ({self.num_skus}) must be >= num_groups ({self.num_groups})")
        if self.train_images is not None and not (
            n_skus * self.train_min_per_sku <= self.train_images <= n_skus * self.train_max_per_sku
        ):
            raise ValueError(
                f"train_images ({self.train_images}) must lie between {n_skus} SKUs x train_min_per_sku and "
                f"x train_max_per_sku ({n_skus * self.train_min_per_sku}..{n_skus * self.train_max_per_sku})"
            )
        if self.test_images is not None and self.test_images < n_skus:
            raise ValueError(f"test_images ({self.test_images}) must be >= the number of SKUs ({n_skus})")
        if not 1 <= self.train_min_per_sku <= self.train_max_per_sku:
            raise ValueError("need 1 <= train_min_per_sku <= train_max_per_sku")
        if self.tail_power < 0:
            raise ValueError(f"tail_power must be >= 0, got {self.tail_power}")
        for name in ("train_inshop_fraction", "test_customer_fraction", "public_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.customer_difficulty <= 2.0:
            raise ValueError(f"customer_difficulty must be in [0, 2], got {self.customer_difficulty}")
        if n_skus > 9999:
            raise ValueError(f"{n_skus} SKUs: at most 9999 fit the synthetic SKU id range")
        if self.n_jobs == 0:
            raise ValueError("n_jobs must be >= 1, or negative for 'all cores but n_jobs+1' (-1 = all)")


@dataclass(frozen=True)
class KaggleConfig:
    """``data.kaggle``: the official Kaggle CLI downloads the competition files."""

    competition: str = "products-10k"
    timeout_s: float = 21600.0  # the CLI is killed after this; the real archive is tens of GB

    def validate(self) -> None:
        if not self.competition.strip():
            raise ValueError("competition must not be empty")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class DataConfig:
    """``data``: where the four official files come from."""

    source: Literal["synthetic", "dir", "kaggle"] = "synthetic"
    dir: str | None = None  # source=dir: folder holding the official files, zipped or extracted
    # source=dir: how zips/CSVs reach data/raw. hardlink skips the copy at stage time (falls back
    # to copy across filesystems); DVC still copies into its cache and relinks data/raw on commit,
    # leaving the user's files as they were (checked: content, mode and link count).
    link: Literal["copy", "hardlink"] = "copy"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    kaggle: KaggleConfig = field(default_factory=KaggleConfig)

    def validate(self) -> None:
        if self.source == "dir" and not self.dir:
            raise ValueError("source is 'dir' but data.dir is not set")


@dataclass(frozen=True)
class PrepareConfig:
    """``prepare``: validation, extraction, pre-resize, split (products10k/prepared/prepare.py)."""

    size: int = 512  # shorter side after resize (the paper: 512, then crop 448); never upscales
    val_fraction: float = 0.15  # of the images of SKUs with >= val_min_images; 0 = no val split
    val_min_images: int = 10  # only SKUs with at least this many images give val images
    seed: int = 0
    max_bad_fraction: float = 0.01  # per table (train.csv, test_kaggletest.csv); above it the stage fails
    max_unseen_test_fraction: float = 0.01  # test rows whose SKU has no train images; above it: fail
    jpeg_quality: int = 93
    n_jobs: int = -1  # image threads (OpenCV releases the GIL); -1 = all cores
    shard_mb: float = 256.0  # prepared images are packed into shards of about this size

    def validate(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.val_min_images < 2:
            raise ValueError(
                f"val_min_images must be >= 2 (a SKU keeps one training image), got {self.val_min_images}"
            )
        for name in ("max_bad_fraction", "max_unseen_test_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in [1, 100]")
        if self.n_jobs == 0:
            raise ValueError("n_jobs must be >= 1, or negative for 'all cores but n_jobs+1' (-1 = all)")
        if self.shard_mb <= 0:
            raise ValueError(f"shard_mb must be > 0, got {self.shard_mb}")


@dataclass(frozen=True)
class BalanceConfig:
    """``balance``: the paper's balanced subset."""

    per_class: int = 5  # the paper's value: at most 5 random images per SKU
    seed: int = 0

    def validate(self) -> None:
        if self.per_class < 1:
            raise ValueError("per_class must be >= 1")


# --- evaluation, TTA, ensemble and submission (stages evaluate, submit) ---

PHASES = ("train", "finetune_balanced", "finetune_accuracy")


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate``: per member and phase, metrics, logits for the ensemble, plots."""

    phases: tuple[str, ...] = PHASES  # the matrix of evaluate stages: one per member x phase
    batch_size: int = 32
    num_workers: int | Literal["auto"] = 0  # DataLoader workers; auto = 0 on CPU, up to 8 on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # autocast of the backbone; auto = on CUDA only
    top_k: int = 100  # labels kept per row in the predictions file (the head is float32 regardless)
    tail_max_images: int = 10  # SKUs with at most this many training images are "tail"
    top_confused: int = 20  # confused SKU pairs kept in the plot
    gallery_size: int = 12  # worst test errors drawn in the gallery PNG
    gallery_tile: int = 160  # pixel size of each gallery tile

    def validate(self) -> None:
        if not self.phases:
            raise ValueError("phases must not be empty")
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown:
            raise ValueError(f"unknown phase '{unknown[0]}' in phases (known: {', '.join(PHASES)})")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError("phases must not repeat")
        for name in ("batch_size", "gallery_tile"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.top_k < 5:
            raise ValueError(f"top_k must be >= 5 (top-5 metrics), got {self.top_k}")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 or auto")
        for name in ("tail_max_images", "top_confused", "gallery_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class TTAConfig:
    """``tta``: test-time views whose logits are averaged (scales x crops x flips)."""

    scales: tuple[float, ...] = (1.0,)  # multiples of the checkpoint's resolution and resize
    crops: Literal["center", "five"] = "center"  # five = 4 corners + centre of the resized image
    flip: bool = True  # add the horizontally flipped copy of every view

    def validate(self) -> None:
        if not self.scales:
            raise ValueError("scales must not be empty")
        if any(s <= 0 for s in self.scales):
            raise ValueError("scales must be > 0")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError("scales must not repeat")


@dataclass(frozen=True)
class EnsembleConfig:
    """``ensemble``: members (dotted overrides per member) and how their softmaxes are weighted."""

    members: dict = field(default_factory=lambda: {"m0": {}})
    # fit: maximise the val log-likelihood of the weighted softmax average over the simplex;
    # equal: 1/N each; a mapping {member: weight} gives them (normalised to sum 1).
    weights: str | dict = "fit"

    def validate(self) -> None:
        if not self.members:
            raise ValueError("members must be a non-empty mapping of name -> overrides")
        if isinstance(self.weights, str):
            if self.weights not in ("fit", "equal"):
                raise ValueError(f"weights is {self.weights!r}, expected 'fit', 'equal' or a mapping")
            return
        names = set(self.members)
        unknown = sorted(set(self.weights) - names)
        if unknown:
            raise ValueError(
                f"weights names unknown member '{unknown[0]}' (members: {', '.join(self.members)})"
            )
        missing = [m for m in self.members if m not in self.weights]
        if missing:
            raise ValueError(f"weights has no entry for member '{missing[0]}'")
        for name, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
                raise ValueError(f"weights.{name} must be a number >= 0, got {w!r}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be 0")


@dataclass(frozen=True)
class KaggleSubmitConfig:
    """``submit.kaggle``: upload with the Kaggle CLI (off by default; needs the CLI and credentials)."""

    enabled: bool = False
    competition: str = "products-10k"
    message: str = "products10k pipeline"
    timeout_s: float = 600.0  # the upload is killed after this long instead of hanging the stage


@dataclass(frozen=True)
class SubmitConfig:
    """``submit``: the ensemble's submission CSV, its top-k file and its local score."""

    phase: Literal["train", "finetune_balanced", "finetune_accuracy"] = "finetune_accuracy"
    top_k: int = 5
    kaggle: KaggleSubmitConfig = field(default_factory=KaggleSubmitConfig)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")


# --- training (issue 3): model, train, finetune_* and dist sections ---------------------------


@dataclass(frozen=True)
class ModelConfig:
    """``model``: timm backbone + pooling + classification head (see products10k.training.model)."""

    arch: str = "resnet10t"  # any timm model name; the paper uses efficientnet_b3
    pretrained: bool = False  # ImageNet weights from the local timm/HF cache or pretrained_file
    pretrained_file: str | None = None  # a local .pth/.safetensors file of timm weights for `arch`
    pool: Literal["avg", "gem"] = "avg"  # gem = generalized-mean pooling (retrieval winners)
    gem_p: float = 3.0  # initial GeM exponent (learned)
    head: Literal["linear", "arcface", "cosface"] = "linear"
    margin: float = 0.3  # additive angular (arcface) / cosine (cosface) margin, training only
    scale: float = 30.0  # logit scale s of the margin heads: logits = s * cos
    drop_rate: float = 0.0  # dropout before the head
    drop_path_rate: float = 0.0  # stochastic depth inside the backbone, where timm supports it

    def validate(self) -> None:
        if not self.arch:
            raise ValueError("arch must be a timm model name")
        if self.gem_p <= 0:
            raise ValueError("gem_p must be > 0")
        if self.scale <= 0:
            raise ValueError("scale must be > 0")
        if not 0.0 <= self.margin < 1.5:
            raise ValueError("margin must be in [0, 1.5)")
        for name in ("drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: the ``train`` section, or ``train`` merged with a finetune section.

    ``batch_size`` is the global batch (over all processes and accumulation steps), so a recipe
    means the same thing on 1 CPU and on 8 GPUs.
    """

    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None  # null = 2 * batch_size per process
    resolution: int = 128  # training crop and eval centre crop (the paper: 448; baseline 224)
    resize: int | None = None  # shorter side before cropping; null = round(resolution * 8 / 7)
    crop: Literal["resize_random", "random_resized"] = "resize_random"  # paper: resize + random crop
    rrc_scale: tuple[float, ...] = (0.35, 1.0)  # crop area range of crop=random_resized
    hflip: float = 0.5  # horizontal flip probability
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    random_erasing: float = 0.0  # probability of erasing a random rectangle (after normalise)
    rotate: float = 0.0  # max rotation in degrees (uniform +-, before the crop); 0 = off
    perspective: float = 0.0  # corner jitter of a random perspective warp (fraction of side); 0 = off
    blur: float = 0.0  # probability of a Gaussian (defocus) or motion (hand-shake) blur
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    momentum: float = 0.9  # sgd only
    schedule: Literal["step", "cosine"] = "step"
    milestones: tuple[int, ...] = ()  # step: epochs where lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from warmup_lr, per optimizer step
    warmup_lr: float = 1.0e-6
    min_lr: float = 0.0  # cosine floor
    label_smoothing: float = 0.0
    accuracy_loss_weight: float = 0.0  # loss = (1-w) * CE + w * L_acc (the paper's accuracy loss)
    sampler: Literal["random", "class_balanced"] = "random"  # class_balanced: equal SKU odds
    grad_accum: int = 1  # optimizer step every grad_accum micro-batches
    drop_last: bool = True  # each epoch trains on whole global batches only (timm's drop_last)
    clip_grad: float | None = None  # max global grad norm; null = no clipping
    ema: bool = False  # keep an EMA of the weights; it is what gets evaluated and saved
    ema_decay: float = 0.999
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA if supported, off on CPU
    channels_last: bool = False
    # keep BatchNorm layers in eval mode (running statistics frozen, affine weights still trained):
    # a finetune on a small subset (the balanced 5-per-SKU set) otherwise drifts the statistics
    freeze_bn: bool = False
    compile: bool = False  # torch.compile the model (slow start; pays off on long GPU runs)
    num_workers: int = 2  # DataLoader workers per process

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "resolution", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resize is not None and self.resize < self.resolution:
            raise ValueError(f"resize ({self.resize}) must be >= resolution ({self.resolution})")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if len(self.rrc_scale) != 2 or not 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0:
            raise ValueError("rrc_scale must be [min, max] with 0 < min <= max <= 1")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"rotate must be in [0, 180] degrees, got {self.rotate}")
        if not 0.0 <= self.perspective <= 0.5:
            raise ValueError(f"perspective must be in [0, 0.5], got {self.perspective}")
        for name in ("hflip", "random_erasing", "accuracy_loss_weight", "blur"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError("ema_decay must be in (0, 1)")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError("milestones must be increasing")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError("clip_grad must be > 0 or null")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")


@dataclass(frozen=True)
class DistConfig:
    """``dist``: processes per node for torchrun (the dvc.yaml cmd reads nproc_per_node)."""

    nproc_per_node: int = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm (small per-GPU batches)
    timeout_s: int = 1800  # collective timeout: a dead peer fails the run instead of hanging it
    threads: int | None = None  # torch CPU threads per process; null = cores / local processes

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1 or null")
        if self.nproc_per_node < 1:
            raise ValueError("nproc_per_node must be >= 1")
        if self.timeout_s < 1:
            raise ValueError("timeout_s must be >= 1")


PHASES = ("train", "finetune_balanced", "finetune_accuracy")
