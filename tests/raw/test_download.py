"""The `download` stage: synthetic, dir and kaggle sources, atomic output, the stage script and DVC."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

import products10k.raw.download as dl
from products10k.common import DataError
from products10k.contracts import kaggle
from tests.helpers import ROOT, config, dvc, make_project, write_project_params

RAW = ("train.zip", "test.zip", "train.csv", "test_kaggletest.csv")
TINY = {
    "seed": 1,
    "num_groups": 2,
    "skus_per_group": 2,
    "train_max_per_sku": 3,
    "train_min_per_sku": 1,
    "test_per_sku": 1,
    "n_jobs": 1,
}
TRAIN_CSV = "name,class,group\n1.jpg,10,1\n2.jpg,20,1\n"
TEST_CSV = "name,class,Usage\n1000001.jpg,10,Public\n1000002.jpg,20,Private\n"


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with its hash, mode and mtime: proves a folder was left alone."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[p.relative_to(folder).as_posix()] = (digest, st.st_mode, st.st_mtime_ns)
    return out


def write_zip(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


@pytest.fixture
def zipped_dir(tmp_path) -> Path:
    src = tmp_path / "official"
    src.mkdir()
    write_zip(src / "train.zip", {"train/1.jpg": b"a", "train/2.jpg": b"b"})
    write_zip(src / "test.zip", {"test/1000001.jpg": b"c", "test/1000002.jpg": b"d"})
    (src / "train.csv").write_text(TRAIN_CSV)
    (src / "test_kaggletest.csv").write_text(TEST_CSV)
    return src


@pytest.fixture
def extracted_dir(tmp_path) -> Path:
    src = tmp_path / "extracted"
    for name, data in {"train/1.jpg": b"a", "train/2.jpg": b"b", "test/1000001.jpg": b"c"}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "train" / ".DS_Store").write_bytes(b"junk")
    (src / "train.csv").write_text(TRAIN_CSV)
    (src / "test_kaggletest.csv").write_text(TEST_CSV)
    return src


# ---------------------------------------------------------------------------------------------
# synthetic source and atomic output
# ---------------------------------------------------------------------------------------------


def test_synthetic_fills_out_and_replaces_old_content(tmp_path):
    out = tmp_path / "data" / "raw"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older run")
    (tmp_path / "data" / ".raw.tmp-killed").mkdir()  # staging of a run killed with SIGKILL
    (tmp_path / "data" / ".raw.tmp-killed" / "train.zip").write_bytes(b"half")
    dl.download(config("data", **{f"synthetic.{k}": v for k, v in TINY.items()}), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(RAW)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]  # no staging left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    dl.check_raw(out)


def test_failed_run_keeps_previous_output_and_leaves_no_staging(tmp_path, monkeypatch):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "train.csv").write_text("previous")

    def broken(cfg, folder):
        (Path(folder) / "train.zip").write_bytes(b"half an archive")
        raise KeyboardInterrupt  # as if the run were killed mid-way

    monkeypatch.setattr(dl, "generate", broken)
    with pytest.raises(KeyboardInterrupt):
        dl.download(config("data", **{f"synthetic.{k}": v for k, v in TINY.items()}), out)
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]
    assert [p.name for p in out.iterdir()] == ["train.csv"]
    assert (out / "train.csv").read_text() == "previous"


# ---------------------------------------------------------------------------------------------
# dir source
# ---------------------------------------------------------------------------------------------


def test_dir_zipped_is_copied_and_user_folder_untouched(zipped_dir, tmp_path):
    before = snapshot(zipped_dir)
    out = tmp_path / "raw"
    dl.download(config("data", source="dir", dir=str(zipped_dir)), out)
    assert snapshot(zipped_dir) == before
    for name in RAW:
        assert (out / name).read_bytes() == (zipped_dir / name).read_bytes()
        assert (out / name).stat().st_ino != (zipped_dir / name).stat().st_ino  # a copy, not a link


def test_dir_hardlink_shares_the_files(zipped_dir, tmp_path):
    out = tmp_path / "raw"
    dl.download(config("data", source="dir", dir=str(zipped_dir), link="hardlink"), out)
    assert all((out / n).stat().st_ino == (zipped_dir / n).stat().st_ino for n in RAW)


def test_dir_extracted_is_zipped_reproducibly(extracted_dir, tmp_path):
    before = snapshot(extracted_dir)
    dl.download(config("data", source="dir", dir=str(extracted_dir)), tmp_path / "a")
    dl.download(config("data", source="dir", dir=str(extracted_dir)), tmp_path / "b")
    assert snapshot(extracted_dir) == before
    with zipfile.ZipFile(tmp_path / "a" / "train.zip") as zf:
        assert zf.namelist() == ["train/1.jpg", "train/2.jpg"]  # hidden files left out
        assert zf.read("train/2.jpg") == b"b"
    with zipfile.ZipFile(tmp_path / "a" / "test.zip") as zf:
        assert zf.namelist() == ["test/1000001.jpg"]
    assert (tmp_path / "a" / "train.zip").read_bytes() == (tmp_path / "b" / "train.zip").read_bytes()


def test_dir_relative_to_base_dir(zipped_dir, tmp_path):
    dl.download(config("data", source="dir", dir="official"), tmp_path / "raw", base_dir=zipped_dir.parent)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(RAW)


def test_dir_missing_files_are_named(zipped_dir, tmp_path):
    (zipped_dir / "test.zip").unlink()
    (zipped_dir / "train.csv").unlink()
    with pytest.raises(DataError, match=r"lacks train\.csv, test\.zip \(or an extracted test/ folder\)"):
        dl.download(config("data", source="dir", dir=str(zipped_dir)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    with pytest.raises(DataError, match="is not a folder"):
        dl.download(config("data", source="dir", dir=str(tmp_path / "nope")), tmp_path / "raw")


def test_check_raw_names_bad_column_and_zip_root(zipped_dir, tmp_path):
    (zipped_dir / "train.csv").write_text("name,label,group\n1.jpg,1,1\n")
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) class"):
        dl.check_raw(zipped_dir)
    (zipped_dir / "train.csv").write_text(TRAIN_CSV)
    write_zip(zipped_dir / "test.zip", {"images/1.jpg": b"x"})
    with pytest.raises(DataError, match=r"test\.zip: no images under 'test/'"):
        dl.check_raw(zipped_dir)
    (zipped_dir / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unexpected notes.txt"):
        dl.check_raw(zipped_dir)


# ---------------------------------------------------------------------------------------------
# kaggle source
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch) -> Path:
    """A clean HOME and PATH with only a folder for a fake `kaggle` executable; returns that folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def fake_kaggle(bin_dir: Path, body: str) -> None:
    script = bin_dir / "kaggle"
    script.write_text(f"#!{sys.executable}\nimport sys, os, zipfile, time\n" + textwrap.dedent(body))
    script.chmod(0o755)


