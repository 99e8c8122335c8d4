"""The index stage's retrieval work at Products-10K's full size, without the images.

Gallery 141,931 vectors (the real training split), 55,376 test queries, 9,691 SKUs, k from
params.yaml: build the exact inner-product Faiss index (``build_gallery``), search it
(``knn_scores``: search + vote), fit the fusion weight on 5,000 val rows and fuse the test rows
with a classifier's top-100 (``fit_fusion_weight``, ``fuse``): the same functions the stage calls,
on random unit vectors (their values do not change the cost of exact search). Reports seconds per
step and the process's peak RSS (the stage's bound is 4 GiB). Writes benchmarks/results/index.json.

    python benchmarks/bench_index.py [--dim 960]   # 960: mobilenetv4_conv_small; 1536: efficientnet_b3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import params as load_params  # noqa: E402
from benchmarks.harness import write_results  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from products10k.ensemble import fit_fusion_weight  # noqa: E402
from products10k.knn import build_gallery, fuse, knn_scores  # noqa: E402
from products10k.scores import SplitScores  # noqa: E402

GALLERY, TEST, VAL, CLASSES, TOP_K = 141_931, 55_376, 5_000, 9_691, 100


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 16384):  # in blocks: no float64 (n, dim) temporary
        block = rng.standard_normal((min(16384, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def classifier(rng, n: int, labels) -> SplitScores:
    """A top-100 predictions block as evaluate writes it (random logits, exact format)."""
    # TOP_K distinct labels per row, in blocks, each copied out of its (2048, K) block: a whole (n, K)
    # random matrix, or views keeping every block alive, would dominate the peak RSS
    blocks = []
    for start in range(0, n, 2048):
        noise = rng.random((min(2048, n - start), CLASSES), dtype=np.float32)
        blocks.append(np.argpartition(noise, TOP_K, axis=1)[:, :TOP_K].astype(np.int32))
    top = np.concatenate(blocks)
    logits = -np.sort(-rng.standard_normal((n, TOP_K)).astype(np.float32), axis=1)
    return SplitScores(
        names=np.arange(n).astype(str),
        labels=np.asarray(labels),
        topk_labels=top,
        topk_logits=logits,
        logsumexp=np.full(n, 9.0, np.float32),
        label_logprob=np.full(n, -9.5, np.float32),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=960)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "index.json")
    args = p.parse_args()
    cfg = load_params()["retrieval"]
    vote = dict(k=cfg["k"], kind=cfg["vote"], temperature=cfg["temperature"], smoothing=cfg["smoothing"],
                batch=cfg["search_batch"], shots=cfg["vote_shots"])  # fmt: skip
    rng = np.random.default_rng(0)
    seconds = {}
    gallery_labels = rng.integers(0, CLASSES, GALLERY)

    t = time.perf_counter()
    vectors = unit_vectors(rng, GALLERY, args.dim)
    gallery = build_gallery(vectors, gallery_labels, np.arange(GALLERY).astype(str), np.arange(CLASSES), {})
    del vectors  # the stage holds the embeddings only while the index copies them
    seconds["build"] = time.perf_counter() - t
    val_labels, test_labels = rng.integers(0, CLASSES, VAL), rng.integers(0, CLASSES, TEST)

    t = time.perf_counter()
    val_knn = knn_scores(
        gallery, unit_vectors(rng, VAL, args.dim), np.arange(VAL).astype(str), val_labels, **vote
    )
    test_knn = knn_scores(
        gallery, unit_vectors(rng, TEST, args.dim), np.arange(TEST).astype(str), test_labels, **vote
    )
    seconds["search_and_vote"] = time.perf_counter() - t

    val_classifier, test_classifier = classifier(rng, VAL, val_labels), classifier(rng, TEST, test_labels)
    t = time.perf_counter()
    weight = fit_fusion_weight(val_classifier, val_knn)
    fused = fuse(test_classifier, test_knn, weight, CLASSES, TOP_K)
    seconds["fit_and_fuse"] = time.perf_counter() - t
    assert fused.topk_labels.shape == (TEST, TOP_K)

    report = {
        "machine": describe(),
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "gallery": GALLERY,
        "queries": VAL + TEST,
        "classes": CLASSES,
        "dim": args.dim,
        "k": cfg["k"],
        "index_mb": round(GALLERY * args.dim * 4 / 2**20, 1),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
