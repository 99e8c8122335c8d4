"""The params.yaml schema: one pydantic model per section, types and bounds only.

params.yaml is the only home of a default value: no field here has one, so a key missing from
params.yaml is an error naming it, never a silent fallback. Models are frozen and forbid unknown
keys (a typo such as ``train.resolutoin`` fails at start); values are checked strictly (``"3"`` is
not an integer, ``1`` is not ``true``), except that an integer is accepted where a number is
expected and a YAML list where a tuple is. Loading, with the file and the dotted key in every error,
is :mod:`products10k.config.load`.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from products10k.imaging.defects import DECODE_CEILING

#: The paper's Table 1 rows, in order; each is a training phase and an evaluate stage per member.
Phase = Literal["train", "finetune_balanced", "finetune_accuracy"]
PHASES: tuple[str, ...] = get_args(Phase)

Amp = Literal["auto", "off", "bf16", "fp16"]
Fraction01 = Annotated[float, Field(ge=0.0, le=1.0)]


def _threads(value: int) -> int:
    if value == 0:
        raise ValueError("n_jobs must be >= 1, or negative for 'all cores but n_jobs+1' (-1 = all)")
    return value


#: joblib's meaning: >= 1 threads, -1 all cores, -2 all but one, ...; 0 is invalid
NJobs = Annotated[int, AfterValidator(_threads)]


def _fraction(value):
    """``"8/7"`` (a YAML string) as the number it names; anything else is left to the type check."""
    if isinstance(value, str) and "/" in value:
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            return value  # reported as "not a valid number" by the float check
    return value


#: a positive number, written as a number or as a fraction such as ``8/7``
Ratio = Annotated[float, BeforeValidator(_fraction), Field(gt=0.0)]


def _workers(value):
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError("must be a number of DataLoader workers >= 0, or auto")


#: DataLoader workers: a count, or ``auto`` (resolved for the device: products10k.dist.devices)
Workers = Annotated[int | Literal["auto"], BeforeValidator(_workers)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _list(tp):
    """A tuple field that accepts a YAML list (strict mode alone takes only a Python tuple)."""
    return Annotated[tp, Field(strict=False)]


# --- data: stage download ----------------------------------------------------------------------


class SyntheticConfig(Section):
    """``data.synthetic``: Products-10K-like data generated deterministically (products10k.raw.synthetic)."""

    seed: int
    num_groups: int = Field(ge=1)
    skus_per_group: int | None = Field(ge=1)  # SKUs of a group share shape and base colour
    num_skus: int | None = Field(ge=1)  # instead of skus_per_group: this many SKUs over the groups
    # distinct (mark, stripes) pairs per group, at most 4 marks x 4 stripe counts: SKUs beyond that
    # share a pair with another SKU of their group and differ only in the fine print
    medium_variants: int = Field(ge=1, le=16)
    image_size: int = Field(ge=32)
    train_images: int | None  # exact train total, log-normal per SKU (real: 141,931)
    test_images: int | None  # exact test total, spread evenly over SKUs (real: 55,376)
    train_max_per_sku: int = Field(ge=1)
    train_min_per_sku: int = Field(ge=1)
    tail_power: float = Field(ge=0.0)
    train_inshop_fraction: Fraction01
    test_per_sku: int = Field(ge=1)
    test_customer_fraction: Fraction01
    public_fraction: Fraction01
    customer_difficulty: float = Field(ge=0.0, le=2.0)
    n_jobs: NJobs

    @property
    def n_skus(self) -> int:
        return self.num_skus if self.num_skus is not None else self.num_groups * self.skus_per_group

    @model_validator(mode="after")
    def _consistent(self):
        if (self.skus_per_group is None) == (self.num_skus is None):
            raise ValueError("set exactly one of skus_per_group and num_skus (the other null)")
        n_skus = self.n_skus
        if self.num_skus is not None and self.num_skus < self.num_groups:
            raise ValueError(f"num_skus ({self.num_skus}) must be >= num_groups ({self.num_groups})")
        if self.train_min_per_sku > self.train_max_per_sku:
            raise ValueError("need train_min_per_sku <= train_max_per_sku")
        low, high = n_skus * self.train_min_per_sku, n_skus * self.train_max_per_sku
        if self.train_images is not None and not low <= self.train_images <= high:
            raise ValueError(
                f"train_images ({self.train_images}) must lie between {n_skus} SKUs x train_min_per_sku and "
                f"x train_max_per_sku ({low}..{high})"
            )
        if self.test_images is not None and self.test_images < n_skus:
            raise ValueError(f"test_images ({self.test_images}) must be >= the number of SKUs ({n_skus})")
        if n_skus > 9999:
            raise ValueError(f"{n_skus} SKUs: at most 9999 fit the synthetic SKU id range")
        return self


class KaggleConfig(Section):
    """``data.kaggle``: the competition the Kaggle CLI downloads from and submits to."""

    competition: str = Field(min_length=1, pattern=r"\S")
    timeout_s: float = Field(gt=0.0)  # the download is killed after this; the real archive is tens of GB


class DataConfig(Section):
    """``data``: where the four official files come from."""

    source: Literal["synthetic", "dir", "kaggle"]
    dir: str | None  # source=dir: folder holding the official files, zipped or extracted
    # source=dir: how zips/CSVs reach data/raw. hardlink skips the copy at stage time (falls back
    # to copy across filesystems); DVC still copies into its cache and relinks data/raw on commit,
    # leaving the user's files as they were (checked: content, mode and link count).
    link: Literal["copy", "hardlink"]
    synthetic: SyntheticConfig
    kaggle: KaggleConfig

    @model_validator(mode="after")
    def _dir_for_source_dir(self):
        if self.source == "dir" and not self.dir:
            raise ValueError("source is 'dir' but data.dir is not set")
        return self


# --- prepared data: stages prepare, balance ----------------------------------------------------


class PrepareConfig(Section):
    """``prepare``: validation, extraction, pre-resize, split (products10k/prepared/prepare.py)."""

    size: int = Field(ge=16)  # shorter side after resize; never upscales
    val_fraction: float = Field(ge=0.0, lt=1.0)  # of the images of SKUs with >= val_min_images
    val_min_images: int = Field(ge=2)  # >= 2: a SKU that gives a val image keeps one to train on
    val_tail_images: int = Field(ge=0)  # val images of each smaller SKU (a leave-out: val sees the tail)
    val_tail_min_images: int = Field(ge=2)  # ... of those with at least this many images
    seed: int
    max_bad_fraction: Fraction01
    max_unseen_test_fraction: Fraction01
    jpeg_quality: int = Field(ge=1, le=100)
    # decoded pixels per image (imaging/images.py): a JPEG over it is decoded reduced, others excluded
    # at most Pillow's own refusal, twice its MAX_IMAGE_PIXELS (imaging/defects.py; a test checks)
    max_pixels: int = Field(ge=1_000_000, le=DECODE_CEILING)
    max_aspect_ratio: float = Field(ge=2.0, le=1000.0)  # longer / shorter side; a thinner image is too-large
    max_file_mb: float = Field(
        gt=0.0, le=4096.0
    )  # bytes of one image file or zip member, checked before reading
    n_jobs: NJobs
    shard_mb: float = Field(gt=0.0)


class BalanceConfig(Section):
    """``balance``: the paper's balanced subset."""

    per_class: int | None = Field(ge=1)  # null: every train image (class-balanced sampling over all)
    seed: int


