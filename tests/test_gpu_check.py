"""benchmarks/gpu_check.py on the CPU: every step of the GPU box check, tiny, and its parsers.

The GPU figures themselves come from a lent GPU box (the README's GPU table); this keeps the
command that produces them working: the wheelhouse install without a registry, dvc repro in a
scratch project, the peer comparison and bench_train, each recorded in gpu.json / gpu.md.
"""

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_peer  # noqa: E402
import gpu_run  # noqa: E402

# timm's train.py logs one of these every --log-interval updates and at the last one of an epoch;
# the parenthesised figures are the epoch's running means
TIMM_LINES = [
    "Train: 0 [   0/100 (  1%)]  Loss: 3.90 (3.90)  Time: 2.500s,   25.60/s  (2.500s,   25.60/s)  "
    "LR: 3.000e-04  Data: 2.100 (2.100)",
    "Train: 0 [  99/100 (100%)]  Loss: 3.10 (3.50)  Time: 0.080s,  800.00/s  (0.100s,  640.00/s)  "
    "LR: 3.000e-04  Data: 0.001 (0.030)",
    "Test: [   0/10]  Time: 0.500 (0.500)  Loss:  3.0 (3.0)  Acc@1: 10.0 (10.0)",
    "Train: 1 [  50/100 ( 51%)]  Loss: 2.90 (2.95)  Time: 0.080s,  800.00/s  (0.081s,  790.12/s)  "
    "LR: 2.000e-04  Data: 0.001 (0.002)",
    "Train: 1 [  99/100 (100%)]  Loss: 2.80 (2.90)  Time: 0.080s,  800.00/s  (0.080s,  800.00/s)  "
    "LR: 2.000e-04  Data: 0.001 (0.004)",
]


def test_timm_epochs_are_read_from_the_last_line_of_each_epoch():
    epochs = gpu_peer.timm_epochs(TIMM_LINES, batch=64)
    assert [round(e["throughput"], 1) for e in epochs] == [640.0, 800.0]
    assert [round(e["data_wait"], 3) for e in epochs] == [0.3, 0.05]
    assert gpu_peer.steady([e["throughput"] for e in epochs]) == 800.0  # the first epoch left out
    assert gpu_peer.steady([5.0]) == 5.0 and gpu_peer.steady([]) is None


def test_stage_seconds_come_from_dvcs_running_stage_lines():
    lines = [
        (0.5, "Running stage 'download':"),
        (0.6, "> python stages/download.py"),
        (3.0, "Running stage 'prepare':"),
    ]
    lines += [(4.0, "Stage 'balance' didn't change, skipping"), (9.5, "Running stage 'train@m0':")]
    assert gpu_check.stage_seconds(lines, end=20.0) == {"download": 2.5, "prepare": 6.5, "train@m0": 10.5}


