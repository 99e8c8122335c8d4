"""products10k-serve as it is used: the real server (uvicorn) on 127.0.0.1, a real HTTP client (urllib).

Every endpoint, bad images in a request, oversize requests, a missing or wrong token, an enrolment
followed by a recognition that names the new SKU by kNN, and the batcher merging concurrent requests.
"""

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zipfile

import cv2
import numpy as np
import pytest

from products10k.deploy.serve import Batcher
from tests.deploy.test_deploy import prepared_image
from tests.helpers import free_port

TOKEN = "correct-horse-battery-staple"


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, data in files:
        body.write(f"--{boundary}\r\n".encode())
        body.write(f'Content-Disposition: form-data; name="images"; filename="{name}"\r\n'.encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def call(base: str, path: str, files=None, token: str | None = None, method: str | None = None):
    """(status, JSON or bytes) of one request; HTTP errors are answers too."""
    data, headers = None, {}
    if files is not None:
        data, headers["Content-Type"] = multipart(files)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, body, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, body, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(body) if kind.startswith("application/json") else body


def wait_until_up(base: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until the server at ``base`` answers /healthz; the test fails with its output if it exits or
    does not answer in ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            if call(base, "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not start:\n{proc.stdout.read()}")


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    root, prepared, _ = project
    work = tmp_path_factory.mktemp("serve")
    (work / "token").write_text(TOKEN + "\n")
    port = free_port()
    cmd = [
        sys.executable, "-m", "products10k.deploy.serve", "--model", str(root / "models" / "export"),
        "--index", str(root / "models" / "m0" / "index"), "--port", str(port),
        "--token-file", str(work / "token"), "--versions", str(work / "versions"),
        "--max-images", "6", "--max-request-mb", "1", "--batch-wait-ms", "20",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_until_up(base, proc)
    yield base, root, prepared, work
    proc.terminate()
    proc.wait(timeout=30)


def test_healthz_names_the_model_and_the_index(server):
    base, root, _, _ = server
    status, health = call(base, "/healthz")
    spec = json.loads((root / "models" / "export" / "preprocess.json").read_text())
    assert status == 200 and health["status"] == "ok" and health["enrolment"] is True
    assert health["model"]["checkpoint_sha256"] == spec["checkpoint_sha256"]
    assert health["index"]["skus"] == len(spec["skus"]) and health["index"]["version"] >= 0
    # the index stage wrote a thumbnail per trained SKU for the page
    status, thumb = call(base, f"/v1/skus/{spec['skus'][0]}/thumbnail")
    assert status == 200 and thumb[:3] == b"\xff\xd8\xff"
    assert call(base, "/v1/skus/123456789/thumbnail")[0] == 404


def test_recognize_answers_every_image_in_order_and_bad_ones_in_their_own_result(server, tmp_path):
    base, root, prepared, _ = server
    good = prepared_image(prepared, "test.csv", 0)
    shelf = io.BytesIO()
    with zipfile.ZipFile(shelf, "w") as z:
        z.writestr("b.jpg", prepared_image(prepared, "test.csv", 5))
        z.writestr("inner.zip", b"PK\x03\x04 not really")
    files = [
        ("a.jpg", good),
        ("cut.jpg", good[: len(good) // 2]),
        ("shelf.zip", shelf.getvalue()),
        ("e.jpg", b""),
    ]
    status, reply = call(base, "/v1/recognize?mode=classifier&top_k=3", files)
    assert status == 200 and reply["mode"] == "classifier"
    results = reply["results"]
    assert [r["source"] for r in results] == [
        "a.jpg",
        "cut.jpg",
        "shelf.zip:b.jpg",
        "shelf.zip:inner.zip",
        "e.jpg",
    ]
    assert [r["status"] for r in results] == ["ok", "error", "ok", "error", "error"]
    assert results[1]["error"].startswith(("truncated", "undecodable")) and results[4]["error"].startswith(
        "empty"
    )
    assert results[3]["error"].startswith("unsupported")
    assert len(results[0]["skus"]) == 3 and results[0]["scores"] == sorted(results[0]["scores"], reverse=True)

    # the same answer as products10k-predict on the same file
    photo = tmp_path / "a.jpg"
    photo.write_bytes(good)
    out = tmp_path / "p.json"
    model = str(root / "models" / "export")
    cmd = [sys.executable, "-m", "products10k.deploy.predict", str(photo), "--model", model, "--top-k", "3"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True)
    row = json.loads(out.read_text())[0]
    assert results[0]["skus"] == [row["sku_1"], row["sku_2"], row["sku_3"]]
    assert results[0]["scores"][0] == pytest.approx(row["score_1"], abs=1e-5)


def test_bad_requests_get_a_status_and_a_message_not_a_crash(server):
    base, _, prepared, _ = server
    good = prepared_image(prepared, "test.csv", 0)
    assert call(base, "/v1/recognize?mode=psychic", [("a.jpg", good)]) == (
        400, {"error": "mode 'psychic' is not one of classifier, knn, fused"}
    )  # fmt: skip
    assert call(base, "/v1/recognize?top_k=0", [("a.jpg", good)])[0] == 400
    assert call(base, "/v1/recognize", [])[0] == 400
    status, reply = call(base, "/v1/recognize", [(f"{i}.jpg", good) for i in range(7)])  # --max-images 6
    assert status == 413 and "more than 6 images" in reply["error"]
    status, reply = call(base, "/v1/recognize", [("big.jpg", bytes(2 << 20))])  # --max-request-mb 1
    assert status == 413 and "over the limit" in reply["error"]
    garbage = urllib.request.Request(base + "/v1/recognize", data=b"\x00" * 100, method="POST",
                                     headers={"Content-Type": "multipart/form-data; boundary=x"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(garbage, timeout=30)
    assert info.value.code == 400
    assert call(base, "/healthz")[0] == 200  # still serving


def test_enrolment_needs_the_token_and_swaps_in_a_version_that_knn_uses(server):
    base, root, prepared, work = server
    index = root / "models" / "m0" / "index"
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()}
    board = (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    photos = [
        cv2.imencode(".jpg", np.stack([board, np.roll(board, i, 1), 255 - board], 2))[1].tobytes()
        for i in range(3)
    ]
    files = [(f"{i}.jpg", p) for i, p in enumerate(photos)] + [("bad.jpg", b"nope")]
    assert call(base, "/v1/skus/777/images", files)[0] == 401
    assert call(base, "/v1/skus/777/images", files, token="wrong-token-of-some-length")[0] == 401
    assert call(base, "/v1/skus/seven/images", files, token=TOKEN)[0] == 400
    version = call(base, "/healthz")[1]["index"]["version"]
    status, reply = call(base, "/v1/skus/777/images", files, token=TOKEN)
    assert status == 201 and reply["added"] == 3 and reply["index_version"] == version + 1
    assert [s["source"] for s in reply["skipped"]] == ["bad.jpg"]

    health = call(base, "/healthz")[1]["index"]
    assert health["version"] == version + 1 and "path" not in health  # no server paths to the public
    written = work / "versions" / f"v{version + 1:04d}"  # a segment: only what this enrolment added
    assert sorted(p.name for p in written.iterdir()) == ["delta.json", "segment.npz", "thumbs"]
    status, reply = call(base, "/v1/recognize?mode=knn", [("q.jpg", photos[1])])
    assert reply["results"][0]["skus"][0] == 777 and reply["index_version"] == version + 1
    assert {p.name: p.read_bytes() for p in index.iterdir() if p.is_file()} == before  # input untouched
    status, thumb = call(base, "/v1/skus/777/thumbnail")
    assert status == 200 and thumb[:3] == b"\xff\xd8\xff"


def test_the_page_is_served_with_no_outside_resource(server):
    base = server[0]
    status, page = call(base, "/")
    assert status == 200 and b"/v1/recognize" in page
    assert b"http://" not in page and b"https://" not in page  # no CDN: works offline


def test_the_batcher_merges_concurrent_requests_into_one_model_run():
    class Model:
        runs = []

        def run(self, batch):
            self.runs.append(len(batch))
            return batch.sum(axis=(1, 2, 3))[:, None], batch[:, :, 0, 0]

    async def scenario():
        batcher = Batcher(Model(), max_batch=16, wait_s=0.2)
        await batcher.start()
        inputs = [np.full((n, 3, 2, 2), float(n), np.float32) for n in (1, 2, 3)]
        answers = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return inputs, answers

    inputs, answers = asyncio.run(scenario())
    assert Model.runs == [6]  # three requests, one run
    for x, (logits, embedding) in zip(inputs, answers, strict=True):  # each request gets its own rows
        assert logits.shape == (len(x), 1) and (logits == x.sum(axis=(1, 2, 3))[:, None]).all()
        assert (embedding == x[:, :, 0, 0]).all()


def test_enrolment_is_off_without_a_token_file(project):
    from products10k.deploy.serve import Service, create_app

    root, _, _ = project
    service = Service(root / "models" / "export", root / "models" / "m0" / "index", token=None)

    async def scenario():
        from starlette.requests import Request

        scope = {"type": "http", "method": "POST", "path": "/v1/skus/1/images", "headers": [],
                 "path_params": {"sku_id": "1"}, "query_string": b""}  # fmt: skip
        return await service.enrol_sku(Request(scope))

    response = asyncio.run(scenario())
    assert response.status_code == 403 and b"--token-file" in response.body
    assert create_app(service).routes


def chromium_driver():
    """Headless Debian Chromium driven by its chromedriver (packages chromium, chromium-driver; .ci/run
    installs them), with the flags a closed network and a root user need. No download of any kind."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1100,900"]  # fmt: skip
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService("/usr/bin/chromedriver"), options=options)


def test_the_page_in_a_real_browser_shows_the_top_skus_of_a_dropped_photo(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, prepared, _ = server
    photo = tmp_path / "shelf-photo.jpg"
    photo.write_bytes(prepared_image(prepared, "test.csv", 2))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a photo")
    expected = call(base, "/v1/recognize?top_k=5", [(photo.name, photo.read_bytes())])[1]["results"][0]

    driver = chromium_driver()
    try:
        driver.get(base + "/")
        driver.find_element(By.ID, "files").send_keys(f"{photo}\n{bad}")
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 2)
        shown = driver.find_elements(By.CSS_SELECTOR, f'.result[data-source="{photo.name}"] li.sku')
        assert [int(li.get_attribute("data-sku")) for li in shown] == expected["skus"]
        assert shown[0].text.startswith(f"SKU {expected['skus'][0]}")
        # the thumbnails loaded from the index (a broken one would have zero natural width)
        widths = driver.execute_script(
            "return [...document.querySelectorAll('li.sku img')].map(i => i.complete ? i.naturalWidth : -1)"
        )
        assert widths and all(w > 0 for w in widths)
        error = driver.find_element(By.CSS_SELECTOR, f'.result[data-source="{bad.name}"] .error').text
        assert error.startswith("Could not be read:")
        shot = os.environ.get("PRODUCTS10K_SCREENSHOT")  # docs: where a screenshot of the page is wanted
        driver.save_screenshot(shot or str(tmp_path / "page.png"))
    finally:
        driver.quit()
