"""Build a throw-away copy of the project as a git repo with one commit, to drive the real dvc CLI.

DVC experiments need a git repository with at least one commit; the copy keeps the tests from
touching the developer's own workspace, cache or dvc.lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ["dvc.yaml", "params.yaml", "stages", "products10k", "presets", ".dvcignore"]
DVC_CONFIG = ROOT / ".dvc" / "config"


def _env() -> dict:
    env = dict(os.environ)
    # Stage commands call `python`/`torchrun`: use the interpreter running the tests.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run(cwd: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def dvc(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, **kw)


def deep_update(tree: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            deep_update(tree[key], value)
        else:
            tree[key] = value
    return tree


def make_project(dest: Path, params_update: dict | None = None) -> Path:
    """Copy the project into ``dest`` with ``params_update`` merged into params.yaml; git+dvc init."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(params, params_update or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    run(dest, "git", "init", "-q")
    # `dvc exp run` commits through pygit2/dulwich, which read the repo config, not GIT_AUTHOR_*:
    # a CI machine without a global git identity still needs one here.
    run(dest, "git", "config", "user.name", "test")
    run(dest, "git", "config", "user.email", "test@example.com")
    dvc(dest, "init", "-q")
    shutil.copy2(DVC_CONFIG, dest / ".dvc" / "config")  # same cache link type as the project
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-q", "-m", "init")
    return dest
