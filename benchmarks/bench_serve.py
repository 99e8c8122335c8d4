"""Load benchmark of products10k-serve on this machine, loopback only, bounded in clients and time.

    .venv/bin/python benchmarks/bench_serve.py [--model models/export] [--index models/m0/index]
        [--clients 8] [--seconds 20] [--screenshot docs/serve_page.png]
        [--soak-s 120 [--only-soak] [--enrol-every-s 2] [--compact-every 16] [--poll-s 0.5]]

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
5. With ``--soak-s S``, a soak of three services on one ``--versions`` folder: a writer (the only
   one that takes enrolments, ``--compact-every 16`` so the soak crosses compactions) and two
   read-only followers (``--follow --poll-s 0.5``). ``--clients`` clients for S seconds, client k on
   service k % 3, while a new SKU is enrolled on the writer every ``--enrol-every-s``; each service
   killed with SIGKILL in turn (follower 1 at 1/4, the writer at 1/2, follower 2 at 3/4) and
   started again at once with the same arguments. Per service: requests/s, p50/p99, failures (those
   in its own restart window counted apart), kill-to-first-200 seconds, peak RSS of each process,
   and the SKUs lost (acknowledged but not named top-1 by kNN for the photo enrolled: must be 0).
   Beside it: acknowledged enrolments, SKUs absent from the newest version on disk (must be 0), the
   followers' lag (acknowledgement to a follower's /healthz naming that version, p50/max), how long
   the slower follower took to reach the writer's version after the last enrolment, and version
   folders left (``--keep-versions 3``). ``--only-soak`` skips 1-4 (results then go to
   benchmarks/results/serve_soak.json unless ``--out`` says otherwise).

Results: benchmarks/results/serve.json. Needs `make repro`'s export and index.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import describe  # noqa: E402

from tests.deploy.test_serve import chromium_driver, multipart  # noqa: E402
from tests.helpers import free_port  # noqa: E402

NEW_SKU = 990_000_001
RESULTS = Path(__file__).parent / "results"


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
    ok = [r for r in records if _answered(r[1], r[3])]
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
    p.add_argument("--only-soak", action="store_true", help="the soak alone (steps 1-4 skipped)")
    p.add_argument("--enrol-every-s", type=float, default=2.0, help="soak: a new SKU this often")
    p.add_argument("--compact-every", type=int, default=16, help="soak: the writer's --compact-every")
    p.add_argument("--poll-s", type=float, default=0.5, help="soak: the followers' --poll-s")
    p.add_argument("--soak-logs", type=Path, help="soak: keep the three services' logs in this folder")
    p.add_argument("--out", type=Path, help="default: results/serve.json (serve_soak.json with --only-soak)")
    args = p.parse_args()
    if args.only_soak and args.soak_s <= 0:
        p.error("--only-soak needs --soak-s")
    out = args.out or RESULTS / ("serve_soak.json" if args.only_soak else "serve.json")
    photos = test_photos()
    result = {
        "machine": describe(),
        "clients": args.clients,
        "seconds": args.seconds,
        "server": args.server_python,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only_soak:
            del result["seconds"]  # the load's seconds: not run
        else:
            result["offline_images_per_s"] = offline_images_per_s(args.model, photos)
            result.update(bench_load(args, photos, tmp))
        if args.soak_s > 0:
            result["soak"] = {"seconds": args.soak_s, "enrol_every_s": args.enrol_every_s}
            result["soak"].update(soak(args, photos, tmp))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def bench_load(args, photos, tmp: Path) -> dict:
    """Steps 1-3 of the docstring on one fresh service."""
    result: dict = {}
    token = uuid.uuid4().hex
    (tmp / "token").write_text(token)
    port = free_port()
    cmd = [args.server_python, "-m", "products10k.deploy.serve", "--model", str(args.model), "--index",
           str(args.index), "--port", str(port), "--token-file", str(tmp / "token"), "--versions",
           str(tmp / "versions")]  # fmt: skip
    server, result["cold_start_s"] = start_server(cmd, port)
    try:
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
        for _, status, name, reply, *_ in swap["records"]:
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
    return result


def _answered(status: int, reply: dict | None) -> bool:
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


# --- the soak: a writer and two followers -----------------------------------------------------------


@dataclass
class Replica:
    """One of the soak's services: its command line, and each process run under it."""

    name: str
    cmd: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    peaks_mb: list[float] = field(default_factory=list)  # VmHWM of each process, read before it ends
    restarts: list[tuple[float, float]] = field(default_factory=list)  # (SIGKILL sent, first 200)

    def start(self) -> None:
        self.proc, _ = start_server(self.cmd, self.port, self.log)

    def kill_and_restart(self) -> None:
        self.peaks_mb.append(rss_mb(self.proc.pid, "VmHWM"))
        t0 = time.perf_counter()
        self.proc.kill()
        self.proc.wait()
        with open(self.log, "ab") as f:
            f.write(b"=== bench_serve: SIGKILL, started again ===\n")
        self.start()
        self.restarts.append((t0, time.perf_counter()))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.peaks_mb.append(rss_mb(self.proc.pid, "VmHWM"))
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def version(self) -> int:
        return json.loads(_get(self.port, "/healthz"))["index"]["version"]


