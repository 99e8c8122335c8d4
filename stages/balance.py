"""Stage `balance`: the paper's balanced subset (at most balance.per_class random images per SKU).

Run (as dvc.yaml does):

    python stages/balance.py --params params.yaml --train data/prepared/train.csv \
        --out data/prepared/balanced.csv
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
from products10k.config import BalanceConfig, load_section
from products10k.prepared.balance import balance

log = logging.getLogger("stages.balance")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="params file (section 'balance')")
    parser.add_argument("--train", required=True, help="prepared train.csv")
    parser.add_argument("--out", required=True, help="balanced CSV to write (same columns as --train)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    balance(args.train, args.out, load_section(args.params, "balance", BalanceConfig))


if __name__ == "__main__":
    main()
