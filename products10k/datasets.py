"""Training/evaluation datasets over the prepared CSVs and packed image shards, plus samplers.

Images are read from ``data/prepared/images/shard-*.bin`` (memory-mapped, see storage.py) and
decoded with OpenCV. When the target shorter side is at most half of the stored one, the JPEG is
decoded at reduced scale (libjpeg DCT scaling: ``IMREAD_REDUCED_COLOR_2/4/8``), which is several
times cheaper than a full decode followed by a resize.

Samplers are epoch-seeded and shard the epoch across DDP ranks *without* duplicating samples:
each rank gets ``indices[rank::world]`` and the shorter ranks are padded with *weight-0* entries
(encoded as ``index + len(dataset)``), so every rank runs the same number of steps while every
real sample contributes exactly once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from products10k.errors import DataError
from products10k.storage import ImageStore

PREPARED_COLUMNS = ("name", "label", "sku", "shard", "offset", "length", "width", "height")
LABEL_MAP_COLUMNS = ("label", "sku")


def read_label_map(path: str | Path) -> pd.DataFrame:
    """Read label_map.csv; labels must be exactly 0..K-1 in order (index = contiguous label)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label map not found (run the prepare stage)")
    df = pd.read_csv(path)
    missing = [c for c in LABEL_MAP_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (have: {', '.join(df.columns)})")
    df = df.sort_values("label").reset_index(drop=True)
    expected = np.arange(len(df))
    bad = np.flatnonzero(df["label"].to_numpy() != expected)
    if len(bad):
        raise DataError(
            f"{path}: column 'label' must be 0..{len(df) - 1} without gaps; "
            f"row {int(bad[0]) + 2} has {df['label'].iloc[bad[0]]!r}"
        )
    return df


def read_prepared_csv(path: str | Path, num_classes: int | None = None) -> pd.DataFrame:
    """Read a prepared split CSV (train/val/balanced), checking the columns training needs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared CSV not found")
    df = pd.read_csv(path)
    missing = [c for c in PREPARED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (have: {', '.join(df.columns)})")
    if df.empty:
        raise DataError(f"{path}: no rows")
    for col in ("label", "offset", "length", "width", "height"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() | (values.to_numpy() < 0))
        if len(bad):
            raise DataError(
                f"{path}: row {int(bad[0]) + 2} column '{col}' is {df[col].iloc[bad[0]]!r}, "
                "expected a non-negative integer"
            )
    if num_classes is not None:
        bad = np.flatnonzero(df["label"].to_numpy() >= num_classes)
        if len(bad):
            raise DataError(
                f"{path}: row {int(bad[0]) + 2} column 'label' is {int(df['label'].iloc[bad[0]])}, "
                f"but the label map has only {num_classes} labels"
            )
    return df.reset_index(drop=True)


def reduced_decode_flag(width: int, height: int, min_side: int) -> int:
    """The cheapest OpenCV decode flag whose output keeps the shorter side >= ``min_side``."""
    short = min(int(width), int(height))
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4)):
        if short // factor >= min_side:
            return flag
    if short // 2 >= min_side:
        return cv2.IMREAD_REDUCED_COLOR_2
    return cv2.IMREAD_COLOR


class PreparedImageDataset(Dataset):
    """Rows of a prepared CSV as ``(image tensor, label, index, weight)``.

    Indices ``>= len(self)`` are the samplers' padding entries: they return the image of
    ``index - len(self)`` with weight 0, so they fill a batch without counting in loss/metrics.
    """

    def __init__(self, df: pd.DataFrame, images_root: str | Path, transform, min_side: int | None = None):
        self.store = ImageStore(images_root)
        self.transform = transform
        self.min_side = min_side
        # plain arrays: cheap to pickle into workers, no pandas row access in __getitem__
        self.shards = df["shard"].astype(str).to_numpy()
        self.offsets = df["offset"].to_numpy(dtype=np.int64)
        self.lengths = df["length"].to_numpy(dtype=np.int64)
        self.widths = df["width"].to_numpy(dtype=np.int64)
        self.heights = df["height"].to_numpy(dtype=np.int64)
        self.labels = df["label"].to_numpy(dtype=np.int64)
        self.names = df["name"].astype(str).to_numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        buf = self.store.read_bytes(self.shards[i], self.offsets[i], self.lengths[i])
        flag = cv2.IMREAD_COLOR
        if self.min_side is not None:
            flag = reduced_decode_flag(self.widths[i], self.heights[i], self.min_side)
        img = cv2.imdecode(np.asarray(buf), flag)
        if img is None:
            raise DataError(
                f"{self.store.dir / self.shards[i]}@{self.offsets[i]}: image '{self.names[i]}' "
                "is not decodable (re-run the prepare stage)"
            )
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def __getitem__(self, index: int):
        n = len(self)
        weight = 1.0
        if index >= n:  # sampler padding: real image, no weight
            index, weight = index - n, 0.0
        image = self.transform(image=self.load(index))["image"]
        return image, int(self.labels[index]), index, weight


def shard_for_rank(
    order: Sequence[int], n: int, rank: int, world: int, batch_size: int | None = None
) -> list[int]:
    """``order[rank::world]`` padded to ``ceil(len/world)`` with weight-0 entries (``i + n``).

    With ``batch_size``, one more padding entry avoids a final batch of a single sample:
    BatchNorm cannot normalise one value per channel (a 1x1 feature map at low resolution).
    """
    order = list(order)
    per_rank = math.ceil(len(order) / world)
    if batch_size is not None and batch_size > 1 and per_rank % batch_size == 1:
        per_rank += 1
    mine = order[rank::world]
    pad = per_rank - len(mine)
    # padding repeats this rank's own first samples (or the epoch's first, if the rank is empty)
    source = mine or order
    mine = mine + [int(source[k % len(source)]) + n for k in range(pad)]
    return mine


class _ShardedEpochSampler(Sampler[int]):
    """An epoch's ``n`` draws, the same on every rank (seed + epoch), sharded by ``shard_for_rank``.

    Subclasses say which ``n`` indices an epoch draws (``_order``); ``set_epoch``, the length
    and the sharding are shared.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, batch_size: int | None):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def _order(self) -> list[int]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(shard_for_rank(range(self.n), self.n, self.rank, self.world, self.batch_size))

    def __iter__(self) -> Iterator[int]:
        return iter(shard_for_rank(self._order(), self.n, self.rank, self.world, self.batch_size))


