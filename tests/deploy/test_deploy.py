"""The export stage, products10k-predict and products10k-enrol on a tiny dataset and checkpoint:
onnxruntime against PyTorch, real JPEG/PNG files with real defects, a zip, an enrolled SKU."""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from products10k.contracts.shards import ImageStore, ShardWriter
from products10k.data.transforms import eval_transform
from products10k.deploy import enrol, predict
from products10k.deploy.runtime import ExportedModel
from products10k.imaging.images import prepare_image
from products10k.models.checkpoint import load_model
from tests.helpers import limits


def prepared_image(prepared, csv: str, row: int) -> bytes:
    r = pd.read_csv(prepared / csv).iloc[row]
    store = ImageStore(prepared)
    rgb = store.read(r["shard"], r["offset"], r["length"], cv2.IMREAD_COLOR, r["name"])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_export_matches_pytorch_and_writes_its_preprocessing(project):
    root, prepared, ckpt = project
    metrics = json.loads((root / "metrics" / "export.json").read_text())
    assert metrics["n_images"] == 6 and metrics["top1_agreement"] == 1.0
    assert metrics["max_abs_logit_diff"] < 1e-3 and metrics["max_abs_embedding_diff"] < 1e-4
    spec = json.loads((root / "models" / "export" / "preprocess.json").read_text())
    labels = pd.read_csv(prepared / "label_map.csv")
    assert spec["skus"] == labels.sort_values("label")["sku"].tolist()
    assert spec["center_crop"] == 32 and spec["resize_shorter_side"] == 37  # round(32 * 8 / 7)
    # no path of the exporting machine in the shipped model (the exporter records stack traces)
    onnx_bytes = (root / "models" / "export" / "model.onnx").read_bytes()
    assert b"stack_trace" not in onnx_bytes and str(Path.cwd()).encode() not in onnx_bytes
    assert b"site-packages" not in onnx_bytes

    # a batch size the export never saw, on the exported file itself
    exported = ExportedModel(root / "models" / "export")
    model, _ = load_model(ckpt)
    x = torch.randn(5, 3, 32, 32)
    logits, embedding = exported.run(x.numpy())
    with torch.no_grad():
        assert np.abs(logits - model(x).numpy()).max() < 1e-3
        assert np.abs(embedding - model.embedding(x).numpy()).max() < 1e-4


def test_predict_folders_zips_and_bad_images(project, tmp_path):
    root, prepared, ckpt = project
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    good = prepared_image(prepared, "test.csv", 0)
    (photos / "a.jpg").write_bytes(good)
    png = io.BytesIO()
    Image.open(io.BytesIO(prepared_image(prepared, "test.csv", 3))).save(png, format="PNG")
    (photos / "sub" / "b.png").write_bytes(png.getvalue())
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photos / "notes.jpg").write_bytes(b"not an image at all")
    (photos / "readme.txt").write_text("skipped: not an image suffix")
    archive = tmp_path / "shelf.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x/c.jpg", prepared_image(prepared, "test.csv", 5))
        z.writestr("x/broken.jpg", b"\xff\xd8\xff garbage")
    out = tmp_path / "out.csv"
    inputs = [str(photos), str(archive), str(tmp_path / "missing.jpg")]
    model = str(root / "models" / "export")
    predict.main([*inputs, "--model", model, "--out", str(out), "--top-k", "3", "--batch-size", "2"])

    rows = pd.read_csv(out)
    in_photos = [str(photos / n) for n in ("a.jpg", "empty.jpg", "notes.jpg", "sub/b.png", "truncated.jpg")]
    in_zip = [f"{archive}:x/broken.jpg", f"{archive}:x/c.jpg"]
    assert rows["source"].tolist() == [*in_photos, *in_zip, str(tmp_path / "missing.jpg")]
    status = dict(zip(rows["source"], rows["status"], strict=True))
    errors = dict(zip(rows["source"], rows["error"].fillna(""), strict=True))
    assert [s for s, v in status.items() if v == "ok"] == [
        str(photos / "a.jpg"), str(photos / "sub" / "b.png"), f"{archive}:x/c.jpg"
    ]  # fmt: skip
    assert errors[str(photos / "empty.jpg")].startswith("empty")
    assert errors[str(photos / "truncated.jpg")].startswith("truncated")
    assert errors[str(photos / "notes.jpg")].startswith("undecodable")
    assert errors[str(tmp_path / "missing.jpg")].startswith("missing")
    assert rows.loc[rows["status"] == "error", "sku_1"].isna().all()

    # the classifier's top-1 is the PyTorch model's on prepare's re-encode, decode and centre crop
    model, meta = load_model(ckpt)
    tf = eval_transform(37, 32, meta.get("normalize"))
    spec = json.loads((root / "models" / "export" / "preprocess.json").read_text())["prepare"]
    prepared_jpeg = prepare_image(good, spec["resize_shorter_side"], spec["jpeg_quality"], limits=limits())[0]
    rgb = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(prepared_jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )
    with torch.no_grad():
        probs = torch.softmax(model(tf(image=rgb)["image"][None]), 1)[0].numpy()
    skus = json.loads((root / "models" / "export" / "preprocess.json").read_text())["skus"]
    first = rows.iloc[0]
    assert first["sku_1"] == skus[int(probs.argmax())]
    assert first["score_1"] == pytest.approx(float(probs.max()), abs=1e-4)
    assert first["score_1"] >= first["score_2"] >= first["score_3"]


