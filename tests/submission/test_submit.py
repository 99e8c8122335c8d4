"""Submission: building, validation, scoring, the ensemble end to end, and the Kaggle upload."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from products10k.common import DataError, Products10kError
from products10k.contracts.kaggle import submit_command
from products10k.scores import SplitScores, save_predictions
from products10k.submission.format import (
    align_to_test_list,
    build_submission,
    read_excluded_test_names,
    validate_submission,
)
from products10k.submission.leaderboard import kaggle_submit, score_submission
from products10k.submission.submit import ChoiceSpec, make_submission
from tests.helpers import TINY_PREPARE, config, jpeg_bytes, make_raw_data, stage_module, write_project_params

SKUS = np.array([501, 502, 503, 504])  # label -> original SKU id


def _test_list(n=6):
    names = [f"{4713700 + i}.jpg" for i in range(n)]
    return pd.DataFrame(
        {
            "name": names,
            "class": [501, 502, 503, 504, 501, 999][:n],  # 999: a SKU the training set lacks
            "Usage": ["Public", "Private"] * (n // 2),
        }
    )


def test_build_submission_maps_labels_to_skus_and_keeps_top_k():
    top = np.array([[1, 2, 0], [0, 1, 2]])
    scores = np.array([[0.6, 0.2, 0.1], [0.7, 0.1, 0.1]])
    sub, topk = build_submission(["a.jpg", "b.jpg"], top, scores, SKUS)
    assert list(sub.columns) == ["name", "class"]
    assert sub["class"].tolist() == [502, 501]
    assert list(topk.columns) == ["name", "class_1", "class_2", "class_3", "score_1", "score_2", "score_3"]
    assert topk.iloc[0][["class_1", "class_2"]].tolist() == [502, 503]
    assert topk.iloc[0]["score_1"] == pytest.approx(0.6)


def test_validate_submission_accepts_a_good_one():
    tl = _test_list()
    sub = pd.DataFrame({"name": tl["name"], "class": [501, 502, 503, 504, 501, 502]})
    validate_submission(sub, tl, SKUS)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.assign(extra=1), "expected exactly"),
        (lambda s: s.reset_index(), "expected exactly"),
        (lambda s: s.iloc[:-1], "5 rows but the test list has 6"),
        (lambda s: pd.concat([s.iloc[:-1], s.iloc[:1]]), "appears more than once"),
        (lambda s: s.assign(name=s["name"].where(s.index != 2, "nope.jpg")), "not in the test list"),
        (lambda s: s.assign(**{"class": s["class"].where(s.index != 3, 777)}), "class 777 is not a SKU"),
        (lambda s: s.assign(**{"class": s["class"].astype(float)}), "integer SKU ids"),
    ],
)
def test_validate_submission_rejects(mutate, message):
    tl = _test_list()
    sub = pd.DataFrame({"name": tl["name"], "class": [501, 502, 503, 504, 501, 502]})
    with pytest.raises(DataError, match=message):
        validate_submission(mutate(sub), tl, SKUS, where="sub.csv")


def test_align_reorders_and_rejects_count_mismatch():
    tl = _test_list(4)
    names = tl["name"].to_numpy()[::-1]
    probs = np.arange(4)[:, None] * np.ones((4, 2))
    out_names, (out_probs,) = align_to_test_list(names, (probs,), tl, "x")
    assert out_names.tolist() == tl["name"].tolist()
    assert out_probs[:, 0].tolist() == [3, 2, 1, 0]
    with pytest.raises(DataError, match="predictions for 3 test images but the test list has 4"):
        align_to_test_list(names[:3], (probs[:3],), tl, "x")
    with pytest.raises(DataError, match="no prediction for test image"):
        align_to_test_list(np.array(["a", "b", "c", "d"]), (probs,), tl, "x")


def test_align_fills_only_excluded_images_with_the_fallback():
    tl = _test_list(4)
    names = tl["name"].to_numpy()
    probs = np.arange(3)[:, None] * np.ones((3, 2))
    labels = np.arange(3)[:, None] * np.ones((3, 2), dtype=int)
    fallback = (np.array([3, 1]), np.array([0.75, 0.25]))
    excluded = {names[1], "4799999.jpg"}  # an excluded name outside the test list changes nothing
    out_names, (out_labels, out_probs) = align_to_test_list(
        names[[0, 2, 3]], (labels, probs), tl, "x", excluded, fallback
    )
    assert out_names.tolist() == tl["name"].tolist()
    assert out_probs.tolist() == [[0, 0], [0.75, 0.25], [1, 1], [2, 2]]
    assert out_labels.tolist() == [[0, 0], [3, 1], [1, 1], [2, 2]]
    # a missing image that prepare did not exclude stays an error, named
    with pytest.raises(DataError, match=rf"predictions for 2 test images \(\+1 excluded by prepare\) but "
                       rf"the test list has 4 \(no prediction for e\.g\. {names[3]}\)"):  # fmt: skip
        align_to_test_list(names[[0, 2]], (labels[:2], probs[:2]), tl, "x", excluded, fallback)
    # so is a count mismatch the fallback does not explain (an image outside the list)
    with pytest.raises(
        DataError, match=r"predictions for 4 test images .*\(not in the test list: e\.g\. a\.jpg\)"
    ):
        align_to_test_list(
            np.array([*names[[0, 2, 3]], "a.jpg"]), (np.ones((4, 2)),), tl, "x", excluded, fallback
        )


def test_score_submission_public_private_and_unknown_sku():
    tl = _test_list()
    sub = pd.DataFrame({"name": tl["name"], "class": [501, 503, 503, 504, 502, 501]})
    topk = pd.DataFrame({"name": tl["name"], "class_1": sub["class"], "class_2": [502, 502, 1, 1, 501, 1]})
    s = score_submission(sub, topk, tl)
    assert s["top1"] == pytest.approx(3 / 6)
    assert s["top2"] == pytest.approx(5 / 6)
    assert s["public"] == {"top1": pytest.approx(2 / 3), "top2": pytest.approx(1.0), "n": 3}
    assert s["private"]["top1"] == pytest.approx(1 / 3)
    assert score_submission(sub, topk, tl.drop(columns="class")) == {}


# --- make_submission: the submit stage's work on prediction files made here ---


def _report(path: Path, test_list_path: Path, test_names=(), train_names=()) -> Path:
    """A prepare report.json (products10k/prepared/prepare.py's format) excluding the named images."""

    def entry(csv, name, line):
        return {
            "file": str(csv), "line": line, "name": name, "archive": str(csv.parent / "test.zip"),
            "member": "test/" + name, "reason": "truncated", "detail": "image file is truncated",
        }  # fmt: skip

    excluded = [entry(test_list_path.parent / "train.csv", n, 2 + i) for i, n in enumerate(train_names)]
    excluded += [entry(test_list_path, n, 2 + i) for i, n in enumerate(test_names)]
    path.write_text(json.dumps({"counts": {"excluded_test": len(test_names)}, "excluded": excluded}))
    return path


def _label_map(path: Path) -> Path:
    pd.DataFrame({"label": range(4), "sku": SKUS, "group": [1, 1, 2, 2], "n_train": [9, 3, 5, 2]}).to_csv(
        path, index=False
    )
    return path


def _predictions(path, test_names, rng, strength, skus=SKUS, truth=None):
    val_labels = rng.integers(0, 4, size=40)
    val = rng.normal(size=(40, 4))
    val[np.arange(40), val_labels] += strength
    test = rng.normal(size=(len(test_names), 4))
    if truth is not None:
        test[np.arange(len(test_names)), truth] += strength
    test_labels = np.zeros(len(test_names), dtype=np.int64)
    save_predictions(
        path,
        val=SplitScores.from_logits([f"v{i}.jpg" for i in range(40)], val_labels, val, k=100),
        test=SplitScores.from_logits(np.asarray(test_names), test_labels, test, k=100),
        skus=np.asarray(skus),
    )


@pytest.fixture
def submit_inputs(tmp_path):
    rng = np.random.default_rng(0)
    tl = _test_list()
    tl_path = tmp_path / "test_kaggletest.csv"
    tl.to_csv(tl_path, index=False)
    truth = np.array([0, 1, 2, 3, 0, 1])
    preds = tmp_path / "predictions"
    preds.mkdir()
    # prediction rows in another order than the test list: the submission must follow the list
    order = np.array([5, 4, 3, 2, 1, 0])
    _predictions(preds / "m0.npz", tl["name"].to_numpy()[order], rng, 6.0, truth=truth[order])
    _predictions(preds / "m1.npz", tl["name"].to_numpy()[order], rng, 0.0, truth=truth[order])
    return {
        "members": ["m0", "m1"],
        "prediction_paths": {"m0": preds / "m0.npz", "m1": preds / "m1.npz"},
        "weights_spec": "fit",
        "choice": ChoiceSpec(target_prior="train", taus=(0.0,), reference=None, confidence=0.95, rerank_k=50),
        "label_map_path": _label_map(tmp_path / "label_map.csv"),
        "test_list_path": tl_path,
        "out": tmp_path / "sub" / "submission.csv",
        "top_k_out": tmp_path / "sub" / "top5.csv",
        "top_k": 5,
        "report_path": _report(tmp_path / "report.json", tl_path),  # nothing excluded
    }


def test_make_submission_writes_a_valid_scored_submission(submit_inputs):
    metrics = make_submission(**submit_inputs)
    sub = pd.read_csv(submit_inputs["out"])
    assert list(sub.columns) == ["name", "class"]
    tl = pd.read_csv(submit_inputs["test_list_path"], dtype={"name": str})
    assert sub["name"].astype(str).tolist() == tl["name"].tolist()
    # the informative member dominates: every known SKU right, the unknown 999 wrong
    assert sub["class"].tolist() == [501, 502, 503, 504, 501, 502]
    assert metrics["test"]["top1"] == pytest.approx(5 / 6)
    assert metrics["test"]["fallback_rows"] == 0
    assert metrics["ensemble"]["weights"]["m0"] > 0.9
    # val is what the weights were fitted on: labelled in-sample, never shown as plain "val"
    assert "val" not in metrics and 0 <= metrics["val_in_sample"]["top1"] <= 1
    top5 = pd.read_csv(submit_inputs["top_k_out"])
    assert top5.shape == (6, 1 + 2 * 4)  # K = 4 < 5: four SKU ids and four scores
    assert not list(submit_inputs["out"].parent.glob(".*"))  # no temp files left behind


def test_make_submission_count_mismatch_leaves_no_submission(submit_inputs, tmp_path):
    out = submit_inputs["out"]
    out.parent.mkdir(parents=True)
    out.write_text("name,class\nstale.jpg,1\n")  # from an earlier run
    tl = _test_list()
    pd.concat([tl, tl.iloc[:1].assign(name="4799999.jpg")]).to_csv(
        submit_inputs["test_list_path"], index=False
    )
    with pytest.raises(DataError, match="predictions for 6 test images but the test list has 7"):
        make_submission(**submit_inputs)
    assert not out.exists()
    assert not list(out.parent.iterdir())


def _predict_only(inputs, rows, extra=()):
    """Rewrite both members' predictions to cover only test-list ``rows`` (plus ``extra`` names)."""
    rng = np.random.default_rng(2)
    tl = pd.read_csv(inputs["test_list_path"], dtype={"name": str})
    names = [*tl["name"].to_numpy()[rows], *extra]
    truth = [*np.array([0, 1, 2, 3, 0, 1])[rows], *[0] * len(extra)]
    for member, strength in (("m0", 6.0), ("m1", 0.0)):
        _predictions(inputs["prediction_paths"][member], names, rng, strength, truth=np.array(truth))
    return tl["name"].to_numpy()


def test_make_submission_fills_excluded_test_images_with_the_most_frequent_sku(submit_inputs, caplog):
    # test images 0 (truth 501) and 2 (truth 503) were excluded by prepare: no predictions for them
    names = _predict_only(submit_inputs, [1, 3, 4, 5])
    _report(submit_inputs["report_path"], submit_inputs["test_list_path"], test_names=[names[0], names[2]])
    metrics = make_submission(**submit_inputs)
    sub = pd.read_csv(submit_inputs["out"], dtype={"name": str})
    assert sub["name"].tolist() == names.tolist()  # complete, in the test list's order
    # 501 has the most training images (n_train 9, 3, 5, 2): right for image 0, wrong for image 2
    assert sub["class"].tolist() == [501, 502, 501, 504, 501, 502]
    assert metrics["test"]["fallback_rows"] == 2
    assert metrics["test"]["top1"] == pytest.approx(4 / 6) and metrics["test"]["n"] == 6
    top5 = pd.read_csv(submit_inputs["top_k_out"], dtype={"name": str}).set_index("name")
    # the fallback row is the training prior: SKUs by n_train, scores n_train / total
    assert top5.loc[names[2], ["class_1", "class_2", "class_3", "class_4"]].tolist() == [501, 503, 502, 504]
    assert top5.loc[names[2], "score_1"] == pytest.approx(9 / 19, abs=1e-6)
    assert "2 test image(s) excluded by prepare" in caplog.text and "501" in caplog.text


def test_make_submission_rejects_missing_images_that_were_not_excluded(submit_inputs):
    out = submit_inputs["out"]
    out.parent.mkdir(parents=True)
    out.write_text("name,class\nstale.jpg,1\n")  # from an earlier run
    names = _predict_only(submit_inputs, [1, 3, 4, 5])
    # image 0 is an excluded test image; image 2 is missing too, but only a *train* image of the
    # same name was excluded: that is no excuse
    _report(
        submit_inputs["report_path"],
        submit_inputs["test_list_path"],
        test_names=[names[0]],
        train_names=[names[2]],
    )
    with pytest.raises(
        DataError,
        match=rf"predictions for 4 test images \(\+1 excluded by prepare\) but the test list has 6 "
        rf"\(no prediction for e\.g\. {names[2]}\)",
    ):  # fmt: skip
        make_submission(**submit_inputs)
    assert not out.exists()
    # a prediction outside the test list: the counts only match by accident, still an error
    _predict_only(submit_inputs, [1, 3, 4, 5], extra=["4799999.jpg"])
    _report(submit_inputs["report_path"], submit_inputs["test_list_path"], test_names=[names[0]])
    with pytest.raises(DataError, match="no prediction for test image"):
        make_submission(**submit_inputs)
    # without a report, every test image needs a prediction
    _predict_only(submit_inputs, [1, 2, 3, 4, 5])
    with pytest.raises(DataError, match="predictions for 5 test images but the test list has 6"):
        make_submission(**{**submit_inputs, "report_path": None})
    assert not out.exists()


def test_make_submission_names_a_missing_or_bad_report(submit_inputs):
    report = submit_inputs["report_path"]
    report.unlink()
    with pytest.raises(DataError, match=r"report\.json: prepare report not found"):
        make_submission(**submit_inputs)
    report.write_text('{"counts": {}}')
    with pytest.raises(DataError, match="no 'excluded' list"):
        make_submission(**submit_inputs)


def test_excluded_test_names_from_a_real_prepare_report(tmp_path):
    """The report format is prepare's: a truncated test image is found, a bad train image is not."""
    import zipfile

    from products10k.prepared.prepare import prepare

    good = jpeg_bytes((10, 20, 30))
    raw = make_raw_data(tmp_path, replace={"2.jpg": good[: len(good) // 2]})
    with zipfile.ZipFile(raw / "test.zip") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["test/4713701.jpg"] = b""  # an empty test image
    with zipfile.ZipFile(raw / "test.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    report = prepare(raw, tmp_path / "prepared", config("prepare", **TINY_PREPARE))
    assert report["counts"]["excluded_test"] == 1
    names = read_excluded_test_names(tmp_path / "prepared" / "report.json", raw / "test_kaggletest.csv")
    assert names == {"4713701.jpg"}
    assert (
        "4713701.jpg"
        not in pd.read_csv(tmp_path / "prepared" / "test.csv", dtype={"name": str})["name"].tolist()
    )


def test_make_submission_names_missing_member_and_foreign_label_map(submit_inputs):
    paths = dict(submit_inputs["prediction_paths"])
    paths["m1"].unlink()
    with pytest.raises(Products10kError, match="ensemble member 'm1'.*m1.npz not found"):
        make_submission(**submit_inputs)
    rng = np.random.default_rng(1)
    _predictions(paths["m1"], ["a"] * 6, rng, 1.0, skus=np.array([501, 502, 503, 505]))
    with pytest.raises(Products10kError, match="member 'm1'.*different label map"):
        make_submission(**submit_inputs)
    assert not submit_inputs["out"].exists()


# --- Kaggle upload with a fake CLI ---


def _fake_kaggle(bin_dir: Path, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "kaggle"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def _env(tmp_path, bin_dir, creds=True):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(home)}
    if creds:
        env["KAGGLE_USERNAME"], env["KAGGLE_KEY"] = "user", "key"
    return env


def test_submit_command_shape():
    assert submit_command("products-10k", "s/sub.csv", "msg") == [
        "kaggle", "competitions", "submit", "-c", "products-10k", "-f", "s/sub.csv", "-m", "msg",
    ]  # fmt: skip


def test_kaggle_submit_runs_the_cli_with_the_built_arguments(tmp_path):
    log = tmp_path / "args.txt"
    bin_dir = tmp_path / "bin"
    _fake_kaggle(bin_dir, f'printf "%s\\n" "$@" > {log}; echo "Successfully submitted"')
    out = kaggle_submit("products-10k", "sub.csv", "run 1", 10, env=_env(tmp_path, bin_dir))
    assert "Successfully submitted" in out
    assert log.read_text().splitlines() == submit_command("products-10k", "sub.csv", "run 1")[1:]


def test_kaggle_submit_clear_errors(tmp_path):
    bin_dir = tmp_path / "bin"
    with pytest.raises(Products10kError, match="'kaggle' CLI is not on PATH"):
        kaggle_submit("c", "f.csv", "m", 10, env=_env(tmp_path, bin_dir))
    _fake_kaggle(bin_dir, "echo 'Unauthorized: 401' >&2; exit 1")
    with pytest.raises(Products10kError, match="no Kaggle credentials"):
        kaggle_submit("c", "f.csv", "m", 10, env=_env(tmp_path, bin_dir, creds=False))
    # a kaggle.json without a username and key is named, before the CLI runs
    (tmp_path / "home" / ".kaggle").mkdir()
    token = tmp_path / "home" / ".kaggle" / "kaggle.json"
    token.write_text("{}")
    with pytest.raises(DataError, match="kaggle.json: expected keys 'username' and 'key'"):
        kaggle_submit("c", "f.csv", "m", 10, env=_env(tmp_path, bin_dir, creds=False))
    # credentials from ~/.kaggle/kaggle.json count too; the CLI's own failure is reported
    token.write_text('{"username": "u", "key": "s3cret"}')
    with pytest.raises(Products10kError, match="exit code 1: Unauthorized: 401"):
        kaggle_submit("c", "f.csv", "m", 10, env=_env(tmp_path, bin_dir, creds=False))


@pytest.mark.parametrize("creds", ["env", "kaggle.json"])
def test_kaggle_submit_failure_does_not_leak_the_key(tmp_path, caplog, creds):
    bin_dir = tmp_path / "bin"
    # a failing CLI that echoes the key it was given (as a verbose HTTP client might)
    _fake_kaggle(
        bin_dir,
        'echo "POST /submit user=u key=${KAGGLE_KEY:-topsecretkey}"; echo "403 Forbidden" >&2; exit 1',
    )
    env = _env(tmp_path, bin_dir, creds=False)
    if creds == "env":
        env["KAGGLE_USERNAME"], env["KAGGLE_KEY"] = "u", "topsecretkey"
    else:
        (tmp_path / "home" / ".kaggle").mkdir()
        (tmp_path / "home" / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "topsecretkey"}')
    with pytest.raises(Products10kError, match="exit code 1") as info:
        kaggle_submit("c", "f.csv", "m", 10, env=env)
    message = str(info.value)
    assert "POST /submit user=u key=***" in message and "403 Forbidden" in message
    assert "topsecretkey" not in message and "topsecretkey" not in caplog.text


def test_kaggle_submit_never_hangs(tmp_path):
    bin_dir = tmp_path / "bin"
    # a CLI that waits for input (a prompt) and then sleeps: stdin is closed, the timeout fires
    _fake_kaggle(bin_dir, "read answer; exec sleep 30")
    with pytest.raises(Products10kError, match="did not finish within 1s"):
        kaggle_submit("c", "f.csv", "m", 1, env=_env(tmp_path, bin_dir))


# --- the submit stage script ---


def _stage_argv(inputs, params, root):
    return [
        "--params", str(params), "--predictions", str(root),
        "--label-map", str(inputs["label_map_path"]), "--test-list", str(inputs["test_list_path"]),
        "--report", str(inputs["report_path"]),
        "--out", str(inputs["out"]), "--top-k", str(inputs["top_k_out"]),
        "--metrics", str(inputs["out"].parent / "submission.json"),
    ]  # fmt: skip


def test_submit_stage_uploads_with_kaggle_when_enabled(submit_inputs, tmp_path, monkeypatch):
    phase_dir = tmp_path / "finetune_accuracy"
    submit_inputs["prediction_paths"]["m0"].parent.rename(phase_dir)
    params = tmp_path / "params.yaml"
    kaggle = {"enabled": True, "message": "e2e", "timeout_s": 10}
    updates = {
        "ensemble": {"members": {"m0": {}, "m1": {}}},
        "submit": {"kaggle": kaggle, "phase": "finetune_accuracy", "logit_adjust": 0.0},
    }
    write_project_params(params, updates)
    log = tmp_path / "args.txt"
    bin_dir = tmp_path / "bin"
    _fake_kaggle(bin_dir, f'printf "%s\\n" "$@" > {log}')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KAGGLE_USERNAME", "user")
    monkeypatch.setenv("KAGGLE_KEY", "key")
    stage_module("submit").main(_stage_argv(submit_inputs, params, tmp_path))
    assert log.read_text().splitlines() == [
        "competitions", "submit", "-c", "products-10k", "-f", str(submit_inputs["out"]), "-m", "e2e",
    ]  # fmt: skip
    metrics = json.loads((submit_inputs["out"].parent / "submission.json").read_text())
    assert metrics["ensemble"]["size"] == 2 and metrics["test"]["top1"] == pytest.approx(5 / 6)


def test_submit_stage_rejects_a_phase_that_is_not_evaluated(submit_inputs, tmp_path, caplog):
    params = tmp_path / "params.yaml"
    updates = {
        "ensemble": {"members": {"m0": {}, "m1": {}}},
        "evaluate": {"phases": ["train"]},
        "submit": {"phase": "finetune_accuracy"},
    }
    write_project_params(params, updates)
    with pytest.raises(SystemExit):
        stage_module("submit").main(_stage_argv(submit_inputs, params, tmp_path))
    assert "submit.phase 'finetune_accuracy' is not in evaluate.phases (train)" in caplog.text
    assert not submit_inputs["out"].exists()


def test_submit_stage_rejects_a_reference_that_is_not_evaluated(submit_inputs, tmp_path, caplog):
    """auto chooses against submit.reference: one left out of evaluate.phases is named, not replaced."""
    params = tmp_path / "params.yaml"
    updates = {
        "ensemble": {"members": {"m0": {}, "m1": {}}},
        "evaluate": {"phases": ["finetune_accuracy"]},
        "submit": {"phase": "auto", "reference": "train"},
    }
    write_project_params(params, updates)
    with pytest.raises(SystemExit):
        stage_module("submit").main(_stage_argv(submit_inputs, params, tmp_path))
    assert "submit.reference 'train' is not in evaluate.phases (finetune_accuracy)" in caplog.text
    assert not submit_inputs["out"].exists()
