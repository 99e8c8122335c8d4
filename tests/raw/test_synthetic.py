"""The synthetic Products-10K-like generator: determinism, schema, long tail, fine-grained cues."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from products10k.common import ConfigError
from products10k.raw.catalogue import MARKS, make_catalogue, make_rows
from products10k.raw.render import render_customer, render_inshop, render_product
from products10k.raw.synthetic import generate
from tests.helpers import config

RAW = ("train.zip", "test.zip", "train.csv", "test_kaggletest.csv")
# Tiny but complete: 2 groups x 3 SKUs, ~20 train and 12 test images at the minimum size.
TINY = config(
    "data.synthetic",
    seed=3,
    num_groups=2,
    skus_per_group=3,
    train_max_per_sku=5,
    train_min_per_sku=2,
    test_per_sku=2,
    n_jobs=1,
)


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in RAW}


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    generate(TINY, out)
    return out


def test_same_seed_gives_identical_bytes_whatever_the_thread_count(tiny, tmp_path):
    generate(TINY.model_copy(update=dict(n_jobs=2)), tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(RAW)
    assert digests(tmp_path / "again") == digests(tiny)


def test_different_seed_gives_different_data(tiny, tmp_path):
    generate(TINY.model_copy(update=dict(seed=4)), tmp_path / "other")
    a, b = digests(tiny), digests(tmp_path / "other")
    assert all(a[name] != b[name] for name in RAW)


def test_csv_schema_and_zip_contents_match(tiny):
    train_cols, train = read_csv(tiny / "train.csv")
    test_cols, test = read_csv(tiny / "test_kaggletest.csv")
    assert train_cols == ["name", "class", "group", "domain"]
    assert test_cols == ["name", "class", "Usage", "domain"]
    assert [r["name"] for r in train] == [f"{i}.jpg" for i in range(1, len(train) + 1)]
    assert all(len(r["name"]) == len("1234567.jpg") and r["name"][:7].isdigit() for r in test)
    assert len({r["name"] for r in test}) == len(test)
    assert {r["domain"] for r in train + test} <= {"inshop", "customer"}
    assert {r["Usage"] for r in test} == {"Public", "Private"}
    with zipfile.ZipFile(tiny / "train.zip") as zf:
        assert zf.namelist() == [f"train/{r['name']}" for r in train]
    with zipfile.ZipFile(tiny / "test.zip") as zf:
        assert zf.namelist() == [f"test/{r['name']}" for r in test]
        # Fixed metadata: no clock in the archive.
        assert {info.date_time for info in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    # Every test SKU is a train SKU (the test set is labelled with the same classes).
    assert {r["class"] for r in test} == {r["class"] for r in train}


def test_images_decode_at_least_512_and_domains_look_different(tiny):
    _, train = read_csv(tiny / "train.csv")
    std = defaultdict(list)
    with zipfile.ZipFile(tiny / "train.zip") as zf:
        for row in train:
            img = cv2.imdecode(np.frombuffer(zf.read(f"train/{row['name']}"), np.uint8), cv2.IMREAD_COLOR)
            assert img is not None, row["name"]
            assert min(img.shape[:2]) >= 512
            corners = np.concatenate([img[:24, :24], img[:24, -24:], img[-24:, :24]]).reshape(-1, 3)
            std[row["domain"]].append(float(np.mean(corners)))
    # In-shop photos sit on a plain light background; customer photos on clutter.
    assert min(std["inshop"]) > 190
    assert np.mean(std["customer"]) < 190


def test_default_sizes_long_tail_and_splits():
    cfg = config("data.synthetic")
    skus = make_catalogue(cfg)
    train, test, usage = make_rows(cfg, skus)
    assert len(skus) == 48
    assert 650 <= len(train) <= 950 and len(test) == 48 * 20
    counts = Counter(r.sku.sku_id for r in train)
    assert max(counts.values()) >= 8 * min(counts.values())  # long-tailed
    assert sum(c < 20 for c in counts.values()) >= len(skus) // 2  # most SKUs have few images
    in_catalogue_order = [counts[s.sku_id] for s in skus]
    assert in_catalogue_order != sorted(in_catalogue_order, reverse=True)  # head/tail shuffled
    assert sum(r.domain == "customer" for r in test) / len(test) >= 0.75
    assert usage.count("Public") == round(len(test) * cfg.public_fraction)
    domains = defaultdict(set)
    for r in train:
        domains[r.sku.sku_id].add(r.domain)
    assert all(d == {"inshop", "customer"} for d in domains.values())  # every SKU has both kinds


def test_ids_spread_and_each_sku_in_one_group():
    skus = make_catalogue(config("data.synthetic"))
    ids = sorted(s.sku_id for s in skus)
    assert len(set(ids)) == len(ids) and ids != list(range(ids[0], ids[0] + len(ids)))
    groups = defaultdict(list)
    for s in skus:
        groups[s.group_id].append(s)
    assert len(groups) == 6
    for members in groups.values():
        assert len({(s.shape, s.base_bgr, s.brand) for s in members}) == 1  # shared look
        # medium_variants (mark, stripes) pairs, each shared by two SKUs of the group's eight
        pairs = Counter((s.mark, s.stripes) for s in members)
        assert sorted(pairs.values()) == [2, 2, 2, 2]
        assert len({s.code for s in members}) == len(members)  # the fine cue always differs
        assert {len(s.code) for s in members} == {3}  # no length to tell codes apart when blurred
    assert len({(g[0].shape, g[0].base_bgr) for g in groups.values()}) == len(groups)


@pytest.mark.parametrize("variants", [1, 3, 8, 16])
def test_medium_variants_is_the_number_of_mark_and_stripes_pairs_per_group(variants):
    groups = defaultdict(list)
    for s in make_catalogue(config("data.synthetic", medium_variants=variants)):
        groups[s.group_id].append(s)
    for members in groups.values():  # 8 SKUs each
        assert len({(s.mark, s.stripes) for s in members}) == min(variants, len(members))
        assert len({s.code for s in members}) == len(members)


def test_in_group_skus_share_colour_and_differ_in_details():
    skus = make_catalogue(config("data.synthetic"))
    by_group = defaultdict(list)
    for s in skus:
        by_group[s.group_id].append(render_product(s, 460))
    means = {g: [img[mask > 0].mean(axis=0) for img, mask in r] for g, r in by_group.items()}
    assert max(np.linalg.norm(a - b) for m in means.values() for a in m for b in m) < 25  # of 0..255
    # Base colour = chromaticity (brightness-free): close within a group, far between groups.
    chroma = {g: [m / m.sum() for m in ms] for g, ms in means.items()}
    within = max(np.linalg.norm(a - b) for m in chroma.values() for a in m for b in m)
    centres = [np.mean(m, axis=0) for m in chroma.values()]
    between = min(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :])
    assert within < between / 3
    for renders in by_group.values():
        (a, _), (b, _) = renders[0], renders[1]
        changed = np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 40
        assert 0 < changed.mean() < 0.15  # a detail changes, not the product


def _diff_at(sku_a, sku_b, height: int) -> tuple[float, float]:
    """(fraction of pixels changed at full size, max pixel change after downscaling to ``height``)."""
    (a, _), (b, _) = render_product(sku_a, 460), render_product(sku_b, 460)
    full = (np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 40).mean()
    size = (round(a.shape[1] * height / a.shape[0]), height)
    small_a = cv2.resize(a, size, interpolation=cv2.INTER_AREA).astype(int)
    small_b = cv2.resize(b, size, interpolation=cv2.INTER_AREA).astype(int)
    return float(full), float(np.abs(small_a - small_b).max())


def test_medium_cues_survive_half_the_default_resolution_and_the_code_does_not():
    """A 128 px crop shows the product ~87 px high, the baseline's 64 px crop ~43 px: the code must
    be stark at the first and washed out at the second, while the mark and stripes stay stark."""
    for sku in make_catalogue(config("data.synthetic"))[:8]:
        other_mark = next(m for m in MARKS if m != sku.mark)
        code = "".join("K" if c != "K" else "M" for c in sku.code)
        mark_area, mark_half = _diff_at(sku, dataclasses.replace(sku, mark=other_mark), 43)
        stripe_area, stripe_half = _diff_at(sku, dataclasses.replace(sku, stripes=sku.stripes % 4 + 1), 43)
        code_area, code_default = _diff_at(sku, dataclasses.replace(sku, code=code), 87)
        _, code_half = _diff_at(sku, dataclasses.replace(sku, code=code), 43)
        assert mark_area > 0.005 and stripe_area > 0.02  # medium: a few % of the product
        assert 0 < code_area < 0.006  # fine: under a percent
        assert mark_half > 120 and stripe_half > 120  # still stark at half the default resolution
        assert code_default > 130  # the code reads at the default resolution...
        assert code_half < 0.7 * code_default  # ...and washes out at half of it


def test_customer_photos_are_harder_than_inshop():
    sku = make_catalogue(config("data.synthetic"))[0]
    product, mask = render_product(sku, 460)
    rng = np.random.default_rng(0)
    shop = [render_inshop(product, mask, 512, rng) for _ in range(3)]
    customer = [render_customer(product, mask, 512, 1.0, rng) for _ in range(3)]
    # The clean centred view is reproduced closely by in-shop photos, not by customer ones.
    ref = shop[0].astype(np.float32)
    shop_err = np.mean([np.abs(s.astype(np.float32) - ref).mean() for s in shop[1:]])
    cust_err = np.mean([np.abs(c[:512].astype(np.float32) - ref).mean() for c in customer])
    assert cust_err > 2 * shop_err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image_size", 16),
        ("num_skus", 7),  # with skus_per_group still set: exactly one of the two
        ("train_images", 10),  # fewer than 48 SKUs x train_min_per_sku
        ("medium_variants", 17),  # more than 4 marks x 4 stripe counts
        ("public_fraction", 1.5),
        ("train_min_per_sku", 0),
        ("customer_difficulty", -1.0),
        ("n_jobs", 0),
    ],
)
def test_bad_params_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        config("data.synthetic", **{key: value})


def test_totals_mode_gives_exact_counts_uneven_groups_and_a_real_long_tail(tmp_path):
    """The scale rehearsal's mode (presets/scale.yaml) at 1/200 of its size: exact totals."""
    cfg = config(
        "data.synthetic", seed=0, num_groups=7, skus_per_group=None, num_skus=48, image_size=48,
        train_images=700,
        test_images=277, train_min_per_sku=1, train_max_per_sku=120, n_jobs=1,
    )  # fmt: skip
    skus = make_catalogue(cfg)
    sizes = sorted(Counter(s.group_id for s in skus).values())
    assert len(skus) == 48 and sizes == [6] + [7] * 6  # 48 dealt over 7 groups
    train, test, usage = make_rows(cfg, skus)
    assert len(train) == 700 and len(test) == 277
    per_sku = np.array(sorted(Counter(r.sku.sku_id for r in train).values()))
    assert per_sku.min() >= 1 and per_sku.max() <= 120
    # long-tailed like the real data: the median SKU far below the largest, many SKUs under 20
    assert per_sku.max() >= 4 * np.median(per_sku) and (per_sku < 20).mean() > 0.5
    test_per_sku = Counter(r.sku.sku_id for r in test).values()
    assert set(test_per_sku) <= {5, 6}  # 277 / 48 = 5.8: spread evenly
    assert all(len(r.name) == len("4713701.jpg") for r in test)
    summary = generate(cfg, tmp_path / "raw")
    assert summary["train_images"] == 700 and summary["test_images"] == 277 and summary["skus"] == 48
    with zipfile.ZipFile(tmp_path / "raw" / "train.zip") as zf:
        image = cv2.imdecode(np.frombuffer(zf.read(zf.namelist()[0]), np.uint8), cv2.IMREAD_COLOR)
    assert min(image.shape[:2]) == 48
