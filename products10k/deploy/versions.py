"""Enrolled index versions on disk: ``vNNNN`` folders under ``--versions``, written once, never replaced.

products10k-serve keeps its enrolments here as data. The input index (``--index``) is version 0 and is
never written or removed. Enrolment ``N`` writes folder ``vNNNN`` of one of two kinds:

- **a segment** (``delta.json`` + ``segment.npz`` + the thumbnail of a SKU new to the index): only
  the vectors, SKU ids and names this enrolment added, and which version it extends. Its cost does not
  depend on the index's size: a 5-image enrolment writes ~30 KB whether the index holds 600 images
  or 142,000 (benchmarks/bench_serve.py ``--enrol-scale``).
- **a compacted version** (a whole index folder, as the index stage writes it), once ``compact_every``
  segments have piled up on a base: the version is then whole again, start-up and followers read
  one index instead of a long chain, and the chain before it can be pruned.

Version ``N`` is therefore its base (the newest compacted version at or below it, or the input index)
plus every segment after the base up to ``N``. In memory a version is the base's Faiss index, shared
by every version on that base and never modified, beside a small flat index of the enrolled vectors
(``faiss.IndexShards``): an enrolment copies only the enrolled part, so requests in flight keep
reading the version they started with.

Writers and followers. One process writes a versions folder: it holds an exclusive lock while it
runs (a second writer stops at start, naming the holder), writes each version staged and renamed
into place whole (a killed enrolment leaves only a staging folder, removed at the writer's next
start), and removes versions no longer needed once no request reads them: those below the base of
the newest ``keep`` versions. Any number of followers (``products10k-serve --follow``) read the same
folder without the lock: they never write, and pick up each version published, reading only the
segments they lack.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from products10k import common
from products10k.common import Products10kError
from products10k.deploy.runtime import ExportedModel, check_same_model
from products10k.knn import THUMBS_DIR, Gallery, enrol, load_gallery, save_gallery

log = logging.getLogger("products10k.serve")

#: an index version's folder under --versions
VERSION_DIR = re.compile(r"v(\d{4,})")
LOCK_FILE = ".lock"
DELTA_FILE = "delta.json"
SEGMENT_FILE = "segment.npz"
#: what a write error of one of these numbers means: the device holding --versions is full
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class DiskFull(Products10kError):
    """The enrolment could not be written: no space left (or a quota) on the versions' device."""


@dataclass(frozen=True)
class Delta:
    """What was enrolled since a version's base: the segments' rows, oldest first."""

    vectors: np.ndarray  # (n, D) float32
    skus: np.ndarray  # (n,) int64 SKU ids
    names: np.ndarray  # (n,) str
    records: tuple = ()  # each enrolment's record (meta.json's "enrolled" entries)
    thumbs: dict = field(default_factory=dict)  # SKU id -> thumbnail path, for SKUs new since the base

    def plus(self, vectors, skus, names, record: dict, thumbs: dict) -> Delta:
        return Delta(
            np.concatenate([self.vectors, np.asarray(vectors, np.float32)]),
            np.concatenate([self.skus, np.asarray(skus, np.int64)]),
            np.concatenate([self.names, np.asarray(names).astype(str)]),
            (*self.records, record),
            {**self.thumbs, **thumbs},
        )


@dataclass(frozen=True)
class IndexVersion:
    """One immutable version of the index: what a request reads once and keeps to its end."""

    number: int
    folder: Path
    gallery: Gallery
    base: int  # the version whose whole index this one extends (0: the input index)
    base_gallery: Gallery  # that index, shared by every version on it
    base_folder: Path
    delta: Delta

    def thumbnail(self, sku: int) -> Path:
        """Where SKU ``sku``'s thumbnail is (the path may not exist: a SKU without one)."""
        return self.delta.thumbs.get(sku) or self.base_folder / THUMBS_DIR / f"{sku}.jpg"


