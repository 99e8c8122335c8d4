"""products10k.common: atomic writes, joblib's n_jobs meaning, the ordered thread map and its cancellation."""

from __future__ import annotations

import os
import stat
import threading
import time

import joblib
import pandas as pd
import pytest

from products10k.common import (
    IN_FLIGHT_PER_WORKER,
    _linux_process_start,
    atomic_path,
    ordered_map,
    resolve_n_jobs,
    write_csv,
    write_json,
)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write_not_a_live_ones(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "submission.csv"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".submission.csv.{dead.pid}.abc123.csv"  # what a SIGKILL before the rename leaves
    live = tmp_path / f".submission.csv.{os.getpid()}.def456.csv"  # another writer, still at work
    other = tmp_path / f".top5.csv.{dead.pid}.abc123.csv"  # another file's: not this write's business
    for path in (left, live, other):
        path.write_text("name,class\n")
    write_csv(target, pd.DataFrame({"name": ["1.jpg"], "class": [5]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="zombies are told apart through /proc")
def test_a_killed_writer_not_yet_reaped_counts_as_dead(tmp_path):
    """A SIGKILLed writer that nobody has reaped yet is a zombie, which kill(pid, 0) still finds;
    and a pid reused by a process started after the write is not the writer."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "submission.csv"
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(zombie.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _linux_process_start(zombie.pid)[0] != "Z":  # (state, start) from /proc
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(zombie.pid, 0)  # what the old check asked: "alive"
        left = tmp_path / f".submission.csv.{zombie.pid}.abc123.csv"
        left.write_text("name,class\n")
        reused = tmp_path / f".submission.csv.{os.getpid()}.def456.csv"  # this process started before...
        reused.write_text("name,class\n")
        os.utime(reused, (time.time() - 10**7, time.time() - 10**7))  # ...a write long before it started
        write_csv(target, pd.DataFrame({"name": ["1.jpg"], "class": [5]}))
        assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    finally:
        zombie.wait()


def test_atomic_outputs_get_the_mode_of_a_new_file_not_a_private_one(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        write_csv(tmp_path / "top5.csv", pd.DataFrame({"name": ["1.jpg"]}))
    finally:
        os.umask(old)
    for name in ("metrics.json", "top5.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640  # 0o666 & ~0o027, not 0o600


def test_write_csv_no_index(tmp_path):
    target = tmp_path / "sub" / "x.csv"
    write_csv(target, pd.DataFrame({"name": ["1.jpg"], "class": [3]}))
    assert target.read_text().splitlines() == ["name,class", "1.jpg,3"]


def test_resolve_n_jobs_has_joblib_semantics():
    cores = joblib.cpu_count()
    assert resolve_n_jobs(3) == 3
    assert resolve_n_jobs(-1) == cores
    assert resolve_n_jobs(-2) == max(1, cores - 1)
    assert resolve_n_jobs(-10_000) == 1
    assert resolve_n_jobs(8, n_tasks=2) == 2
    assert resolve_n_jobs(-1, n_tasks=0) == 1
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        resolve_n_jobs(0)


@pytest.mark.parametrize("n_workers", [1, 3])
def test_ordered_map_keeps_task_order(n_workers):
    def slow_for_small(i, j):
        time.sleep(0.002 * (20 - i))  # early tasks finish last
        return i * j

    tasks = [(i, 2) for i in range(20)]
    assert list(ordered_map(slow_for_small, tasks, n_workers)) == [2 * i for i in range(20)]


def test_closing_ordered_map_cancels_queued_tasks():
    started: list[int] = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.01)
        return i

    results = ordered_map(work, [(i,) for i in range(1000)], 2)
    assert next(results) == 0
    results.close()
    # only the tasks already queued ran: the rest were cancelled when the consumer stopped
    assert len(started) <= IN_FLIGHT_PER_WORKER * 2 + 2


def test_ordered_map_rejects_no_workers():
    with pytest.raises(ValueError, match="n_workers must be >= 1"):
        list(ordered_map(int, [("1",)], 0))


def test_a_checkpoint_saved_twice_is_the_same_bytes(tmp_path):
    # its hash is recorded (preprocess.json, the index's meta.json): the kill test compares it with
    # an uninterrupted run's, and torch.save given a path names the archive after the temporary file
    import torch

    from products10k.models.checkpoint import save_torch

    saved = []
    for _ in range(2):
        save_torch(tmp_path / "best.pt", {"weights": torch.arange(6.0).reshape(2, 3), "epoch": 3})
        saved.append((tmp_path / "best.pt").read_bytes())
    assert saved[0] == saved[1]


def test_a_sku_id_has_one_spelling():
    from products10k.common import parse_sku_id

    assert [parse_sku_id(t) for t in ("0", "7", "9" * 18, "123456789012345678")] == [
        0, 7, int("9" * 18), 123456789012345678
    ]  # fmt: skip
    # leading zeros, signs, other scripts' digits, too many digits, spaces: not an id
    for text in ("007", "000000000000000007", "00", "-1", "+1", "١٢", "²", "1" * 19, " 7", "7 ", ""):
        assert parse_sku_id(text) is None, text
