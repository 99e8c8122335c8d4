from dataclasses import dataclass, field
from typing import Literal

import pytest

from products10k.common import ConfigError
from products10k.config import (
    BalanceConfig,
    DataConfig,
    PrepareConfig,
    apply_overrides,
    from_dict,
    load_section,
    load_yaml,
    member_names,
    member_params,
    section,
)
from tests.helpers import ROOT


@dataclass(frozen=True)
class Inner:
    n: int = 1
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    opt: int | None = None
    steps: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_types():
    cfg = from_dict(Outer, {"inner": {"ratio": 2}, "steps": [3, 4], "opt": None})
    assert cfg.inner.ratio == 2.0 and isinstance(cfg.inner.ratio, float)
    assert cfg.steps == (3, 4)
    assert cfg.opt is None and cfg.name == "x"


def test_unknown_key_names_file_and_dotted_key():
    with pytest.raises(ConfigError, match=r"my.yaml: unknown key 'outer.inner.nn'"):
        from_dict(Outer, {"inner": {"nn": 3}}, where="my.yaml", prefix="outer")


@pytest.mark.parametrize(
    "data, key",
    [
        ({"name": 3}, "name"),
        ({"mode": "c"}, "mode"),
        ({"opt": "1"}, "opt"),
        ({"steps": [1, "a"]}, r"steps\[1\]"),
        ({"inner": {"n": 1.5}}, "inner.n"),
        ({"inner": {"n": True}}, "inner.n"),
    ],
)
def test_wrong_types_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(Outer, data)


def test_frozen():
    cfg = from_dict(Outer, {})
    with pytest.raises(AttributeError):
        cfg.name = "y"  # type: ignore[misc]


def test_project_params_load(tmp_path):

    params = ROOT / "params.yaml"
    assert isinstance(load_section(params, "data", DataConfig), DataConfig)
    assert isinstance(load_section(params, "prepare", PrepareConfig), PrepareConfig)
    assert isinstance(load_section(params, "balance", BalanceConfig), BalanceConfig)


def test_validate_hooks_report_section(tmp_path):
    with pytest.raises(ConfigError, match="prepare.*val_fraction"):
        section({"prepare": {"val_fraction": 1.5}}, "prepare", PrepareConfig)


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)


def test_member_overrides_follow_base():
    params = {
        "train": {"resolution": 224, "seed": 0},
        "ensemble": {"members": {"a": {}, "b": {"train.seed": 7}}},
    }
    assert member_names(params) == ["a", "b"]
    assert member_params(params, "a")["train"] == {"resolution": 224, "seed": 0}
    assert member_params(params, "b")["train"] == {"resolution": 224, "seed": 7}
    assert params["train"]["seed"] == 0  # the input is not modified
    with pytest.raises(ConfigError, match="unknown ensemble member 'c'"):
        member_params(params, "c")
    with pytest.raises(ConfigError, match="no section 'model'"):
        apply_overrides(params, {"model.arch": "x"})