def compose(base: Gallery, delta: Delta) -> Gallery:
    """The base's gallery with ``delta`` enrolled, the base left as it is: labels of new SKUs follow
    the base's in the order they were first enrolled, as ``knn.enrol`` would have given them."""
    if not len(delta.skus):
        return base
    added = Gallery(faiss.IndexFlatIP(base.index.d), np.zeros(0, np.int64), np.zeros(0, str), base.skus, {})
    enrol(added, delta.vectors, delta.skus, delta.names)
    index = faiss.IndexShards(base.index.d, False, True)  # ids: the base's, then the delta's after them
    index.add_shard(base.index)
    index.add_shard(added.index)
    meta = {**base.meta, "enrolled": [*base.meta.get("enrolled", []), *delta.records]}
    labels = np.concatenate([base.labels, added.labels])
    gallery = Gallery(index, labels, np.concatenate([base.names, added.names]), added.skus, meta)
    # the centroid rule's prototypes: the base's (read from it once, shared by every version on it)
    # plus the delta's, so an enrolment never reads the whole index back
    protos = base.prototypes() if base.meta.get("vote") == "centroid" else base.cached_prototypes
    return gallery.with_prototypes(protos and protos.plus(delta.vectors, added.labels, added.num_classes))


def list_versions(versions_dir: Path) -> list[tuple[int, Path]]:
    """The complete version folders under ``versions_dir``, oldest first (staging folders are not)."""
    if not versions_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in versions_dir.iterdir() if (m := VERSION_DIR.fullmatch(p.name))]
    return sorted(found)


def version_dir(versions_dir: Path, number: int) -> Path:
    return versions_dir / f"v{number:04d}"


def read_delta(folder: Path) -> dict | None:
    """A segment folder's ``delta.json``; None for a whole index folder."""
    path = folder / DELTA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Products10kError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def base_of(versions_dir: Path, number: int) -> int:
    """The version whose whole index version ``number`` extends (itself for a whole one)."""
    if number == 0:
        return 0
    delta = read_delta(version_dir(versions_dir, number))
    return number if delta is None else int(delta["base"])


def hold_versions_lock(versions_dir: Path):
    """An exclusive lock on ``versions_dir`` for this process's lifetime (the open file is returned
    and must be kept): a second writer on the same folder would overwrite this one's versions."""
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
            "(stop it, give this one its own --versions, or run it as a reader with --follow)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def load_version(
    model: ExportedModel, index_dir: Path, versions_dir: Path, number: int, previous: IndexVersion | None
) -> IndexVersion:
    """Version ``number`` from disk; from ``previous`` (read no segment twice) when it is on the same
    base and not newer."""
    base = base_of(versions_dir, number)
    if previous is not None and previous.base == base and previous.number <= number:
        start, base_gallery, base_folder, delta = (
            previous.number + 1,
            previous.base_gallery,
            previous.base_folder,
            previous.delta,
        )
    else:
        base_folder = version_dir(versions_dir, base) if base else index_dir
        base_gallery = load_gallery(base_folder)
        check_same_model(model, base_gallery, base_folder)
        dim = base_gallery.index.d
        start, delta = (
            base + 1,
            Delta(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0, str)),
        )
    for n in range(start, number + 1):
        delta = _read_segment(version_dir(versions_dir, n), delta)
    gallery = compose(base_gallery, delta)
    folder = version_dir(versions_dir, number) if number else index_dir
    return IndexVersion(number, folder, gallery, base, base_gallery, base_folder, delta)


