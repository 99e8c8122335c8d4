"""dvc.yaml and params.yaml stay in step with the code.

A stage's deps are its package folders plus config and common; a module its script imports that no
dep covers would let the stage go stale silently when that module changes. (That params.yaml spells
out every knob is tests/config/test_load.py's: the schema has no defaults.)
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

IMPORTS = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("stage_script", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith("products10k")
                        and getattr(m, "__file__", None))))
"""


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@functools.cache  # the three training phases share stages/train.py: one interpreter start per script
def _script_imports(script: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS, str(ROOT / script)], capture_output=True, text=True, check=True
    ).stdout
    return {str(Path(f).resolve().relative_to(ROOT)) for f in json.loads(out)}


@pytest.mark.parametrize("name", list(_stages()))
def test_stage_deps_list_every_module_its_script_imports(name):
    stage = _stages()[name]
    body = stage.get("do", stage)
    script = next(tok for tok in body["cmd"].split() if tok.startswith("stages/"))
    deps = {d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])}
    assert script in deps, f"{name}: {script} not in deps"
    # a dep is a module file or a package folder; package __init__ files hold docstrings only
    covered = [d.rstrip("/") for d in deps]
    missing = sorted(
        module
        for module in _script_imports(script)
        if not module.endswith("/__init__.py")
        and not any(module == d or module.startswith(d + "/") for d in covered)
    )
    assert not missing, f"dvc.yaml stage '{name}' runs {script}, which imports {missing}: add them to deps"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_a_stage_script_imports_its_own_checkouts_package(tmp_path, script):
    """`dvc exp run --queue` runs stages in a copy of the repository: the copy's products10k must run,
    not the editable install's (the workspace, which may have changed since the experiment was queued)."""
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "stages", copy / "stages")
    shutil.copytree(ROOT / "products10k", copy / "products10k", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "products10k" / "__init__.py"
    init.write_text(init.read_text() + "\nraise SystemExit('the copy of products10k ran')\n")
    command = [sys.executable, str(copy / "stages" / script), "--help"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "the copy of products10k ran" in proc.stderr, proc.stdout + proc.stderr
