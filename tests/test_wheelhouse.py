"""tools/wheelhouse.py: which packages a GPU box needs, and what goes in when the size is bounded."""

import pytest

from tests.helpers import ROOT
from tools.wheelhouse import OPTIONAL, canonical, choose, read_have, read_lock, requirements_closure

BOX = read_have(ROOT / "benchmarks" / "gpu_box_packages.txt")


def test_the_closure_holds_what_the_box_lacks_and_stops_at_what_it_has():
    closure = requirements_closure("pipeline", "3.12", BOX)
    for name in ("dvc", "dvclive", "pydantic", "pydantic-core", "albumentations", "faiss-cpu"):
        assert name in closure, name
    # the box's torch ends the walk: its CUDA stack is the box's, never downloaded
    for name in ("torch", "torchvision", "timm", "nvidia-cudnn-cu13", "triton", "numpy"):
        assert name not in closure, name
    assert set(closure) <= set(read_lock(ROOT / "requirements.lock"))  # every version comes from the lock
    assert closure["dvc"] is True and closure["pydantic-core"] is False  # pure Python vs a compiled wheel


def test_pinning_takes_a_package_from_the_lock_and_nothing_of_its_own_needs_the_box_has():
    closure = requirements_closure("pipeline", "3.12", BOX - {"timm"})
    assert "timm" in closure
    assert "torch" not in closure and "huggingface-hub" not in closure


def test_a_box_with_nothing_gets_the_whole_pipeline():
    assert {"torch", "timm", "pandas", "onnx"} <= set(requirements_closure("pipeline", "3.12", set()))


def test_required_wheels_always_go_in_and_optional_ones_by_priority_while_they_fit():
    mb = 2**20
    sizes = {"dvc": 1 * mb, "pydantic-core": 2 * mb, **{name: 10 * mb for name in OPTIONAL}}
    kept, left_out = choose(sizes, 25 * mb)
    first, second, *rest = OPTIONAL
    assert set(kept) == {"dvc", "pydantic-core", first, second}
    assert left_out == rest
    with pytest.raises(SystemExit, match="required wheels alone"):
        choose(sizes, 2 * mb)


def test_have_reads_pip_freeze_pip_list_and_bare_names(tmp_path):
    path = tmp_path / "have.txt"
    path.write_text(
        "# a comment\nPackage    Version\n---------- -------\nRuamel.YAML 0.18\ntorch==2.11.0\nscikit_learn\n"
    )
    assert read_have(path) == {"ruamel-yaml", "torch", "scikit-learn"}
    assert canonical("zc.lockfile") == "zc-lockfile"
