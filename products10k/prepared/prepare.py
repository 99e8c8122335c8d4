"""The prepare stage: validate the raw tables, pre-resize every image once, split train/val.

Input (``data/raw``, made by the download stage): ``train.zip`` (images under ``train/``),
``test.zip`` (images under ``test/``), ``train.csv`` and ``test_kaggletest.csv``.

Output (``data/prepared``): ``images/shard-*.bin`` (see contracts/shards.py), ``train.csv``, ``val.csv``,
``test.csv`` (columns :data:`products10k.columns.PREPARED_COLUMNS`, test adds ``Usage``),
``label_map.csv`` and ``report.json`` (counts, and every excluded image with its file, line and reason).

Order of work, so that bad input fails fast and a failure writes nothing:

1. tables are validated (tables.py) - a bad CSV fails before any image is read;
2. both zips are indexed; an entry with an absolute path or ``..`` (zip slip) is never read and is
   listed in report.json's ``unsafe_entries`` (nothing is ever extracted to disk - images are
   streamed from the zip - and a CSV name cannot hold a folder separator, so no row can name one);
3. images are decoded, resized and JPEG-encoded in parallel (a thread pool, chunks of rows per
   task), and appended to shards in CSV order (deterministic bytes);
4. unreadable images are excluded; if the excluded share of train.csv or of test_kaggletest.csv
   exceeds ``max_bad_fraction`` the stage fails and the staged shards are discarded;
5. train/val split (after exclusions, so its invariants hold on what is written), then all outputs
   are published: the shard folder by rename, the tables by atomic writes, report.json last.

Zip layout: images are looked up under ``<split>/`` (the official layout). A zip made by
re-compressing an extracted download often has one more top-level folder
(``Products10K/train/1.jpg``) or none (``1.jpg``); both are accepted when unambiguous, otherwise
the error lists the folders found.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import pandas as pd
from tqdm.auto import tqdm

from products10k.common import DataError, ordered_map, pause_point, resolve_n_jobs, write_csv, write_json
from products10k.config import PrepareConfig
from products10k.config.stage import StageFiles, option
from products10k.contracts.prepared import PREPARED_COLUMNS, TEST_COLUMNS
from products10k.contracts.raw import TEST_CSV, TEST_ZIP, TRAIN_CSV, TRAIN_ZIP, unsafe_member
from products10k.contracts.shards import ShardWriter, remove_stale_staging
from products10k.imaging.images import ImageLimits, prepare_zip_members
from products10k.prepared.tables import (
    check_unseen_test_skus,
    load_test_table,
    load_train_table,
    make_label_map,
    split_train_val,
)

log = logging.getLogger(__name__)

# Rows per thread-pool task: a task costs tens of us, a row ~5 ms, so 16 rows amortise the overhead while
# keeping the tail short (the last tasks run on fewer threads than there are cores) and the progress
# bar and in-flight memory smooth.
CHUNK_ROWS = 16
# macOS archivers add these; they are not images and are ignored when locating the image folder.
_JUNK = re.compile(r"(^|/)(__MACOSX/|\._)|(^|/)\.DS_Store$|(^|/)Thumbs\.db$")
_INT_COLUMNS = {"offset": "int64", "length": "int64", "width": "int64", "height": "int64"}


@dataclass(frozen=True)
class RawPaths:
    train_zip: Path
    test_zip: Path
    train_csv: Path
    test_csv: Path

    @classmethod
    def from_dir(cls, raw: str | os.PathLike) -> RawPaths:
        raw = Path(raw)
        if not raw.is_dir():
            raise DataError(f"{raw}: raw data folder not found (run the download stage first)")
        files = {"train_zip": TRAIN_ZIP, "test_zip": TEST_ZIP, "train_csv": TRAIN_CSV, "test_csv": TEST_CSV}
        paths = {key: raw / name for key, name in files.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(f"{raw}: missing raw file(s): {', '.join(missing)}")
        return cls(**paths)


# ----------------------------------------------------------------------------- zip index


def index_zip(path: Path, split: str) -> tuple[str, set[str], list[str]]:
    """Find the image folder of ``path``; returns (prefix, file names, unsafe entries).

    ``prefix`` ends with ``/`` (or is empty for a flat zip); a CSV name ``n`` is the member
    ``prefix + n``. Unsafe entries (zip slip) are left out of the file names.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip archive: {exc}") from exc
    unsafe = [i.filename for i in infos if unsafe_member(i.filename)]
    for name in unsafe[:10]:
        log.warning(
            "%s: entry %r has an absolute path or a '..' component (zip slip): never read", path, name
        )
    files = {
        i.filename
        for i in infos
        if not i.is_dir() and not _JUNK.search(i.filename) and i.filename not in unsafe
    }
    folders = Counter(f.rsplit("/", 1)[0] + "/" if "/" in f else "" for f in files)
    if f"{split}/" in folders or not folders:  # no files at all: only valid for an empty table
        prefix = f"{split}/"
    else:
        nested = [d for d in folders if d.endswith(f"/{split}/")]
        if len(nested) == 1:
            prefix = nested[0]
        elif set(folders) == {""}:
            prefix = ""
        else:
            found = ", ".join(sorted(repr(d) for d in folders)[:10]) or "no files"
            raise DataError(
                f"{path}: cannot find the image folder '{split}/' (nor one '<top>/{split}/', nor a flat"
                f" archive); folders found: {found}"
            )
    if prefix != f"{split}/":
        log.info("%s: images are under %r instead of the official %r", path, prefix or "(root)", f"{split}/")
    return prefix, files, unsafe


