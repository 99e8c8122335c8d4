"""Export the chosen model (export.member, export.phase) to ONNX with its preprocessing; check it
against PyTorch with onnxruntime.

Run::

    python stages/export.py --params params.yaml \
        --checkpoint models/m0/finetune_accuracy/best.pt --label-map data/prepared/label_map.csv \
        --test data/prepared/test.csv --images-root data/prepared \
        --out models/export --metrics metrics/export.json
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k.common import ConfigError, run_stage
from products10k.config.stage import StageParams, require_member, stage_parser
from products10k.dist.devices import seed_everything
from products10k.export.export import ExportFiles, export_model

log = logging.getLogger("stages.export")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, ExportFiles).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    params = StageParams(args.params)
    s = params.typed("export", "prepare", evaluated=["export.phase"])
    require_member(s.export.member, params.tree, params.where, key="export.member")
    expected = Path("models") / s.export.member / s.export.phase / "best.pt"
    if args.checkpoint.parts[-3:] != expected.parts[-3:]:
        # dvc.yaml's cmd and export.member/phase must name the same checkpoint
        raise ConfigError(f"--checkpoint {args.checkpoint} is not {expected} (export.member/export.phase)")
    seed_everything(0)
    export_model(ExportFiles.of(args), s.export, s.prepare)


if __name__ == "__main__":
    main()
