"""The raw-data contract: the four official files ``data/raw`` holds, what ``download`` writes and
``prepare`` reads, and the zip-slip rule both apply to archives."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

TRAIN_ZIP, TEST_ZIP, TRAIN_CSV, TEST_CSV = "train.zip", "test.zip", "train.csv", "test_kaggletest.csv"
#: exactly these files, in this order
RAW_FILES = (TRAIN_ZIP, TEST_ZIP, TRAIN_CSV, TEST_CSV)
#: the columns each table must have (others are allowed and ignored)
RAW_CSV_COLUMNS = {TRAIN_CSV: ("name", "class", "group"), TEST_CSV: ("name", "class", "Usage")}
#: the folder of each archive that holds its images
ZIP_ROOTS = {TRAIN_ZIP: "train/", TEST_ZIP: "test/"}

_DRIVE = re.compile(r"^[A-Za-z]:")


def unsafe_member(name: str) -> bool:
    """An archive entry that would land outside the folder it is extracted to (zip slip):
    an absolute path, a Windows drive or a ``..`` component."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(_DRIVE.match(posix)) or ".." in PurePosixPath(posix).parts
