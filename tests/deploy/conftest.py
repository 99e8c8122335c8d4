"""The deploy tests' shared set-up: a tiny prepared dataset, checkpoint, index and export."""

import pytest

from tests.helpers import index_params, make_eval_data, run_index, stage_module


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    """A tiny prepared dataset, checkpoint, index (k=1) and export, shared by the tests here."""
    root = tmp_path_factory.mktemp("deploy")
    prepared = make_eval_data(root / "prepared")
    params = index_params(root, k=1)
    ckpt = run_index(root, prepared, params)
    stage_module("export").main(
        [
            "--params",
            str(params),
            "--checkpoint",
            str(ckpt),
            "--label-map",
            str(prepared / "label_map.csv"),
            "--test",
            str(prepared / "test.csv"),
            "--images-root",
            str(prepared),
            "--out",
            str(root / "models" / "export"),
            "--metrics",
            str(root / "metrics" / "export.json"),
        ]  # fmt: skip
    )
    return root, prepared, ckpt
