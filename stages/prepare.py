"""Stage `prepare`: validate the raw tables, pre-resize every image once, split train/val.

Run (as dvc.yaml does):

    python stages/prepare.py --params params.yaml --raw data/raw --out data/prepared

Reads the ``prepare`` section of the params file; see products10k/prepared/prepare.py for the contract.
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
from products10k.config import PrepareConfig, load_section
from products10k.prepared.prepare import prepare

log = logging.getLogger("stages.prepare")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params file (section 'prepare')")
    parser.add_argument(
        "--raw", required=True, help="folder with train.zip, test.zip, train.csv, test_kaggletest.csv"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (images/, train/val/test/label_map CSVs, report.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    prepare(args.raw, args.out, load_section(args.params, "prepare", PrepareConfig))


if __name__ == "__main__":
    main()