def _folds(value: int) -> int:
    if value == 1:
        raise ValueError("1 fold holds nothing out: 0 (prepare's single val split) or 2 and more")
    return value


class CVConfig(Section):
    """``cv``: K-fold cross-validation over every training image (products10k/folds.py)."""

    folds: Annotated[int, Field(ge=0, le=50), AfterValidator(_folds)]  # 0: prepare's single val split
    seed: int


# --- training: stages train, finetune_balanced, finetune_accuracy ------------------------------


class ModelConfig(Section):
    """``model``: timm backbone + pooling + classification head (products10k.models.model)."""

    arch: str = Field(min_length=1)
    pretrained: bool  # ImageNet weights from the local timm/HF cache or pretrained_file
    pretrained_file: str | None
    pool: Literal["avg", "gem"]
    gem_p: float = Field(gt=0.0)  # initial GeM exponent (learned)
    head: Literal["linear", "arcface", "cosface"]
    margin: float = Field(ge=0.0, lt=1.5)
    scale: float = Field(gt=0.0)
    drop_rate: float = Field(ge=0.0, lt=1.0)
    drop_path_rate: float = Field(ge=0.0, lt=1.0)


class PhaseConfig(Section):
    """One training phase: the ``train`` section, or ``train`` with a finetune section's keys on top.

    ``batch_size`` is the global batch (over all processes and accumulation steps), so a recipe
    means the same thing on 1 CPU and on 8 GPUs.
    """

    seed: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    eval_batch_size: int | None = Field(ge=1)  # null = 2 x the per-rank batch
    resolution: int = Field(ge=1)
    resize: int | None = Field(ge=1)  # null = the resize rule (data.transforms.RESIZE_RATIO)
    crop: Literal["resize_random", "random_resized"]
    rrc_scale: _list(tuple[float, float])
    hflip: Fraction01
    color_jitter: float = Field(ge=0.0)
    random_erasing: Fraction01
    rotate: float = Field(ge=0.0, le=180.0)
    perspective: float = Field(ge=0.0, le=0.5)
    blur: Fraction01
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    momentum: float = Field(ge=0.0, lt=1.0)
    schedule: Literal["step", "cosine"]
    milestones: _list(tuple[int, ...])
    gamma: float = Field(gt=0.0)
    warmup_epochs: float = Field(ge=0.0)
    warmup_lr: float = Field(ge=0.0)
    min_lr: float = Field(ge=0.0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    accuracy_loss_weight: Fraction01
    # balanced_softmax (Ren et al. 2020): the loss sees logits + log(prior of what the sampler draws)
    loss: Literal["ce", "balanced_softmax"]
    sampler: Literal["random", "class_balanced", "pk"]
    pk_images: int = Field(ge=2)  # pk: images of one SKU per group (each image's positives: k - 1)
    pk_group_share: Fraction01  # pk: share of a micro-batch's SKUs drawn from its first SKU's product group
    # supervised contrastive loss (Khosla et al. 2020) on the unit embedding the index compares,
    # added to the classification loss with this weight; its positives are a batch's same-SKU images
    metric_loss_weight: float = Field(ge=0.0)
    metric_temperature: float = Field(gt=0.0)
    freeze_backbone: bool  # only the head learns (cRT, Kang et al. 2020): backbone + pooling fixed
    reset_head: bool  # re-initialise the head as the phase starts (cRT re-learns the classifier)
    grad_accum: int = Field(ge=1)
    drop_last: bool
    clip_grad: float | None = Field(gt=0.0)
    ema: bool
    ema_decay: float = Field(gt=0.0, lt=1.0)
    amp: Amp
    channels_last: bool
    freeze_bn: bool
    compile: bool
    num_workers: Workers  # auto: dist.devices.train_workers
    checkpoint: Literal["best", "last"]  # which epoch's weights best.pt (the phase's output) holds

    @model_validator(mode="after")
    def _consistent(self):
        if self.resize is not None and self.resize < self.resolution:
            raise ValueError(f"resize ({self.resize}) must be >= resolution ({self.resolution})")
        if not 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0:
            raise ValueError("rrc_scale must be [min, max] with 0 < min <= max <= 1")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError("milestones must be increasing")
        if self.pk_group_share > 0 and self.sampler != "pk":
            raise ValueError(f"pk_group_share ({self.pk_group_share}) needs sampler: pk, not {self.sampler}")
        if self.sampler == "pk" and self.batch_size % self.pk_images:
            raise ValueError(
                f"sampler pk draws groups of pk_images ({self.pk_images}) images of one SKU: "
                f"batch_size ({self.batch_size}) must be a multiple of it"
            )
        return self


class DistConfig(Section):
    """``dist``: processes per node and nodes for torchrun (products10k.dist.launch reads it)."""

    nproc_per_node: int = Field(ge=1)
    nnodes: int = Field(ge=1)
    rdzv_endpoint: str | None = Field(pattern=r"^[^\s:]+:\d+$")  # HOST:PORT of the node that runs dvc
    rdzv_id: str | None = Field(pattern=r"^[\w.-]+$")  # null: derived from the stage command
    max_restarts: int = Field(ge=0)  # torchrun restarts of failed workers, which resume from last.pt
    backend: Literal["auto", "nccl", "gloo"]
    sync_bn: bool
    timeout_s: int = Field(ge=1)  # collective timeout: a dead peer fails the run instead of hanging it
    threads: int | None = Field(ge=1)  # torch CPU threads per process; null = cores / local processes


# --- evaluation, TTA, ensemble and submission: stages evaluate, submit ---------------------------


class EvaluateConfig(Section):
    """``evaluate``: per member and phase, metrics, the predictions file, plots."""

    phases: _list(tuple[Phase, ...]) = Field(min_length=1)
    batch_size: int = Field(ge=1)
    num_workers: Workers  # auto: dist.devices.eval_workers
    device: Literal["auto", "cpu", "cuda"]
    amp: Amp
    top_k: int = Field(ge=5)  # >= 5: the top-5 metrics read it
    tail_max_images: int = Field(ge=0)
    top_confused: int = Field(ge=0)
    gallery_size: int = Field(ge=0)
    gallery_tile: int = Field(ge=1)
    # the SKU mix test follows, which val's estimate is weighted to (products10k/choose.py):
    # uniform | train | a CSV file of sku,weight
    target_prior: str = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.target_prior not in ("uniform", "train") and not self.target_prior.endswith(".csv"):
            raise ValueError(f"target_prior must be uniform, train or a .csv file, not {self.target_prior!r}")
        if len(set(self.phases)) != len(self.phases):
            raise ValueError("phases must not repeat")
        return self


class TTAConfig(Section):
    """``tta``: test-time views whose logits are averaged (scales x crops x flips)."""

    scales: _list(tuple[Ratio, ...]) = Field(min_length=1)  # multiples of resolution and resize
    crops: Literal["center", "five"]
    flip: bool

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.scales)) != len(self.scales):
            raise ValueError("scales must not repeat")
        return self


