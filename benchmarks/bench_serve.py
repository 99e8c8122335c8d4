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
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import write_results  # noqa: E402
from machine import describe  # noqa: E402
from serve_client import NEW_SKU, answers, get_bytes, load, post, rss_mb, same, start_server, test_photos  # noqa: E402
from serve_soak import soak  # noqa: E402

from tests.deploy.test_serve import chromium_driver  # noqa: E402
from tests.helpers import free_port  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def offline_images_per_s(model_dir: Path, photos) -> float:
    from products10k.deploy.runtime import ExportedModel

    model = ExportedModel(model_dir)
    data = [d for _, d in photos] * max(1, 256 // len(photos))
    t0 = time.perf_counter()
    for start in range(0, len(data), 32):
        model.run(np.stack([model.load(d) for d in data[start : start + 32]]))
    return round(len(data) / (time.perf_counter() - t0), 1)


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
    write_results(out, result)
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
        health = json.loads(get_bytes(port, "/healthz"))
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
