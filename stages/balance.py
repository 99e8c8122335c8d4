"""Stage `balance`: the paper's balanced subset (at most balance.per_class random images per SKU).

Run (as dvc.yaml does):

    python stages/balance.py --params params.yaml --train data/prepared/train.csv \
        --out data/prepared/balanced.csv
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k.common import run_stage
from products10k.config.stage import StageParams, stage_parser
from products10k.prepared.balance import BalanceFiles, balance

log = logging.getLogger("stages.balance")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, BalanceFiles).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    files = BalanceFiles.of(args)
    balance(files.train, files.out, StageParams(args.params).typed("balance").balance)


if __name__ == "__main__":
    main()
