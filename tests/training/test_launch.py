"""products10k.training.launch: plain Python for one process, torchrun for several (as dvc.yaml runs it)."""

import subprocess
import sys


def _run(tmp_path, nproc: int) -> list[str]:
    script = tmp_path / "who.py"
    script.write_text(
        "import os, sys\nprint(os.environ.get('WORLD_SIZE'), os.environ.get('RANK'), sys.argv[1:])\n"
    )
    cmd = [sys.executable, "-m", "products10k.training.launch", "--nproc-per-node", str(nproc), str(script)]
    out = subprocess.run([*cmd, "--phase", "train"], capture_output=True, text=True, check=True, timeout=120)
    return sorted(out.stdout.splitlines())


def test_one_process_runs_the_script_itself_without_torchrun(tmp_path):
    assert _run(tmp_path, 1) == ["None None ['--phase', 'train']"]


def test_several_processes_run_under_torchrun_as_ranks(tmp_path):
    assert _run(tmp_path, 2) == ["2 0 ['--phase', 'train']", "2 1 ['--phase', 'train']"]


def test_a_process_count_below_one_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "products10k.training.launch", "--nproc-per-node", "0", "x.py"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and "dist.nproc_per_node" in proc.stderr
