"""The balanced subset: at most per_class per SKU, all of a small SKU, seeded; and the stage script."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from products10k.common import DataError
from products10k.config import BalanceConfig
from products10k.prepared.balance import balance, balance_table
from tests.helpers import ROOT, config, write_project_params

COLUMNS = ["name", "label", "sku", "group", "domain", "shard", "offset", "length", "width", "height"]


def train_frame(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    counts = [1, 2, 5, 6, 13, 40]
    skus = np.repeat(np.arange(100, 100 + len(counts)), counts)
    n = len(skus)
    return pd.DataFrame(
        {
            "name": [f"{i}.jpg" for i in rng.permutation(n)],
            "label": skus - 100,
            "sku": skus,
            "group": skus // 3,
            "domain": "unknown",
            "shard": "shard-00000.bin",
            "offset": np.arange(n) * 1000,
            "length": 1000,
            "width": 512,
            "height": 640,
        }
    )


def test_at_most_per_class_and_all_of_small_skus():
    train = train_frame()
    out = balance_table(train, per_class=5, seed=0)
    got = out["sku"].value_counts().sort_index()
    want = train["sku"].value_counts().clip(upper=5).sort_index()
    pd.testing.assert_series_equal(got, want)
    assert out.index.is_monotonic_increasing  # original row order kept
    assert out.columns.tolist() == COLUMNS


def test_per_class_null_keeps_every_image(tmp_path):
    train = train_frame()
    pd.testing.assert_frame_equal(balance_table(train, per_class=None, seed=0), train)
    src, out = tmp_path / "train.csv", tmp_path / "balanced.csv"
    train.to_csv(src, index=False)
    balance(src, out, BalanceConfig(per_class=None, seed=0))
    assert out.read_bytes() == src.read_bytes()


def test_seeded_and_random():
    train = train_frame()
    a = balance_table(train, 5, seed=0)["name"].tolist()
    assert a == balance_table(train, 5, seed=0)["name"].tolist()
    picks = {tuple(balance_table(train, 5, seed=s)["name"]) for s in range(5)}
    assert len(picks) > 1
    # Not simply the first rows of each SKU.
    first5 = train.groupby("sku").head(5)["name"].tolist()
    assert any(tuple(first5) != p for p in picks)


def test_stage_script_writes_same_columns(tmp_path):
    train = train_frame()
    src = tmp_path / "train.csv"
    train.to_csv(src, index=False)
    params = tmp_path / "params.yaml"
    write_project_params(params, {"balance": {"per_class": 2, "seed": 3}})
    out = tmp_path / "balanced.csv"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages/balance.py"),
            "--params",
            str(params),
            "--train",
            str(src),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    got = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert got.columns.tolist() == COLUMNS
    assert got["sku"].value_counts().max() == 2 and got["sku"].nunique() == 6
    # Every row is a verbatim row of the input.
    src_rows = set(map(tuple, pd.read_csv(src, dtype=str).itertuples(index=False)))
    assert set(map(tuple, got.itertuples(index=False))) <= src_rows
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_stage_script_bad_params_and_input(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("balance:\n  per_klass: 2\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/balance.py"), "--params", str(params)]
        + ["--train", str(tmp_path / "t.csv"), "--out", str(tmp_path / "b.csv")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "balance.per_klass" in proc.stderr
    bad = tmp_path / "t.csv"
    bad.write_text("name,label\n1.jpg,0\n")
    with pytest.raises(DataError, match=r"t\.csv, line 1, column 'sku'"):
        balance(bad, tmp_path / "b.csv", config("balance"))
    assert not (tmp_path / "b.csv").exists()
