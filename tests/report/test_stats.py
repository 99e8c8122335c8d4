"""The Table 1 report's statistics and rendering, on hand-made hits."""

import cv2
import numpy as np
import pytest

from products10k.report.chart import draw_table1
from products10k.report.stats import paired_bootstrap, seed_spread
from products10k.report.table1 import PAPER, build_report, markdown, table_rows
from tests.helpers import config


def test_seed_spread_is_mean_and_sample_sd_over_seeds():
    hits = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=bool)
    mean, std = seed_spread(hits)
    assert mean == pytest.approx(0.625) and std == pytest.approx(np.std([0.5, 0.75], ddof=1))
    assert seed_spread(hits[:1]) == (0.5, 0.0)


def test_paired_bootstrap_separates_a_real_step_from_none():
    rng = np.random.default_rng(1)
    before = rng.random((2, 400)) < 0.5
    same = paired_bootstrap(before, before, resamples=500, confidence=0.95, seed=0)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero()
    after = before | (rng.random((2, 400)) < 0.3)  # fixes ~15% of the images, breaks none
    real = paired_bootstrap(after, before, resamples=500, confidence=0.95, seed=0)
    assert real.estimate == pytest.approx(after.mean() - before.mean())
    assert real.low > 0 and real.excludes_zero() and real.low < real.estimate < real.high
    noise = paired_bootstrap(rng.random((2, 400)) < 0.5, before, resamples=500, confidence=0.95, seed=0)
    assert noise.low < 0 < noise.high
    with pytest.raises(ValueError, match="different images"):
        paired_bootstrap(after[:, :10], before, resamples=100, confidence=0.95, seed=0)


def test_interval_accounts_for_the_spread_over_seeds():
    # Three seeds that disagree: the step fixes 30% of the images with seed 0, none with seed 1,
    # and breaks 15% with seed 2. Over 2,000 images each seed's own gain is measured to +-2 points,
    # so an interval over images alone would exclude 0; over seeds the step's sign is not settled.
    rng = np.random.default_rng(3)
    n = 2000
    before = rng.random((3, n)) < 0.5
    after = before.copy()
    after[0] |= rng.random(n) < 0.6
    after[2] &= rng.random(n) < 0.7
    gains = after.mean(axis=1) - before.mean(axis=1)
    assert gains[0] > 0.2 and gains[2] < -0.1
    ci = paired_bootstrap(after, before, resamples=1000, confidence=0.95, seed=0)
    assert ci.estimate == pytest.approx(gains.mean())
    assert ci.low < 0 < ci.high and not ci.excludes_zero()
    assert ci.high - ci.low > 0.2  # as wide as the seeds' disagreement, not the +-2 points of the images


def test_report_rows_markdown_and_chart():
    rng = np.random.default_rng(0)
    rows = table_rows(128, 64)
    hits = {r.key: rng.random((2, 60)) < 0.4 + 0.1 * i for i, r in enumerate(rows)}
    tail = np.arange(60) % 3 == 0
    report = build_report(
        hits, rows, tail, config("table1", seeds=2, bootstrap=200, confidence=0.9), ["a", "b"]
    )
    assert [r["key"] for r in report["rows"]] == list(PAPER)
    first, second = report["rows"][:2]
    assert "gain" not in first["all"] and first["paper"] == 60.04
    assert second["all"]["top1"] == pytest.approx(hits["train"].mean())
    assert second["tail"]["top1"] == pytest.approx(hits["train"][:, tail].mean())
    assert second["all"]["gain"]["estimate"] == pytest.approx(hits["train"].mean() - hits["baseline"].mean())
    text = markdown(report)
    assert "| train @ 64 px (baseline) |" in text and "62.98 (EfficientNet-B3, 448×448)" in text
    assert text.count("\n| ") == 5  # header + 4 rows
    png = cv2.imdecode(np.frombuffer(draw_table1(report), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (540, 960, 3) and (png < 250).any()


@pytest.mark.parametrize("key", ["train.seed", "train.resolution"])
def test_table1_refuses_a_member_that_overrides_what_it_varies(key):
    from products10k.common import Products10kError
    from products10k.report.table1 import plan
    from tests.helpers import params_tree

    params = params_tree({"ensemble.members": {"m0": {key: 3 if key == "train.seed" else 96}}})
    with pytest.raises(Products10kError, match=f"ensemble.members.m0 sets {key}"):
        plan(params, "params.yaml", config("table1"), "m0")
