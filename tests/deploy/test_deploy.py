"""The export stage, products10k-predict and products10k-enrol on a tiny dataset and checkpoint:
onnxruntime against PyTorch, real JPEG/PNG files with real defects, a zip, an enrolled SKU."""

import io
import json
import zipfile

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from products10k.deploy import enrol, predict
from products10k.deploy.runtime import ExportedModel
from products10k.prepared.shards import ImageStore
from products10k.training.checkpoint import load_model
from products10k.training.transforms import eval_transform
from tests.helpers import index_params, make_eval_data, run_index, stage_module


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny prepared dataset, checkpoint, index (k=1) and export, shared by the tests here."""
    root = tmp_path_factory.mktemp("deploy")
    prepared = make_eval_data(root / "prepared")
    params = index_params(root, k=1)
    ckpt = run_index(root, prepared, params)
    stage_module("export").main(
        [
            "--params",
            str(params),
            "--checkpoint",
            str(ckpt),
            "--label-map",
            str(prepared / "label_map.csv"),
            "--test",
            str(prepared / "test.csv"),
            "--images-root",
            str(prepared),
            "--out",
            str(root / "models" / "export"),
            "--metrics",
            str(root / "metrics" / "export.json"),
        ]  # fmt: skip
    )
    return root, prepared, ckpt


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

    # the classifier's top-1 is the PyTorch model's on the same decode and centre crop
    model, meta = load_model(ckpt)
    tf = eval_transform(37, 32, meta.get("normalize"))
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
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
    assert "row 3: class 'twelve' is not an integer SKU id" in caplog.text
    csv.write_text("name,class\nx.jpg,12\n")
    with pytest.raises(SystemExit):
        enrol.main([str(csv), "--model", model, "--index", index, "--out", str(tmp_path / "o")])
    assert f"{tmp_path / 'x.jpg'}: empty" in caplog.text and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        enrol.main([str(csv), "--model", model, "--index", index, "--out", index])
    assert "write the enrolled index to a new folder" in caplog.text
