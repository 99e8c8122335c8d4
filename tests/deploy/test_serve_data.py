"""products10k-serve against what a stranger can send, and its enrolments kept as data.

- The abuse corpus: a zip bomb, a zip whose header lies about a member's size, a zip of many members,
  the thin PNG, the APP14 JPEG claiming 10000 x 10000, a Radiance bomb, truncated multipart bodies,
  absurd SKU ids: each gets a 4xx or a per-image error, and the server's peak RSS (VmHWM) stays within
  a stated margin of its figure after a warm-up request.
- Enrolments survive restarts: kill -9 after an acknowledged enrolment and in the middle of one, start
  again on the same --versions: every acknowledged SKU is served, nothing half-written is; a second
  service on the same folder stops at start; old versions are pruned to --keep-versions.
"""

import contextlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.deploy.test_serve import TOKEN, call, multipart, wait_until_up
from tests.helpers import free_port
from tests.hostile import jpeg_claiming, radiance, thin_png, with_app14

#: how far the server's peak RSS may rise over its warmed-up figure while it answers the abuse corpus
#: (before the bounds, the zip bomb alone took +584 MB)
RSS_MARGIN_MB = 120


def start(root: Path, work: Path, *extra: str, env: dict | None = None, expect_up: bool = True):
    port = free_port()
    cmd = [
        sys.executable, "-m", "products10k.deploy.serve", "--model", str(root / "models" / "export"),
        "--index", str(root / "models" / "m0" / "index"), "--port", str(port),
        "--token-file", str(work / "token"), "--versions", str(work / "versions"), *extra,
    ]  # fmt: skip
    (work / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    base = f"http://127.0.0.1:{port}"
    if expect_up:
        wait_until_up(base, proc)
    return proc, base


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def photo(shift: int = 0) -> bytes:
    board = (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    return cv2.imencode(".jpg", np.stack([board, np.roll(board, shift, 1), 255 - board], 2))[1].tobytes()


def zip_of(members: dict[str, bytes], level: int = 9) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def zip_bomb(inflated: int) -> bytes:
    """One member of ``inflated`` zero bytes, deflated (about 1/1000 of it), declared honestly."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("bomb.jpg", "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(inflated >> 20):
                f.write(chunk)
    return buf.getvalue()


def lying_zip(inflated: int, declared: int) -> bytes:
    """A member that inflates to ``inflated`` bytes but declares ``declared`` in both headers."""
    data = bytearray(zip_of({"liar.jpg": bytes(inflated)}))
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = data.find(sig)
        data[pos + size_at : pos + size_at + 4] = struct.pack("<I", declared)
    return bytes(data)


@pytest.fixture(scope="module")
def abuse_server(project, tmp_path_factory):
    root = project[0]
    work = tmp_path_factory.mktemp("abuse")
    # a 1 MP budget: the APP14 JPEG claiming 10000 x 10000 is over it even at 1/8 scale (with a larger
    # one it is decoded reduced, as any JPEG over the budget is: tests/prepared/test_images.py)
    proc, base = start(root, work, "--max-images", "8", "--max-request-mb", "4", "--max-pixels", "1000000")
    yield proc, base
    proc.terminate()
    proc.wait(timeout=30)


def test_the_abuse_corpus_gets_4xx_or_per_image_errors_and_the_server_keeps_its_memory(abuse_server):
    proc, base = abuse_server
    # warm-up: one ordinary request, so the model's arenas and the decoders are allocated
    assert call(base, "/v1/recognize", [("ok.jpg", photo())])[0] == 200
    idle = vm_hwm_mb(proc.pid)

    status, reply = call(base, "/v1/recognize", [("bomb.zip", zip_bomb(300 << 20))])
    assert status == 413 and "inflated" in reply["error"]
    status, reply = call(base, "/v1/recognize", [("liar.zip", lying_zip(50 << 20, 1000))])
    assert status == 200 and reply["results"][0]["error"].startswith("unreadable")
    status, reply = call(
        base, "/v1/recognize", [("many.zip", zip_of({f"{i}.jpg": photo() for i in range(200)}))]
    )
    assert status == 413 and "200 members" in reply["error"]
    files = [
        ("thin.png", thin_png()),
        ("app14.jpg", with_app14(jpeg_claiming(10000, 10000))),
        ("radiance.hdr", radiance(2000, 2000)),
        ("fine.jpg", photo(3)),
    ]
    status, reply = call(base, "/v1/recognize", files)
    errors = [r["error"].split(":")[0] for r in reply["results"]]
    assert status == 200 and errors == ["too-large", "too-large", "undecodable", ""], reply
    # a multipart body cut off in the middle of a part
    body, kind = multipart([("a.jpg", photo())])
    for cut in (len(body) // 2, len(body) - 3):
        request = urllib.request.Request(
            base + "/v1/recognize", data=body[:cut], headers={"Content-Type": kind}, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 400
    # SKU ids that str.isdigit takes and int64 does not (or that are not what they seem)
    # and an id with leading zeros: 000000000000000007 would silently be SKU 7, one id with two spellings
    for sku in ("%C2%B2", "%D9%A1%D9%A2", "9" * 5000, "9" * 20, "-1", "1e3", "000000000000000007"):
        status, _ = call(base, f"/v1/skus/{sku}/images", [("a.jpg", photo())], token=TOKEN)
        assert status == 400, sku
    assert call(base, "/healthz")[0] == 200  # still serving
    grown = vm_hwm_mb(proc.pid) - idle
    assert grown < RSS_MARGIN_MB, f"peak RSS rose {grown:.0f} MB over the warmed-up {idle:.0f} MB"


def test_a_request_larger_than_a_batch_runs_as_several(project, tmp_path):
    proc, base = start(project[0], tmp_path, "--batch-size", "2", "--batch-wait-ms", "0")
    try:
        before = call(base, "/healthz")[1]["batches"]
        status, reply = call(base, "/v1/recognize", [(f"{i}.jpg", photo(i)) for i in range(6)])
        assert status == 200 and [r["status"] for r in reply["results"]] == ["ok"] * 6
        after = call(base, "/healthz")[1]["batches"]
        assert after["images"] - before["images"] == 6 and after["runs"] - before["runs"] >= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_bearer_scheme_is_case_insensitive(abuse_server):
    _, base = abuse_server
    body, kind = multipart([("a.jpg", photo(1))])
    for scheme in ("bearer", "BEARER", "Bearer"):
        request = urllib.request.Request(
            base + "/v1/skus/4242/images",
            data=body,
            headers={"Content-Type": kind, "Authorization": f"{scheme} {TOKEN}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 201, scheme


def _enrol(base: str, sku: int, shift: int) -> int:
    status, reply = call(base, f"/v1/skus/{sku}/images", [("a.jpg", photo(shift))], token=TOKEN)
    assert status == 201, reply
    return reply["index_version"]


def _knn_top(base: str, shift: int) -> int:
    status, reply = call(base, "/v1/recognize?mode=knn", [("q.jpg", photo(shift))])
    assert status == 200
    return reply["results"][0]["skus"][0]


def test_enrolments_survive_kill_9_after_and_during_an_enrolment(project, tmp_path):
    root = project[0]
    proc, base = start(root, tmp_path)
    assert _enrol(base, 900001, 1) == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    # restarted: it starts from version 1 and serves the SKU enrolled before the kill
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {"PRODUCTS10K_PAUSE_AT": "publish versions/v0002", "PRODUCTS10K_PAUSE_DIR": str(pause)}
    proc, base = start(root, tmp_path, env=env)
    assert call(base, "/healthz")[1]["index"]["version"] == 1
    assert _knn_top(base, 1) == 900001
    # an enrolment killed while its version is written, before it is acknowledged
    body, kind = multipart([("b.jpg", photo(2))])
    request = urllib.request.Request(
        base + "/v1/skus/900002/images",
        data=body,
        headers={"Content-Type": kind, "Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    with pytest.raises((urllib.error.URLError, ConnectionError, TimeoutError)):
        deadline = time.time() + 30
        while not (pause / "pids").exists() and time.time() < deadline:
            try:
                urllib.request.urlopen(request, timeout=0.5)
            except TimeoutError:
                continue
        proc.send_signal(signal.SIGKILL)
        urllib.request.urlopen(request, timeout=5)
    proc.wait()
    assert (pause / "pids").exists(), "the enrolment never reached its publish point"

    proc, base = start(root, tmp_path)
    try:
        health = call(base, "/healthz")[1]["index"]
        assert health["version"] == 1  # the killed enrolment was never acknowledged and left nothing
        assert sorted(p.name for p in (tmp_path / "versions").iterdir() if not p.name.startswith(".")) == [
            "v0001"
        ]
        assert _knn_top(base, 1) == 900001
        assert _enrol(base, 900002, 2) == 2  # the next version number: nothing was overwritten
        assert _knn_top(base, 2) == 900002 and _knn_top(base, 1) == 900001
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_one_service_per_versions_folder_and_old_versions_pruned(project, tmp_path):
    root = project[0]
    proc, base = start(root, tmp_path, "--keep-versions", "2", "--compact-every", "2")
    versions = tmp_path / "versions"

    def kept() -> list[str]:
        return sorted(p.name for p in versions.iterdir() if p.name.startswith("v"))

    try:
        second, _ = start(root, tmp_path, expect_up=False)
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 1 and "is held by pid" in out and str(versions) in out
        for i in range(4):
            assert _enrol(base, 910000 + i, i) == i + 1
        # v1 a segment on the input index, v2 whole (2 segments on a base), v3 a segment on v2, v4 whole:
        # the newest 2 (v3, v4) need v2, v3's base; v1 is needed by none
        assert kept() == ["v0002", "v0003", "v0004"]
        assert (versions / "v0004" / "index.faiss").is_file() and (
            versions / "v0003" / "delta.json"
        ).is_file()
        assert _enrol(base, 910004, 4) == 5
        assert kept() == ["v0004", "v0005"]  # v4 is whole: nothing below it is needed any more
        assert all(_knn_top(base, i) == 910000 + i for i in range(5))  # pruning lost no SKU
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("what", ["model", "index", "token"])
def test_a_corrupt_model_index_or_token_file_stops_start_up_with_a_message(project, tmp_path, what):
    import shutil

    root = project[0]
    copy = tmp_path / "root"
    shutil.copytree(root / "models", copy / "models")
    work = tmp_path / "work"
    work.mkdir()
    if what == "model":
        (copy / "models" / "export" / "model.onnx").write_bytes(b"not an onnx model")
    elif what == "index":
        path = copy / "models" / "m0" / "index" / "index.faiss"
        path.write_bytes(path.read_bytes()[:100])
    proc, _ = start(copy, work, expect_up=False)
    if what == "token":
        proc.kill()
        proc.wait()
        (work / "token").write_bytes(b"\xff\xfe" + b"x" * 20)
        port = free_port()
        cmd = [sys.executable, "-m", "products10k.deploy.serve", "--model", str(copy / "models" / "export"),
               "--index", str(copy / "models" / "m0" / "index"), "--port", str(port),
               "--token-file", str(work / "token")]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in out, out
    expected = {"model": "onnxruntime cannot load it", "index": "Faiss cannot read it", "token": "not UTF-8"}
    assert expected[what] in out, out


def test_a_token_file_that_is_a_fifo_or_a_device_is_refused_not_read(tmp_path):
    from products10k.common import Products10kError
    from products10k.deploy.options import read_token

    os.mkfifo(tmp_path / "fifo")  # open() alone would wait for a writer
    (tmp_path / "zero").symlink_to("/dev/zero")  # read() alone would never end
    with pytest.raises(Products10kError, match="not a regular file \\(a FIFO\\)"):
        read_token(tmp_path / "fifo")
    with pytest.raises(Products10kError, match="not a regular file \\(a character device\\)"):
        read_token(tmp_path / "zero")
    (tmp_path / "big").write_text("x" * 5000)
    with pytest.raises(Products10kError, match="over the limit of 4096"):
        read_token(tmp_path / "big")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    """A small tmpfs at ``folder``, where this machine lets the tests mount one (root, no sandbox)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_is_a_507_in_words_and_the_previous_version_is_still_served(project, tmp_path):
    """--versions on a real full file system (a 256 KB tmpfs, filled): the enrolment is a 507 that
    says why, its staging folder is gone at once, version 0 is still served; with room again the
    next enrolment is version 1. (Where no tmpfs can be mounted, test_versions.py injects the fault.)"""
    root = project[0]
    versions = tmp_path / "versions"
    if not _mount_tmpfs(versions, "256k"):
        pytest.skip(
            "cannot mount a tmpfs here: the full disk is covered by fault injection in test_versions.py"
        )
    proc = None
    try:
        proc, base = start(root, tmp_path)
        filler = versions / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill it, unbuffered: writes stop with ENOSPC
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        status, reply = call(base, "/v1/skus/920001/images", [("a.jpg", photo(1))], token=TOKEN)
        assert status == 507, reply
        assert "no space left" in reply["error"] and "version 0 is still served" in reply["error"]
        assert sorted(p.name for p in versions.iterdir() if p.name != "lost+found") == [".lock", "filler"]
        assert call(base, "/healthz")[1]["index"]["version"] == 0
        assert call(base, "/v1/recognize?mode=knn", [("q.jpg", photo(1))])[0] == 200  # still answering
        filler.unlink()
        assert _enrol(base, 920001, 1) == 1 and _knn_top(base, 1) == 920001
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(["umount", str(versions)], capture_output=True, timeout=30)


def _wait_for_version(base: str, number: int, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if call(base, "/healthz")[1]["index"]["version"] == number:
            return
        time.sleep(0.1)
    raise AssertionError(f"{base} is not at index version {number} after {seconds} s")


def test_a_writer_and_two_followers_each_killed_in_turn_lose_nothing_acknowledged(project, tmp_path):
    """One writer and two read-only followers (--follow) on one versions folder, across a compaction
    (--compact-every 2): each follower serves every acknowledged enrolment within seconds; a follower,
    then the writer, then the other follower killed with SIGKILL and started again loses none."""
    root = project[0]
    follow = ("--follow", "--poll-s", "0.2")
    procs = {"writer": start(root, tmp_path, "--compact-every", "2")}
    procs.update({name: start(root, tmp_path, *follow) for name in ("f1", "f2")})
    acknowledged: dict[int, int] = {}  # SKU -> the photo it was enrolled with

    def enrol_and_check(sku: int, shift: int) -> None:
        acknowledged[sku] = shift
        number = _enrol(procs["writer"][1], sku, shift)
        for name in ("f1", "f2"):
            _wait_for_version(procs[name][1], number)
            assert all(_knn_top(procs[name][1], s) == sku for sku, s in acknowledged.items()), name

    def kill_and_restart(name: str) -> None:
        proc, _ = procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        procs[name] = start(root, tmp_path, *(() if name == "writer" else follow), *(
            ("--compact-every", "2") if name == "writer" else ()))  # fmt: skip

    try:
        enrol_and_check(960001, 1)
        status, reply = call(procs["f1"][1], "/v1/skus/960009/images", [("a.jpg", photo(9))], token=TOKEN)
        assert status == 403 and "follows" in reply["error"]  # followers never write
        kill_and_restart("f1")
        enrol_and_check(960002, 2)  # version 2: written whole (the compaction)
        kill_and_restart("writer")
        enrol_and_check(960003, 3)
        kill_and_restart("f2")
        enrol_and_check(960004, 4)  # version 4: whole again
        for name in procs:
            assert call(procs[name][1], "/healthz")[1]["index"]["version"] == 4
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