class VersionWatch:
    """Polls each follower's /healthz every ``period`` on its own thread and notes when each first
    served each index version. Polling all the time, rather than per enrolment, keeps a slow
    follower's wait from delaying the next enrolment's measurement."""

    def __init__(self, followers: list[Replica], period: float = 0.05):
        self.followers, self.period = followers, period
        self.first_seen: dict[str, dict[int, float]] = {f.name: {} for f in followers}
        self.seen = {f.name: -1 for f in followers}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        while not self.stop.is_set():
            for f in self.followers:
                if f.name not in conns:
                    conns[f.name] = http.client.HTTPConnection("127.0.0.1", f.port, timeout=5)
                conn = conns[f.name]
                try:
                    conn.request("GET", "/healthz")
                    version = json.loads(conn.getresponse().read())["index"]["version"]
                except (OSError, http.client.HTTPException, ValueError):
                    conns.pop(f.name).close()  # down (its restart): a new connection next round
                    continue
                now = time.perf_counter()
                # a follower may skip versions (two published within one poll): serving version v
                # serves every enrolment up to v
                for v in range(self.seen[f.name] + 1, version + 1):
                    self.first_seen[f.name].setdefault(v, now)
                self.seen[f.name] = max(self.seen[f.name], version)
            self.stop.wait(self.period)
        for conn in conns.values():
            conn.close()

    def wait_for(self, version: int, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while min(self.seen.values()) < version:
            if time.perf_counter() > deadline:
                return False
            time.sleep(self.period)
        return True


def enrolment_photos(args, n: int) -> list[tuple[str, bytes]]:
    """``n`` test photos (after the 64 the clients send) that kNN must name top-1 as the SKU they are
    enrolled as, whatever else is enrolled: each farther from every gallery vector and from the
    others than a similarity at which its k neighbours could outvote its own match (similarity 1).
    Any photo would do to check that an enrolment is present; this one makes "not named" mean lost."""
    from products10k.deploy.runtime import ExportedModel
    from products10k.imaging.images import ImageDefect
    from products10k.knn import load_gallery, search

    model, gallery = ExportedModel(args.model), load_gallery(args.index)
    meta = gallery.meta
    if meta["vote"] not in ("softmax", "best"):
        raise SystemExit(f"the soak's kNN check needs a softmax or best vote, not '{meta['vote']}'")
    # softmax: a neighbour at similarity s weighs exp((s - 1) / T) against the photo's own 1; k of them
    # below this ceiling weigh under 1/2 together ("best" only needs s < 1)
    ceiling = 1 + meta["temperature"] * math.log(0.5 / meta["k"])
    pool, inputs = [], []
    for name, data in test_photos(64 + 4 * n)[64:]:
        try:
            inputs.append(model.load(data))
        except ImageDefect:
            continue
        pool.append((name, data))
    emb = np.concatenate([model.run(np.stack(inputs[i : i + 32]))[1] for i in range(0, len(inputs), 32)])
    sims, _ = search(gallery.index, emb, 1, batch=64, progress=False)
    chosen: list[int] = []
    for i in np.flatnonzero(sims[:, 0] < ceiling):
        if len(chosen) == n:
            break
        if not chosen or float(np.max(emb[chosen] @ emb[i])) < ceiling:
            chosen.append(int(i))
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} test photos are distinct enough to enrol, {n} needed")
    return [pool[i] for i in chosen]


