"""Index one ensemble member's training images; kNN-classify val and test; fuse with the classifier.

Run (dvc.yaml generates one stage per member, e.g. ``index@m0``)::

    python stages/index.py --params params.yaml --member m0 \
        --checkpoint models/m0/finetune_accuracy/best.pt --label-map data/prepared/label_map.csv \
        --train data/prepared/train.csv --val data/prepared/val.csv --test data/prepared/test.csv \
        --images-root data/prepared --classifier predictions/finetune_accuracy/m0.npz \
        --index models/m0/index --fused predictions/fused/m0.npz --metrics metrics/m0/retrieval.json

``--checkpoint`` and ``--classifier`` are of the phase named by ``retrieval.phase``. dvc.yaml
starts it through ``products10k.dist.launch``: with ``dist.nproc_per_node > 1`` every rank
embeds its shard of the images and rank 0 merges them, builds the index and writes the outputs.
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
from products10k.retrieval.index import IndexFiles, build_index

log = logging.getLogger("stages.index")


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__, IndexFiles, member=True).parse_args(argv)
    run_stage(log, _run, args)


def _run(args) -> None:
    params = StageParams(args.params)
    with process_group(params.section("dist"), params.tree, params.where) as info:  # torchrun's ranks
        # typed after the ranks compared their params: a value one node alone holds is named there
        s = params.typed("retrieval", "evaluate", "cv", member=args.member, evaluated=["retrieval.phase"])
        seed_everything(0)
        build_index(args.member, IndexFiles.of(args), s.retrieval, s.evaluate, s.cv.folds, info)


if __name__ == "__main__":
    main()
