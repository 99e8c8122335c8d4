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
    RetrievalConfig,
    load_yaml,
    member_names,
    section,
)
from products10k.dist.group import process_group
from products10k.retrieval.index import IndexInputs, IndexOutputs, build_index
from products10k.scores import require_evaluated_phase

log = logging.getLogger("stages.index")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", required=True, type=Path)
    p.add_argument("--member", required=True, help="ensemble member name (ensemble.members)")
    p.add_argument("--checkpoint", required=True, type=Path, help="best.pt of retrieval.phase")
    p.add_argument("--label-map", required=True, type=Path)
    p.add_argument("--train", required=True, type=Path, help="train CSV: the gallery")
    p.add_argument("--val", required=True, type=Path, help="val CSV: fits the fusion weight")
    p.add_argument("--test", required=True, type=Path)
    p.add_argument("--images-root", required=True, type=Path, help="folder holding images/shard-*.bin")
    p.add_argument("--classifier", required=True, type=Path, help="evaluate's predictions of retrieval.phase")
    p.add_argument(
        "--index", required=True, type=Path, help="output folder: index.faiss, gallery.npz, meta.json"
    )
    p.add_argument("--fused", required=True, type=Path, help="output: fused predictions (.npz)")
    p.add_argument("--knn", type=Path, help="output: the kNN's own predictions (.npz)")
    p.add_argument("--metrics", required=True, type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_stage(log, _run, args)


def _run(args: argparse.Namespace) -> None:
    params = load_yaml(args.params)
    dist_cfg = section(params, "dist", DistConfig, where=args.params)
    inputs = IndexInputs(
        checkpoint=args.checkpoint,
        label_map=args.label_map,
        train=args.train,
        val=args.val,
        test=args.test,
        images_root=args.images_root,
        classifier=args.classifier,
    )
    outputs = IndexOutputs(args.index, args.fused, args.metrics, args.knn)
    with process_group(dist_cfg, params, str(args.params)) as info:  # one process unless torchrun's
        # typed after the ranks compared their params: a value one node alone holds is named there
        cfg = section(params, "retrieval", RetrievalConfig, where=args.params)
        evaluate = section(params, "evaluate", EvaluateConfig, where=args.params)
        folds = section(params, "cv", CVConfig, where=args.params).folds
        if args.member not in member_names(params, args.params):
            raise ConfigError(f"{args.params}: '{args.member}' is not in ensemble.members")
        require_evaluated_phase(cfg.phase, evaluate.phases, args.params, key="retrieval.phase")
        seed_everything(0)
        build_index(args.member, inputs, outputs, cfg, evaluate, folds, info)


if __name__ == "__main__":
    main()
