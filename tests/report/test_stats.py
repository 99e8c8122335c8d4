"""The Table 1 report's statistics and rendering, on hand-made hits."""

import cv2
import numpy as np
import pandas as pd
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


def test_method_rows_gain_against_train_and_have_no_paper_figure():
    rng = np.random.default_rng(1)
    rows = table_rows(128, 64, ("logit_adjust", "crt"))
    assert [r.key for r in rows][4:] == ["logit_adjust", "logit_adjust_1", "crt"]
    hits = {r.key: rng.random((2, 90)) < 0.3 for r in rows}
    hits["crt"] = hits["train"] | (rng.random((2, 90)) < 0.5)  # a method that adds hits to train's
    tail = np.arange(90) % 2 == 0
    val = {r.key: [0.5, 0.6] for r in rows}
    report = build_report(
        hits, rows, tail, config("table1", bootstrap=200), ["a"], {"logit_adjust": [0.5, 1.0]}, val
    )
    crt = report["rows"][-1]
    assert crt["val_estimate"] == pytest.approx(0.55)
    assert crt["base"] == "train" and "paper" not in crt
    assert crt["all"]["gain"]["estimate"] == pytest.approx(hits["crt"].mean() - hits["train"].mean())
    assert crt["all"]["gain"]["low"] > 0  # the interval sees a real gain over its base
    text = markdown(report)
    assert "train + logit adjustment (τ fitted on val) [τ 0.5, 1]" in text
    png = cv2.imdecode(np.frombuffer(draw_table1(report), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (540, 960, 3)


def test_logit_adjusted_row_fits_tau_on_val_and_moves_tail_predictions():
    """A skewed toy: every row's scores favour the head SKU 0 by its train prior; the tail's true
    SKU is second. tau = 0 leaves the hits as they are, tau = 1 recovers the tail, and "auto"
    picks the smallest tau of the grid with val's best (uniformly weighted) estimate."""
    from products10k.report.table1 import Adjustment, adjusted_hits
    from products10k.scores import Predictions, SplitScores

    label_map = pd.DataFrame({"label": [0, 1, 2], "sku": [10, 11, 12], "n_train": [90, 5, 5]})

    def split(labels):
        # the true SKU's logit is 1 over the others', the head's 2 more: log(90/5) = 2.9 undoes that
        logits = np.zeros((len(labels), 3))
        logits[np.arange(len(labels)), labels] += 1.0
        logits[:, 0] += 2.0
        return SplitScores.from_logits(np.array([str(i) for i in range(len(labels))]), labels, logits, 3)

    labels = np.array([0, 1, 2, 1, 2, 0])
    scores = Predictions(split(labels), split(labels), np.array([10, 11, 12]))
    adjustment = Adjustment("uniform", (0.0, 0.5, 1.0))
    plain, tau0, val0 = adjusted_hits(scores, label_map, 0.0, adjustment)
    assert tau0 == 0.0 and plain.tolist() == (labels == 0).tolist()
    assert val0 == pytest.approx(1 / 3)  # uniform over 3 SKUs: only the head SKU's rows are right
    full, _, val1 = adjusted_hits(scores, label_map, 1.0, adjustment)
    assert full[labels > 0].all() and val1 == 1.0  # log(90/5) = 2.9 > the head's 2-logit lead
    fitted, tau, _ = adjusted_hits(scores, label_map, "auto", adjustment)
    assert tau == 0.5 and fitted.tolist() == full.tolist()  # the smallest tau that gets every row


def test_chart_row_titles_wrap_within_their_group():
    from products10k.report.chart import LABEL_LINES, LABEL_SCALE, _wrap

    width = 90
    for title in [
        "+ cRT (head re-trained, backbone frozen)",
        "train + logit adjustment (τ fitted on val)",
        "x" * 40,
    ]:
        lines = _wrap(title, width)
        assert 1 <= len(lines) <= LABEL_LINES and all(line.isascii() for line in lines)
        fits = [
            cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, LABEL_SCALE, 1)[0][0] <= width for line in lines
        ]
        assert all(fits) or (len(lines) == 1 and lines[0] == "x" * 40)  # one word longer than the group
    assert " ".join(_wrap("train @ 128 px", width)) == "train @ 128 px"
