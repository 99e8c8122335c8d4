"""Evaluate one ensemble member's checkpoint of one training phase.

Run (dvc.yaml generates one stage per member x phase, e.g. ``evaluate@m0-finetune_accuracy``)::

    python stages/evaluate.py --params params.yaml --member m0 --phase finetune_accuracy \
        --checkpoint models/m0/finetune_accuracy/best.pt --label-map data/prepared/label_map.csv \
        --train data/prepared/train.csv --val data/prepared/val.csv --test data/prepared/test.csv \
        --images-root data/prepared --metrics metrics/m0/finetune_accuracy.json \
        --predictions predictions/finetune_accuracy/m0.npz \
        --per-group plots/m0/finetune_accuracy/per_group.csv \
        --confused plots/m0/finetune_accuracy/confused_pairs.csv \
        --gallery plots/m0/finetune_accuracy/errors.png

dvc.yaml starts it through ``products10k.dist.launch``: with ``dist.nproc_per_node > 1``
it runs under torchrun, each rank (one GPU each) predicts its shard of the rows and rank 0
merges them and writes the outputs, identical to a single process's.
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
from products10k.config import (
    CVConfig,
    DistConfig,
    EvaluateConfig,
    TTAConfig,
    load_yaml,
    member_names,
    section,
)
from products10k.dist.group import process_group
from products10k.evaluation.evaluate import EvalOutputs, evaluate_phase
from products10k.scores import require_evaluated_phase

log = logging.getLogger("stages.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", required=True, type=Path)
    p.add_argument("--member", required=True, help="ensemble member name (ensemble.members)")
    p.add_argument("--phase", required=True, help="training phase whose checkpoint is evaluated")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--label-map", required=True)
    p.add_argument("--train", required=True, help="train CSV (gallery exemplars of each SKU)")
    p.add_argument("--val", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--images-root", required=True, help="folder holding images/shard-*.bin")
    p.add_argument("--metrics", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--per-group", required=True)
    p.add_argument("--confused", required=True)
    p.add_argument("--gallery", required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    params = load_yaml(args.params)
    dist_cfg = section(params, "dist", DistConfig, where=args.params)
    with process_group(dist_cfg, params, str(args.params)) as info:  # one process unless torchrun's
        # typed after the ranks compared their params: a value one node alone holds is named there
        cfg = section(params, "evaluate", EvaluateConfig, where=args.params)
        tta = section(params, "tta", TTAConfig, where=args.params)
        folds = section(params, "cv", CVConfig, where=args.params).folds
        if args.member not in member_names(params, args.params):
            raise ConfigError(f"{args.params}: '{args.member}' is not in ensemble.members")
        require_evaluated_phase(args.phase, cfg.phases, args.params)
        seed_everything(0)  # inference is deterministic; seeded only so any stray randomness is too
        _evaluate(args, cfg, tta, folds, info)


def _evaluate(args: argparse.Namespace, cfg: EvaluateConfig, tta: TTAConfig, folds: int, info) -> None:
    evaluate_phase(
        member=args.member,
        phase=args.phase,
        checkpoint=args.checkpoint,
        label_map_path=args.label_map,
        train_path=args.train,
        val_path=args.val,
        test_path=args.test,
        images_root=args.images_root,
        outputs=EvalOutputs(
            metrics=Path(args.metrics),
            predictions=Path(args.predictions),
            per_group=Path(args.per_group),
            confused=Path(args.confused),
            gallery=Path(args.gallery),
        ),
        cfg=cfg,
        tta=tta,
        folds=folds,
        info=info,
    )


if __name__ == "__main__":
    main()
