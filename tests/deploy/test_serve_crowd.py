"""products10k-serve under a crowd: many clients at the request limit at once, and a client that
trickles its body. The server is real (uvicorn in a subprocess) and so are the clients (threads with
urllib, a raw socket)."""

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.deploy.test_serve import multipart
from tests.deploy.test_serve_data import photo, start, vm_hwm_mb

MB = 2**20


def post(base: str, files) -> tuple[int, dict]:
    body, kind = multipart(files)
    request = urllib.request.Request(base + "/v1/recognize?mode=classifier", data=body, method="POST",
                                     headers={"Content-Type": kind})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def reset_peak(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0; writable by its owner), so that a
    peak is the request's, not start-up's; where it cannot be reset, the start-up peak stays in
    (a weaker bound, never a false failure)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def test_sixteen_clients_at_the_request_limit_stay_within_the_in_flight_budget(project, tmp_path):
    """16 clients at once, each an 8 MB body of random parts, against a 16 MB budget: every answer a
    200 or a 503 with Retry-After, and the server's peak memory over its figure before them within
    the budget plus a margin (docs/serving.md). Without the budget the same clients took +100 MB, and
    before the body was parsed as it streams in, +300 MB with 16 MB bodies."""
    root = project[0]
    proc, base = start(
        root, tmp_path, "--max-request-mb", "8", "--max-inflight-mb", "16", "--queue-wait-s", "5"
    )
    try:
        bodies = [[(f"{s}-{i}.bin", os.urandom(MB - 4096)) for i in range(8)] for s in range(16)]
        assert post(base, [("a.jpg", photo())])[0] == 200  # warm: the model, the decoders, the parser
        assert post(base, bodies[0])[0] == 200
        reset_peak(proc.pid)
        warm = vm_hwm_mb(proc.pid)
        answers: list[tuple[int, dict]] = []
        together = threading.Barrier(16)

        def client(parts) -> None:
            together.wait()
            answers.append(post(base, parts))

        threads = [threading.Thread(target=client, args=(parts,)) for parts in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        rise = vm_hwm_mb(proc.pid) - warm
        assert len(answers) == 16 and {status for status, _ in answers} <= {200, 503}, answers
        assert all(headers.get("Retry-After") for status, headers in answers if status == 503)
        assert rise <= 16 + 24, f"peak RSS rose {rise:.0f} MB with 16 clients at the limit"
        assert post(base, [("a.jpg", photo())])[0] == 200  # and it still answers
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_body_slower_than_the_floor_rate_is_cut_with_408_and_others_are_answered(project, tmp_path):
    root = project[0]
    proc, base = start(root, tmp_path, "--upload-grace-s", "1", "--min-upload-kbps", "64")
    port = int(base.rsplit(":", 1)[1])
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        body, kind = multipart([("a.jpg", photo())])
        head = (f"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        slow.sendall(head)
        started, answer = time.time(), b""
        slow.settimeout(0.3)
        for byte in body:  # a byte every 0.3 s: under 4 bytes/s, against a floor of 64 KB/s
            try:
                slow.sendall(bytes([byte]))
                answer = slow.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer or time.time() - started > 30:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.time() - started < 10  # cut after the grace, not when the client gave up
        assert post(base, [("a.jpg", photo())])[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_budget_admits_what_fits_waits_for_room_and_refuses_after_its_wait():
    import asyncio

    from products10k.deploy.uploads import InFlight

    async def scenario():
        now = InFlight(10, wait_s=0.0)  # no waiting at all: what fits is still admitted
        assert await now.acquire(5) and await now.acquire(5)
        assert not await now.acquire(1) and now.refused == 1
        patient = InFlight(10, wait_s=5.0)
        assert await patient.acquire(8)
        waiting = asyncio.create_task(patient.acquire(4))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # no room yet: it waits, its body unread
        await patient.release(8)
        assert await waiting and patient.used == 4

    asyncio.run(scenario())
