"""Enrolled index versions on disk: ``vNNNN`` folders under ``--versions``, written once, never replaced.

products10k-serve keeps its enrolments here as data: it starts from the newest complete version,
holds an exclusive lock on the folder while it runs (a second service on the same folder stops at
start, naming the holder), writes each new version staged and renamed into place whole (a killed
enrolment leaves only a staging folder, removed at the next start), and removes versions beyond the
newest N once no request reads them. The input index (version 0) is never written or removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from products10k.common import Products10kError
from products10k.deploy.runtime import ExportedModel, check_same_model
from products10k.imaging.images import ImageLimits
from products10k.knn import THUMBS_DIR, Gallery, enrol, load_gallery, save_gallery, thumbnail_jpeg

log = logging.getLogger("products10k.serve")

#: an index version's folder under --versions
VERSION_DIR = re.compile(r"v(\d{4,})")
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class IndexVersion:
    """One immutable version of the index: what a request reads once and keeps to its end."""

    number: int
    folder: Path
    gallery: Gallery


def list_versions(versions_dir: Path) -> list[tuple[int, Path]]:
    """The complete version folders under ``versions_dir``, oldest first (staging folders are not)."""
    if not versions_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in versions_dir.iterdir() if (m := VERSION_DIR.fullmatch(p.name))]
    return sorted(found)


def newest_version(model: ExportedModel, index_dir: Path, versions_dir: Path) -> IndexVersion:
    """The newest version under ``versions_dir``, else the input index as version 0; said in the log.

    Staging folders a killed enrolment left are removed (they were never acknowledged)."""
    for leftover in versions_dir.glob("*.tmp") if versions_dir.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    versions = list_versions(versions_dir)
    number, folder = versions[-1] if versions else (0, index_dir)
    gallery = load_gallery(folder)
    check_same_model(model, gallery, folder)
    if number:
        log.info("starting from index version %d (%s): the newest under %s", number, folder, versions_dir)
    else:
        log.info(
            "starting from the input index %s (no enrolled versions under %s yet)", index_dir, versions_dir
        )
    return IndexVersion(number, folder, gallery)


def hold_versions_lock(versions_dir: Path):
    """An exclusive lock on ``versions_dir`` for this process's lifetime (the open file is returned
    and must be kept): a second service on the same folder would overwrite this one's versions."""
    versions_dir.mkdir(parents=True, exist_ok=True)
    handle = open(versions_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise Products10kError(
            f"{versions_dir} is held by {holder}: one service at a time writes a versions folder "
            "(stop it, or give this one its own --versions)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def prune_versions(versions_dir: Path, newest: int, keep: int, in_use: set[int]) -> None:
    """Remove the versions older than the newest ``keep`` that are not ``in_use`` (read by a request)."""
    for number, folder in list_versions(versions_dir):
        if number <= newest - keep and number not in in_use:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed index version %d (older than the newest %d)", number, keep)


def build_version(
    current: IndexVersion, folder: Path, vectors, sku: int, names, photo: bytes, limits: ImageLimits
) -> Gallery:
    """A copy of ``current`` with the images added, written to ``folder`` (staged, then renamed into
    place whole: a killed enrolment leaves no version folder, only a staging one the next removes)."""
    if folder.exists():  # a version once written is never replaced
        raise RuntimeError(f"{folder} exists: the versions lock should have made this impossible")
    gallery = load_gallery(current.folder)  # a private copy: the current version stays as it is
    added = enrol(gallery, vectors, np.full(len(vectors), sku, np.int64), [f"enrolled:{n}" for n in names])
    gallery.meta.setdefault("enrolled", []).append({"source": "products10k-serve", **added})
    known = (current.folder / THUMBS_DIR / f"{sku}.jpg").is_file()
    thumbs = {} if known else {sku: thumbnail_jpeg(photo, limits)}
    save_gallery(gallery, folder, thumbs=thumbs, thumbs_from=current.folder)
    return gallery