def soak(args, photos, tmp: Path) -> dict:
    """A writer and two followers under clients and enrolments, each killed in turn (docstring, 5)."""
    token = uuid.uuid4().hex
    (tmp / "token").write_text(token)
    versions, logs = tmp / "soak-versions", args.soak_logs or tmp / "soak-logs"
    logs.mkdir(parents=True, exist_ok=True)
    to_enrol = enrolment_photos(args, int(args.soak_s / args.enrol_every_s) + 2)
    common = [args.server_python, "-m", "products10k.deploy.serve", "--model", str(args.model), "--index",
              str(args.index), "--versions", str(versions), "--keep-versions", "3"]  # fmt: skip
    roles = {
        "writer": ["--token-file", str(tmp / "token"), "--compact-every", str(args.compact_every)],
        "follower1": ["--follow", "--poll-s", str(args.poll_s)],
        "follower2": ["--follow", "--poll-s", str(args.poll_s)],
    }
    replicas = []
    for name, extra in roles.items():
        port = free_port()
        replicas.append(Replica(name, [*common, "--port", str(port), *extra], port, logs / f"{name}.log"))
    writer, followers = replicas[0], replicas[1:]
    acked: list[tuple[int, tuple[str, bytes], int, float]] = []  # (SKU, photo, version, acknowledged at)
    refused: list[int | str] = []  # the status or error of each enrolment not acknowledged
    stop, watch = threading.Event(), VersionWatch(followers)

    def enroller() -> None:
        for k, photo in enumerate(to_enrol):
            if stop.wait(args.enrol_every_s):
                return
            sku = NEW_SKU + 1000 + k
            try:
                conn = http.client.HTTPConnection("127.0.0.1", writer.port, timeout=120)
                status, reply = post(conn, f"/v1/skus/{sku}/images", [photo], token)
                conn.close()
            except (OSError, http.client.HTTPException, ValueError) as exc:
                refused.append(type(exc).__name__)  # the writer was down: not acknowledged, so not owed
                continue
            if status == 201:
                acked.append((sku, photo, reply["index_version"], time.perf_counter()))
            else:
                refused.append(status)

    def kill_in_turn() -> None:  # follower 1 at 1/4 of the soak, the writer at 1/2, follower 2 at 3/4
        for i, replica in enumerate((followers[0], writer, followers[1]), 1):
            time.sleep(max(0.0, started + args.soak_s * i / 4 - time.perf_counter()))
            replica.kill_and_restart()

    thread = threading.Thread(target=enroller)
    try:
        for replica in replicas:  # the writer first: it clears a killed enrolment's staging folder
            replica.start()
        watch.thread.start()
        thread.start()
        started = time.perf_counter()  # the soak's clock: the kills and the restarts' at_s count from here
        result = load([r.port for r in replicas], photos, args.clients, args.soak_s, kill_in_turn, at=0)
        stop.set()
        thread.join()
        final = converge(writer, watch, acked)
        lost = {r.name: not_named(r.port, acked) for r in replicas}
    finally:
        stop.set()
        watch.stop.set()
        for replica in replicas:
            replica.stop()
    return soak_summary(args, replicas, result, started, acked, refused, watch, final, lost, versions)


def converge(writer: Replica, watch: VersionWatch, acked) -> dict:
    """Wait (60 s at most) until both followers serve the writer's version; how long after the last
    acknowledged enrolment the slower one got there (from the watch's first sighting, so a follower
    already there counts its real lag, not the time this wait began)."""
    target = writer.version()
    reached = watch.wait_for(target, timeout=60)
    watch.stop.set()
    watch.thread.join()
    out: dict = {"writer_version": target, "followers_reached_it": reached}
    out["follower_versions"] = dict(watch.seen)
    if reached and acked:
        slowest = max(watch.first_seen[name][target] for name in watch.first_seen)
        out["slower_follower_after_last_enrolment_s"] = round(slowest - acked[-1][3], 2)
    return out


