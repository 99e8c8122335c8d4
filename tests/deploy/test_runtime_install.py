"""The runtime as it is installed: a virtual environment holding only what the base install and the
``serve`` extra pull in (the lock's versions), where predict runs in every mode, enrol and serve.

The packages are the ones the test environment installed from requirements.lock, linked into the new
environment one distribution at a time along the requirement closure of ``products10k[serve]`` (the
same walk tools/wheelhouse.py makes): no registry is needed, and nothing else is importable there, so a
missing dependency of the runtime (joblib, once) fails here as it would for a user.
"""

import json
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from tests.deploy.test_serve import call, wait_until_up
from tests.helpers import ROOT, free_port
from tools.wheelhouse import requirements_closure

pytestmark = pytest.mark.e2e


def _link_distribution(name: str, site: Path) -> None:
    """Every top-level file and folder of an installed distribution, linked into ``site``."""
    dist = metadata.distribution(name)
    source = Path(dist.locate_file(""))
    tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        target = site / top
        if not target.exists():
            target.symlink_to(source / top)


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    version = sysconfig.get_python_version()
    closure = requirements_closure("serve", version, have=set())
    for name in closure:
        _link_distribution(name, site)
    (site / "products10k-source.pth").write_text(str(ROOT) + "\n")  # the project's code, not installed
    return python, sorted(closure)


def test_the_runtime_install_holds_the_runtime_and_not_the_training_stack(runtime_venv):
    python, closure = runtime_venv
    runtime = {"numpy", "opencv-python-headless", "onnxruntime", "faiss-cpu", "starlette", "uvicorn"}
    assert runtime <= set(closure)
    code = "import importlib.util as u; "
    code += "print([m for m in ('torch', 'joblib', 'pandas', 'dvc') if u.find_spec(m)])"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_in_every_mode_enrol_and_serve_run_in_the_runtime_install(runtime_venv, project, tmp_path):
    python, _ = runtime_venv
    root, prepared, _ = project
    model, index = root / "models" / "export", root / "models" / "m0" / "index"
    photos = tmp_path / "photos"
    (photos / "777").mkdir(parents=True)
    from tests.deploy.test_deploy import prepared_image

    for i in range(2):
        (photos / "777" / f"{i}.jpg").write_bytes(prepared_image(prepared, "test.csv", i))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *args: subprocess.run(  # noqa: E731
        [str(python), "-m", *args], capture_output=True, text=True, env=env, timeout=300
    )
    for mode in ("classifier", "knn", "fused"):
        out = tmp_path / f"{mode}.json"
        proc = run("products10k.deploy.predict", str(photos), "--model", str(model), "--index", str(index),
                   "--mode", mode, "--out", str(out))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = json.loads(out.read_text())
        assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["sku_1"] is not None for r in rows)
    proc = run("products10k.deploy.enrol", str(photos), "--model", str(model), "--index", str(index),
               "--out", str(tmp_path / "enrolled"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "enrolled" / "index.faiss").is_file()

    port = free_port()
    server = subprocess.Popen(
        [
            str(python),
            "-m",
            "products10k.deploy.serve",
            "--model",
            str(model),
            "--index",
            str(tmp_path / "enrolled"),
            "--port",
            str(port),
            "--versions",
            str(tmp_path / "versions"),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, server)
        status, reply = call(
            base, "/v1/recognize?mode=knn", [("q.jpg", (photos / "777" / "0.jpg").read_bytes())]
        )
        assert status == 200 and reply["results"][0]["skus"][0] == 777
    finally:
        server.terminate()
        server.wait(timeout=30)
