"""Stage `download`: make --out hold the four official Products-10K files, from data.source.

data.source is `synthetic` (generated, the embedded default), `dir` (a folder you already have,
zipped or extracted) or `kaggle` (the official Kaggle CLI). Run (as dvc.yaml does):

    python stages/download.py --params params.yaml --out data/raw
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
from products10k.raw.download import DownloadFiles, download

log = logging.getLogger("stages.download")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, DownloadFiles).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    # a relative data.dir is relative to params.yaml, wherever the command is started from
    data = StageParams(args.params).typed("data").data
    download(data, DownloadFiles.of(args).out, base_dir=Path(args.params).resolve().parent)


if __name__ == "__main__":
    main()
