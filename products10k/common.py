"""What every stage and the runtime share: errors, logging, atomic writes, the stage runner, a thread map.

NumPy and the standard library only: the deployed runtime stands on this module (torch-side helpers
live with their users: ``save_torch`` in models/checkpoint.py, ``seed_everything`` in dist/devices.py).

- Errors: a :class:`Products10kError` is a problem the user can fix (bad params, bad data, a
  missing input); its message names the file, row, column or params key. :func:`run_stage` logs it
  as one line and exits with status 1; any other exception is a bug and keeps its traceback.
- Atomic writes: every declared output is written to a temporary sibling and renamed, so a killed
  stage never leaves a half-written CSV/JSON/checkpoint behind (``os.replace`` is atomic on POSIX
  when the temporary file lives on the same filesystem).
- The thread map (:func:`ordered_map`) serves the stages that render or re-encode images: OpenCV
  and NumPy release the GIL, so threads use every core without pickling images. joblib's
  ``Parallel(return_as="generator")`` keeps order and cancels on close too, but it runs ahead of a
  slow consumer without bound (measured: all 1,000 tasks done while the consumer had taken 5), and
  prepare must hold at most a few images per thread whatever the disk speed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# --- errors ------------------------------------------------------------------------------------


class Products10kError(Exception):
    """Base class: an error the user can act on (bad params, bad data, missing weights)."""


class ConfigError(Products10kError):
    """A params.yaml problem: unknown key, wrong type, bad value. Names the file and the key."""


class DataError(Products10kError):
    """A dataset problem: bad CSV schema or values, too many bad images. Names file/row/column."""


# --- logging -------------------------------------------------------------------------------


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("P10K_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# --- atomic writes -------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file is named ``.<name>.<pid>.<random><suffix>``: a run killed before the rename
    leaves it behind, and the next write of ``path`` removes those of processes no longer alive
    (never a live one's: two DDP ranks may write the same cache file at once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=suffix or ".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes a private (0600) file, and writers that reopen it keep that mode: outputs
    # (metrics, submissions, reports) get the usual mode of a new file instead.
    tmp_path.chmod(0o666 & ~current_umask())
    try:
        yield tmp_path
        pause_point(f"publish {path.parent.name}/{path.name}")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _remove_dead_temporaries(path: Path) -> None:
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        try:
            written = tmp.stat().st_mtime
        except FileNotFoundError:  # another writer's cleanup got there first
            continue
        if pid.isdigit() and not _writer_alive(int(pid), written):
            tmp.unlink(missing_ok=True)


def _writer_alive(pid: int, written: float) -> bool:
    """Whether process ``pid``, which last wrote its temporary at ``written``, may still be writing.

    Not when it is gone, nor when it is a zombie (SIGKILLed with its parent, not yet reaped by init:
    ``kill(pid, 0)`` still succeeds on one; the kill test met it), nor when the pid now belongs to a
    process started after the write (pids wrap at 32,768 on many Linux systems).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: decided below, where /proc can tell
        pass
    started = _linux_process_start(pid)
    if started is None:  # no /proc (macOS): kill's answer stands
        return True
    state, start_time = started
    return state not in ("Z", "X") and start_time <= written + 1.0  # /proc's boot time is in whole seconds


