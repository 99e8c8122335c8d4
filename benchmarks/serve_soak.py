"""The soak of bench_serve.py (``--soak-s``): a writer and two followers on one versions folder under
load, a new SKU enrolled every few seconds, each service killed and restarted in turn; what every
service served, what was lost and how far the followers lagged (bench_serve.py's docstring, step 5)."""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from serve_client import (
    NEW_SKU,
    answered,
    get_bytes,
    load,
    post,
    rss_mb,
    start_server,
    summarize,
    test_photos,
)

from tests.helpers import free_port


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
        return json.loads(get_bytes(self.port, "/healthz"))["index"]["version"]


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
        failed = [rec for rec in mine if not answered(rec[1], rec[3])]
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
