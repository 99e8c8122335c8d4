"""The mutation fuzzer of tests/imaging/test_fuzz.py at length: more cases than the suite runs.

    .venv/bin/python benchmarks/bench_fuzz.py [--cases 20000] [--max-pixels 200000]

Each seed file of tests/hostile.py's ``fuzz_seeds`` (a JPEG, PNG, WebP, GIF, BMP, TIFF, a zip of two
images, and GIF, APNG and WebP animations) is mutated ``--cases`` times (byte flips,
16-bit size fields, cuts, duplicated, deleted and inserted slices; seeded) and sent through the
upload zip reader (zips) and the one decoder. Anything but the project's ImageDefect (or the zip
reader's 413) stops the run with its traceback. Prints, per format: the outcomes by reason, the
largest decode (never over ``--max-pixels``), the slowest case, the cases per second and the
process's peak RSS. Results: benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import write_results  # noqa: E402
from machine import describe  # noqa: E402

from tests.hostile import FORMATS, fuzz  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=20_000, help="mutations per seed file")
    p.add_argument("--max-pixels", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=100, help="the first format's seed (+1 per format)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = p.parse_args()
    result = {"machine": describe(), "cases_per_format": args.cases, "max_pixels": args.max_pixels}
    fuzz("JPEG", 1, seed=0, max_pixels=args.max_pixels)  # imports and seeds: the baseline below
    result["baseline_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for i, fmt in enumerate(FORMATS):
        t0 = time.perf_counter()
        report = fuzz(fmt, args.cases, seed=args.seed + i, max_pixels=args.max_pixels)
        report["cases_per_s"] = round(args.cases / (time.perf_counter() - t0), 1)
        # the process's peak so far: a format that raises it allocated that much for some case
        report["peak_rss_mb_after"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        assert report["largest_decode"] <= args.max_pixels
        result[fmt] = report
        print(fmt, json.dumps(report), flush=True)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_results(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