def _linux_process_start(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in seconds since the epoch) of ``pid`` from /proc, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    except (OSError, StopIteration):
        return None
    # after the ")" that closes the command name (which may hold spaces): state is field 3, start 22
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(boot.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def swap_in(staging: Path, out: Path) -> None:
    """Publish the complete folder ``staging`` as ``out``, replacing an existing ``out``.

    Two renames rather than rmtree-then-rename: the old ``out`` (moved to ``.<name>.old-<pid>``)
    disappears only once the new one is in place. A run killed between the renames leaves ``out``
    absent (never half-written) and the old copy aside; the next publish removes such leftovers.
    """
    pause_point(f"publish {out.parent.name}/{out.name}")
    for leftover in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    old = None
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, df, **kwargs) -> None:
    """Write a pandas DataFrame as CSV atomically (no index unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, **kwargs)


# --- fault injection ---------------------------------------------------------------------------


def pause_point(name: str) -> None:
    """Fault-injection hook for the kill tests: a no-op unless ``$PRODUCTS10K_PAUSE_AT`` is ``name``.

    Then the process appends its pid to ``$PRODUCTS10K_PAUSE_DIR/pids`` and waits to be killed, so a
    test can SIGKILL a real run at a precise moment (a file complete but not yet published, a shard
    half-written, a training epoch in flight) instead of guessing one with a timer. Named points:
    ``publish <folder>/<name>`` before every atomic publish (atomic_path, swap_in), and the ones
    the stages add where a kill is most interesting (``prepare images``, ``train epoch <n>``).
    Once the test creates ``$PRODUCTS10K_PAUSE_DIR/released`` the point lets processes through
    (those waiting, and the ones torchrun restarts after the kill with the same environment).
    """
    if os.environ.get("PRODUCTS10K_PAUSE_AT") != name:
        return
    folder = Path(os.environ.get("PRODUCTS10K_PAUSE_DIR", "."))
    if (folder / "released").exists():
        return
    with open(folder / "pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    while not (folder / "released").exists():  # until killed or released
        time.sleep(0.1)


# --- the stage runner ----------------------------------------------------------------------


def run_stage(log: logging.Logger, work: Callable[..., T], *args, **kwargs) -> T:
    """Set up logging, run ``work(*args, **kwargs)`` and return its result.

    On a Products10kError, log its message on ``log`` (the stage's logger) and exit with status 1.
    """
    setup_logging()
    try:
        return work(*args, **kwargs)
    except Products10kError as exc:
        log.error("%s", exc)
        sys.exit(1)


# --- thread map ----------------------------------------------------------------------------

# Tasks submitted ahead of the one being consumed, per worker: enough to keep every worker busy,
# few enough to bound the memory held in finished-but-unconsumed results.
IN_FLIGHT_PER_WORKER = 4


#: SKU ids: ASCII digits, at most 18 (every such number fits an int64, the label arrays' type), and
#: no leading zero: ``007`` and ``7`` would otherwise be one SKU under two spellings
_SKU_ID = re.compile(r"0|[1-9][0-9]{0,17}")
#: what parse_sku_id accepts, in words (for the error messages that refuse an id)
SKU_ID_RULE = "an integer of 1-18 ASCII digits without leading zeros (one SKU, one spelling: 7, not 007)"


def parse_sku_id(text: str) -> int | None:
    """The SKU id ``text`` names, or None (see SKU_ID_RULE). ``str.isdigit`` is not the test: it takes
    superscripts (``²``), other scripts' digits (``١٢``) and 5000-digit numbers that int64 arrays refuse."""
    return int(text) if _SKU_ID.fullmatch(text) else None


def process_cores() -> int:
    """The cores this process may run on: a container's or taskset's share, not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_n_jobs(n_jobs: int, n_tasks: int | None = None) -> int:
    """The number of workers for ``n_jobs``, with joblib's meaning, capped at ``n_tasks``.

    ``n_jobs >= 1`` is taken as is, -1 is all cores, -2 all cores but one (down to 1), and so on;
    0 is a ValueError. Never less than 1, never more than ``n_tasks`` (when given).
    """
    if n_jobs == 0:
        raise ValueError("n_jobs must be >= 1, or negative for 'all cores but n_jobs+1' (-1 = all)")
    # not joblib, which the deploy runtime's install does not have
    n = n_jobs if n_jobs > 0 else process_cores() + 1 + n_jobs
    if n_tasks is not None:
        n = min(n, n_tasks)
    return max(1, n)


def ordered_map(
    fn: Callable, tasks: Iterable[tuple], n_workers: int, thread_name_prefix: str = "worker"
) -> Iterator:
    """Yield ``fn(*task)`` for every task, in task order, computed on ``n_workers`` threads.

    The order never depends on the thread scheduling, so neither do output bytes written from it.
    At most ``IN_FLIGHT_PER_WORKER * n_workers`` tasks are submitted ahead of the one being
    consumed, which bounds the memory held in finished-but-unconsumed results. If the consumer
    stops (an exception, Ctrl-C, the generator is closed), queued tasks are cancelled and the pool
    waits only for the few that are running.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers} (see resolve_n_jobs)")
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix=thread_name_prefix)
    pending: deque = deque()
    try:
        it = iter(tasks)
        for task in it:
            pending.append(pool.submit(fn, *task))
            if len(pending) >= IN_FLIGHT_PER_WORKER * n_workers:
                break
        for task in it:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, *task))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
