"""What every benchmark shares: the repository's params.yaml (typed, or as a tree with dotted
overrides, read by the package's own loader), the machine it ran on, and its results file.

    from harness import ROOT, describe, params, typed, write_params, write_results

(benchmarks/ first on sys.path, as every script here puts it.) gpu_run.py keeps its own small
params writer: the GPU box check runs it with nothing but its own python3 before its install step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from products10k import common  # noqa: E402
from products10k.config import apply_overrides, load_section, load_yaml  # noqa: E402

PARAMS = ROOT / "params.yaml"

__all__ = [
    "PARAMS",
    "ROOT",
    "clone_head",
    "describe",
    "digits_overrides",
    "params",
    "parse_sets",
    "run_tool",
    "typed",
    "write_params",
    "write_results",
]


def params(overrides: dict | None = None, path: Path = PARAMS) -> dict:
    """params.yaml as a tree, with dotted ``overrides`` ({"train.resolution": 224}) set (a key that
    names no section is a ConfigError naming it)."""
    return apply_overrides(load_yaml(path), overrides or {}, str(path))


def typed(section: str, cls, path: Path = PARAMS):
    """One section of params.yaml, typed and checked as the stages check it."""
    return load_section(path, section, cls)


def parse_sets(items: list[str]) -> dict:
    """``--set key=yaml-value`` arguments as dotted overrides (values read as YAML: 224, true, [1, 2])."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def write_params(path: Path, tree: dict) -> Path:
    """A params tree written as YAML (key order kept), for a stage script run on it."""
    import yaml

    common.write_text(path, yaml.safe_dump(tree, sort_keys=False))
    return path


def write_results(path: Path, report: dict) -> None:
    """A benchmark's results as JSON, atomically (a killed run leaves the previous file whole), with
    the machine named if the report does not name it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    report = report if "machine" in report else {"machine": describe(), **report}
    common.write_text(path, json.dumps(report, indent=2) + "\n")


def run_tool(cmd: list[str], cwd: Path) -> float:
    """Run ``cmd`` in ``cwd`` with this checkout's .venv/bin first on PATH (dvc, torchrun); return its
    seconds, or stop with the tail of its output when it fails."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def clone_head(work: Path, reuse: bool = False) -> Path:
    """A fresh clone of this repository's HEAD (commit first) at ``work``/project, for a benchmark
    that runs the real pipeline with ``dvc exp run``; ``reuse``: the clone an earlier run left there,
    as it is (its runs already made come back from DVC's run cache)."""
    project = Path(work) / "project"
    if reuse and (project / ".git").is_dir():
        head = subprocess.check_output(["git", "-C", str(project), "rev-parse", "HEAD"], text=True)
        print(f"reusing {project} at {head.strip()}")
        return project
    run_tool(["git", "clone", "-q", str(ROOT), str(project)], Path(work))
    return project


def digits_overrides(work: Path) -> list[str]:
    """Write scikit-learn's digits under ``work``/digits (benchmarks/digits_data.py) and return the
    ``dvc exp run`` arguments that make them the pipeline's data."""
    from benchmarks.digits_data import write_digits

    print(write_digits(Path(work) / "digits"))
    return ["-S", "data.source=dir", "-S", f"data.dir={Path(work) / 'digits'}"]
