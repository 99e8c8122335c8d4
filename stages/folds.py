"""Stage `folds`: prepare's single val split passed through (cv.folds 0), or K folds over every
training image, stratified by SKU (products10k/folds.py).

Run (as dvc.yaml does):

    python stages/folds.py --params params.yaml --train data/prepared/train.csv \
        --val data/prepared/val.csv --out-train data/folds/train.csv --out-val data/folds/val.csv
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
from products10k.folds import FoldsFiles, write_folds

log = logging.getLogger("stages.folds")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, FoldsFiles).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    files, cv = FoldsFiles.of(args), StageParams(args.params).typed("cv").cv
    write_folds(files.train, files.val, files.out_train, files.out_val, cv.folds, cv.seed)


if __name__ == "__main__":
    main()