def not_named(port: int, acked) -> list[int]:
    """The acknowledged SKUs this service's kNN does not name top-1 for the photo each was enrolled
    with (16 photos a request)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    missing = []
    for start in range(0, len(acked), 16):
        chunk = acked[start : start + 16]
        status, reply = post(conn, "/v1/recognize?mode=knn&top_k=1", [photo for _, photo, _, _ in chunk])
        if status != 200:
            raise SystemExit(f"port {port}: the kNN check was answered {status}: {reply}")
        for (sku, *_), r in zip(chunk, reply["results"], strict=True):
            if r["skus"][:1] != [sku]:
                missing.append(sku)
    conn.close()
    return missing


def soak_summary(args, replicas, result, started, acked, refused, watch, final, lost, versions) -> dict:
    from products10k.deploy.runtime import ExportedModel
    from products10k.deploy.versions import list_versions, load_version

    records = result["records"]
    services = {}
    for index, r in enumerate(replicas):
        mine = [rec for rec in records if rec[5] == index]
        failed = [rec for rec in mine if not _answered(rec[1], rec[3])]
        # a request fails only while its own service is down: the slack covers the requests sent in the
        # last moments before the first 200 (their retry sleeps), as the single-service soak did
        in_window = [f for f in failed if any(kill <= f[4] <= up + 1.0 for kill, up in r.restarts)]
        services[r.name] = {
            "clients": len(range(index, args.clients, len(replicas))),
            **summarize(mine, args.soak_s),
            "failed_in_its_restart_window": len(in_window),
            "restart": [{"at_s": round(k - started, 1), "down_s": round(up - k, 2)} for k, up in r.restarts],
            "peak_rss_mb_per_process": [round(p, 1) for p in r.peaks_mb],
            "skus_lost": len(lost[r.name]),
        }
        if lost[r.name]:
            services[r.name]["skus_lost_ids"] = lost[r.name]
    on_disk = list_versions(versions)
    number = on_disk[-1][0] if on_disk else 0
    # as a restarted service reads it: the newest version is its base plus the segments after it
    newest = load_version(ExportedModel(args.model), args.index, versions, number, None)
    present = {int(s) for s in newest.gallery.skus}
    total = summarize(records, args.soak_s)
    total["failed_outside_restart"] = total["failed"] - sum(
        s["failed_in_its_restart_window"] for s in services.values()
    )
    return {
        "compact_every": args.compact_every,
        "poll_s": args.poll_s,
        "keep_versions": 3,
        "total": total,
        "services": services,
        "enrolments_acknowledged": len(acked),
        "enrolments_not_acknowledged": refused,
        "skus_absent_from_newest_version_on_disk": len([s for s, *_ in acked if s not in present]),
        "newest_version": number,
        "whole_versions_written": number // args.compact_every,
        "follower_lag_s": follower_lags(replicas[1:], watch, acked),
        "convergence": final,
        "version_folders_left": len(on_disk),
    }


def follower_lags(followers: list[Replica], watch: VersionWatch, acked) -> dict:
    """Seconds from each acknowledgement to each follower first serving that version (or a later one),
    p50/p99/max, and the max again leaving out the waits a follower's own restart was part of."""
    lags, calm = [], []
    for f in followers:
        for _, _, version, acked_at in acked:
            seen = watch.first_seen[f.name].get(version)
            if seen is None:
                continue
            lags.append(seen - acked_at)
            if not any(kill <= seen and acked_at <= up for kill, up in f.restarts):
                calm.append(seen - acked_at)
    if not lags:
        return {"samples": 0, "of": len(followers) * len(acked)}
    return {
        "samples": len(lags),
        "of": len(followers) * len(acked),
        "p50": round(float(np.median(lags)), 2),
        "p99": round(float(np.percentile(lags, 99)), 2),
        "max": round(max(lags), 2),
        "max_outside_own_restart": round(max(calm), 2) if calm else None,
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