# ----------------------------------------------------------------------------- image workers


@dataclass
class _Job:
    table: str  # which CSV the row came from, for the report
    archive: Path
    prefix: str
    rows: pd.DataFrame  # name, line


def _chunks(jobs: list[_Job]):
    for job in jobs:
        names = job.rows["name"].tolist()
        for start in range(0, len(names), CHUNK_ROWS):
            yield job, start, [job.prefix + n for n in names[start : start + CHUNK_ROWS]]


def process_images(
    jobs: list[_Job], writer: ShardWriter, size: int, quality: int, n_jobs: int, limits: ImageLimits
) -> dict[str, pd.DataFrame]:
    """Prepare the rows of every job; returns per table a frame aligned with its rows.

    Columns: shard, offset, length, width, height (valid where ``reason`` is empty), reason, detail.

    Images are prepared on a pool of ``n_jobs`` threads (-1: one per core): OpenCV releases the GIL
    in decode, resize and encode, which are >95% of the work, so threads use all cores without the
    start-up of worker processes (1-2 s, as long as preparing 200 images) or pickling every image.
    Each thread reads the zip through its own handle; the calling thread only writes the shards.
    """
    total = sum(len(j.rows) for j in jobs)
    results: dict[str, list] = {j.table: [] for j in jobs}
    tasks = list(_chunks(jobs))
    n_workers = resolve_n_jobs(n_jobs, len(tasks))
    log.info("preparing %d images on %d thread(s)", total, n_workers)
    # One thread per core already: OpenCV's own thread pool would only oversubscribe the cores (and
    # costs more than it gains on images this small). The setting is process-wide, so it is restored.
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    # ordered_map yields results in submission order: shards are written in CSV order whatever
    # the thread scheduling, so the output bytes are deterministic and independent of n_jobs.
    outputs = ordered_map(
        prepare_zip_members,
        [(str(job.archive), members, size, quality, limits) for job, _, members in tasks],
        n_workers,
        thread_name_prefix="prepare",
    )
    try:
        with tqdm(total=total, desc="prepare images", unit="img", mininterval=1.0) as bar:
            for (job, _, _), chunk in zip(tasks, outputs, strict=True):
                for jpeg, w, h, reason, detail in chunk:
                    if jpeg is None:
                        results[job.table].append(("", -1, -1, -1, -1, reason, detail))
                    else:
                        shard, offset, length = writer.add(jpeg)
                        results[job.table].append((shard, offset, length, w, h, "", ""))
                bar.update(len(chunk))
                pause_point("prepare images")  # kill tests: shards half-written
    finally:
        outputs.close()  # on an error: cancel the queued chunks, wait for the running ones
        cv2.setNumThreads(cv_threads)
    columns = ["shard", "offset", "length", "width", "height", "reason", "detail"]
    return {
        j.table: pd.DataFrame(results[j.table], columns=columns, index=j.rows.index).astype(_INT_COLUMNS)
        for j in jobs
    }


