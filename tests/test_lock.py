"""requirements.lock (tools/lock.py) against pyproject.toml and against the environment the tests run in."""

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.lock import lock_lines

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\]+) \\\n    --hash=sha256:[0-9a-f]{64}$", re.M)


def pins() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text()
    found = {canonicalize_name(n): v for n, v in PIN.findall(text)}
    assert len(found) == text.count("==")  # every entry has exactly one hash in the expected form
    return found


def test_the_lock_satisfies_every_floor_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = pins()
    extras = project["optional-dependencies"]
    for line in [*project["dependencies"], *extras["pipeline"], *extras["serve"], *extras["dev"]]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "products10k":  # dev = products10k[serve] + tools: the extra itself is checked
            continue
        assert name in locked, (
            f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        )
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={locked[name]}, outside {req} (pyproject.toml): `make lock`"
        )


@pytest.mark.skipif(
    os.environ.get("PRODUCTS10K_UNLOCKED") == "1", reason="installed with `make install LOCK=`"
)
def test_the_tests_run_on_exactly_what_the_lock_pins():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differ = {n: (v, installed.get(n)) for n, v in pins().items() if installed.get(n) != v}
    assert not differ, f"locked vs installed (run `make install`): {differ}"


def test_lock_lines_pin_the_file_pip_chose_and_skip_the_project():
    def entry(name, version, info):
        return {"metadata": {"name": name, "version": version}, "download_info": info}

    entries = [
        entry("zeta", "1.0", {"archive_info": {"hash": "sha256=ab"}}),
        entry("Alpha", "2", {"archive_info": {"hashes": {"sha256": "cd"}}}),
        entry("products10k", "0.1.0", {"dir_info": {}}),  # the project itself: not pinned
    ]
    assert lock_lines(entries) == ["Alpha==2 \\\n    --hash=sha256:cd", "zeta==1.0 \\\n    --hash=sha256:ab"]
