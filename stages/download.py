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

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k.common import run_stage
from products10k.config import DataConfig, load_section
from products10k.raw.download import download

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
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    cfg = load_section(args.params, "data", DataConfig)
    # A relative data.dir is relative to params.yaml, wherever the command is started from.
    download(cfg, args.out, base_dir=Path(args.params).resolve().parent)


if __name__ == "__main__":
    main()
