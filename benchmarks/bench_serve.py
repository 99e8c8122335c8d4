"""Load benchmark of products10k-serve on this machine, loopback only, bounded in clients and time.

    .venv/bin/python benchmarks/bench_serve.py [--model models/export] [--index models/m0/index]
        [--clients 8] [--seconds 20] [--screenshot docs/serve_page.png]

1. Starts the service (a fresh process) and records its cold start (process start to the first
   200 from /healthz) and idle memory (RSS).
2. ``--clients`` concurrent clients, each on its own keep-alive connection, send one test photo
   per request (``mode=fused``) for ``--seconds``: requests/s, p50/p95/p99 latency, failed
   requests, the server's peak RSS, and how many images each model run served (the batching).
3. The same load while an enrolment (5 photos of a new SKU) swaps the index mid-run: every answer
   must be the answer of the version it names (compared with both versions' answers for the same
   photo, taken before and after), none may fail.
4. The offline figure beside it: the same photos through the runtime in batches of 32 in-process
   (decode, prepare, crop, onnxruntime), images/s.
5. With ``--soak-s S``, a soak: ``--clients`` clients for S seconds while a new SKU is enrolled
   every ``--enrol-every-s`` and the service is killed with SIGKILL half-way and started again on
   the same ``--versions``: requests/s, p99, failures (those in the restart window counted apart),
   the restart's seconds, acknowledged enrolments, SKUs lost (acknowledged but absent from the
   newest version after the run: must be 0), version folders left (``--keep-versions 3``) and the
   peak RSS of each server process.

Results: benchmarks/results/serve.json. Needs `make repro`'s export and index.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402

from tests.deploy.test_serve import chromium_driver, multipart  # noqa: E402
from tests.helpers import free_port  # noqa: E402

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


def load(port: int, photos: list[tuple[str, bytes]], clients: int, seconds: float, during=None) -> dict:
    """``clients`` threads posting one photo per request for ``seconds``; ``during`` runs mid-way."""
    stop = time.perf_counter() + seconds
    records: list[tuple[float, int, str, dict | None]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
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
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                time.sleep(0.05)  # the service is down (the soak's restart): retry, not spin
            with lock:
                records.append((time.perf_counter() - t0, status, name, reply, time.perf_counter()))
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        time.sleep(seconds / 2)
        during()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies = np.array([r[0] for r in records]) * 1000
    ok = [r for r in records if _answered(r[1], r[3])]
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "requests_per_s": round(len(records) / elapsed, 1),
        "latency_ms": {
            p: round(float(np.percentile(latencies, int(p[1:]))), 1) for p in ("p50", "p95", "p99")
        },
        "records": records,
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


def offline_images_per_s(model_dir: Path, photos) -> float:
    from products10k.deploy.runtime import ExportedModel

    model = ExportedModel(model_dir)
    data = [d for _, d in photos] * max(1, 256 // len(photos))
    t0 = time.perf_counter()
    for start in range(0, len(data), 32):
        model.run(np.stack([model.load(d) for d in data[start : start + 32]]))
    return round(len(data) / (time.perf_counter() - t0), 1)


def test_photos(n: int = 64) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile("data/raw/test.zip") as z:
        names = sorted(m for m in z.namelist() if m.endswith(".jpg"))[:n]
        return [(Path(m).name, z.read(m)) for m in names]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/export"))
    p.add_argument("--index", type=Path, default=Path("models/m0/index"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--screenshot", type=Path, help="also save a screenshot of the page here (Chromium)")
    p.add_argument(
        "--server-python", default=sys.executable, help="the interpreter of an install to serve from"
    )
    p.add_argument("--soak-s", type=float, default=0.0, help="also soak for this long (0: no soak)")
    p.add_argument("--enrol-every-s", type=float, default=2.0, help="soak: a new SKU this often")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = p.parse_args()
    photos = test_photos()
    result = {
        "machine": describe(),
        "clients": args.clients,
        "seconds": args.seconds,
        "server": args.server_python,
    }
    result["offline_images_per_s"] = offline_images_per_s(args.model, photos)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        token = uuid.uuid4().hex
        (tmp / "token").write_text(token)
        port = free_port()
        cmd = [args.server_python, "-m", "products10k.deploy.serve", "--model", str(args.model), "--index",
               str(args.index), "--port", str(port), "--token-file", str(tmp / "token"), "--versions",
               str(tmp / "versions")]  # fmt: skip
        t0 = time.perf_counter()
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/healthz")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    time.sleep(0.05)
            result["cold_start_s"] = round(time.perf_counter() - t0, 2)
            result["idle_rss_mb"] = round(rss_mb(server.pid), 1)

            steady = load(port, photos, args.clients, args.seconds)
            result["steady"] = {k: v for k, v in steady.items() if k != "records"}
            health = json.loads(_get(port, "/healthz"))
            result["images_per_model_run"] = round(health["batches"]["images"] / health["batches"]["runs"], 2)
            if args.screenshot:  # before the enrolment: a photo the index has never seen
                screenshot(port, photos[-1], args.screenshot)

            before = answers(port, photos)
            new_photos = [(f"new{i}.jpg", photos[i][1]) for i in range(5)]

            def enrol() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                status, reply = post(conn, f"/v1/skus/{NEW_SKU}/images", new_photos, token)
                result["enrolment"] = {"status": status, "index_version": reply.get("index_version")}

            swap = load(port, photos, args.clients, args.seconds, during=enrol)
            after = answers(port, photos)
            mixed = 0
            for _, status, name, reply, _ in swap["records"]:
                if status != 200:
                    continue
                version, r = reply["index_version"], reply["results"][0]
                expected = before[name] if version == before[name][0] else after[name]
                mixed += not (expected[0] == version and same(expected, r["skus"], r["scores"]))
            result["during_enrolment"] = {k: v for k, v in swap.items() if k != "records"}
            result["during_enrolment"]["mixed_answers"] = mixed
            result["during_enrolment"]["versions_seen"] = sorted(
                {r[3]["index_version"] for r in swap["records"] if r[3]}
            )
            result["peak_rss_mb"] = round(rss_mb(server.pid, "VmHWM"), 1)
        finally:
            server.terminate()
            server.wait(timeout=30)
        if args.soak_s > 0:
            result["soak"] = {"seconds": args.soak_s, "enrol_every_s": args.enrol_every_s}
            result["soak"].update(soak(args, photos, tmp))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _answered(status: int, reply: dict | None) -> bool:
    return status == 200 and reply["results"][0]["status"] == "ok"


def start_server(cmd: list[str], port: int) -> tuple[subprocess.Popen, float]:
    """The service started and answering /healthz, and the seconds that took."""
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while server.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return server, round(time.perf_counter() - t0, 2)
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the service did not start: {' '.join(cmd)}")


def soak(args, photos, tmp: Path) -> dict:
    """Clients, enrolments every few seconds and a kill -9 with a restart half-way (docstring, 5)."""
    from products10k.deploy.versions import list_versions
    from products10k.knn import load_gallery

    token = uuid.uuid4().hex
    (tmp / "token").write_text(token)
    port = free_port()
    versions = tmp / "soak-versions"
    cmd = [args.server_python, "-m", "products10k.deploy.serve", "--model", str(args.model), "--index",
           str(args.index), "--port", str(port), "--token-file", str(tmp / "token"), "--versions",
           str(versions), "--keep-versions", "3"]  # fmt: skip
    server, _ = start_server(cmd, port)
    acked: list[int] = []
    stop = threading.Event()
    peaks = []

    def enroller() -> None:
        k = 0
        while not stop.wait(args.enrol_every_s):
            sku = NEW_SKU + 1000 + k
            name, data = photos[k % len(photos)]
            k += 1
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                status, _ = post(conn, f"/v1/skus/{sku}/images", [(name, data)], token)
                conn.close()
            except (OSError, http.client.HTTPException, ValueError):
                continue  # the service was down: not acknowledged, so not owed
            if status == 201:
                acked.append(sku)

    restart: dict = {}

    def kill_and_restart() -> None:
        nonlocal server
        peaks.append(rss_mb(server.pid, "VmHWM"))
        restart["at_s"] = round(args.soak_s / 2, 1)
        t0 = time.perf_counter()
        server.kill()
        server.wait()
        server, _ = start_server(cmd, port)
        restart["down_s"] = round(time.perf_counter() - t0, 2)
        restart["window"] = (t0, time.perf_counter())

    thread = threading.Thread(target=enroller)
    thread.start()
    try:
        result = load(port, photos, args.clients, args.soak_s, during=kill_and_restart)
    finally:
        stop.set()
        thread.join()
        peaks.append(rss_mb(server.pid, "VmHWM"))
        server.terminate()
        server.wait(timeout=30)
    number, newest = list_versions(versions)[-1] if list_versions(versions) else (0, args.index)
    present = {int(s) for s in load_gallery(newest).skus}
    down_from, down_to = restart.get("window", (0.0, 0.0))
    failed_outside = sum(
        1
        for _, status, _, reply, end in result["records"]
        if not (status == 200 and reply["results"][0]["status"] == "ok")
        and not down_from <= end <= down_to + 1.0
    )
    return {
        **{k: v for k, v in result.items() if k != "records"},
        "failed_outside_restart": failed_outside,  # must be 0: a request fails only while the service is down
        "restart": {k: v for k, v in restart.items() if k != "window"},
        "enrolments_acknowledged": len(acked),
        "skus_lost": len([s for s in acked if s not in present]),
        "newest_version": number,
        "version_folders_left": len(list_versions(versions)),
        "peak_rss_mb_per_process": [round(p, 1) for p in peaks],
    }


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def screenshot(port: int, photo: tuple[str, bytes], out: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / photo[0]
        path.write_bytes(photo[1])
        driver = chromium_driver()
        try:
            driver.set_window_size(1000, 760)
            driver.get(f"http://127.0.0.1:{port}/")
            driver.find_element(By.ID, "files").send_keys(str(path))
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".result li.sku"))
            time.sleep(0.5)  # the thumbnails
            driver.save_screenshot(str(out))
        finally:
            driver.quit()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
