"""Stage `download`: make --out hold the four official Products-10K files, from data.source.

data.source is `synthetic` (generated, the embedded default), `dir` (a folder you already have,
zipped or extracted) or `kaggle` (the official Kaggle CLI). Run (as dvc.yaml does):

    python stages/download.py --params params.yaml --out data/raw
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from products10k.config import load_section
from products10k.download import download
from products10k.errors import Products10kError
from products10k.logs import setup_logging
from products10k.params import DataConfig

log = logging.getLogger("stages.download")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params file (section 'data')")
    parser.add_argument(
        "--out", required=True, help="folder to fill with train.zip, test.zip, train.csv, test_kaggletest.csv"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    try:
        cfg = load_section(args.params, "data", DataConfig)
        # A relative data.dir is relative to params.yaml, wherever the command is started from.
        download(cfg, args.out, base_dir=Path(args.params).resolve().parent)
    except Products10kError as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