# ----------------------------------------------------------------------------- the stage


def _excluded_entries(df: pd.DataFrame, csv: Path, archive: Path, prefix: str) -> list[dict]:
    bad = df[df["reason"] != ""]
    return [
        {
            "file": str(csv),
            "line": int(r.line),
            "name": r.name,
            "archive": str(archive),
            "member": prefix + r.name,
            "reason": r.reason,
            "detail": r.detail,
        }
        for r in bad.itertuples(index=False)
    ]


def _check_bad_fraction(table: Path, n_rows: int, excluded: list[dict], limit: float) -> None:
    if n_rows == 0 or len(excluded) / n_rows <= limit:
        return
    reasons = Counter(e["reason"] for e in excluded)
    examples = "; ".join(f"line {e['line']} {e['name']!r}: {e['reason']}" for e in excluded[:5])
    raise DataError(
        f"{table}: {len(excluded)} of {n_rows} images ({len(excluded) / n_rows:.2%}) are missing or"
        f" unreadable, more than prepare.max_bad_fraction={limit:g}"
        f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}); e.g. {examples}"
    )


def prepare(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: PrepareConfig) -> dict:
    """Run the whole prepare stage; returns the report (also written to ``out_dir/report.json``)."""
    raw = RawPaths.from_dir(raw_dir)
    out = Path(out_dir)
    train, test, unseen = _load_tables(raw, cfg)
    # every check before the first write: a bad archive leaves no output folder behind
    archives = {"train": index_zip(raw.train_zip, "train"), "test": index_zip(raw.test_zip, "test")}
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(out):
        log.warning("removed %s left behind by an interrupted run", stale)
    merged, excluded, shards = _pack_images(raw, archives, out, train, test, cfg)

    kept = merged["train"]
    is_val = split_train_val(
        kept["sku"],
        cfg.val_fraction,
        cfg.seed,
        cfg.val_min_images,
        cfg.val_tail_images,
        cfg.val_tail_min_images,
    )
    # n_train counts what the model trains on (train.csv), so head/tail is by training images
    label_map = make_label_map(train, kept[~is_val])
    label_of = label_map.set_index("sku")["label"]
    for key in merged:
        # -1: a test SKU with no train images (counted above), never a train row
        merged[key]["label"] = merged[key]["sku"].map(label_of).fillna(-1).astype("int64")
    kept = merged["train"]
    splits = {
        "train": kept[~is_val][PREPARED_COLUMNS],
        "val": kept[is_val][PREPARED_COLUMNS],
        "test": merged["test"][TEST_COLUMNS],
    }
    for name, df in splits.items():
        write_csv(out / f"{name}.csv", df)
    write_csv(out / "label_map.csv", label_map)

    empty_skus = label_map.loc[label_map["n_train"] == 0, "sku"].tolist()
    if empty_skus:
        log.warning(
            "%d SKU(s) lost all their train images to exclusions: %s", len(empty_skus), empty_skus[:20]
        )
    unsafe = {str(path): archives[key][2] for key, path in (("train", raw.train_zip), ("test", raw.test_zip))}
    report = _report(train, test, kept, splits, excluded, label_map, unseen, shards, unsafe, cfg)
    write_json(out / "report.json", report)
    log.info(
        "prepared %d train, %d val, %d test images (%d excluded) into %d shard(s), %.1f MiB",
        len(splits["train"]),
        len(splits["val"]),
        len(splits["test"]),
        len(report["excluded"]),
        shards["shards"],
        shards["shard_bytes"] / 2**20,
    )
    return report


