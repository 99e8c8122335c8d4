"""``products10k-predict``: name the SKUs of images with the exported model.

    products10k-predict photos/ shelf.zip one.jpg --model models/export --out predictions.csv
    products10k-predict photos/ --model models/export --index models/m0/index --mode fused --out p.json

Inputs are image files, folders (searched recursively for image files) and zip archives (their
image members, read in place; nothing is extracted). Output, CSV or JSON by the ``--out``
extension: one row per image in input order with ``source``, ``status`` (ok | error), ``error``
(why an image could not be read: missing, empty, truncated, undecodable ...), and the top-k
original SKU ids with their probabilities (``sku_1``, ``score_1``, ...). An unreadable image is
reported in its row and does not stop the run; the exit status is 0 as long as the model ran. What
cannot be read, and why: a file that is missing, empty, truncated, undecodable (not a format the
project reads), unreadable (its size cannot be read from its header) or too large (the export's
record of params.yaml's ``prepare`` limits: decoded pixels, where a JPEG over the budget is decoded
reduced and any other image refused, ``--max-pixels`` to change it; the aspect ratio; the file's
bytes, a zip member's judged by its declared size before it is inflated), a zip member that is
encrypted or uses a compression method Python cannot read (``unreadable``), a zip inside a zip
(``unsupported``). Zip members are read in place, so an entry named ``../x.jpg`` or a
symlink entry cannot reach outside the archive. A name that is not valid UTF-8 is written with
backslash escapes.

Every image is prepared as the model's training and evaluation images were: the prepare stage's
resize and JPEG re-encode (recorded in preprocess.json), then the evaluate stage's centre crop.

Modes: ``classifier`` (the softmax of the logits), ``knn`` (the index's k nearest training images
vote, see ``products10k.knn``), ``fused`` (both, with the weight fitted on val by the
index stage). kNN and fused need ``--index``: the index stage's folder, or one that
``products10k-enrol`` extended with new SKUs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from products10k import common
from products10k.common import Products10kError
from products10k.deploy.runtime import MODES, ExportedModel, Scorer
from products10k.imaging.archive import (
    IMAGE_SUFFIXES,
    ZIP_READ_ERRORS,
    image_members,
    open_zip,
    read_file,
    read_member,
)
from products10k.imaging.images import ImageDefect, ImageLimits

log = logging.getLogger("products10k.predict")


@dataclass
class Source:
    """One image to predict: where it is (``label`` in the output) and how to read its bytes."""

    label: str
    path: Path
    member: zipfile.ZipInfo | None = None  # a zip member
    error: str = ""  # known unusable before reading (a nested zip)

    def read(self, max_bytes: int) -> bytes:
        """The file's or member's bytes; ImageDefect too-large over ``max_bytes`` (a member by its
        declared size, before anything is inflated)."""
        if self.member is not None:
            return read_member(open_zip(self.path), self.member, max_bytes)
        return read_file(self.path, max_bytes)


def printable(name: str) -> str:
    """``name`` with the bytes of a non-UTF-8 file name (surrogate escapes) as ``\\xNN``: CSV-safe."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
            sources.extend(Source(printable(str(p)), p) for p in files)
        elif path.suffix.lower() == ".zip" and path.is_file() and zipfile.is_zipfile(path):
            # is_file first: is_zipfile would open a FIFO named x.zip and wait for a writer forever
            sources.extend(_zip_sources(path))
        else:
            sources.append(Source(printable(str(path)), path))
    return sources


def _zip_sources(path: Path) -> list[Source]:
    """A zip's image members (and nested zips, as errors), sorted."""
    label = printable(str(path))
    try:
        members = image_members(zipfile.ZipFile(path))
    except ZIP_READ_ERRORS as exc:
        return [Source(label, path, error=f"unreadable: {type(exc).__name__}: {exc}")]
    return [Source(f"{label}:{printable(m.filename)}", path, m, error) for m, error in members]


def load_image(source: Source, model: ExportedModel, limits: ImageLimits) -> tuple[np.ndarray | None, str]:
    """(model input, "") or (None, the reason the image cannot be used)."""
    if source.error:
        return None, source.error
    try:
        data = source.read(limits.max_file_bytes)
    except ImageDefect as exc:
        return None, f"{exc.reason}: {exc.detail}"
    except FileNotFoundError:
        return None, "missing: no such file"
    except (*ZIP_READ_ERRORS, KeyError) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    try:
        return model.load(data, limits), ""
    except ImageDefect as exc:
        return None, f"{exc.reason}: {exc.detail}"


def predict_sources(
    sources: list[Source],
    model: ExportedModel,
    scorer: Scorer,
    batch_size: int,
    n_jobs: int = -1,
    limits: ImageLimits | None = None,
) -> list[dict]:
    """One output row per source, in order; images decoded on threads, the model run per batch.
    ``limits``: what one image may cost (default: the export's record of params.yaml's)."""
    rows: list[dict] = []
    limits = limits or model.limits
    workers = common.resolve_n_jobs(n_jobs, len(sources))
    loaded = common.ordered_map(load_image, ((s, model, limits) for s in sources), workers, "decode")
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
    """CSV (``.csv``) or JSON (``.json``) by extension, written atomically.

    In the CSV a row without a prediction has empty ``sku_*``/``score_*`` cells (ids stay integers).
    """
    if out.suffix.lower() == ".json":
        common.write_text(out, json.dumps(rows, indent=1) + "\n")
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    common.write_text(out, buffer.getvalue())


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
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="decoded pixels per image (default: the export's, from params.yaml prepare.max_pixels): "
        "a larger JPEG is decoded reduced, another image reported as too-large",
    )
    p.add_argument("--out", required=True, type=Path, help="output .csv or .json")
    args = p.parse_args(argv)
    if args.out.suffix.lower() not in (".csv", ".json"):
        p.error(f"--out {args.out}: the extension must be .csv or .json")
    if args.top_k < 1 or args.batch_size < 1 or (args.max_pixels is not None and args.max_pixels < 1):
        p.error("--top-k, --batch-size and --max-pixels must be >= 1")
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
    limits = model.limits if args.max_pixels is None else replace(model.limits, max_pixels=args.max_pixels)
    rows = predict_sources(sources, model, scorer, args.batch_size, limits=limits)
    write_rows(rows, args.out)
    bad = [r for r in rows if r["status"] == "error"]
    log.info("%d images, %s mode -> %s; %d could not be read", len(rows), mode, args.out, len(bad))
    for row in bad[:10]:
        log.warning("%s: %s", row["source"], row["error"])


if __name__ == "__main__":
    sys.exit(main())
