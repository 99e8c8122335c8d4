"""Packed image storage for prepared images: a few large shard files instead of 197k small ones.

DVC hashes and links every file of an output; at Products-10K scale (197k images) per-file
overhead dominates (dvc issues #7607, #10491). Prepared JPEG bytes are therefore appended to
``images/shard-NNNNN.bin`` files of about ``shard_mb`` MiB each; the CSVs carry
``shard, offset, length`` per row. Reading is a memory-mapped slice plus ``cv2.imdecode``: no
per-image open(), cheap in DataLoader workers (each worker maps the shards lazily).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from products10k.common import DataError, swap_in

SHARD_DIR = "images"
STAGING_PREFIX = ".images.tmp-"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


class ShardWriter:
    """Append encoded images to shards under ``root/images``; ``add`` returns (shard, offset, length).

    The whole ``images`` folder is built in a temporary sibling (``root/.images.tmp-*``) and renamed
    onto ``root/images`` by ``close``, so a killed or failed prepare never leaves a partial or
    complete-looking ``images`` folder behind; leaving the ``with`` block with an exception removes
    the temporary folder. Shards are numbered in ``add`` order, so the same input order gives
    byte-identical shards (DVC then sees an unchanged output).
    """

    def __init__(self, root: str | os.PathLike, shard_mb: float):
        self.root = Path(root)
        self.dir = self.root / SHARD_DIR
        # An existing images folder is kept untouched until close(); a missing one is created empty
        # so that readers see "no shards" rather than "no folder" while the writer works.
        self.dir.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        self.max_bytes = max(1, int(shard_mb * 1024 * 1024))
        self.index = -1
        self._fh = None
        self._size = 0
        self.total_bytes = 0

    def _finish_current(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _open_next(self) -> None:
        self._finish_current()
        self.index += 1
        self._fh = open(self._staging / shard_name(self.index), "wb")  # noqa: SIM115 - closed in _finish_current
        self._size = 0

    def add(self, data: bytes) -> tuple[str, int, int]:
        # Shards are opened lazily: no empty shard when nothing is added.
        if self._fh is None or (self._size > 0 and self._size + len(data) > self.max_bytes):
            self._open_next()
        offset = self._size
        self._fh.write(data)
        self._size += len(data)
        self.total_bytes += len(data)
        return shard_name(self.index), offset, len(data)

    @property
    def n_shards(self) -> int:
        return self.index + 1

    def close(self) -> None:
        """Publish the shards: replace ``root/images`` by the staged folder."""
        if self._staging is None:
            return
        self._finish_current()
        swap_in(self._staging, self.dir)
        self._staging = None

    def abort(self) -> None:
        """Drop everything written so far; ``root/images`` is left as it was."""
        self._finish_current()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_stale_staging(root: str | os.PathLike) -> list[Path]:
    """Delete ``.images.tmp-*`` / ``.images.old-*`` folders a killed ShardWriter left in ``root``."""
    root = Path(root)
    prefixes = (STAGING_PREFIX, ".images.old-")
    stale = [p for p in root.glob(".images.*") if p.is_dir() and p.name.startswith(prefixes)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


class ImageStore:
    """Read prepared images by (shard, offset, length); returns RGB uint8 HxWx3 arrays."""

    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / SHARD_DIR
        self._maps: dict[str, np.memmap] = {}
        self._pid = os.getpid()

    def __getstate__(self):  # DataLoader workers re-map lazily instead of pickling mappings
        return {"dir": self.dir}

    def __setstate__(self, state):
        self.dir = state["dir"]
        self._maps = {}
        self._pid = os.getpid()

    def read_bytes(self, shard: str, offset: int, length: int) -> bytes:
        if self._pid != os.getpid():  # forked: mappings are fine to share, but keep it simple
            self._maps, self._pid = {}, os.getpid()
        mm = self._maps.get(shard)
        if mm is None:
            path = self.dir / shard
            if not path.is_file():
                raise DataError(f"{path}: image shard missing (re-run the prepare stage)")
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps[shard] = mm
        return mm[int(offset) : int(offset) + int(length)]

    def read(
        self, shard: str, offset: int, length: int, flag: int = cv2.IMREAD_COLOR, what: str = "prepared image"
    ) -> np.ndarray:
        """Decode one image as RGB; ``flag`` may ask libjpeg for a reduced-size decode."""
        buf = self.read_bytes(shard, offset, length)
        img = cv2.imdecode(np.asarray(buf), flag)
        if img is None:
            raise DataError(
                f"{self.dir / shard}@{offset}: {what} is not decodable (re-run the prepare stage)"
            )
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def read_row(self, row) -> np.ndarray:
        """Read the image of a prepared-CSV row (a Series/namedtuple/dict with shard/offset/length)."""
        get = row.__getitem__ if isinstance(row, dict) else lambda k: getattr(row, k)
        return self.read(get("shard"), get("offset"), get("length"))
