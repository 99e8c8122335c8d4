"""Stage `folds`: prepare's single val split passed through (cv.folds 0), or K folds over every
training image, stratified by SKU (products10k/folds.py).

Run (as dvc.yaml does):

    python stages/folds.py --params params.yaml --train data/prepared/train.csv \
        --val data/prepared/val.csv --out-train data/folds/train.csv --out-val data/folds/val.csv
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
from products10k.config import CVConfig, load_section
from products10k.folds import write_folds

log = logging.getLogger("stages.folds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, type=Path, help="params file (section 'cv')")
    parser.add_argument("--train", required=True, type=Path, help="prepared train.csv")
    parser.add_argument("--val", required=True, type=Path, help="prepared val.csv")
    parser.add_argument("--out-train", required=True, type=Path, help="the training table every phase reads")
    parser.add_argument("--out-val", required=True, type=Path, help="the val table (under cv: every image)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    cfg = load_section(args.params, "cv", CVConfig)
    write_folds(args.train, args.val, args.out_train, args.out_val, cfg.folds, cfg.seed)


if __name__ == "__main__":
    main()
