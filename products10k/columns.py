"""The prepared-data contract's column lists: written by ``prepare``, read by training and evaluation.

Kept in a module of its own so that readers (datasets.py) need not import the prepare stage.
"""

from __future__ import annotations

#: columns of ``train.csv`` / ``val.csv`` (and ``balanced.csv``, a subset of train's rows)
PREPARED_COLUMNS = [
    "name",
    "label",
    "sku",
    "group",
    "domain",
    "shard",
    "offset",
    "length",
    "width",
    "height",
]
#: ``test.csv`` adds the Kaggle leaderboard split
TEST_COLUMNS = [*PREPARED_COLUMNS, "Usage"]
#: columns of ``label_map.csv`` every reader needs (prepare also writes ``group`` and ``n_train``)
LABEL_MAP_COLUMNS = ["label", "sku"]