class EnsembleConfig(Section):
    """``ensemble``: members (dotted overrides per member) and how their softmaxes are weighted."""

    members: dict[str, dict | None] = Field(min_length=1)
    # fit: maximise the val log-likelihood of the weighted softmax average over the simplex;
    # equal: 1/N each; a mapping {member: weight} gives them (normalised to sum 1).
    weights: Literal["fit", "equal"] | dict[str, Annotated[float, Field(ge=0.0)]]

    @model_validator(mode="after")
    def _weights_name_members(self):
        if isinstance(self.weights, str):
            return self
        unknown = sorted(set(self.weights) - set(self.members))
        if unknown:
            members = ", ".join(self.members)
            raise ValueError(f"weights names unknown member '{unknown[0]}' (members: {members})")
        missing = [m for m in self.members if m not in self.weights]
        if missing:
            raise ValueError(f"weights has no entry for member '{missing[0]}'")
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be 0")
        return self


class KaggleSubmitConfig(Section):
    """``submit.kaggle``: upload with the Kaggle CLI to ``data.kaggle.competition``."""

    enabled: bool
    message: str
    timeout_s: float = Field(gt=0.0)  # the upload is killed after this long instead of hanging the stage


class SubmitConfig(Section):
    """``submit``: the ensemble's submission CSV, its top-k file and its local score."""

    # a phase: the members' TTA'd classifier predictions of that phase (evaluate stages);
    # knn: their kNN over the training-image index; fused: the classifier fused with it (index
    # stages, of retrieval.phase); auto: whichever of those has the best val estimate (choose.py)
    phase: Phase | Literal["knn", "fused", "auto"]
    # post-hoc logit adjustment: tau subtracted x log train prior; auto = fitted on val over tau_grid
    logit_adjust: Literal["auto"] | Annotated[float, Field(ge=0.0, le=10.0)]
    tau_grid: _list(tuple[Annotated[float, Field(ge=0.0, le=10.0)], ...]) = Field(min_length=1)
    # auto: the output the choice starts from (at the grid's first tau); another output is taken only
    # for a gain over it whose paired interval lies above zero (choose.py)
    reference: Phase | Literal["knn", "fused"]
    confidence: float = Field(gt=0.5, lt=1.0)  # of the intervals, before the Bonferroni correction
    top_k: int = Field(ge=1)
    rerank_k: int = Field(ge=1)  # labels per row logit adjustment may re-rank
    kaggle: KaggleSubmitConfig


