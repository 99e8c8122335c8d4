"""Thread-pool helpers shared by the stages that render or re-encode images.

Threads suffice there: OpenCV and NumPy release the GIL in the heavy calls, so a thread pool uses
all cores without the start-up of worker processes or pickling every image.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import joblib

# Tasks submitted ahead of the one being consumed, per worker: enough to keep every worker busy,
# few enough to bound the memory held in finished-but-unconsumed results.
IN_FLIGHT_PER_WORKER = 4


def resolve_n_jobs(n_jobs: int, n_tasks: int | None = None) -> int:
    """The number of workers for ``n_jobs``, with joblib's meaning, capped at ``n_tasks``.

    ``n_jobs >= 1`` is taken as is, -1 is all cores, -2 all cores but one (down to 1), and so on;
    0 is a ValueError. Never less than 1, never more than ``n_tasks`` (when given).
    """
    if n_jobs == 0:
        raise ValueError("n_jobs must be >= 1, or negative for 'all cores but n_jobs+1' (-1 = all)")
    n = joblib.effective_n_jobs(n_jobs)
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
