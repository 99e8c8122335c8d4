"""Zip archives read within bounds the project sets, from the central directory, before inflating.

A 300 KB zip can hold a member that inflates to 300 MB, or thousands of members. So every reader of
a user's zip (prepare's train.zip/test.zip, products10k-predict, the service's uploads) lists the
members from the central directory first, refuses an archive with more members or more declared
bytes than its caller allows (:func:`check_members`), and reads a member only if its declared size
is within the per-file limit, never past that size (:func:`read_member`: a header that lies cannot
inflate further, and zipfile's CRC check at the member's end catches the lie).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import zipfile
import zlib
from pathlib import Path

from products10k.imaging.defects import ImageDefect

#: what opening a zip or reading one member can raise: a bad CRC or a cut-off archive (BadZipFile,
#: zlib.error, EOFError, OSError), an encrypted member (RuntimeError: password required), a compression
#: method zipfile lacks (NotImplementedError: implode, AES ...), and what the mutation fuzzer
#: (tests/imaging/test_fuzz.py) found zipfile raising on a corrupt directory: a negative seek
#: (ValueError), a short field (struct.error), an offset past the end (OverflowError, IndexError)
ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    struct.error,
    OverflowError,
    IndexError,
)
#: file name suffixes read as images (imaging/headers.py reads each of these formats' size)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
NESTED_ZIP = "unsupported: a zip inside a zip (extract it and pass the inner archive)"


class ArchiveTooLarge(Exception):
    """An archive over its caller's member count or inflated total: the whole archive is refused."""


def image_members(archive: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """(member, error) of a zip's image members and nested zips, sorted by name; error is "" for an
    image, NESTED_ZIP for a zip (a row with the reason, not silently skipped)."""
    out = []
    for info in sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename):
        suffix = Path(info.filename).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            out.append((info, ""))
        elif suffix == ".zip":
            out.append((info, NESTED_ZIP))
    return out


def check_members(members: list[zipfile.ZipInfo], max_members: int, max_total_bytes: int) -> None:
    """ArchiveTooLarge when there are more than ``max_members`` members or their declared sizes
    add up past ``max_total_bytes`` (checked before anything is inflated)."""
    if len(members) > max_members:
        raise ArchiveTooLarge(f"{len(members)} members, over the limit of {max_members}")
    total = 0
    for info in members:
        total += info.file_size
        if total > max_total_bytes:
            raise ArchiveTooLarge(
                f"its members declare over {max_total_bytes} bytes inflated (the limit), "
                f"{info.filename!r} included"
            )


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """The member's bytes, read up to its declared size only; ImageDefect ``too-large`` when that
    size is over ``max_bytes``, ``unreadable`` when the member cannot be read or is not that size."""
    if info.file_size > max_bytes:
        raise ImageDefect(
            "too-large", f"zip member {info.filename!r} declares {info.file_size} bytes, over {max_bytes}"
        )
    try:
        with archive.open(info) as f:
            data = f.read(info.file_size + 1)
    except ZIP_READ_ERRORS as exc:
        raise ImageDefect("unreadable", f"zip entry {info.filename!r}: {type(exc).__name__}: {exc}") from exc
    if len(data) != info.file_size:
        raise ImageDefect(
            "unreadable",
            f"zip entry {info.filename!r} holds {len(data)} bytes, not its declared {info.file_size}",
        )
    return data


def read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """A regular file's bytes; ImageDefect ``too-large`` over ``max_bytes`` (judged on its size before
    it is read: the limit a zip member is held to by :func:`read_member`), ``unreadable`` for what is
    not a regular file.

    The file is opened first and judged by ``fstat`` of what was opened (a check of the path before
    opening could be raced): a FIFO, a device such as /dev/zero, a socket or a folder, named directly
    or through a symlink, reports a size of 0 and would be read forever. ``O_NONBLOCK`` keeps the
    open itself from waiting for a FIFO's writer; reading never goes past ``max_bytes`` + 1.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket (or a device with no driver): nothing to read
            raise ImageDefect("unreadable", "not a regular file (a socket or an absent device)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageDefect("unreadable", f"not a regular file ({_file_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise ImageDefect("too-large", f"{info.st_size} bytes, over the limit of {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew between the fstat and the read
        raise ImageDefect("too-large", f"over {max_bytes} bytes (the file grew while it was read)")
    return data


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


# One open ZipFile per archive and thread: a ZipFile must not be read from several threads at once
# (its shared file position and reference count are not thread-safe), so every worker thread of the
# prepare stage opens its own handle, reused across the chunks it is given. A worker thread's handles
# are closed with the thread-local storage when the pool shuts down.
_LOCAL = threading.local()


def open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    """This thread's open handle of the zip at ``path`` (its central directory is parsed once)."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)  # a rewritten file at the same path is a new archive
    zips = getattr(_LOCAL, "zips", None)
    if zips is None:
        zips = _LOCAL.zips = {}
    zf = zips.get(key)
    if zf is None:
        zf = zipfile.ZipFile(path)
        zips[key] = zf
    return zf
