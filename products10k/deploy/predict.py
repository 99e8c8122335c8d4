"""``products10k-predict``: name the SKUs of images with the exported model.

    products10k-predict photos/ shelf.zip one.jpg --model models/export --out predictions.csv
    products10k-predict photos/ --model models/export --index models/m0/index --mode fused --out p.json

Inputs are image files, folders (searched recursively for image files) and zip archives (their
image members, read in place; nothing is extracted). Output, CSV or JSON by the ``--out``
extension: one row per image in input order with ``source``, ``status`` (ok | error), ``error``
(why an image could not be read: missing, empty, truncated, undecodable ...), and the top-k
original SKU ids with their probabilities (``sku_1``, ``score_1``, ...). An unreadable image is
reported in its row and does not stop the run; the exit status is 0 as long as the model ran.

Modes: ``classifier`` (the softmax of the logits), ``knn`` (the index's k nearest training images
vote, see ``products10k.retrieval.knn``), ``fused`` (both, with the weight fitted on val by the
index stage). kNN and fused need ``--index``: the index stage's folder, or one that
``products10k-enrol`` extended with new SKUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from products10k import common
from products10k.common import Products10kError
from products10k.deploy.runtime import MODES, ExportedModel, Scorer
from products10k.prepared.images import ImageDefect, decode_rgb

log = logging.getLogger("products10k.predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


@dataclass
class Source:
    """One image to predict: where it is (``label`` in the output) and how to read its bytes."""

    label: str
    path: Path
    member: str | None = None  # a zip member

    def read(self) -> bytes:
        if self.member is None:
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.member)


def gather(inputs: list[str]) -> list[Source]:
    """The images named by ``inputs`` in order: files as given, folders and zips sorted by path.

    A path that does not exist is a row with an error (like an unreadable image), not a crash:
    the other inputs are still predicted.
    """
    sources: list[Source] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            sources.extend(Source(str(p), p) for p in files)
        elif path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = sorted(
                    m.filename
                    for m in archive.infolist()
                    if not m.is_dir() and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
                )
            sources.extend(Source(f"{path}:{m}", path, m) for m in members)
        else:
            sources.append(Source(str(path), path))
    return sources


def load_image(source: Source, model: ExportedModel) -> tuple[np.ndarray | None, str]:
    """(model input, "") or (None, the reason the image cannot be used)."""
    try:
        data = source.read()
    except FileNotFoundError:
        return None, "missing: no such file"
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    try:
        rgb = decode_rgb(data, min_side=model.min_side)
    except ImageDefect as exc:
        return None, f"{exc.reason}: {exc.detail}"
    return model.preprocess(rgb), ""


def predict_sources(
    sources: list[Source], model: ExportedModel, scorer: Scorer, batch_size: int, n_jobs: int = -1
) -> list[dict]:
    """One output row per source, in order; images decoded on threads, the model run per batch."""
    rows: list[dict] = []
    workers = common.resolve_n_jobs(n_jobs, len(sources))
    loaded = common.ordered_map(load_image, ((s, model) for s in sources), workers, "decode")
    progress = tqdm(total=len(sources), desc="predict", unit="img", mininterval=1.0)
    for chunk in _chunks(zip(sources, loaded, strict=True), batch_size):
        ok = [(i, x) for i, (_, (x, _err)) in enumerate(chunk) if x is not None]
        top = scorer(*model.run(np.stack([x for _, x in ok]))) if ok else None
        ranks = {i: r for r, (i, _) in enumerate(ok)}
        for i, (source, (_x, error)) in enumerate(chunk):
            row = {"source": source.label, "status": "error" if error else "ok", "error": error}
            for j in range(scorer.top_k):
                r = ranks.get(i)
                row[f"sku_{j + 1}"] = int(top.skus[r, j]) if r is not None else None
                row[f"score_{j + 1}"] = round(float(top.scores[r, j]), 6) if r is not None else None
            rows.append(row)
        progress.update(len(chunk))
    progress.close()
    return rows


def _chunks(items, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_rows(rows: list[dict], out: Path) -> None:
    """CSV (``.csv``) or JSON (``.json``) by extension, written atomically."""
    if out.suffix.lower() == ".json":
        common.write_text(out, json.dumps(rows, indent=1) + "\n")
    else:
        frame = pd.DataFrame(rows)
        for col in frame.columns:
            if col.startswith("sku_"):
                frame[col] = frame[col].astype("Int64")  # ids, not floats, where a row has none
        common.write_csv(out, frame)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="products10k-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help="image files, folders, zip archives")
    p.add_argument("--model", required=True, type=Path, help="export folder (model.onnx + preprocess.json)")
    p.add_argument("--index", type=Path, help="index folder (models/<member>/index): knn and fused modes")
    p.add_argument("--mode", choices=MODES, default=None, help="default: fused with --index, else classifier")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--out", required=True, type=Path, help="output .csv or .json")
    args = p.parse_args(argv)
    if args.out.suffix.lower() not in (".csv", ".json"):
        p.error(f"--out {args.out}: the extension must be .csv or .json")
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top-k and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    mode = args.mode or ("fused" if args.index else "classifier")
    model = ExportedModel(args.model, threads=args.threads)
    scorer = Scorer(model, mode, args.top_k, args.index)
    sources = gather(args.inputs)
    if not sources:
        raise Products10kError(f"no images found in {', '.join(args.inputs)}")
    rows = predict_sources(sources, model, scorer, args.batch_size)
    write_rows(rows, args.out)
    bad = [r for r in rows if r["status"] == "error"]
    log.info("%d images, %s mode -> %s; %d could not be read", len(rows), mode, args.out, len(bad))
    for row in bad[:10]:
        log.warning("%s: %s", row["source"], row["error"])


if __name__ == "__main__":
    sys.exit(main())