def test_a_step_past_its_time_is_killed_with_its_children_and_keeps_its_output(tmp_path):
    # the child starts a grandchild (as dvc starts a stage, a stage its DataLoader workers)
    pid_file = tmp_path / "grandchild.pid"
    code = "import pathlib, subprocess, time; p = subprocess.Popen(['sleep', '60'])"
    code += f"; pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); print('started', flush=True)"
    code += "; time.sleep(60)"
    result = gpu_run.run_timed([sys.executable, "-c", code], tmp_path, {}, 2.0, tmp_path / "log")
    assert result["code"] is None and result["seconds"] < 20
    assert [line for _, line in result["lines"]] == ["started"]
    assert "timed out after 2 s" in gpu_run.outcome(result, 2.0)["status"]
    assert "started" in (tmp_path / "log").read_text()
    # this grandchild's own pid (any other `sleep 60` on the machine is none of this test's business)
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while _running(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not _running(grandchild), "the grandchild survived the kill"


def _running(pid: int) -> bool:
    """A live process (a zombie waiting for its reaper is dead: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wheel(dest: Path) -> Path:
    """A minimal pure-Python wheel, for installing without a registry."""
    path = dest / "p10kdemo-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("p10kdemo/__init__.py", "VALUE = 42\n")
        z.writestr("p10kdemo-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: p10kdemo\nVersion: 0.1\n")
        z.writestr(
            "p10kdemo-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr("p10kdemo-0.1.dist-info/RECORD", "")
    manifest = {"wheels": [{"name": "p10kdemo", "bytes": path.stat().st_size}], "left_out": []}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return path


# A stand-in for timm's train.py (timm's wheel does not ship it): it reads the ImageFolder the check
# wrote and the arguments the check passes, and logs its epochs in timm's format.
STAND_IN = """
import argparse, pathlib
p = argparse.ArgumentParser()
p.add_argument("data")
for flag in ("--train-split", "--val-split", "--model", "--opt", "--lr", "--weight-decay", "--sched", "-j",
             "--warmup-epochs", "--log-interval", "--output", "--device", "--seed", "--checkpoint-hist",
             "--amp-dtype", "--img-size"):
    p.add_argument(flag)
for flag in ("--num-classes", "-b", "--epochs"):
    p.add_argument(flag, type=int)
for flag in ("--pin-mem", "--amp", "--channels-last"):
    p.add_argument(flag, action="store_true")
a = p.parse_args()
train = pathlib.Path(a.data) / a.train_split
images = list(train.rglob("*.jpg"))
classes = [d for d in train.iterdir() if d.is_dir()]
assert images and len(classes) <= a.num_classes, (len(images), len(classes))
for epoch in range(a.epochs):
    t = 0.5 / (epoch + 1)
    print(f"Train: {epoch} [   0/1 (100%)]  Loss: 1.0 (1.0)  Time: {t:.3f}s, 1.00/s  ({t:.3f}s, 1.00/s)  "
          "LR: 1e-3  Data: 0.010 (0.010)")
"""


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    (root / "wheels").mkdir()
    _wheel(root / "wheels")
    (root / "train.py").write_text(STAND_IN)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    cmd += [
        "--wheelhouse",
        str(root / "wheels"),
        "--target",
        str(root / "site"),
        "--steps",
        "repro,peer,bench",
    ]
    cmd += ["--timm-train", str(root / "train.py"), "--work", str(root / "work"), "--out", str(root / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    data = json.loads((root / "out" / "gpu.json").read_text())
    return proc, data, root


def test_the_tiny_check_runs_every_step_and_records_it(tiny_check):
    proc, data, root = tiny_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = data["steps"]
    assert list(steps) == ["install", "repro", "peer", "bench"]
    assert all(step["status"] == "ok" for step in steps.values()), steps
    assert steps["install"]["wheels"] == 1 and (root / "site" / "p10kdemo" / "__init__.py").exists()
    assert data["machine"]["device"] == "cpu" and data["machine"]["cpu_cores"] >= 1


def test_repro_records_every_stage_and_the_phases_figures(tiny_check):
    repro = tiny_check[1]["steps"]["repro"]
    assert {"download", "prepare", "train@m0", "finetune_accuracy@m0", "submit", "export"} <= set(
        repro["stages"]
    )
    assert all(seconds > 0 for seconds in repro["stages"].values())
    for phase in gpu_check.PHASES:
        figures = repro["metrics"][phase]
        assert 0.0 <= figures["test_top1"] <= 1.0
        assert len(figures["throughput"]) == 1 and figures["throughput"][0] > 0  # one epoch a phase
        assert 0.0 <= figures["data_wait"][0] < 1.0
    assert 0.0 <= repro["metrics"]["submission_test_top1"] <= 1.0


def test_peer_trains_both_sides_on_the_same_imagefolder(tiny_check):
    proc, data, root = tiny_check
    peer = data["steps"]["peer"]
    train_rows = sum(1 for _ in open(root / "work" / "peer" / "data" / "prepared" / "train.csv")) - 1
    assert peer["images"]["train"] == train_rows
    assert len(list((root / "work" / "imagefolder" / "train").rglob("*.jpg"))) == train_rows
    assert len(peer["ours"]["epochs"]["throughput"]) == peer["settings"]["epochs"] == 2
    assert peer["ours"]["img_per_s"] > 0
    # the stand-in's second epoch: 0.25 s an update of batch 8
    assert peer["timm"]["img_per_s"] == 32.0 and peer["timm"]["data_wait"] == 0.04
    assert peer["ratio"] == round(peer["ours"]["img_per_s"] / 32.0, 2)


def test_bench_rows_and_the_markdown_table(tiny_check):
    proc, data, root = tiny_check
    rows = data["steps"]["bench"]["rows"]
    assert [(r["amp"], r["channels_last"]) for r in rows] == [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ]
    md = (root / "out" / "gpu.md").read_text()
    assert "no GPU (CPU run)" in md and "ours / timm" in md and "| tf_efficientnet_lite0 | 64 |" in md


def test_a_budget_spent_skips_the_remaining_steps_and_says_so(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    cmd += [
        "--steps",
        "repro,bench",
        "--budget-s",
        "5",
        "--out",
        str(tmp_path),
        "--work",
        str(tmp_path / "w"),
    ]
    subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    steps = json.loads((tmp_path / "gpu.json").read_text())["steps"]
    assert all(step["status"].startswith("skipped:") for step in steps.values()), steps
