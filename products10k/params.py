"""Frozen dataclasses, one per params.yaml section; field defaults equal the embedded default.

Load with ``products10k.config.load_section(path, "prepare", PrepareConfig)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SyntheticConfig:
    """Products-10K-like data generated deterministically (``data.synthetic``)."""

    seed: int = 0
    num_groups: int = 6
    skus_per_group: int = 5
    image_size: int = 512  # >= 512 so the small details survive the 512 resize, lost at 224
    train_max_per_sku: int = 30  # long tail: SKU k gets about max * (k+1)^-tail_power images
    train_min_per_sku: int = 2
    tail_power: float = 0.8
    train_inshop_fraction: float = 0.5  # share of clean in-shop images in train
    test_per_sku: int = 6
    test_customer_fraction: float = 0.85  # the test set is mostly customer images
    public_fraction: float = 0.5  # Usage=Public share of the test rows

    def validate(self) -> None:
        if self.image_size < 512:
            raise ValueError(f"image_size must be >= 512, got {self.image_size}")
        for name in ("num_groups", "skus_per_group", "train_max_per_sku", "test_per_sku"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 1 <= self.train_min_per_sku <= self.train_max_per_sku:
            raise ValueError("need 1 <= train_min_per_sku <= train_max_per_sku")
        for name in ("train_inshop_fraction", "test_customer_fraction", "public_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclass(frozen=True)
class KaggleConfig:
    competition: str = "products-10k"


@dataclass(frozen=True)
class DataConfig:
    """``data``: where the four official files come from."""

    source: Literal["synthetic", "dir", "kaggle"] = "synthetic"
    dir: str | None = None  # source=dir: folder holding the official files, zipped or extracted
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    kaggle: KaggleConfig = field(default_factory=KaggleConfig)

    def validate(self) -> None:
        if self.source == "dir" and not self.dir:
            raise ValueError("source is 'dir' but data.dir is not set")


@dataclass(frozen=True)
class PrepareConfig:
    """``prepare``: validation, extraction, pre-resize, split."""

    size: int = 512  # shorter side after resize (the paper resizes to 512 before cropping 448)
    val_fraction: float = 0.15
    seed: int = 0
    max_bad_fraction: float = 0.01
    jpeg_quality: int = 93
    n_jobs: int = -1  # joblib workers; -1 = all cores
    shard_mb: float = 256.0  # prepared images are packed into shards of about this size

    def validate(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("max_bad_fraction must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in [1, 100]")


@dataclass(frozen=True)
class BalanceConfig:
    """``balance``: the paper's balanced subset."""

    per_class: int = 5  # the paper's value: at most 5 random images per SKU
    seed: int = 0

    def validate(self) -> None:
        if self.per_class < 1:
            raise ValueError("per_class must be >= 1")
