"""Export the chosen model (export.member, export.phase) to ONNX with its preprocessing; check it
against PyTorch with onnxruntime.

Run::

    python stages/export.py --params params.yaml \
        --checkpoint models/m0/finetune_accuracy/best.pt --label-map data/prepared/label_map.csv \
        --test data/prepared/test.csv --images-root data/prepared \
        --out models/export --metrics metrics/export.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k.common import ConfigError, run_stage, seed_everything
from products10k.config import EvaluateConfig, ExportConfig, PrepareConfig, load_yaml, member_names, section
from products10k.export.export import export_model
from products10k.scores import require_evaluated_phase

log = logging.getLogger("stages.export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", required=True, type=Path)
    p.add_argument("--checkpoint", required=True, type=Path, help="best.pt of export.member/export.phase")
    p.add_argument("--label-map", required=True, type=Path)
    p.add_argument("--test", required=True, type=Path, help="prepared test CSV (images for the check)")
    p.add_argument("--images-root", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="output folder: model.onnx, preprocess.json")
    p.add_argument("--metrics", required=True, type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    params = load_yaml(args.params)
    cfg = section(params, "export", ExportConfig, where=args.params)
    if cfg.member not in member_names(params, args.params):
        raise ConfigError(f"{args.params}: export.member '{cfg.member}' is not in ensemble.members")
    phases = section(params, "evaluate", EvaluateConfig, where=args.params).phases
    require_evaluated_phase(cfg.phase, phases, args.params, key="export.phase")
    expected = Path("models") / cfg.member / cfg.phase / "best.pt"
    if args.checkpoint.parts[-3:] != expected.parts[-3:]:
        # dvc.yaml's cmd and export.member/phase must name the same checkpoint
        raise ConfigError(f"--checkpoint {args.checkpoint} is not {expected} (export.member/export.phase)")
    seed_everything(0)
    export_model(
        checkpoint=args.checkpoint,
        label_map_path=args.label_map,
        test_path=args.test,
        images_root=args.images_root,
        out=args.out,
        metrics_path=args.metrics,
        cfg=cfg,
        prepare=section(params, "prepare", PrepareConfig, where=args.params),
    )


if __name__ == "__main__":
    main()