def test_enrolled_sku_is_predicted_by_knn(project, tmp_path):
    root, prepared, _ = project
    new = tmp_path / "new_skus"
    (new / "777").mkdir(parents=True)
    # the new SKU: a bright checkerboard, unlike the training bars
    board = (np.indices((64, 64)).sum(0) // 8 % 2 * 255).astype(np.uint8)
    for i in range(3):
        img = np.stack([board, np.roll(board, i, axis=1), 255 - board], axis=2)
        Image.fromarray(img).save(new / "777" / f"{i}.jpg", quality=95)
    index = root / "models" / "m0" / "index"
    before = (index / "gallery.npz").read_bytes()
    enrol.main([str(new), "--model", str(root / "models" / "export"), "--index", str(index),
                "--out", str(tmp_path / "enrolled")])  # fmt: skip
    assert (index / "gallery.npz").read_bytes() == before  # the input index is untouched
    meta = json.loads((tmp_path / "enrolled" / "meta.json").read_text())
    assert meta["enrolled"][0]["new_skus"] == 1 and meta["enrolled"][0]["images"] == 3
    thumbs = {p.name for p in (tmp_path / "enrolled" / "thumbs").iterdir()}
    assert "777.jpg" in thumbs and {p.name for p in (index / "thumbs").iterdir()} < thumbs  # carried over

    out = tmp_path / "p.json"
    predict.main([str(new / "777" / "1.jpg"), "--model", str(root / "models" / "export"),
                  "--index", str(tmp_path / "enrolled"), "--mode", "knn", "--out", str(out)])  # fmt: skip
    row = json.loads(out.read_text())[0]
    assert row["status"] == "ok" and row["sku_1"] == 777
    # the classifier alone cannot name it: 777 is not one of its SKUs
    predict.main([str(new / "777" / "1.jpg"), "--model", str(root / "models" / "export"), "--out", str(out)])
    assert json.loads(out.read_text())[0]["sku_1"] != 777


def test_enrol_bad_input_names_the_problem(project, tmp_path, caplog):
    root, _, _ = project
    model, index = str(root / "models" / "export"), str(root / "models" / "m0" / "index")
    (tmp_path / "bad" / "not-a-sku").mkdir(parents=True)
    with pytest.raises(SystemExit):
        enrol.main([str(tmp_path / "bad"), "--model", model, "--index", index, "--out", str(tmp_path / "o")])
    assert "must be named by their integer SKU id" in caplog.text
    csv = tmp_path / "new.csv"
    (tmp_path / "x.jpg").write_bytes(b"")
    csv.write_text("name,class\nx.jpg,12\nx.jpg,twelve\n")
    with pytest.raises(SystemExit):
        enrol.main([str(csv), "--model", model, "--index", index, "--out", str(tmp_path / "o")])
    assert "row 3: class 'twelve' is not an integer" in caplog.text
    csv.write_text("name,class\nx.jpg,12\nx.jpg,0012\n")  # one SKU, two spellings: refused
    with pytest.raises(SystemExit):
        enrol.main([str(csv), "--model", model, "--index", index, "--out", str(tmp_path / "o")])
    assert "row 3: class '0012' is not an integer of 1-18 ASCII digits without leading zeros" in caplog.text
    csv.write_text("name,class\nx.jpg,12\n")
    with pytest.raises(SystemExit):
        enrol.main([str(csv), "--model", model, "--index", index, "--out", str(tmp_path / "o")])
    assert f"skipped {tmp_path / 'x.jpg'} (SKU 12): empty" in caplog.text
    assert "SKU(s) 12: none of their images could be read" in caplog.text and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        enrol.main([str(csv), "--model", model, "--index", index, "--out", index])
    assert "write the enrolled index to a new folder" in caplog.text


def test_enrol_out_never_replaces_what_it_did_not_write(project, tmp_path, caplog):
    """--out is written whole: the images folder, a parent of the index, an unrelated folder are refused
    and left as they were; an index enrol wrote before may be replaced (enrolling again)."""
    root, _, _ = project
    model, index = root / "models" / "export", root / "models" / "m0" / "index"
    images = tmp_path / "new"
    (images / "555").mkdir(parents=True)
    board = (np.indices((48, 48)).sum(0) // 6 % 2 * 255).astype(np.uint8)
    Image.fromarray(np.stack([board, board, 255 - board], 2)).save(images / "555" / "a.jpg")
    (images / "NOTES.txt").write_text("mine")
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("keep")
    snapshot = {
        p: p.read_bytes()
        for p in [*images.rglob("*"), *unrelated.rglob("*"), *index.rglob("*")]
        if p.is_file()
    }
    for out, words in (
        (images, "the images"),
        (images / "555", "the images"),
        (index.parent, "--index"),
        (index / "sub", "--index"),
        (model, "--model"),
        (unrelated, "not an index products10k-enrol wrote"),
    ):
        caplog.clear()
        with pytest.raises(SystemExit):
            enrol.main([str(images), "--model", str(model), "--index", str(index), "--out", str(out)])
        assert words in caplog.text, (out, caplog.text)
    assert {p: p.read_bytes() for p in snapshot} == snapshot  # nothing touched
    out = tmp_path / "enrolled"
    for _ in range(2):  # the second time --out is an index enrol wrote: replaced with the new one
        enrol.main([str(images), "--model", str(model), "--index", str(index), "--out", str(out)])
    assert json.loads((out / "meta.json").read_text())["enrolled"][-1]["tool"] == "products10k-enrol"


def test_deploy_feeds_the_model_what_evaluation_fed_it(project, tmp_path):
    """A raw photo through products10k-predict's loader equals the same photo through prepare (resize
    to prepare.size, JPEG re-encode), the shards and the evaluate stage's dataset: exactly."""
    from products10k.data.datasets import PreparedImageDataset
    from tests.hostile import base_image

    root, _, _ = project
    model = ExportedModel(root / "models" / "export")
    prep = model.spec["prepare"]
    photo = cv2.imencode(".jpg", cv2.resize(base_image(), (1200, 900)), [cv2.IMWRITE_JPEG_QUALITY, 97])[
        1
    ].tobytes()
    jpeg, w, h = prepare_image(photo, prep["resize_shorter_side"], prep["jpeg_quality"], limits=limits())
    with ShardWriter(tmp_path, shard_mb=1) as writer:
        shard, offset, length = writer.add(jpeg)
    rows = pd.DataFrame(
        {
            "shard": [shard],
            "offset": [offset],
            "length": [length],
            "width": [w],
            "height": [h],
            "label": [0],
            "name": ["p"],
        }
    )
    transform = eval_transform(
        model.min_side, model.spec["center_crop"], {"mean": model.spec["mean"], "std": model.spec["std"]}
    )
    dataset = PreparedImageDataset(rows, tmp_path, transform, min_side=model.min_side)
    evaluated = dataset[0][0].numpy()
    assert np.array_equal(model.load(photo), evaluated)
    # what deploy computed before it re-created prepare's step: a different network input
    direct = model.preprocess(
        cv2.cvtColor(cv2.imdecode(np.frombuffer(photo, np.uint8), 1), cv2.COLOR_BGR2RGB)
    )
    assert np.abs(direct - evaluated).max() > 0.01


def test_predict_and_enrol_read_the_hostile_corpus_or_name_each_failure(project, tmp_path, caplog):
    from tests.hostile import ANY, BUDGET, OK, ZIP_EXPECT, corpus, hostile_zip

    root, prepared, _ = project
    cases = corpus()
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, case in cases.items():
        (photos / name).write_bytes(case.data)
    good = prepared_image(prepared, "test.csv", 0)
    odd_name = os.fsdecode(b"caf\xe9-latin1.jpg")  # not UTF-8: a surrogate escape in Python
    (photos / odd_name).write_bytes(good)
    shelf = hostile_zip(tmp_path / "shelf.zip", good)
    model = str(root / "models" / "export")
    out = tmp_path / "rows.csv"
    predict.main([str(photos), str(shelf), "--model", model, "--out", str(out), "--max-pixels", str(BUDGET)])

    rows = pd.read_csv(out, keep_default_na=False).set_index("source")
    assert len(rows) == len(cases) + 1 + len(ZIP_EXPECT)  # one row per input, nested zip included
    got = {s: (r["status"] if r["status"] == "ok" else r["error"].split(":")[0]) for s, r in rows.iterrows()}
    for name, case in cases.items():
        if case.expect != ANY:
            assert got[str(photos / name)] == case.expect, name
    assert got[str(photos) + "/caf\\xe9-latin1.jpg"] == OK  # the name written with its byte escaped
    assert {m: got[f"{shelf}:{m}"] for m in ZIP_EXPECT} == ZIP_EXPECT
    assert (rows.loc[rows["status"] == "ok", "sku_1"] != "").all()

    # enrol: the same files as a SKU's images; the readable ones are enrolled, the rest named and skipped
    new = tmp_path / "new" / "4242"
    new.mkdir(parents=True)
    for name, case in cases.items():
        (new / name).write_bytes(case.data)
    index, enrolled = root / "models" / "m0" / "index", tmp_path / "enrolled"
    enrol.main([str(new.parent), "--model", model, "--index", str(index), "--out", str(enrolled),
                "--max-pixels", str(BUDGET)])  # fmt: skip
    [entry] = json.loads((enrolled / "meta.json").read_text())["enrolled"]
    skipped = {Path(s["path"]).name: s["error"].split(":")[0] for s in entry["skipped"]}
    for name, case in cases.items():
        if case.expect == OK:
            assert name not in skipped
        elif case.expect != ANY:
            assert skipped[name] == case.expect, name
    assert entry["images"] == len(cases) - len(skipped)
    with pytest.raises(SystemExit):  # --strict: any unreadable image stops it, nothing written
        enrol.main([str(new.parent), "--model", model, "--index", str(index), "--out", str(tmp_path / "s"),
                    "--max-pixels", str(BUDGET), "--strict"])  # fmt: skip
    assert "--strict is set" in caplog.text and not (tmp_path / "s").exists()


def test_predict_peak_memory_over_a_huge_photo_stays_bounded(project, tmp_path):
    """A 12000 x 8000 JPEG (96 MP, 288 MB decoded in full): predict decodes it at 1/8 scale (and the
    budget would refuse a full decode), so its peak RSS stays within 64 MB of a run over a small photo."""
    root, prepared, _ = project
    huge = tmp_path / "huge.jpg"
    gradient = np.linspace(0, 255, 12000, dtype=np.float32).astype(np.uint8)
    canvas = np.broadcast_to(gradient[None, :, None], (8000, 12000, 3))
    huge.write_bytes(cv2.imencode(".jpg", np.ascontiguousarray(canvas))[1].tobytes())
    del canvas
    small = tmp_path / "small.jpg"
    small.write_bytes(prepared_image(prepared, "test.csv", 0))
    code = (
        "import resource, sys; from products10k.deploy import predict; "
        "predict.main(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )

    def peak_mb(image):
        out = tmp_path / f"{image.stem}.json"
        args = [str(image), "--model", str(root / "models" / "export"), "--out", str(out), "--threads", "1"]
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(out.read_text())[0]["status"] == "ok"
        return int(proc.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux

    assert peak_mb(huge) - peak_mb(small) < 64


def test_enrol_killed_mid_write_leaves_the_input_whole_and_the_output_whole_or_absent(project, tmp_path):
    import signal
    import time

    root, prepared, _ = project
    new = tmp_path / "new" / "888"
    new.mkdir(parents=True)
    new.joinpath("a.jpg").write_bytes(prepared_image(prepared, "test.csv", 1))
    index = root / "models" / "m0" / "index"
    before = _files(index)
    out = tmp_path / "enrolled"
    args = [
        str(new.parent),
        "--model",
        str(root / "models" / "export"),
        "--index",
        str(index),
        "--out",
        str(out),
    ]
    enrol.main(args)  # a first enrolment: the output exists, whole
    first = _files(out)
    new.joinpath("b.jpg").write_bytes(prepared_image(prepared, "test.csv", 2))

    # the second is killed with its new index staged, at the moment it would be published
    env = dict(
        os.environ,
        PRODUCTS10K_PAUSE_AT=f"publish {tmp_path.name}/enrolled",
        PRODUCTS10K_PAUSE_DIR=str(tmp_path),
    )
    proc = subprocess.Popen([sys.executable, "-m", "products10k.deploy.enrol", *args], env=env)
    deadline = time.time() + 120
    while not (tmp_path / "pids").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "pids").exists(), "enrol never reached its publish"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _files(index) == before  # the input index is untouched
    assert _files(out) == first  # the output: the previous, whole
    enrol.main(args)  # run again: the staged leftover is replaced, the new version published
    meta = json.loads((out / "meta.json").read_text())
    assert meta["enrolled"][-1]["images"] == 2 and not (tmp_path / "enrolled.tmp").exists()


def _files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_and_enrol_name_fifos_and_devices_unreadable_without_reading_them(project, tmp_path):
    """A FIFO (which would wait for a writer), /dev/zero and /dev/urandom (which never end) named
    directly, through a symlink or as a zip: each an ``unreadable`` row, and the run ends. In a
    subprocess with a timeout, so a regression fails instead of hanging the suite."""
    root, prepared, _ = project
    files = tmp_path / "in"
    (files / "5151").mkdir(parents=True)
    good = files / "5151" / "good.jpg"
    good.write_bytes(prepared_image(prepared, "test.csv", 0))
    os.mkfifo(files / "fifo.jpg")
    os.mkfifo(files / "fifo.zip")
    (files / "zero.jpg").symlink_to("/dev/zero")
    (files / "random.png").symlink_to("/dev/urandom")
    bad = ["fifo.jpg", "fifo.zip", "zero.jpg", "random.png"]
    model = str(root / "models" / "export")
    out = tmp_path / "rows.csv"
    run = [sys.executable, "-m", "products10k.deploy.predict", str(good), *(str(files / b) for b in bad),
           "--model", model, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(out, keep_default_na=False).set_index("source")
    assert rows.loc[str(good), "status"] == "ok"
    for name in bad:
        assert rows.loc[str(files / name), "error"].startswith("unreadable: not a regular file"), name
    assert "a FIFO" in rows.loc[str(files / "fifo.jpg"), "error"]
    assert "a character device" in rows.loc[str(files / "zero.jpg"), "error"]

    listing = files / "new.csv"  # enrol from a CSV naming them beside a readable photo
    listing.write_text("name,class\n5151/good.jpg,5151\n" + "".join(f"{b},5151\n" for b in bad))
    enrolled = tmp_path / "enrolled"
    run = [sys.executable, "-m", "products10k.deploy.enrol", str(listing), "--model", model,
           "--index", str(root / "models" / "m0" / "index"), "--out", str(enrolled)]  # fmt: skip
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads((enrolled / "meta.json").read_text())["enrolled"]
    assert entry["images"] == 1
    assert {Path(s["path"]).name: s["error"].split(" (")[0] for s in entry["skipped"]} == {
        b: "unreadable: not a regular file" for b in bad
    }
