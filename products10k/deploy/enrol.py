"""``products10k-enrol``: add SKUs to an index from a few images each, without retraining.

    products10k-enrol new_skus/ --model models/export --index models/m0/index --out models/m0/index+new
    products10k-enrol new_skus.csv --model models/export --index models/m0/index --out models/m0/index+new

The images are either a folder with one sub-folder per SKU, named by its SKU id
(``new_skus/1000123/a.jpg``), or a CSV with columns ``name,class`` (the Products-10K layout;
``name`` relative to the CSV's folder). They are embedded with the exported model (the model the
index was built with: checked by checkpoint hash) and appended to a copy of the index written to
``--out``; the input index is never modified. Known SKU ids get more reference images, new ones
a new label after the classifier's. ``products10k-predict --index <out>`` then names them in
``knn`` and ``fused`` modes. An image that cannot be read (missing, empty, truncated, undecodable,
too large: the same bounded decode as prepare and predict) is skipped with a warning naming it and
its reason, and listed in the index's meta.json; a SKU left with no readable image stops the
enrolment, as does any skipped image with ``--strict``: an index silently missing a SKU is worse
than no index. The output is written beside and swapped in whole: a killed enrolment leaves the
input index untouched and ``--out`` either absent, as it was, or complete. Since ``--out`` is replaced
whole, it must be a new folder or an index this tool wrote, and may neither contain nor sit inside
the input index, the images or the model.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from products10k import common
from products10k.common import DataError, Products10kError
from products10k.deploy.runtime import ExportedModel, check_same_model
from products10k.imaging.archive import IMAGE_SUFFIXES, read_file
from products10k.imaging.images import ImageDefect, ImageLimits
from products10k.knn import META_FILE, THUMBS_DIR, enrol, load_gallery, save_gallery, thumbnail_jpeg

log = logging.getLogger("products10k.enrol")
#: the mark an index this tool wrote carries in meta.json's "enrolled" records (what --out may replace)
ENROL_TOOL = "products10k-enrol"


def read_enrolment(images: Path) -> list[tuple[Path, int]]:
    """``(path, sku)`` rows from a folder of SKU folders or a ``name,class`` CSV; bad input names the row."""
    if images.is_dir():
        rows = []
        for folder in sorted(p for p in images.iterdir() if p.is_dir()):
            if common.parse_sku_id(folder.name) is None:
                raise DataError(
                    f"{folder}: SKU folders must be named by their integer SKU id: {common.SKU_ID_RULE}"
                )
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            rows += [(p, common.parse_sku_id(folder.name)) for p in files]
        if not rows:
            raise DataError(f"{images}: no images in SKU sub-folders (expected <images>/<sku id>/<file>.jpg)")
        return rows
    if not images.is_file():
        raise DataError(f"{images}: no such folder or CSV")
    with open(images, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for col in ("name", "class"):
            if col not in columns:
                raise DataError(f"{images}: missing column '{col}' (columns: {', '.join(columns)})")
        rows = []
        for line, record in enumerate(reader, start=2):
            value = (record["class"] or "").strip()
            sku = common.parse_sku_id(value)
            if sku is None:
                raise DataError(f"{images}: row {line}: class '{value[:40]}' is not {common.SKU_ID_RULE}")
            rows.append((images.parent / record["name"], sku))
    if not rows:
        raise DataError(f"{images}: no rows")
    return rows


def check_out(out: Path, index_dir: Path, images: Path, model_dir: Path) -> None:
    """``--out`` is written whole (staged, then swapped in), so it must not hold anything else: refused
    when it exists and is not an index products10k-enrol wrote, or when it contains or sits inside
    the input index, the images or the model (replacing it would delete them)."""
    target = out.resolve()
    for name, path in (("--index", index_dir), ("the images", images), ("--model", model_dir)):
        other = path.resolve()
        if target == other or target in other.parents or other in target.parents:
            raise Products10kError(
                f"--out {out} is, contains or sits inside {name} ({path}): write the enrolled index to a "
                "new folder beside them"
            )
    if out.exists():
        meta = out / META_FILE
        try:
            wrote = any(e.get("tool") == ENROL_TOOL for e in json.loads(meta.read_text()).get("enrolled", []))
        except (OSError, ValueError, AttributeError):
            wrote = False
        if not wrote:
            raise Products10kError(
                f"--out {out} exists and is not an index products10k-enrol wrote: it would be replaced "
                "whole; choose a new folder"
            )


def embed_files(
    model: ExportedModel, paths: list[Path], batch_size: int, limits: ImageLimits
) -> tuple[np.ndarray, dict[int, str]]:
    """(N', D) embeddings of the readable image files, and {position in ``paths``: why not} for the rest."""
    out, skipped = [], {}
    for start in tqdm(range(0, len(paths), batch_size), desc="enrol", unit="batch", leave=False):
        batch = []
        for i, path in enumerate(paths[start : start + batch_size], start):
            try:
                batch.append(model.load(read_file(path, limits.max_file_bytes), limits))
            except ImageDefect as exc:
                skipped[i] = f"{exc.reason}: {exc.detail}"
            except FileNotFoundError:
                skipped[i] = "missing: no such file"
            except OSError as exc:
                skipped[i] = f"unreadable: {type(exc).__name__}: {exc}"
        if batch:
            out.append(model.run(np.stack(batch))[1])
    dim = model.session.get_outputs()[1].shape[1]
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), skipped


