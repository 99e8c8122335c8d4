"""What an enrolment costs at the real size: a 142k x 1,280 gallery (Products-10K's training set in
the default backbone's embedding), 5-image enrolments into products10k-serve's versions folder.

The gallery is the repository's own index (``make repro``'s models/m0/index: its model hash and
label map, so the export accepts it) grown with random unit vectors to ``--images`` rows over
``--skus`` SKUs. Then, through ``VersionStore`` (products10k/deploy/versions.py, what the service
runs), ``--enrolments`` enrolments of 5 images each, every one written to disk and published as the
service does: the time and the bytes written per enrolment (a segment, or the whole index every
``--compact-every``), the disk the versions folder holds at the end (``--keep-versions``), a
restart's load time, and a follower catching up. Beside it, the cost before segments: one
enrolment written as a whole copy of the index (what every enrolment did).

    python benchmarks/bench_versions.py --images 142000 --enrolments 300 --compact-every 256

Writes benchmarks/results/versions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import write_results  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from products10k.deploy.runtime import ExportedModel  # noqa: E402
from products10k.deploy.versions import VersionStore  # noqa: E402
from products10k.knn import build_gallery, load_gallery, save_gallery  # noqa: E402


def folder_bytes(folder: Path) -> int:
    """Bytes the files under ``folder`` hold (hard links counted once)."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def real_size_index(index: Path, out: Path, images: int, skus: int, seed: int) -> Path:
    """``index`` grown to ``images`` rows over ``skus`` SKUs (its own SKUs first), written to ``out``."""
    small = load_gallery(index)
    rng = np.random.default_rng(seed)
    extra = images - small.index.ntotal
    all_skus = np.concatenate([small.skus, 10_000_000 + np.arange(max(skus - len(small.skus), 0))])
    vectors = np.concatenate(
        [small.index.reconstruct_n(0, small.index.ntotal), unit(rng, extra, small.index.d)]
    )
    labels = np.concatenate([small.labels, rng.integers(0, len(all_skus), extra)])
    names = np.concatenate([small.names, np.array([f"train/{i}.jpg" for i in range(extra)])])
    save_gallery(build_gallery(vectors, labels, names, all_skus, small.meta), out, thumbs_from=index)
    return out


def enrol_many(store: VersionStore, n: int, rng: np.random.Generator, dim: int) -> list[dict]:
    rows = []
    for i in range(n):
        start = time.perf_counter()
        version = store.enrol(unit(rng, 5, dim), 20_000_000 + i, [f"{i}-{j}.jpg" for j in range(5)], None)
        store.publish(version)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "number": version.number,
                "seconds": seconds,
                "bytes": folder_bytes(version.folder),
                "whole": version.base == version.number,
            }  # fmt: skip
        )
    return rows


def summary(rows: list[dict]) -> dict:
    segments = [r for r in rows if not r["whole"]]
    whole = [r for r in rows if r["whole"]]
    seconds = np.array([r["seconds"] for r in segments])
    return {
        "enrolments": len(rows),
        "segment": {
            "count": len(segments),
            "seconds_p50": float(np.median(seconds)),
            "seconds_p95": float(np.percentile(seconds, 95)),
            "seconds_max": float(seconds.max()),
            "bytes_written_median": int(np.median([r["bytes"] for r in segments])),
        },
        "whole": [{"number": r["number"], "seconds": r["seconds"], "bytes": r["bytes"]} for r in whole],
        "amortised_bytes_per_enrolment": int(sum(r["bytes"] for r in rows) / len(rows)),
        "amortised_seconds_per_enrolment": float(sum(r["seconds"] for r in rows) / len(rows)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "export")
    p.add_argument("--index", type=Path, default=ROOT / "models" / "m0" / "index")
    p.add_argument("--images", type=int, default=142_000)
    p.add_argument("--skus", type=int, default=9_691)
    p.add_argument("--enrolments", type=int, default=300)
    p.add_argument("--compact-every", type=int, default=256)
    p.add_argument("--keep-versions", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "versions.json")
    args = p.parse_args()
    model = ExportedModel(args.model)
    rng = np.random.default_rng(args.seed + 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        index = real_size_index(args.index, work / "index", args.images, args.skus, args.seed)
        built = time.perf_counter() - start
        versions = work / "versions"
        start = time.perf_counter()
        store = VersionStore(
            model, index, versions, keep=args.keep_versions, compact_every=args.compact_every
        )
        cold = time.perf_counter() - start
        dim = store.current.gallery.index.d
        follower = VersionStore(model, index, versions, follow=True)
        rows = enrol_many(store, args.enrolments, rng, dim)
        start = time.perf_counter()
        follower.current = follower.newer()
        catch_up = time.perf_counter() - start
        store._lock.close()
        start = time.perf_counter()
        again = VersionStore(model, index, versions)
        restart = time.perf_counter() - start
        assert again.current.gallery.index.ntotal == store.current.gallery.index.ntotal
        # before segments: every enrolment wrote a whole copy of the index
        start = time.perf_counter()
        save_gallery(store.current.base_gallery, work / "whole-copy")
        whole_copy = {"seconds": time.perf_counter() - start, "bytes": folder_bytes(work / "whole-copy")}
        result = {
            "machine": describe(),
            "gallery": {
                "images": args.images,
                "dims": dim,
                "skus": args.skus,
                "index_bytes": folder_bytes(index),
                "built_s": built,
            },  # fmt: skip
            "settings": {"compact_every": args.compact_every, "keep_versions": args.keep_versions},
            "start_s": cold,
            "enrolment": summary(rows),
            "follower_catch_up_s": {"versions": args.enrolments, "seconds": catch_up},
            "restart_s": restart,
            "versions_folder_bytes": folder_bytes(versions),
            "version_folders": len([p for p in versions.iterdir() if p.name.startswith("v")]),
            "before_segments_one_enrolment": whole_copy,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