def _load_tables(raw: RawPaths, cfg: PrepareConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The checked train and test tables, and the count of test rows whose SKU train lacks."""
    train = load_train_table(raw.train_csv)
    test = load_test_table(raw.test_csv, train)
    unseen = check_unseen_test_skus(test, train, raw.test_csv, cfg.max_unseen_test_fraction)
    if unseen["rows"]:
        log.warning(
            "%s: %d test row(s) of %d SKU(s) have no train images (first at line %d); they are kept "
            "with label -1 and count as errors in every metric, as on Kaggle",
            raw.test_csv,
            unseen["rows"],
            unseen["skus"],
            unseen["first_line"],
        )
    log.info(
        "tables valid: %d train rows, %d SKUs, %d test rows", len(train), train["sku"].nunique(), len(test)
    )
    return train, test, unseen


def _pack_images(
    raw: RawPaths, archives: dict, out: Path, train: pd.DataFrame, test: pd.DataFrame, cfg: PrepareConfig
) -> tuple[dict, dict, dict]:
    """Decode, resize and pack every listed image into shards under ``out``.

    ``archives``: per table, :func:`index_zip`'s (prefix, file names). Returns per table (train,
    test) the rows with their shard location, the excluded images with
    the reason, and the shard count and size. Too many exclusions fail before the shards are
    published.
    """
    tables = {"train": (train, raw.train_csv, raw.train_zip, *archives["train"])}
    tables["test"] = (test, raw.test_csv, raw.test_zip, *archives["test"])
    missing = {}
    jobs = []
    for key, (df, _, archive, prefix, files, _unsafe) in tables.items():
        present = (prefix + df["name"]).isin(files)
        missing[key] = ~present
        jobs.append(_Job(key, archive, prefix, df.loc[present, ["name", "line"]]))

    with ShardWriter(out, shard_mb=cfg.shard_mb) as writer:
        limits = ImageLimits.from_prepare(cfg)
        located = process_images(jobs, writer, cfg.size, cfg.jpeg_quality, cfg.n_jobs, limits)
        merged, excluded = {}, {}
        for key, (df, csv, archive, prefix, _, _) in tables.items():
            loc = located[key].reindex(df.index)
            loc.loc[missing[key], ["shard", "reason", "detail"]] = [
                "",
                "missing",
                f"no entry in {archive.name}",
            ]
            m = df.join(loc)
            excluded[key] = _excluded_entries(m, csv, archive, prefix)
            for e in excluded[key]:
                log.warning(
                    "excluded %s line %d %r: %s (%s)",
                    e["file"],
                    e["line"],
                    e["name"],
                    e["reason"],
                    e["detail"],
                )
            _check_bad_fraction(csv, len(df), excluded[key], cfg.max_bad_fraction)
            # reindex put NaN (float) into the missing rows' integer columns; they are dropped here.
            merged[key] = m[m["reason"] == ""].drop(columns=["reason", "detail"]).astype(_INT_COLUMNS)
        # Leaving the block publishes the shards; an exception above discards them instead.
    return merged, excluded, {"shards": writer.n_shards, "shard_bytes": writer.total_bytes}


def _report(
    train, test, kept, splits, excluded, label_map, unseen, shards, unsafe, cfg: PrepareConfig
) -> dict:
    """report.json: counts per split and table, the excluded images and why, the zip-slip entries."""
    counts = {
        "train_csv_rows": len(train),
        "test_csv_rows": len(test),
        **{name: len(df) for name, df in splits.items()},
        "excluded_train": len(excluded["train"]),
        "excluded_test": len(excluded["test"]),
        "skus": len(label_map),
        "groups": int(label_map["group"].nunique()),
        "val_skus": int(splits["val"]["sku"].nunique()),
        "train_skus": int(splits["train"]["sku"].nunique()),
        # SKUs below prepare.val_min_images: every one of their images is trained on, but for the
        # prepare.val_tail_images each of them with at least val_tail_min_images gives to val
        "skus_all_images_trained": int(
            (
                (kept["sku"].value_counts() < max(2, cfg.val_min_images))
                & (
                    (kept["sku"].value_counts() < max(2, cfg.val_tail_min_images))
                    | (cfg.val_tail_images == 0)
                )
            ).sum()
        ),
        "skus_without_train_images": int((label_map["n_train"] == 0).sum()),
        "test_rows_of_unseen_skus": unseen["rows"],
        "test_unseen_skus": unseen["skus"],
        **shards,
    }
    return {
        "counts": counts,
        "excluded": excluded["train"] + excluded["test"],
        "unsafe_entries": unsafe,
    }


@dataclass
class PrepareFiles(StageFiles):
    """The prepare stage's files (its command line: stages/prepare.py)."""

    raw: Path = option("folder with train.zip, test.zip, train.csv, test_kaggletest.csv")
    out: Path = option("output folder (images/, train/val/test/label_map CSVs, report.json)")