def enrol_skus(
    images: Path,
    model_dir: Path,
    index_dir: Path,
    out: Path,
    batch_size: int = 32,
    strict: bool = False,
    max_pixels: int | None = None,
) -> dict:
    """Enrol the SKUs of ``images`` into a copy of ``index_dir`` written to ``out``; return a summary."""
    check_out(out, index_dir, images, model_dir)
    table = read_enrolment(images)
    paths, skus = [p for p, _ in table], np.array([s for _, s in table], dtype=np.int64)
    model = ExportedModel(model_dir)
    limits = model.limits if max_pixels is None else replace(model.limits, max_pixels=max_pixels)
    gallery = load_gallery(index_dir)
    check_same_model(model, gallery, index_dir)
    vectors, skipped = embed_files(model, paths, batch_size, limits)
    for i, why in skipped.items():
        log.warning("skipped %s (SKU %d): %s", paths[i], skus[i], why)
    if skipped and strict:
        raise DataError(f"{len(skipped)} image(s) could not be read and --strict is set (see the warnings)")
    ok = np.ones(len(table), bool)
    ok[list(skipped)] = False
    lost = sorted(set(skus.tolist()) - set(skus[ok].tolist()))
    if lost:
        raise DataError(
            f"SKU(s) {', '.join(map(str, lost))}: none of their images could be read (see the warnings)"
        )
    kept = [(paths[i], int(skus[i])) for i in np.flatnonzero(ok)]
    added = enrol(gallery, vectors, skus[ok], [str(p) for p, _ in kept])
    added["skipped"] = [{"path": str(paths[i]), "error": why} for i, why in skipped.items()]
    gallery.meta.setdefault("enrolled", []).append({"source": str(images), "tool": ENROL_TOOL, **added})
    # a thumbnail for each SKU the index has none for: its first readable image
    thumbs: dict[int, bytes] = {}
    for path, sku in kept:
        if sku not in thumbs and not (index_dir / THUMBS_DIR / f"{sku}.jpg").is_file():
            thumbs[sku] = thumbnail_jpeg(read_file(path, limits.max_file_bytes), limits)
    try:
        save_gallery(gallery, out, thumbs=thumbs, thumbs_from=index_dir)
    except OSError as exc:  # a full disk, a quota, a read-only mount: said, and --out as it was
        raise Products10kError(
            f"--out {out}: the enrolled index could not be written ({exc.strerror or exc}); "
            "--out is as it was and nothing was enrolled"
        ) from None
    log.info(
        "enrolled %d images of %d SKUs (%d new), %d skipped -> %s",
        added["images"],
        added["skus"],
        added["new_skus"],
        len(skipped),
        out,
    )
    return added


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="products10k-enrol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("images", type=Path, help="folder of <sku id>/ sub-folders, or a name,class CSV")
    p.add_argument("--model", required=True, type=Path, help="export folder (model.onnx + preprocess.json)")
    p.add_argument("--index", required=True, type=Path, help="index folder to extend (never modified)")
    p.add_argument("--out", required=True, type=Path, help="new index folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--strict", action="store_true", help="stop when any image cannot be read")
    p.add_argument(
        "--max-pixels", type=int, default=None, help="decoded pixels per image (default: the export's)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.run_stage(
        log,
        enrol_skus,
        args.images,
        args.model,
        args.index,
        args.out,
        args.batch_size,
        args.strict,
        args.max_pixels,
    )


if __name__ == "__main__":
    main()
