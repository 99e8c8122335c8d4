"""The tables docs/retrieval.md shows from bench_enrol's JSON: ``table`` (one run: every embedding
and vote rule, by gallery size, novelty, the doubt switch) and ``summary`` (the embeddings of
several runs side by side, the figures the enrolment goal is judged on):

    python benchmarks/enrol_tables.py benchmarks/results/enrol.json benchmarks/results/enrol_seed1.json \\
        benchmarks/results/enrol_metric.json --rows linear,supcon,pk,supcon-random,supcon-pairs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.enrol_rules import PHOTO_BUCKETS, RULES  # noqa: E402


def table(results: dict) -> str:
    """The README/docs table: per embedding and vote rule, top-1 on trained and held-out SKUs."""

    def f(x):
        return "–" if x is None else f"{x['top1']:.3f} [{x['top1_ci95'][0]:.2f}, {x['top1_ci95'][1]:.2f}]"

    lines = [
        "| embedding | vote | trained: classifier | trained: kNN | trained: fused | held-out: kNN "
        "| held-out: fused | held-out kNN top-5 | ratio (kNN) | trained kNN before enrolment |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, r in results.items():
        t, h = r["trained_skus"], r["held_out_skus"]
        for kind in RULES:
            knn_t, knn_h = t[f"knn_{kind}"], h[f"knn_{kind}"]
            ratio = knn_h["top1"] / knn_t["top1"] if knn_t["top1"] else float("nan")
            cells = [f(t["classifier"]), f(knn_t), f(t[f"fused_{kind}"]), f(knn_h), f(h[f"fused_{kind}"]),
                     f"{knn_h['top5']:.3f}", f"{ratio:.2f}×",
                     f(t[f"knn_{kind}_before_enrolment"])]  # fmt: skip
            lines.append(f"| {row} | {kind} | " + " | ".join(cells) + " |")
    buckets = [f"{low}-{high}" for low, high in PHOTO_BUCKETS]
    lines += ["", "Trained SKUs' kNN top-1 by their gallery photos:", "",
              "| embedding | vote | " + " | ".join(f"{b} photos" for b in buckets) + " |",
              "|---|---|" + "---|" * len(buckets)]  # fmt: skip
    for row, r in results.items():
        for kind, by in r["trained_by_gallery_photos"].items():
            cells = [f(by[b]) + f" (n={by[b]['n_images']})" if b in by else "–" for b in buckets]
            lines.append(f"| {row} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", NOVELTY_HEAD, "", "| embedding | classifier doubt AUROC | nearest distance AUROC | "
              + " | ".join(f"named enrolled: {k}" for k in NOVELTY_RULES) + " |",
              "|---|---|---|" + "---|" * len(NOVELTY_RULES)]  # fmt: skip
    for row, r in results.items():
        novelty, t = r.get("novelty", {}), r["trained_skus"]
        cells = [
            f"{novelty[k]:.3f}" if k in novelty else "–"
            for k in ("classifier_doubt_auroc", "nearest_distance_auroc")
        ]
        cells += [
            f"{t[f'knn_{k}_named_enrolled']:.3f}" if f"knn_{k}_named_enrolled" in t else "–"
            for k in NOVELTY_RULES
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", GATED_HEAD, "", "| embedding | expected_best where doubt is above val's | trained: kNN | "
              "held-out: kNN | ratio | trained named enrolled |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row, r in results.items():
        for q, g in r.get("gated", {}).items():
            ratio = g["held_out"]["top1"] / g["trained"]["top1"] if g["trained"]["top1"] else float("nan")
            cells = [
                f"{q[1:]} quantile",
                f(g["trained"]),
                f(g["held_out"]),
                f"{ratio:.2f}×",
                f"{g['named_enrolled']:.3f}",
            ]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GATED_HEAD = (
    "Each photo judged by `expected_best` where the classifier doubts it more than the given "
    "quantile of its doubt on val, by `best` elsewhere:"
)


#: the rules whose cost to the trained SKUs the third table shows
NOVELTY_RULES = ("best", "expected_best", "normalised")
NOVELTY_HEAD = (
    "Before any enrolment, how well a held-out SKU's photo stands out from a trained SKU's "
    "(AUROC, 0.5 = chance), and after it, the trained SKUs' photos the kNN names as an enrolled SKU:"
)


def summary(reports: list[dict], rows: tuple[str, ...] | None = None) -> str:
    """The embeddings of several bench_enrol runs side by side: the classifier and the kNN on the
    trained SKUs before any enrolment, how well a new SKU's photo stands out (AUROC of the distance
    to the nearest gallery photo), and for ``best`` and ``expected_best`` the enrolled SKUs' top-1,
    its ratio to the trained SKUs' and what the enrolment costs the trained SKUs, in points."""
    lines = [
        "| run | embedding | trained: classifier | trained: kNN before enrolment | new photo stands out "
        "(AUROC) | best: enrolled | ratio | trained lose (points) | expected_best: enrolled | ratio "
        "| trained lose (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    entries = []
    for number, report in enumerate(reports):
        held = "whole groups" if report.get("whole_groups") else "SKUs"
        setting = "".join(f", {key}={value}" for key, value in (report.get("set") or {}).items())
        run = f"{report['data']}, {held} held out, seed {report['seed']}{setting}"
        for place, (row, r) in enumerate(report["rows"].items()):
            if rows is not None and row not in rows:
                continue
            t, h = r["trained_skus"], r["held_out_skus"]
            classifier = "–" if t["classifier"] is None else f"{t['classifier']['top1']:.3f}"
            cells = [run, row, classifier, f"{t['knn_best_before_enrolment']['top1']:.3f}",
                     f"{r['novelty']['nearest_distance_auroc']:.3f}"]  # fmt: skip
            for kind in ("best", "expected_best"):
                after, before = t[f"knn_{kind}"]["top1"], t[f"knn_{kind}_before_enrolment"]["top1"]
                enrolled = h[f"knn_{kind}"]["top1"]
                cells += [f"{enrolled:.3f}", f"{enrolled / after:.2f}×", f"{100 * (before - after):.1f}"]
            # one block per run, its embeddings in ``rows``' order (or the files' and rows' order)
            order = (rows.index(row),) if rows is not None else (number, place)
            entries.append(((report["data"], held, report["seed"], setting, *order), cells))
    lines += ["| " + " | ".join(cells) + " |" for _, cells in sorted(entries, key=lambda e: e[0])]
    return "\n".join(lines)


def read_reports(paths) -> list[dict]:
    """bench_enrol reports from JSON files: one report each, or ``{"runs": [report, ...]}``."""
    reports = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        reports += data["runs"] if "runs" in data else [data]
    return reports


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="bench_enrol runs' embeddings side by side (summary)")
    p.add_argument("results", nargs="+", type=Path, help="bench_enrol JSON files")
    p.add_argument("--rows", help="comma-separated embeddings to show (default: all)")
    args = p.parse_args()
    print(summary(read_reports(args.results), tuple(args.rows.split(",")) if args.rows else None))
