"""The shard-backed dataset and the epoch samplers (DDP sharding, class balance, drop_last)."""

import numpy as np
import pytest

from products10k.contracts.prepared import read_label_map, read_prepared
from products10k.data.datasets import (
    ClassBalancedSampler,
    EpochSampler,
    PKSampler,
    PreparedImageDataset,
)
from products10k.data.transforms import (
    eval_transform,
)
from tests.helpers import make_training_data


def test_dataset_reads_packed_images_and_padding_has_zero_weight(tmp_path):
    data = make_training_data(tmp_path / "data", num_classes=3, train_per_class=2)
    df = read_prepared(data / "train.csv", read_label_map(data / "label_map.csv"))
    ds = PreparedImageDataset(df, data, eval_transform(37, 32), min_side=37)
    image, label, index, weight = ds[4]
    assert image.shape == (3, 32, 32) and label == df.label[4] and index == 4 and weight == 1.0
    _, label_pad, index_pad, weight_pad = ds[len(ds) + 4]
    assert (label_pad, index_pad, weight_pad) == (label, 4, 0.0)


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4), (9, 2), (5, 1)])
def test_epoch_sampler_covers_every_sample_once_across_ranks(n, world):
    for epoch in range(2):
        shards = []
        for rank in range(world):
            s = EpochSampler(n, rank, world, shuffle=True, seed=3)
            s.set_epoch(epoch)
            shards.append(list(s))
        assert len({len(x) for x in shards}) == 1  # same number of steps on every rank
        real = [i for shard in shards for i in shard if i < n]
        assert sorted(real) == list(range(n))  # weight-1 entries: each sample exactly once
        assert all(i - n in range(n) for shard in shards for i in shard if i >= n)
    # with a batch size, no rank ends an epoch on a 1-sample batch (BatchNorm needs 2)
    for rank in range(world):
        s = EpochSampler(n, rank, world, seed=3, batch_size=4)
        idx = list(s)
        assert len(idx) == len(s) and len(idx) % 4 != 1
        plain = EpochSampler(n, rank, world, seed=3)
        assert sorted(i for i in idx if i < n) == sorted(i for i in plain if i < n)
    a, b = EpochSampler(n, 0, 1, seed=3), EpochSampler(n, 0, 1, seed=3)
    b.set_epoch(1)
    assert list(a) != list(b) or n < 3  # a new order every epoch


def test_class_balanced_sampler_evens_out_the_long_tail():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = ClassBalancedSampler(labels, seed=0)
    counts = np.zeros(3)
    for epoch in range(20):
        s.set_epoch(epoch)
        counts += np.bincount(labels[list(s)], minlength=3)
    shares = counts / counts.sum()
    assert np.all(np.abs(shares - 1 / 3) < 0.05), shares


def test_drop_last_keeps_whole_global_batches_and_varies_the_dropped_images():
    from products10k.data.datasets import EpochSampler

    samplers = [EpochSampler(21, rank, 2, True, seed=0, batch_size=4, global_batch=8) for rank in (0, 1)]
    dropped = []
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        seen = [i for s in samplers for i in s]
        assert len(seen) == 16 and len(set(seen)) == 16 and all(i < 21 for i in seen)  # no padding
        assert all(len(s) == 8 for s in samplers)
        dropped.append(set(range(21)) - set(seen))
        sizes = samplers[0].update_sizes(micro_batch=4, grad_accum=1)
        assert sizes.tolist() == [8.0, 8.0]  # every update a whole global batch
    assert dropped[0] != dropped[1]  # a different remainder each epoch
    # fewer images than one global batch: nothing is dropped
    small = EpochSampler(5, 0, 1, True, seed=0, batch_size=8, global_batch=8)
    assert sorted(small) == list(range(5))