class RetrievalConfig(Section):
    """``retrieval``: a Faiss index of the training images' embeddings, kNN, and its fusion with the
    classifier (weight fitted on val)."""

    phase: Phase  # whose checkpoint embeds (one index per ensemble member)
    k: int = Field(ge=1)  # neighbours that vote
    # softmax: weight exp(similarity / temperature); count: 1 each; best: each SKU by its best match;
    # centroid: each SKU by its prototype (the mean of its gallery vectors); expected_best: each SKU
    # by the expected best match of vote_shots of its photos drawn at random: votes.py
    vote: Literal["softmax", "count", "best", "centroid", "expected_best"]
    temperature: float = Field(gt=0.0)
    vote_shots: int = Field(ge=1)  # expected_best: every SKU judged as if it had this many photos
    # kNN probability = (1 - smoothing) x vote share + smoothing / K: no SKU gets probability 0,
    # so the fusion weight fit (val log-likelihood) is finite for rows whose SKU got no vote
    smoothing: float = Field(gt=0.0, lt=1.0)
    batch_size: int = Field(ge=1)  # images per embedding batch
    search_batch: int = Field(ge=1)  # queries per Faiss search call (progress and memory)
    unfitted_weight: float = Field(ge=0.0, le=1.0)  # the fusion weight without labelled val rows
    # the enrolment check: SKUs cut to enrol_shots gallery images, their val images queried
    # (metrics/<member>/retrieval.json "enrolment"); 0 turns it off
    enrol_check_skus: int = Field(ge=0)
    enrol_shots: int = Field(ge=1)


