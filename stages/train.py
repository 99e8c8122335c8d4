"""Train one phase of one ensemble member: train, finetune_balanced or finetune_accuracy.

Run (one process):
    python stages/train.py --phase train --member m0 --params params.yaml \
        --train-csv data/prepared/train.csv --val-csv data/prepared/val.csv \
        --label-map data/prepared/label_map.csv --images data/prepared \
        --out models/m0/train --live dvclive/m0/train

DDP: the same arguments after ``torchrun ...``; dvc.yaml runs it through
``python -m products10k.dist.launch --params params.yaml stages/train.py ...``, which builds the
torchrun command from ``dist`` (one node or several) and runs this script alone for one process.
Finetune phases add ``--init models/m0/<previous>/best.pt``.
A re-run after a kill resumes from ``<out>/last.pt`` when the settings are unchanged. Under
``cv.folds: K`` the phase trains K fold models into ``<out>/fold<i>/`` (finetunes start from
``<init's folder>/fold<i>/best.pt``), then the refit on every image into ``<out>``.
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
from products10k.training.loop import PhasePaths, train_phase

log = logging.getLogger("stages.train")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, PhasePaths, member=True, phase=True).parse_args(argv)
    result = run_stage(log, _train, args)
    if result["is_main"]:  # one summary line, on the node that runs dvc (not torchrun's RANK 0)
        folds = result["folds"]
        log.info(
            "%s@%s done: best val top-1 %s",
            args.phase,
            args.member,
            " / ".join(f"{r['best_val_top1']:.4f}" for r in folds) + " (folds; the refit has no val)"
            if folds
            else f"{result['best_val_top1']:.4f}",
        )


def _train(args) -> dict:
    params = StageParams(args.params).for_member(args.member)
    return train_phase(params, args.phase, args.member, PhasePaths.of(args))


if __name__ == "__main__":
    main()