def _read_segment(folder: Path, delta: Delta) -> Delta:
    record = read_delta(folder)
    if record is None:
        raise Products10kError(f"{folder}: a segment was expected here (its {DELTA_FILE} is missing)")
    try:
        with np.load(folder / SEGMENT_FILE, allow_pickle=False) as data:
            vectors, skus, names = data["vectors"], data["skus"], data["names"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise Products10kError(
            f"{folder / SEGMENT_FILE}: cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    thumbs = {int(p.stem): p for p in (folder / THUMBS_DIR).glob("*.jpg")}
    return delta.plus(vectors, skus, names, record["enrolled"], thumbs)


def write_segment(
    versions_dir: Path, current: IndexVersion, vectors, sku: int, names, record: dict, thumb: bytes | None
) -> Path:
    """Version ``current.number + 1`` as a segment folder: staged, synced and renamed into place whole
    (a killed enrolment leaves only a staging folder); DiskFull when the device is full, the staging
    folder then removed at once."""
    folder = version_dir(versions_dir, current.number + 1)
    staging = folder.with_name(folder.name + ".tmp")

    def write(name: str, data: bytes) -> None:
        path = staging / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # acknowledged means on disk: the rename below must not outrun the data

    with _disk_full_said(versions_dir, staging):
        if folder.exists():  # a version once written is never replaced
            raise RuntimeError(f"{folder} exists: the versions lock should have made this impossible")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / THUMBS_DIR).mkdir(parents=True)
        buffer = _npz(vectors=np.asarray(vectors, np.float32), skus=np.full(len(vectors), sku, np.int64),
                      names=np.asarray(names).astype(str))  # fmt: skip
        write(SEGMENT_FILE, buffer)
        if thumb is not None:
            write(f"{THUMBS_DIR}/{sku}.jpg", thumb)
        meta = {"format": 1, "base": current.base, "parent": current.number, "enrolled": record}
        write(DELTA_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        common.pause_point(f"publish {folder.parent.name}/{folder.name}")
        os.replace(staging, folder)
        _fsync_dir(versions_dir)
    return folder


def write_whole(
    versions_dir: Path, number: int, current: IndexVersion, delta: Delta, thumbs: dict[int, bytes]
) -> Gallery:
    """Version ``number`` (``current``'s base with ``delta``) written whole, every vector in one flat
    index and every thumbnail in its folder: the base of the versions after it. Returns that
    gallery; DiskFull as :func:`write_segment`."""
    folder = version_dir(versions_dir, number)
    base = current.base_gallery
    flat = faiss.IndexFlatIP(base.index.d)
    flat.add(base.index.reconstruct_n(0, base.index.ntotal))
    flat.add(np.ascontiguousarray(delta.vectors, np.float32))
    gallery = compose(base, delta)
    whole = Gallery(flat, gallery.labels, gallery.names, gallery.skus, gallery.meta)
    whole.with_prototypes(gallery.cached_prototypes)
    carried = {sku: path.read_bytes() for sku, path in delta.thumbs.items()}
    with _disk_full_said(versions_dir):  # save_gallery removes its own staging folder on a failure
        save_gallery(whole, folder, thumbs={**carried, **thumbs}, thumbs_from=current.base_folder)
        _fsync_dir(versions_dir)
    return whole


@contextlib.contextmanager
def _disk_full_said(versions_dir: Path, staging: Path | None = None):
    """A write error inside the block removes ``staging`` at once (not at the next start); a full
    device (or quota) becomes DiskFull, which the service answers 507."""
    try:
        yield
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in DISK_FULL:
            raise DiskFull(f"{versions_dir}: {exc.strerror}") from None
        raise


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionStore:
    """The versions one service reads: as the versions folder's writer, or as a follower (read only).

    ``current`` is the version new requests read; a request marks the version it reads
    (:meth:`reading`) so that pruning leaves it alone until the request ends.
    """

    def __init__(
        self,
        model: ExportedModel,
        index_dir: Path,
        versions_dir: Path,
        *,
        keep: int = 3,
        compact_every: int = 256,
        follow: bool = False,
    ):
        self.model, self.index_dir, self.versions_dir = model, index_dir, versions_dir
        self.keep, self.compact_every, self.follow = keep, compact_every, follow
        self.readers: Counter[int] = Counter()
        if not follow:
            self._lock = hold_versions_lock(versions_dir)
            for leftover in versions_dir.glob("*.tmp"):  # a killed enrolment's: never acknowledged
                shutil.rmtree(leftover, ignore_errors=True)
        self.current = self._load_newest(None)
        said = f"index version {self.current.number}" if self.current.number else "the input index"
        role = "following" if follow else "writing"
        log.info("starting from %s (%s %s)", said, role, versions_dir)

    def _load_newest(self, previous: IndexVersion | None) -> IndexVersion:
        versions = list_versions(self.versions_dir)
        number = versions[-1][0] if versions else 0
        return load_version(self.model, self.index_dir, self.versions_dir, number, previous)

    # -- followers

    def newer(self) -> IndexVersion | None:
        """A version newer than ``current`` read from disk (None when there is none): for a follower,
        on a worker thread; :meth:`publish` then swaps it in on the event loop."""
        versions = list_versions(self.versions_dir)
        if not versions or versions[-1][0] <= self.current.number:
            return None
        return self._load_newest(self.current)

    # -- the writer

    def enrol(self, vectors, sku: int, names, thumb: bytes | None) -> IndexVersion:
        """The next version with ``vectors`` of SKU ``sku`` added, written to disk (a segment, or the
        whole index once ``compact_every`` segments sit on the base); not yet swapped in
        (:meth:`publish`). ``thumb``: the SKU's thumbnail, kept if it has none yet."""
        current, number = self.current, self.current.number + 1
        names = [f"enrolled:{n}" for n in names]
        new = int(not np.isin(sku, current.gallery.skus))
        record = {"source": "products10k-serve", "images": len(names), "skus": 1, "new_skus": new}
        thumb = None if current.thumbnail(sku).is_file() else thumb
        if number - current.base < self.compact_every:
            folder = write_segment(self.versions_dir, current, vectors, sku, names, record, thumb)
            delta = _read_segment(folder, current.delta)  # what a restart reads: no second truth
            gallery = compose(current.base_gallery, delta)
            return IndexVersion(
                number, folder, gallery, current.base, current.base_gallery, current.base_folder, delta
            )
        delta = current.delta.plus(vectors, np.full(len(names), sku), names, record, {})
        whole = write_whole(self.versions_dir, number, current, delta, {sku: thumb} if thumb else {})
        folder = version_dir(self.versions_dir, number)
        log.info(
            "index version %d written whole (%d images): the base of the next ones",
            number,
            whole.index.ntotal,
        )
        empty = Delta(delta.vectors[:0], delta.skus[:0], delta.names[:0])
        return IndexVersion(number, folder, whole, number, whole, folder, empty)

    def publish(self, version: IndexVersion) -> None:
        """Swap ``version`` in (one assignment: requests in flight keep theirs), then prune."""
        self.current = version
        self.prune()

    @contextlib.contextmanager
    def reading(self, version: IndexVersion):
        """Mark ``version`` as read by a request until it ends: pruning leaves it alone till then."""
        self.readers[version.number] += 1
        try:
            yield
        finally:
            self.readers[version.number] -= 1
            if not self.readers[version.number]:
                del self.readers[version.number]
                # only a version a prune had to leave for its readers is due now: the current ones are
                # not, and this runs at the end of every request
                if version.base < self.current.base:
                    self.prune()

    def prune(self) -> None:
        """Remove the versions below the base of the oldest version still needed: the newest
        ``keep`` and those requests read. The writer only; never the input index (version 0).
        Runs on the event loop: no request can start reading a version while it is judged."""
        if self.follow:
            return
        oldest = min([max(self.current.number - self.keep + 1, 0), *self.readers])
        floor = base_of(self.versions_dir, oldest)
        for number, folder in list_versions(self.versions_dir):
            if number < floor:
                shutil.rmtree(folder, ignore_errors=True)
                log.info("removed index version %d (below the base of the versions kept)", number)