class ExportConfig(Section):
    """``export``: the ONNX model people run (``products10k-predict``), checked with onnxruntime."""

    member: str
    phase: Phase
    opset: int = Field(ge=18)  # the torch.export-based exporter writes opset >= 18
    check_images: int = Field(ge=1)  # prepared test images compared between PyTorch and onnxruntime


class Table1Config(Section):
    """``table1``: the Table 1 report over seeds of DVC experiments (``products10k.report.table1``)."""

    seeds: int = Field(ge=1)  # train.seed = 0 .. seeds-1, one high- and one low-resolution experiment each
    bootstrap: int = Field(ge=100)  # resamples of the test images per interval
    confidence: float = Field(gt=0.5, lt=1.0)
    jobs: int = Field(ge=1)  # experiments run at once (`dvc queue start -j`)
    # long-tail rows beside the paper's (report/table1.py METHODS): logit_adjust | balanced_softmax |
    # class_balanced | crt
    methods: _list(tuple[Literal["logit_adjust", "balanced_softmax", "class_balanced", "crt"], ...])

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must not repeat")
        return self


#: the params.yaml section each stage's config is read from
SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "prepare": PrepareConfig,
    "balance": BalanceConfig,
    "cv": CVConfig,
    "model": ModelConfig,
    "train": PhaseConfig,
    "dist": DistConfig,
    "ensemble": EnsembleConfig,
    "evaluate": EvaluateConfig,
    "tta": TTAConfig,
    "submit": SubmitConfig,
    "retrieval": RetrievalConfig,
    "export": ExportConfig,
    "table1": Table1Config,
}
