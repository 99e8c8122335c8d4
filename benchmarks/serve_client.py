"""The clients bench_serve.py and serve_soak.py drive products10k-serve with: a multipart post,
a timed load of concurrent keep-alive clients, the answers a service gives, a service started and
waited for, a process's memory."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from tests.deploy.test_serve import multipart

#: the SKU id the load's enrolment adds (the soak's are NEW_SKU + 1000 + k)
NEW_SKU = 990_000_001


def post(conn: http.client.HTTPConnection, path: str, files, token: str | None = None) -> tuple[int, dict]:
    body, kind = multipart(files)
    headers = {"Content-Type": kind}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(port: int | list[int], photos, clients: int, seconds: float, during=None, at: float = 0.5) -> dict:
    """``clients`` threads posting one photo per request for ``seconds``, client k to ``port[k %
    len(port)]``; ``during`` runs at ``at`` of the run. Records: (latency s, status, photo, reply,
    end time, index of the port)."""
    ports = [port] if isinstance(port, int) else port
    stop = time.perf_counter() + seconds
    records: list[tuple[float, int, str, dict | None, float, int]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        target = k % len(ports)
        conn = http.client.HTTPConnection("127.0.0.1", ports[target], timeout=60)
        i = k
        while time.perf_counter() < stop:
            name, data = photos[i % len(photos)]
            i += clients
            t0 = time.perf_counter()
            try:
                status, reply = post(conn, "/v1/recognize?mode=fused&top_k=5", [(name, data)])
            except (OSError, http.client.HTTPException, ValueError):
                status, reply = 0, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", ports[target], timeout=60)
                time.sleep(0.05)  # the service is down (the soak's restart): retry, not spin
            with lock:
                records.append((time.perf_counter() - t0, status, name, reply, time.perf_counter(), target))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        time.sleep(seconds * at)
        during()
    for t in threads:
        t.join()
    return {**summarize(records, time.perf_counter() - started), "records": records}


def summarize(records, elapsed: float) -> dict:
    ok = [r for r in records if answered(r[1], r[3])]
    # latency of the answered requests: a refused connection while a service restarts fails in
    # microseconds and would pull the percentiles down
    latencies = np.array([r[0] for r in ok] or [np.nan]) * 1000
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "requests_per_s": round(len(records) / elapsed, 1),
        "latency_ms": {
            p: round(float(np.percentile(latencies, int(p[1:]))), 1) for p in ("p50", "p95", "p99")
        },
    }


def answers(port: int, photos) -> dict[str, tuple]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = {}
    for name, data in photos:
        reply = post(conn, "/v1/recognize?mode=fused&top_k=5", [(name, data)])[1]
        out[name] = (reply["index_version"], reply["results"][0]["skus"], reply["results"][0]["scores"])
    conn.close()
    return out


def same(a: tuple, skus: list, scores: list) -> bool:
    return a[1] == skus and np.allclose(a[2], scores, atol=1e-4)


def answered(status: int, reply: dict | None) -> bool:
    return status == 200 and reply["results"][0]["status"] == "ok"


def start_server(cmd: list[str], port: int, log: Path | None = None) -> tuple[subprocess.Popen, float]:
    """The service started and answering /healthz, and the seconds that took; its output appended to
    ``log`` (a restarted process after the killed one's) or dropped."""
    t0 = time.perf_counter()
    with open(log, "ab") if log else open(os.devnull, "wb") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    while server.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return server, round(time.perf_counter() - t0, 2)
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the service did not start: {' '.join(cmd)}" + (f" (log: {log})" if log else ""))


def get_bytes(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def test_photos(n: int = 64) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile("data/raw/test.zip") as z:
        names = sorted(m for m in z.namelist() if m.endswith(".jpg"))[:n]
        return [(Path(m).name, z.read(m)) for m in names]
