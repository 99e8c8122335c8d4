"""Running things for the GPU box check (benchmarks/gpu_check.py): commands under a deadline with
time-stamped logs, scratch copies of the project with params overrides, DVCLive's per-epoch figures.

Standard library only (and PyYAML once the wheelhouse is installed): the check runs on a GPU box
with nothing but its own python3 before the install step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a scratch project needs of the working tree (data and outputs are made there)
PROJECT_FILES = ["dvc.yaml", "params.yaml", "stages", "products10k", "presets", ".dvcignore", ".gitignore"]
#: --tiny: a few synthetic SKUs at 32 px, one short epoch a phase (the tests' tiny pipeline)
TINY = {
    "data.synthetic.num_groups": 2,
    "data.synthetic.skus_per_group": 3,
    "data.synthetic.train_max_per_sku": 6,
    "data.synthetic.train_min_per_sku": 2,
    "data.synthetic.test_per_sku": 2,
    "prepare.size": 48,
    "prepare.val_min_images": 2,
    "balance.per_class": 2,
    "model.arch": "resnet10t",
    "model.pretrained": False,
    "train.epochs": 1,
    "train.resolution": 32,
    "train.batch_size": 8,
    "finetune_balanced.epochs": 1,
    "finetune_accuracy.epochs": 1,
    "evaluate.batch_size": 16,
    "evaluate.gallery_size": 3,
    "evaluate.gallery_tile": 48,
}


# --- running things --------------------------------------------------------------------------


def run_timed(cmd: list[str], cwd: Path, env: dict, timeout: float, log_path: Path) -> dict:
    """Run ``cmd`` with every output line time-stamped into ``log_path``; kill its whole process
    group at ``timeout``. Returns the exit code (None: killed), seconds and the stamped lines."""
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def pump() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                stamp = time.perf_counter() - t0
                lines.append((stamp, line.rstrip("\n")))
                log.write(f"{stamp:8.1f} {line}")
                log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # stage processes, torchrun, DataLoader workers
        proc.wait()
        code = None
    reader.join(timeout=10)
    return {"code": code, "seconds": round(time.perf_counter() - t0, 1), "lines": lines}


def outcome(result: dict, timeout: float) -> dict:
    if result["code"] == 0:
        return {"status": "ok", "seconds": result["seconds"]}
    status = f"timed out after {timeout:.0f} s" if result["code"] is None else f"exit {result['code']}"
    return {
        "status": status,
        "seconds": result["seconds"],
        "tail": [line for _, line in result["lines"][-25:]],
    }


def tool_env(bin_dir: Path) -> dict:
    """Stage commands call ``python``: a folder holding ``python`` -> this interpreter goes first
    on PATH (a GPU image may have ``python3`` alone), with the target folder's scripts."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python"  # a script, not a link: a link to a venv's python leaves the venv
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    extra = [str(bin_dir)]
    if os.environ.get("P10K_GPU_CHECK_TARGET"):
        extra.append(str(Path(os.environ["P10K_GPU_CHECK_TARGET"]) / "bin"))
    env["PATH"] = os.pathsep.join([*extra, str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env.setdefault(key, "gpu-check")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env.setdefault(key, "gpu-check@localhost")
    return env


def set_dotted(tree: dict, overrides: dict) -> dict:
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def make_project(dest: Path, overrides: dict, env: dict) -> Path:
    """A scratch copy of the project with ``overrides`` in params.yaml, git and DVC initialised."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    write_params(dest, overrides)
    git = shutil.which("git") is not None  # a bare GPU image may lack it: DVC then runs without git
    cmds = [["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]] if git else []
    cmds = cmds or [[sys.executable, "-m", "dvc", "init", "-q", "--no-scm"]]
    for cmd in cmds:
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    shutil.copy2(ROOT / ".dvc" / "config", dest / ".dvc" / "config")
    if git:  # DVCLive (and dvc exp) want a commit to stand on
        for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "gpu-check"]):
            subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)
    return dest


def write_params(project: Path, overrides: dict) -> None:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    set_dotted(params, overrides)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def dvclive_epochs(folder: Path) -> dict:
    """Per-epoch img/s and data wait of a training phase from its DVCLive plots."""
    out = {}
    for key in ("throughput", "data_wait"):
        tsv = folder / "plots" / "metrics" / f"{key}.tsv"
        if tsv.exists():
            rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
            out[key] = [round(float(r[-1]), 4) for r in rows]
    return out
