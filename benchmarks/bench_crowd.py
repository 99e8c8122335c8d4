"""products10k-serve under a crowd of uploads at the request limit: peak memory against the number
of clients, and what one ordinary client meanwhile sees.

The service runs as a fresh process on ``make repro``'s export and index with its default limits
(``--max-request-mb 32``, ``--max-inflight-mb 128``). For each crowd size in ``--clients``
(default 1, 4, 16, 64), that many clients post one body just under the request limit at once (32
parts of random bytes: each is read, parsed and refused by the decoder's header check, the path any
upload takes), while one ordinary client posts a test photo every 50 ms. Reported per size: the
server's peak RSS over its figure before the crowd (VmHWM, reset through /proc/<pid>/clear_refs),
the crowd's answers (200, or 503 with Retry-After when the in-flight budget has no room within
``--queue-wait-s``), and the ordinary client's p50/p99 latency and failures. ``--budget-mb`` runs
the same with another budget (``--budget-mb 100000``: none to speak of, for comparison).

    python benchmarks/bench_crowd.py --clients 1,4,16,64

Writes benchmarks/results/crowd.json (``--out``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_serve import rss_mb, start_server, test_photos  # noqa: E402
from harness import write_results  # noqa: E402
from machine import describe  # noqa: E402

from tests.deploy.test_serve import multipart  # noqa: E402
from tests.helpers import free_port  # noqa: E402

MB = 2**20


def send(port: int, body: bytes, kind: str, timeout: float = 300) -> tuple[int, float, dict]:
    """(status, seconds, headers) of one POST /v1/recognize on a fresh connection."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/recognize?mode=classifier", body=body, headers={"Content-Type": kind})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - start, dict(response.getheaders())
    except OSError:
        return -1, time.perf_counter() - start, {}
    finally:
        conn.close()


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS (Linux >= 4.0)


def crowd(port: int, pid: int, clients: int, request_mb: float, photo: tuple[str, bytes]) -> dict:
    parts = int(request_mb) - 1  # parts of ~1 MB, the body just under the limit with its framing
    bodies = [
        multipart([(f"{c}-{i}.bin", os.urandom(MB - 4096)) for i in range(parts)]) for c in range(clients)
    ]
    ordinary = multipart([photo])
    reset_peak(pid)
    before = rss_mb(pid, "VmHWM")
    together = threading.Barrier(clients + 1)
    answers: list[tuple[int, float, dict]] = []
    seen: list[tuple[int, float, dict]] = []
    done = threading.Event()

    def heavy(body) -> None:
        together.wait()
        answers.append(send(port, *body))

    def light() -> None:
        together.wait()
        while not done.is_set():
            seen.append(send(port, *ordinary, timeout=60))
            time.sleep(0.05)

    threads = [threading.Thread(target=heavy, args=(b,)) for b in bodies]
    watcher = threading.Thread(target=light)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    statuses = [status for status, _, _ in answers]
    latency = np.array([s for status, s, _ in seen if status == 200]) * 1000
    return {
        "clients": clients,
        "peak_rss_rise_mb": round(rss_mb(pid, "VmHWM") - before, 1),
        "answers": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "busy_with_retry_after": sum(
            1 for s, _, h in answers if s == 503 and "retry-after" in {k.lower() for k in h}
        ),
        "crowd_seconds_max": round(max(s for _, s, _ in answers), 2),
        "ordinary": {
            "requests": len(seen),
            "failed": sum(1 for status, _, _ in seen if status != 200),
            "p50_ms": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
            "p99_ms": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/export"))
    p.add_argument("--index", type=Path, default=Path("models/m0/index"))
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--request-mb", type=float, default=32.0)
    p.add_argument("--budget-mb", type=float, default=128.0)
    p.add_argument("--queue-wait-s", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/crowd.json"))
    args = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "products10k.deploy.serve", "--model", str(args.model),
           "--index", str(args.index), "--port", str(port), "--max-request-mb", str(args.request_mb),
           "--max-inflight-mb", str(args.budget_mb), "--queue-wait-s", str(args.queue_wait_s),
           "--versions", f"/tmp/bench-crowd-{port}"]  # fmt: skip
    server, _ = start_server(cmd, port)
    photo = test_photos(1)[0]
    try:
        send(port, *multipart([photo]))  # warm: the model, the decoders, the parser
        idle = rss_mb(server.pid)
        rows = [crowd(port, server.pid, int(n), args.request_mb, photo) for n in args.clients.split(",")]
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "machine": describe(),
        "settings": {
            "request_mb": args.request_mb,
            "budget_mb": args.budget_mb,
            "queue_wait_s": args.queue_wait_s,
            "decode_threads": os.cpu_count(),
        },  # fmt: skip
        "idle_rss_mb": round(idle, 1),
        "crowds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(json.dumps(result["crowds"], indent=1))


if __name__ == "__main__":
    main()
