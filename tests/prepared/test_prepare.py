"""The prepare stage on tiny raw data made here: outputs, exclusions, zip safety, determinism, script."""

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from products10k.common import DataError
from products10k.contracts.shards import ImageStore
from products10k.imaging.images import ImageDefect, decode_rgb
from products10k.prepared import prepare as prepare_mod
from products10k.prepared.prepare import PREPARED_COLUMNS, prepare
from tests.helpers import (
    RAW_GROUPS,
    RAW_TRAIN_COUNTS,
    ROOT,
    TINY_PREPARE,
    config,
    jpeg_bytes,
    limits,
    make_raw_data,
    sku_colour,
    write_project_params,
)

CFG = config("prepare", **TINY_PREPARE)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False)


def test_outputs_follow_the_contract(tmp_path):
    raw = make_raw_data(tmp_path)
    out = tmp_path / "prepared"
    report = prepare(raw, out, CFG)

    train, val, test = read(out / "train.csv"), read(out / "val.csv"), read(out / "test.csv")
    lm = read(out / "label_map.csv")
    assert train.columns.tolist() == PREPARED_COLUMNS and val.columns.tolist() == PREPARED_COLUMNS
    assert test.columns.tolist() == [*PREPARED_COLUMNS, "Usage"]
    assert lm.columns.tolist() == ["label", "sku", "group", "n_train"]
    assert lm["sku"].tolist() == sorted(RAW_TRAIN_COUNTS) and lm["label"].tolist() == list(range(5))
    # n_train counts train.csv only: what the model trains on, which head/tail is defined by
    assert dict(zip(lm["sku"], lm["n_train"], strict=True)) == train["sku"].value_counts().to_dict()
    with_val = lm["n_train"] + lm["sku"].map(val["sku"].value_counts()).fillna(0)
    assert (with_val == lm["sku"].map(RAW_TRAIN_COUNTS)).all()  # val images are not counted
    both = pd.concat([train, val])
    assert len(both) == sum(RAW_TRAIN_COUNTS.values()) and not set(train["name"]) & set(val["name"])
    assert set(train["sku"]) == set(RAW_TRAIN_COUNTS)  # every SKU keeps a training image
    assert 205 not in set(val["sku"])  # the singleton stays in train
    label_of = dict(zip(lm["sku"], lm["label"], strict=True))
    for df in (train, val, test):
        assert (df["label"] == df["sku"].map(label_of)).all()
        assert (df["group"] == df["sku"].map(RAW_GROUPS)).all()
    assert set(both["domain"]) == {"inshop", "customer"} and set(test["domain"]) == {"unknown"}
    assert sorted(test["Usage"].unique()) == ["Private", "Public"]

    store = ImageStore(out)
    for row in pd.concat([train, val, test]).itertuples():
        img = store.read_row(row)
        assert img.shape == (row.height, row.width, 3)
        assert min(row.width, row.height) == CFG.size  # all sources are larger than 48
        sku_color = np.asarray(sku_colour(row.sku))
        assert np.abs(img[-5, -5].astype(int) - sku_color).max() < 30  # the row's own image
    assert report["counts"]["train"] == len(train) and report["counts"]["excluded_train"] == 0
    assert json.loads((out / "report.json").read_text())["counts"]["skus"] == 5
    assert sorted(p.name for p in (out / "images").iterdir()) == ["shard-00000.bin"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_bad_images_are_excluded_and_reported_and_odd_ones_read(tmp_path):
    good = jpeg_bytes(sku_colour(101))
    exif = Image.Exif()
    exif[0x0112] = 6
    png = io.BytesIO()
    Image.new("RGB", (96, 72), sku_colour(101)).save(png, "PNG")
    cmyk = io.BytesIO()
    Image.new("RGB", (96, 72), sku_colour(101)).convert("CMYK").save(cmyk, "JPEG")
    grey = io.BytesIO()
    Image.new("L", (96, 72), 128).save(grey, "JPEG")
    raw = make_raw_data(
        tmp_path,
        replace={
            "2.jpg": None,  # listed but not in the zip
            "3.jpg": b"",
            "4.jpg": good[: len(good) // 2],
            "7.jpg": np.random.default_rng(0).bytes(3000),
            "8.jpg": png.getvalue(),
            "9.jpg": cmyk.getvalue(),
            "10.jpg": grey.getvalue(),
            "11.jpg": jpeg_bytes(sku_colour(103), w=96, h=72, exif=exif.tobytes()),
        },
    )
    out = tmp_path / "prepared"
    report = prepare(raw, out, CFG)
    reasons = {e["name"]: (e["reason"], e["line"], e["file"]) for e in report["excluded"]}
    assert reasons == {
        "2.jpg": ("missing", 3, str(raw / "train.csv")),
        "3.jpg": ("empty", 4, str(raw / "train.csv")),
        "4.jpg": ("truncated", 5, str(raw / "train.csv")),
        "7.jpg": ("undecodable", 8, str(raw / "train.csv")),
    }
    assert report["excluded"][0]["member"] == "train/2.jpg"
    both = pd.concat([read(out / "train.csv"), read(out / "val.csv")]).set_index("name")
    assert not set(reasons) & set(both.index)
    assert {"8.jpg", "9.jpg", "10.jpg", "11.jpg"} <= set(both.index)
    assert (both.loc["11.jpg", "width"], both.loc["11.jpg", "height"]) == (48, 64)  # upright: portrait
    lm = read(out / "label_map.csv").set_index("sku")
    trained = read(out / "train.csv")
    assert lm.loc[101, "n_train"] == (trained["sku"] == 101).sum() <= 6 - 3  # 2, 3 and 4.jpg excluded


def test_too_many_bad_images_fail_before_writing(tmp_path):
    raw = make_raw_data(tmp_path)
    out = tmp_path / "prepared"
    prepare(raw, out, CFG)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = make_raw_data(tmp_path / "b", replace={f"{i}.jpg": b"junk" for i in range(1, 4)})  # 3 of 16 bad
    with pytest.raises(DataError) as info:
        prepare(broken, out, CFG.model_copy(update=dict(max_bad_fraction=0.1)))
    msg = str(info.value)
    assert "train.csv" in msg and "3 of 16" in msg and "prepare.max_bad_fraction=0.1" in msg
    assert "line 2 '1.jpg': undecodable" in msg
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous outputs are untouched, no staged shards left


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_crash_mid_run_leaves_no_partial_outputs(tmp_path, monkeypatch, n_jobs):
    raw = make_raw_data(tmp_path)
    out = tmp_path / "prepared"
    real = prepare_mod.prepare_zip_members
    calls = []
    cv_threads = cv2.getNumThreads()

    def crash_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C in the middle of the image loop raises
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "CHUNK_ROWS", 4)
    monkeypatch.setattr(prepare_mod, "prepare_zip_members", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, out, CFG.model_copy(update=dict(n_jobs=n_jobs)))
    assert [p.name for p in out.iterdir()] == ["images"] and not list((out / "images").iterdir())
    # The worker threads are gone and OpenCV's process-wide thread setting is restored.
    assert not [t for t in threading.enumerate() if t.name.startswith("prepare")]
    assert cv2.getNumThreads() == cv_threads


def test_csv_errors_fail_before_any_image_work(tmp_path, monkeypatch):
    raw = make_raw_data(tmp_path)
    (raw / "train.csv").write_text((raw / "train.csv").read_text() + "99.jpg,abc,1,inshop\n")

    def no_images(*args, **kwargs):
        raise AssertionError("images were processed")

    monkeypatch.setattr(prepare_mod, "process_images", no_images)
    with pytest.raises(DataError, match=r"train\.csv, line 18, column 'class'"):
        prepare(raw, tmp_path / "prepared", CFG)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("entry", ["../evil.jpg", "/abs/evil.jpg", "train/../../evil.jpg", "C:/evil.jpg"])
def test_zip_slip_entries_are_never_read_and_are_reported(tmp_path, entry):
    raw = make_raw_data(tmp_path, extra={entry: jpeg_bytes((1, 2, 3))})
    out = tmp_path / "work" / "prepared"
    report = prepare(raw, out, CFG)
    assert report["unsafe_entries"] == {str(raw / "train.zip"): [entry], str(raw / "test.zip"): []}
    assert report["counts"]["excluded_train"] == 0  # the run completes with every listed image
    assert not list(tmp_path.rglob("evil.jpg"))


def test_the_hostile_corpus_is_read_or_excluded_with_its_reason_and_every_reader_reads_the_rest(tmp_path):
    from products10k.data.datasets import PreparedImageDataset
    from products10k.data.transforms import eval_transform
    from tests.hostile import ANY, BUDGET, OK, append_members, corpus

    cases = corpus()
    good = jpeg_bytes(sku_colour(101))
    raw = make_raw_data(tmp_path)
    zip_cases = {"encrypted.jpg": "unreadable", "imploded.jpg": "unreadable", "link.jpg": "undecodable"}
    members = {f"train/{n}": c.data for n, c in cases.items()}
    members |= {"train/encrypted.jpg": good, "train/imploded.jpg": good, "train/link.jpg": b"/etc/passwd"}
    members["train/caf\u00e9.jpg"] = good  # cp437 name, no UTF-8 flag
    append_members(
        raw / "train.zip",
        members,
        encrypted=("train/encrypted.jpg",),
        imploded=("train/imploded.jpg",),
        links=("train/link.jpg",),
    )
    table = read(raw / "train.csv")
    names = [*cases, *zip_cases, "caf\u00e9.jpg"]
    extra = pd.DataFrame({"name": names, "class": 101, "group": 1, "domain": "customer"})
    pd.concat([table, extra]).to_csv(raw / "train.csv", index=False)

    cfg = CFG.model_copy(update=dict(max_pixels=BUDGET, max_bad_fraction=0.95))
    report = prepare(raw, tmp_path / "prepared", cfg)
    reasons = {e["name"]: e["reason"] for e in report["excluded"]}
    expected = {n: c.expect for n, c in cases.items() if c.expect not in (OK, ANY)} | zip_cases
    assert {n: reasons.get(n, OK) for n in expected} == expected
    out = tmp_path / "prepared"
    kept = pd.concat([read(out / f"{split}.csv") for split in ("train", "val")])
    assert {n for n, c in cases.items() if c.expect == OK} | {"caf\u00e9.jpg"} <= set(kept["name"])
    assert set(kept["name"]) | set(reasons) == set(table["name"]) | set(names)  # each row: kept or why not

    # the readers of prepared data (training loader, evaluate, index, export) read every kept row
    test = read(out / "test.csv")
    for rows in (kept, test):
        dataset = PreparedImageDataset(rows, out, eval_transform(40, 32), min_side=40)
        for i in range(len(dataset)):
            image, label, index, _ = dataset[i]
            assert tuple(image.shape) == (3, 32, 32) and index == i


@pytest.mark.parametrize("prefix", ["Products10K/train/", ""])
def test_extra_top_folder_or_flat_zip_is_accepted(tmp_path, prefix):
    raw = make_raw_data(tmp_path, train_prefix=prefix, extra={"__MACOSX/train/._1.jpg": b"junk"})
    report = prepare(raw, tmp_path / "prepared", CFG)
    assert report["counts"]["excluded_train"] == 0


def test_ambiguous_zip_layout_is_an_error(tmp_path):
    raw = make_raw_data(tmp_path, train_prefix="images/", extra={"other/x.jpg": b"x"})
    with pytest.raises(DataError, match=r"cannot find the image folder 'train/'.*'images/'"):
        prepare(raw, tmp_path / "prepared", CFG)


def test_missing_raw_file_is_named(tmp_path):
    raw = make_raw_data(tmp_path)
    (raw / "test.zip").unlink()
    with pytest.raises(DataError, match=r"missing raw file\(s\): .*test\.zip"):
        prepare(raw, tmp_path / "prepared", CFG)


def test_parallel_output_is_byte_identical_to_sequential(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "CHUNK_ROWS", 3)  # several chunks per worker
    raw = make_raw_data(tmp_path)
    prepare(raw, tmp_path / "seq", CFG)
    prepare(raw, tmp_path / "par", CFG.model_copy(update=dict(n_jobs=2)))
    prepare(raw, tmp_path / "many", CFG.model_copy(update=dict(n_jobs=5)))  # more threads than cores
    for name in ["train.csv", "val.csv", "test.csv", "label_map.csv", "images/shard-00000.bin"]:
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "par" / name).read_bytes(), name
        assert (tmp_path / "seq" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name


def test_shards_roll_over_and_small_images_are_not_upscaled(tmp_path):
    raw = make_raw_data(tmp_path)
    cfg = CFG.model_copy(update=dict(size=80, shard_mb=2000 / 2**20))
    report = prepare(raw, tmp_path / "prepared", cfg)
    assert report["counts"]["shards"] > 1
    test = read(tmp_path / "prepared" / "test.csv")
    assert set(zip(test["width"], test["height"], strict=True)) == {(72, 100)}  # 72 < 80: kept as is
    store = ImageStore(tmp_path / "prepared")
    train = read(tmp_path / "prepared" / "train.csv")
    assert train["shard"].nunique() > 1
    for row in train.itertuples():
        assert store.read_row(row).shape == (row.height, row.width, 3)


def run_stage(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stage_script(tmp_path):
    raw = make_raw_data(tmp_path)
    params = tmp_path / "params.yaml"
    write_project_params(params, {"prepare": {"size": 48, "val_fraction": 0.25, "n_jobs": 1}})
    out = tmp_path / "prepared"
    proc = run_stage("--params", str(params), "--raw", str(raw), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {
        "images",
        "train.csv",
        "val.csv",
        "test.csv",
        "label_map.csv",
        "report.json",
    }
    # Bad data: one clear line naming file, line and column; exit status 1; nothing written.
    (raw / "test_kaggletest.csv").write_text("name,class,Usage\n4713700.jpg,101,Both\n")
    out2 = tmp_path / "prepared2"
    proc = run_stage("--params", str(params), "--raw", str(raw), "--out", str(out2))
    assert proc.returncode == 1
    assert "test_kaggletest.csv, line 2, column 'Usage'" in proc.stderr
    assert "Traceback" not in proc.stderr and not out2.exists()
    params.write_text("prepare:\n  sise: 48\n")
    proc = run_stage("--params", str(params), "--raw", str(raw), "--out", str(out2))
    assert proc.returncode == 1 and "prepare.sise" in proc.stderr


def test_decode_errors_are_image_defects_not_crashes():
    # The worker contract: every failure mode of one file is an ImageDefect with a reason.
    for data in (b"", b"\xff\xd8\xff", b"GIF89a", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(ImageDefect):
            decode_rgb(data, limits=limits())


def test_a_test_sku_without_train_images_is_kept_as_label_minus_one_and_counted(tmp_path):
    raw = make_raw_data(tmp_path)
    tl = pd.read_csv(raw / "test_kaggletest.csv")
    tl.loc[2, "class"] = 999  # a SKU train.csv lacks
    tl.to_csv(raw / "test_kaggletest.csv", index=False)
    cfg = CFG.model_copy(update=dict(max_unseen_test_fraction=0.2))
    report = prepare(raw, tmp_path / "prepared", cfg)
    assert report["counts"]["test_rows_of_unseen_skus"] == 1 and report["counts"]["test_unseen_skus"] == 1
    test = read(tmp_path / "prepared" / "test.csv")
    row = test[test["sku"] == 999].iloc[0]
    assert row["label"] == -1 and row["group"] == -1 and len(test) == 6  # nothing dropped
    # above the gate (1 of 6 rows > 10%) the stage fails, naming the file, line and column
    with pytest.raises(DataError, match=r"test_kaggletest\.csv.*line 4.*class.*SKU 999"):
        prepare(raw, tmp_path / "prepared2", CFG.model_copy(update=dict(max_unseen_test_fraction=0.1)))