class EpochSampler(_ShardedEpochSampler):
    """Shuffled (or sequential) pass over the dataset, sharded over ranks without duplicates.

    Like ``DistributedSampler`` with ``set_epoch`` (same seed + epoch on every rank gives one
    global permutation), except that the uneven tail is padded with weight-0 entries instead of
    repeated samples, so each real sample has weight 1 exactly once per epoch across ranks.
    """

    def __init__(
        self,
        n: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
    ):
        super().__init__(n, rank, world, seed, batch_size)
        self.shuffle = shuffle

    def _order(self) -> list[int]:
        if self.shuffle:
            return torch.randperm(self.n, generator=self._generator()).tolist()
        return list(range(self.n))


class ClassBalancedSampler(_ShardedEpochSampler):
    """Draw ``n`` samples per epoch with replacement, each SKU equally likely (then sharded).

    The long tail of Products-10K means a plain shuffle shows head SKUs many times more often;
    this gives every SKU the same expected count. Same permutation on every rank (epoch-seeded).
    """

    def __init__(
        self,
        labels: np.ndarray,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        batch_size: int | None = None,
    ):
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        super().__init__(len(labels), rank, world, seed, batch_size)

    def _order(self) -> list[int]:
        return torch.multinomial(self.weights, self.n, replacement=True, generator=self._generator()).tolist()
