"""A seeded mutation fuzzer over valid JPEG, PNG, WebP, GIF, BMP, TIFF, zip and animation (GIF, APNG,
WebP) bytes through the one decoder and the zip reader: only the project's defect types ever come out,
and nothing decodes past the budget.

A few thousand cases here; benchmarks/bench_fuzz.py runs the same fuzzer over as many as you ask.
"""

import pytest

from tests.hostile import FORMATS, fuzz

CASES = 600  # per seed format: 6,000 in all
BUDGET = 200_000


@pytest.mark.filterwarnings("ignore:Tag data larger than file:UserWarning")  # Pillow on hostile TIFFs
@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_files_raise_only_the_projects_defects_and_stay_in_budget(fmt):
    # bench_fuzz.py at 20,000 cases found a 377-byte PNG taking 4 GB (a chunk length OpenCV allocated):
    # tests/hostile.py's corpus holds it now, and the PNG chunk walk refuses it
    report = fuzz(fmt, CASES, seed=FORMATS.index(fmt), max_pixels=BUDGET)
    # anything but ImageDefect (or a 413 of the zip reader) would have propagated out of fuzz()
    assert report["largest_decode"] <= BUDGET
    assert report["slowest_s"] < 5.0  # generous: a case that hangs in a decoder stops here, not in CI
    assert len(report["outcomes"]) >= 2, report  # the mutations reach both sides: decoded and refused
