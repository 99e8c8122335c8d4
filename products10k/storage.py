"""Packed image storage for prepared images: a few large shard files instead of 197k small ones.

DVC hashes and links every file of an output; at Products-10K scale (197k images) per-file
overhead dominates (dvc issues #7607, #10491). Prepared JPEG bytes are therefore appended to
``images/shard-NNNNN.bin`` files of about ``shard_mb`` MiB each; the CSVs carry
``shard, offset, length`` per row. Reading is a memory-mapped slice plus ``cv2.imdecode``: no
per-image open(), cheap in DataLoader workers (each worker maps the shards lazily).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

SHARD_DIR = "images"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


class ShardWriter:
    """Append encoded images to shards under ``root/images``; ``add`` returns (shard, offset, length).

    Shards are written under a temporary name and renamed on ``close`` so a killed prepare never
    leaves a complete-looking shard behind.
    """

    def __init__(self, root: str | os.PathLike, shard_mb: float = 256.0):
        self.dir = Path(root) / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max(1, int(shard_mb * 1024 * 1024))
        self.index = -1
        self._fh = None
        self._size = 0
        self._open_next()

    def _tmp(self, index: int) -> Path:
        return self.dir / (".tmp-" + shard_name(index))

    def _finish_current(self) -> None:
        if self._fh is not None:
            self._fh.close()
            os.replace(self._tmp(self.index), self.dir / shard_name(self.index))
            self._fh = None

    def _open_next(self) -> None:
        self._finish_current()
        self.index += 1
        self._fh = open(self._tmp(self.index), "wb")  # noqa: SIM115 - closed in _finish_current
        self._size = 0

    def add(self, data: bytes) -> tuple[str, int, int]:
        if self._size > 0 and self._size + len(data) > self.max_bytes:
            self._open_next()
        offset = self._size
        self._fh.write(data)
        self._size += len(data)
        return shard_name(self.index), offset, len(data)

    def close(self) -> None:
        self._finish_current()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fh is not None:
            self._fh.close()
            self._tmp(self.index).unlink(missing_ok=True)
            self._fh = None


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
                raise FileNotFoundError(f"{path}: image shard missing (re-run the prepare stage)")
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            self._maps[shard] = mm
        return mm[int(offset) : int(offset) + int(length)]

    def read(self, shard: str, offset: int, length: int) -> np.ndarray:
        buf = self.read_bytes(shard, offset, length)
        img = cv2.imdecode(np.asarray(buf), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{self.dir / shard}@{offset}: prepared image is not decodable")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def read_row(self, row) -> np.ndarray:
        """Read the image of a prepared-CSV row (a Series/namedtuple/dict with shard/offset/length)."""
        get = row.__getitem__ if isinstance(row, dict) else lambda k: getattr(row, k)
        return self.read(get("shard"), get("offset"), get("length"))
