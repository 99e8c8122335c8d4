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

import logging
import sys
from pathlib import Path

# this checkout's products10k, not an installed copy: `dvc exp run --queue`/`--temp` run the stage in
# a copy of the repository, where an editable install would import the workspace's code instead
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from products10k.common import run_stage
from products10k.config.stage import StageParams, stage_parser
from products10k.dist.devices import seed_everything
from products10k.dist.group import process_group
from products10k.evaluation.evaluate import EvalFiles, evaluate_phase

log = logging.getLogger("stages.evaluate")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, EvalFiles, member=True, phase=True).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    params = StageParams(args.params)
    with process_group(params.section("dist"), params.tree, params.where) as info:  # torchrun's ranks
        # typed after the ranks compared their params: a value one node alone holds is named there
        s = params.typed("evaluate", "tta", "cv", member=args.member, phase=args.phase)
        seed_everything(0)  # inference is deterministic; seeded only so any stray randomness is too
        evaluate_phase(args.member, args.phase, EvalFiles.of(args), s.evaluate, s.tta, s.cv.folds, info)


if __name__ == "__main__":
    main()