def test_seeded_samples_give_each_place_of_an_epoch_its_own_seed():
    from products10k.data.datasets import EpochSampler, SeededSamples

    sampler = EpochSampler(10, seed=-1)  # train.seed may be negative
    samples = SeededSamples(sampler)
    first = list(samples)
    assert [i for _, i in first] == list(sampler) and len({s for s, _ in first}) == 10
    assert list(samples) == first  # the epoch's seeds are a function of (seed, epoch, rank)
    sampler.set_epoch(1)
    assert not {s for s, _ in first} & {s for s, _ in samples}
    other_rank = SeededSamples(EpochSampler(10, rank=1, world=2, seed=-1))
    assert not {s for s, _ in first} & {s for s, _ in other_rank}


@pytest.mark.parametrize("world", [1, 2])
def test_pk_sampler_hands_each_rank_whole_groups_of_one_sku(world):
    labels = np.array([0] * 12 + [1] * 3 + [2] * 20 + [3] * 9)
    k, micro = 4, 8
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            s = PKSampler(labels, k, rank, world, seed=5, batch_size=micro, global_batch=micro * world)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s) and list(s) == shards[-1]  # the epoch's order is fixed
            groups = labels[shards[-1]].reshape(-1, k)
            assert (groups == groups[:, :1]).all()  # every group of k is one SKU
            index = np.asarray(shards[-1]).reshape(-1, k)
            bigger = np.bincount(labels)[groups[:, 0]] >= k
            # a SKU with k images or more: k different images; fewer: drawn with replacement
            assert all(len(set(row)) == k for row in index[bigger])
        assert len({len(x) for x in shards}) == 1
        assert all(i < len(labels) for shard in shards for i in shard)  # no padding
        sizes = PKSampler(labels, k, 0, world, seed=5, batch_size=micro, global_batch=micro * world)
        sizes.set_epoch(epoch)
        assert sizes.update_sizes(micro, 1).sum() == sum(len(x) for x in shards)
    first = PKSampler(labels, k, seed=5)
    first.set_epoch(0)
    second = PKSampler(labels, k, seed=5)
    second.set_epoch(1)
    assert list(first) != list(second)


def test_pk_sampler_keeps_the_data_s_sku_mix():
    """SKUs are drawn as often as a random draw draws their images (balanced softmax's prior holds)."""
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = PKSampler(labels, 4, seed=0)
    counts = np.zeros(3)
    for epoch in range(30):
        s.set_epoch(epoch)
        counts += np.bincount(labels[list(s)], minlength=3)
    shares = counts / counts.sum()
    assert np.allclose(shares, [0.90, 0.09, 0.01], atol=0.03), shares


def test_pk_sampler_puts_look_alikes_of_one_product_group_beside_each_other():
    """``group_share``: each micro-batch's first SKUs share its first SKU's product group (hard
    negatives), the rest are drawn from every SKU, and each SKU keeps its share of the data."""
    labels = np.repeat(np.arange(6), [40, 10, 30, 20, 25, 5])
    product_groups = np.array([0, 0, 0, 1, 1, 2])
    k, micro = 2, 8  # 4 SKU groups a micro-batch, 2 of them from the first one's product group
    s = PKSampler(labels, k, seed=3, batch_size=micro, product_groups=product_groups, group_share=0.5)
    counts, same_group = np.zeros(6), 0
    for epoch in range(300):
        s.set_epoch(epoch)
        batches = labels[list(s)].reshape(-1, micro)
        counts += np.bincount(batches.ravel(), minlength=6)
        for batch in batches:
            skus = batch[::k]
            assert product_groups[skus[1]] == product_groups[skus[0]]  # the look-alike slot
            same_group += product_groups[skus[2]] == product_groups[skus[0]]
    assert np.allclose(counts / counts.sum(), np.bincount(labels) / len(labels), atol=0.01)
    assert same_group < 0.6 * 300 * len(batches)  # the other slots draw from every group
    plain = PKSampler(labels, k, seed=3, batch_size=micro)
    plain.set_epoch(0)
    first_two = labels[list(plain)].reshape(-1, micro)[:, [0, k]]
    assert (product_groups[first_two[:, 0]] != product_groups[first_two[:, 1]]).any()  # 0: as before
    with pytest.raises(ValueError, match="product group"):
        PKSampler(labels, k, group_share=0.5)
