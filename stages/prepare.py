"""Stage `prepare`: validate the raw tables, pre-resize every image once, split train/val.

Run (as dvc.yaml does):

    python stages/prepare.py --params params.yaml --raw data/raw --out data/prepared

Reads the ``prepare`` section of the params file; see products10k/prepared/prepare.py for the contract.
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
from products10k.prepared.prepare import PrepareFiles, prepare

log = logging.getLogger("stages.prepare")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, PrepareFiles).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    files = PrepareFiles.of(args)
    prepare(files.raw, files.out, StageParams(args.params).typed("prepare").prepare)


if __name__ == "__main__":
    main()
