"""Training/evaluation datasets over the prepared CSVs and packed image shards, plus samplers.

Images are read from ``data/prepared/images/shard-*.bin`` (memory-mapped, see contracts/shards.py) and
decoded with OpenCV. When the target shorter side is at most half of the stored one, the JPEG is
decoded at reduced scale (libjpeg DCT scaling: ``IMREAD_REDUCED_COLOR_2/4/8``), which is several
times cheaper than a full decode followed by a resize.

Samplers are epoch-seeded and shard the epoch across DDP ranks *without* duplicating samples:
each rank gets ``indices[rank::world]`` and the shorter ranks are padded with *weight-0* entries
(encoded as ``index + len(dataset)``), so every rank runs the same number of steps while every
real sample contributes exactly once per epoch. :class:`SeededSamples` gives every index of an
epoch the seed of its augmentation, so a sample is augmented alike in any DataLoader worker.
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

from products10k.contracts.shards import ImageStore
from products10k.data.transforms import seed_sample
from products10k.imaging.images import reduced_decode_flag


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
        flag = cv2.IMREAD_COLOR
        if self.min_side is not None:
            flag = reduced_decode_flag(self.widths[i], self.heights[i], self.min_side)
        return self.store.read(
            self.shards[i], self.offsets[i], self.lengths[i], flag, f"image '{self.names[i]}'"
        )

    def __getitem__(self, item: int | tuple[int, int]):
        """``item``: a row index, or ``(augmentation seed, row index)`` from :class:`SeededSamples`."""
        seed, index = item if isinstance(item, tuple) else (None, item)
        n = len(self)
        weight = 1.0
        if index >= n:  # sampler padding: real image, no weight
            index, weight = index - n, 0.0
        if seed is not None:
            seed_sample(self.transform, seed)
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


class SeededSamples(Sampler[tuple[int, int]]):
    """``(seed, index)`` for each index the wrapped epoch sampler yields: the seed of that sample's
    augmentation, drawn in the main process from ``(seed, epoch, rank)`` and the sample's place in
    the epoch (numpy's SeedSequence: independent streams for any epoch and rank).

    A sample's augmentation then depends on neither the DataLoader worker that loads it nor the
    worker count: the workers persist across epochs (no restart per epoch), and a resumed run, or one
    with another ``num_workers``, augments exactly as an uninterrupted one.
    """

    def __init__(self, sampler: _ShardedEpochSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        indices = list(s)
        # SeedSequence takes non-negative entropy; train.seed may be any integer
        entropy = [s.seed % 2**64, s.epoch, s.rank]
        seeds = np.random.SeedSequence(entropy).generate_state(len(indices), np.uint64)
        return iter(zip(seeds.tolist(), indices, strict=True))


class _ShardedEpochSampler(Sampler[int]):
    """An epoch's ``n`` draws, the same on every rank (seed + epoch), sharded by ``shard_for_rank``.

    Subclasses say which ``n`` indices an epoch draws (``_order``); ``set_epoch``, the length
    and the sharding are shared.
    """

    def __init__(
        self,
        n: int,
        rank: int,
        world: int,
        seed: int,
        batch_size: int | None,
        global_batch: int | None = None,
    ):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.batch_size = batch_size
        # training: keep only whole global batches of each epoch's order (timm's drop_last). A
        # short last batch of a few images would take a full optimizer step on a noisy gradient
        # and, with BatchNorm in train mode, pull the running statistics towards those few images
        # just before validation (measured on the default: 580 train images = 18 x 32 + 4 cost
        # 19 points of test top-1). The dropped images differ every epoch (the order is shuffled).
        self.global_batch = global_batch if global_batch and n >= global_batch else None
        self.epoch = 0

    def _used(self, order: list[int]) -> list[int]:
        if self.global_batch is None:
            return order
        return order[: len(order) // self.global_batch * self.global_batch]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)

    def _order(self) -> list[int]:
        raise NotImplementedError

    def __len__(self) -> int:
        order = self._used(list(range(self.n)))
        return len(shard_for_rank(order, self.n, self.rank, self.world, self.batch_size))

    def update_sizes(self, micro_batch: int, grad_accum: int) -> np.ndarray:
        """Real (weight-1) samples in each optimizer update of this epoch, over ALL ranks.

        Every rank can compute it (the global order is seeded, the sharding deterministic), so
        the loss of a micro-batch is divided by its update's global size without a collective:
        the step's gradient is then the mean over exactly the samples of that update, however
        they are split over ranks and micro-batches (a short last update included).
        """
        order = self._used(self._order())
        total = None
        for rank in range(self.world):
            index = np.asarray(shard_for_rank(order, self.n, rank, self.world, self.batch_size))
            real = (index < self.n).astype(np.float64)
            per_batch = np.add.reduceat(real, np.arange(0, len(real), micro_batch)) if len(real) else real
            per_update = np.add.reduceat(per_batch, np.arange(0, len(per_batch), grad_accum))
            total = per_update if total is None else total + per_update
        return total

    def __iter__(self) -> Iterator[int]:
        order = self._used(self._order())
        return iter(shard_for_rank(order, self.n, self.rank, self.world, self.batch_size))


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
        global_batch: int | None = None,
    ):
        super().__init__(n, rank, world, seed, batch_size, global_batch)
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
        global_batch: int | None = None,
    ):
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
        super().__init__(len(labels), rank, world, seed, batch_size, global_batch)

    def _order(self) -> list[int]:
        return torch.multinomial(self.weights, self.n, replacement=True, generator=self._generator()).tolist()


class PKSampler(_ShardedEpochSampler):
    """Draw about ``n`` samples per epoch as groups of ``k`` images of one SKU (the P x K batches of
    metric learning: every image has ``k - 1`` positives beside it), micro-batch by micro-batch.

    A group's SKU is drawn with probability proportional to its image count, so an epoch's SKU mix
    is the data's, as under ``random`` (balanced softmax offsets by the same prior); its ``k``
    images without replacement where the SKU has that many. The draws do not depend on the world
    size: they are cut into micro-batches of ``batch_size`` (the per-rank batch), dealt to the
    ranks in turn and interleaved so that ``shard_for_rank``'s ``order[rank::world]`` hands each
    rank its micro-batches whole. An optimizer update on ``world`` ranks then sees the micro-batches
    one process sees with ``world`` times the gradient accumulation (a batch-wise loss such as the
    supervised contrastive one is computed on the same images), and a micro-batch that is a
    multiple of ``k`` holds whole groups.

    ``group_share`` > 0 (with ``product_groups``, each label's product group): that share of a
    micro-batch's SKUs is drawn from its first SKU's product group, so look-alikes stand beside
    each other as hard negatives. They are drawn in proportion to their image count within the
    group, so each SKU's share of the epoch stays its share of the data.
    """

    def __init__(
        self,
        labels: np.ndarray,
        k: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        batch_size: int | None = None,
        global_batch: int | None = None,
        product_groups: np.ndarray | None = None,
        group_share: float = 0.0,
    ):
        labels = np.asarray(labels)
        self.k = k
        counts = np.bincount(labels)
        self.skus = np.flatnonzero(counts)
        self.counts = counts[self.skus]
        self.starts = np.r_[0, np.cumsum(counts)][self.skus]
        self.by_label = np.argsort(labels, kind="stable")
        self.sku_weights = torch.as_tensor(self.counts, dtype=torch.double)
        self.group_share = group_share
        if group_share > 0:
            if product_groups is None:
                raise ValueError("PKSampler: group_share needs each label's product group")
            sku_group = np.asarray(product_groups)[self.skus]
            # per product group: its SKUs, as indices into self.skus
            self.group_members = {g: np.flatnonzero(sku_group == g) for g in np.unique(sku_group)}
            self.sku_group = sku_group
        super().__init__(len(labels), rank, world, seed, batch_size, global_batch)

    def _micro(self) -> int:
        return self.batch_size or self.k

    def _drawn(self) -> int:
        """Draws an epoch keeps: ``n`` rounded down to whole rounds of one micro-batch per rank
        (at least one round)."""
        round_size = self._micro() * self.world
        return max(self.n // round_size, 1) * round_size

    def __len__(self) -> int:
        order = self._used(list(range(self._drawn())))
        return len(shard_for_rank(order, self.n, self.rank, self.world, self.batch_size))

    def _order(self) -> list[int]:
        g = self._generator()
        groups = -(-max(self.n, self._drawn()) // self.k)  # the same draws for any world size
        drawn = torch.multinomial(self.sku_weights, groups, replacement=True, generator=g).numpy()
        if self.group_share > 0:
            drawn = self._beside_look_alikes(drawn, g)
        flat = np.empty((groups, self.k), dtype=np.int64)
        for row, s in enumerate(drawn):
            count = int(self.counts[s])
            if count >= self.k:
                pick = torch.randperm(count, generator=g)[: self.k].numpy()
            else:
                pick = torch.randint(count, (self.k,), generator=g).numpy()
            flat[row] = self.by_label[self.starts[s] + pick]
        # micro-batch j goes to rank j % world; interleaved, order[rank::world] is that rank's
        micro = flat.reshape(-1)[: self._drawn()].reshape(-1, self.world, self._micro())
        return micro.transpose(0, 2, 1).reshape(-1).tolist()

    def _beside_look_alikes(self, drawn: np.ndarray, g: torch.Generator) -> np.ndarray:
        """``drawn`` with each micro-batch's SKU slots after the first, up to ``group_share`` of
        them, redrawn from the first SKU's product group in proportion to image count. The first
        SKU's group is drawn by its image mass, so every SKU keeps its share of the epoch."""
        per_batch = max(self._micro() // self.k, 1)
        same = round(self.group_share * per_batch)
        out = drawn.copy()
        if same < 2:  # a micro-batch of one SKU group has no slot to fill
            return out
        for start in range(0, len(drawn), per_batch):
            members = self.group_members[self.sku_group[drawn[start]]]
            picks = torch.multinomial(self.sku_weights[members], same - 1, replacement=True, generator=g)
            slots = out[start + 1 : start + same]
            slots[:] = members[picks.numpy()][: len(slots)]
        return out