def official_archive_bytes(extracted: bool = False) -> bytes:
    """A competition archive like the one the CLI saves: the four files in a sub-folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("products-10k/train.csv", TRAIN_CSV)
        zf.writestr("products-10k/test_kaggletest.csv", TEST_CSV)
        if extracted:
            zf.writestr("products-10k/train/1.jpg", b"a")
            zf.writestr("products-10k/test/1000001.jpg", b"c")
        else:
            for split, name in (("train", "1.jpg"), ("test", "1000001.jpg")):
                inner = io.BytesIO()
                with zipfile.ZipFile(inner, "w") as z:
                    z.writestr(f"{split}/{name}", b"x")
                zf.writestr(f"products-10k/{split}.zip", inner.getvalue())
    return buf.getvalue()


def test_kaggle_command_is_the_official_cli_call(tmp_path):
    assert kaggle.download_command("products-10k", tmp_path) == [
        "kaggle", "competitions", "download", "-c", "products-10k", "-p", str(tmp_path)
    ]  # fmt: skip


def test_kaggle_credentials_sources(tmp_path, kaggle_env):
    home = tmp_path / "home"
    with pytest.raises(DataError, match="Kaggle credentials not found"):
        kaggle.kaggle_credentials(env={}, home=home)
    assert "KAGGLE_KEY" in kaggle.kaggle_credentials(
        env={"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=home
    )
    (home / ".kaggle").mkdir()
    token = home / ".kaggle" / "kaggle.json"
    token.write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        kaggle.kaggle_credentials(env={}, home=home)
    token.write_text('{"username": "u"}')
    with pytest.raises(DataError, match="'username' and 'key'"):
        kaggle.kaggle_credentials(env={}, home=home)
    token.write_text('{"username": "u", "key": "s3cret"}')
    found = kaggle.kaggle_credentials(env={}, home=home)
    assert str(token) in found and "s3cret" not in found


def test_kaggle_cli_missing(kaggle_env, tmp_path):
    with pytest.raises(DataError, match="`kaggle` CLI is not on PATH"):
        dl.download(config("data", source="kaggle"), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_kaggle_without_credentials(kaggle_env, tmp_path):
    fake_kaggle(kaggle_env, "sys.exit(0)\n")
    with pytest.raises(DataError, match="Kaggle credentials not found"):
        dl.download(config("data", source="kaggle"), tmp_path / "raw")


def test_kaggle_failure_reports_output_without_the_key(kaggle_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "topsecretkey")
    fake_kaggle(
        kaggle_env,
        "print('ConnectionError: network unreachable, key=' + os.environ['KAGGLE_KEY'])\nsys.exit(1)\n",
    )
    with pytest.raises(DataError) as info:
        dl.download(config("data", source="kaggle"), tmp_path / "raw")
    message = str(info.value)
    assert "exit code 1" in message and "network unreachable" in message
    assert "topsecretkey" not in message and "topsecretkey" not in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("bin", "home")] == []


def test_kaggle_timeout_never_hangs(kaggle_env, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "k")
    fake_kaggle(kaggle_env, "print('starting', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(DataError, match=r"did not finish in 1 s \(data.kaggle.timeout_s\)"):
        dl.download(config("data", source="kaggle", **{"kaggle.timeout_s": 1.0}), tmp_path / "raw")


@pytest.mark.parametrize("extracted", [False, True])
def test_kaggle_archive_is_unpacked_into_the_four_files(kaggle_env, tmp_path, monkeypatch, extracted):
    (tmp_path / "archive.zip").write_bytes(official_archive_bytes(extracted))
    monkeypatch.setenv("KAGGLE_API_TOKEN", "tok")
    # The fake CLI checks the arguments it gets and saves the archive where -p says.
    fake_kaggle(
        kaggle_env,
        f"""
        args = sys.argv[1:]
        assert args[:4] == ["competitions", "download", "-c", "products-10k"], args
        dest = args[args.index("-p") + 1]
        with open(os.path.join(dest, "products-10k.zip"), "wb") as f:
            f.write(open({str(tmp_path / "archive.zip")!r}, "rb").read())
        """,
    )
    out = tmp_path / "raw"
    dl.download(config("data", source="kaggle"), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(RAW)
    assert (out / "train.csv").read_text() == TRAIN_CSV
    with zipfile.ZipFile(out / "test.zip") as zf:
        assert zf.namelist() == ["test/1000001.jpg"]


def test_unsafe_archive_entries_are_refused(tmp_path):
    write_zip(tmp_path / "evil.zip", {"../outside.txt": b"x"})
    (tmp_path / "into").mkdir()
    with pytest.raises(DataError, match="outside the archive folder"):
        dl._safe_extract(tmp_path / "evil.zip", tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


# ---------------------------------------------------------------------------------------------
# the stage script and DVC
# ---------------------------------------------------------------------------------------------


def run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "download.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_stage_script_on_a_tiny_config(tmp_path):
    write_project_params(tmp_path / "params.yaml", {"data": {"synthetic": TINY}})
    proc = run_stage(tmp_path, "--params", "params.yaml", "--out", "data/raw")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "raw").iterdir()) == sorted(RAW)
    assert "synthetic data:" in proc.stderr  # logged, not printed


def test_stage_script_names_a_bad_key(tmp_path):
    write_project_params(tmp_path / "params.yaml", {"data": {"synthetic": {"num_grups": 2}}})
    proc = run_stage(tmp_path, "--params", "params.yaml", "--out", "data/raw")
    assert proc.returncode == 1
    assert "unknown key 'data.synthetic.num_grups'" in proc.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.e2e
def test_dvc_repro_download(tmp_path):

    proj = make_project(tmp_path / "proj", {"data": {"synthetic": TINY}})
    dvc(proj, "repro", "download")
    assert sorted(p.name for p in (proj / "data" / "raw").iterdir()) == sorted(RAW)
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    assert lock["stages"]["download"]["params"]["params.yaml"]["data"]["synthetic"]["seed"] == 1
    status = dvc(proj, "status", "download").stdout
    assert "changed" not in status
    assert os.listdir(proj / "data") == ["raw"]
