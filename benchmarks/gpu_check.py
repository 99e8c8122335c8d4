"""The GPU box check: install without a registry, run the pipeline on CUDA, time training against timm's.

    make wheelhouse                         # on a machine with the registry: wheels -> wheelhouse/
    make gpu-check                          # on the GPU box (the working tree and wheelhouse/ copied in)
    python3 benchmarks/gpu_check.py --wheelhouse wheelhouse --timm-train PATH/TO/timm/train.py
    python3 benchmarks/gpu_check.py --device cpu --tiny     # every step, tiny, on a CPU (the test)

Steps, each bounded in time (``--budget-s`` for the whole run, a share of it each), each writing its
figures as it ends, so a killed run still leaves what it measured in ``--out`` (gpu.json, gpu.md):

0. ``install``: ``pip install --no-index --no-deps --target`` of the wheelhouse (tools/wheelhouse.py),
   then the check runs again with that folder first on the path (``pip check`` is recorded).
1. ``repro``: ``dvc repro`` of the embedded default in a scratch copy of the project (git + DVC
   initialised there; the working tree is never touched): every stage's seconds, Table 1's
   metrics, each training phase's img/s and data wait (DVCLive's per-epoch figures).
   ``repro448``: the same project at ``train.resolution=448`` with DataLoader workers for the
   machine's cores (``dvc repro`` re-runs what that changes).
2. ``bench``: benchmarks/bench_train.py: optimizer steps of the default model and of efficientnet_b3
   at 448, batch 64, 9,691 classes, bf16 autocast and channels-last off/on, torch.compile, peak GPU memory.
3. ``peer``: a synthetic set of ``--peer-images`` training images, prepared by the pipeline, written
   as an ImageFolder too; then the same model, resolution, batch, workers, bf16 and channels-last
   through the project's train stage and through timm's own ``train.py`` (``--timm-train``; the timm
   wheel does not ship it: take it from timm's repository, at the installed timm's version).
   Each side's img/s is the median over its epochs after the first (cuDNN's autotuning and the
   first workers' start are in the first), and each side's data wait is its own measure.

``--tiny`` shrinks every step (32 px, a ResNet-10, one epoch a phase, a few images) so that a CPU
runs the whole check in a few minutes; the figures are then only a proof that the steps work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# the sibling modules (this script runs as a file on the GPU box, with benchmarks/ first on sys.path)
from gpu_peer import peer
from gpu_run import ROOT, TINY, dvclive_epochs, make_project, outcome, run_timed, tool_env, write_params

#: seconds each step may take at most, before the run's remaining budget cuts it shorter
STEP_CAPS = {"repro": 240, "repro448": 180, "peer": 200, "bench": 150}
PHASES = ("train", "finetune_balanced", "finetune_accuracy")


# --- the run's record ------------------------------------------------------------------------


class Record:
    """gpu.json and gpu.md under ``out``, rewritten (atomically) after every step."""

    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": {}}
        out.mkdir(parents=True, exist_ok=True)
        previous = out / "gpu.json"
        if os.environ.get("P10K_GPU_CHECK_RECORD") and previous.exists():  # the re-executed run goes on
            self.data = json.loads(previous.read_text())

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def step(self, name: str, value: dict) -> None:
        self.data["steps"][name] = value
        self.flush()

    def flush(self) -> None:
        for name, text in (
            ("gpu.json", json.dumps(self.data, indent=1) + "\n"),
            ("gpu.md", markdown(self.data)),
        ):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


# --- step 0: install ---------------------------------------------------------------------------


def install(wheelhouse: Path, target: Path) -> dict:
    """The wheelhouse into ``target`` with no registry; skipped when ``target`` holds this manifest."""
    manifest = (wheelhouse / "manifest.json").read_text()
    stamp = target / ".products10k-manifest.json"
    t0 = time.perf_counter()
    if not (stamp.exists() and stamp.read_text() == manifest):
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
        cmd += [
            "--disable-pip-version-check",
            "--target",
            str(target),
            *map(str, sorted(wheelhouse.glob("*.whl"))),
        ]
        subprocess.run(cmd, check=True)
        stamp.write_text(manifest)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    check = subprocess.run([sys.executable, "-m", "pip", "check"], env=env, capture_output=True, text=True)
    wheels = json.loads(manifest)
    return {
        "status": "ok",
        "seconds": round(time.perf_counter() - t0, 1),
        "wheels": len(wheels["wheels"]),
        "mib": round(sum(w["bytes"] for w in wheels["wheels"]) / 2**20, 1),
        "left_out": [w["name"] for w in wheels["left_out"]],
        "pip_check": check.stdout.strip().splitlines()[:30],
    }


# --- the machine -------------------------------------------------------------------------------


def machine(device: str) -> dict:
    import cv2
    import timm
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "opencv": cv2.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            info["driver"] = q.stdout.strip()
    return info


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# --- step 1: dvc repro -------------------------------------------------------------------------


def stage_seconds(lines: list[tuple[float, str]], end: float) -> dict:
    """Seconds of each stage from ``dvc repro``'s time-stamped "Running stage 'x':" lines."""
    starts = [(t, line.split("'")[1]) for t, line in lines if line.startswith("Running stage '")]
    out = {}
    for (t, name), nxt in zip(starts, [*starts[1:], (end, None)], strict=True):
        out[name] = round(nxt[0] - t, 1)
    return out


def nested(tree: dict, *keys):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def pipeline_figures(project: Path) -> dict:
    read = lambda p: json.loads(p.read_text()) if p.exists() else {}  # noqa: E731
    figures = {}
    for phase in PHASES:
        m = read(project / "metrics" / "m0" / f"{phase}.json")
        figures[phase] = {
            "val_top1": nested(m, "val", "top1"),
            "test_top1": nested(m, "test", "top1"),
            **dvclive_epochs(project / "dvclive" / "m0" / phase),
        }
    figures["knn_test_top1"] = nested(
        read(project / "metrics" / "m0" / "retrieval.json"), "test", "knn", "top1"
    )
    figures["submission_test_top1"] = nested(read(project / "metrics" / "submission.json"), "test", "top1")
    return figures


def repro(project: Path, env: dict, timeout: float, log: Path) -> dict:
    result = run_timed([sys.executable, "-m", "dvc", "repro"], project, env, timeout, log)
    report = outcome(result, timeout)
    report["stages"] = stage_seconds(result["lines"], result["seconds"])
    report["metrics"] = pipeline_figures(project)
    return report


# --- step 2: bench_train -------------------------------------------------------------------------


def bench(device: str, tiny: bool, compile_: bool, env: dict, timeout: float, work: Path) -> dict:
    out = work / "bench_train.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_train.py"),
        "--device",
        device,
        "--json",
        str(out),
    ]
    # tiny: a CPU under a loaded test run times four settings of the default model in seconds, not minutes
    tiny_args = ["--steps", "2", "--skip-b3", "--classes", "10", "--resolution", "64", "--batch", "8"]
    cmd += tiny_args if tiny else ["--steps", "10"]
    if compile_:
        cmd.append("--compile")
    result = run_timed(cmd, ROOT, env, timeout, work / "bench_train.log")
    report = outcome(result, timeout)
    report["rows"] = json.loads(out.read_text())["rows"] if out.exists() else []
    return report


# --- the Markdown table ----------------------------------------------------------------------


def markdown(data: dict) -> str:
    m = data.get("machine", {})
    lines = ["# GPU check", ""]
    if m:
        gpu = m.get("gpu", "no GPU (CPU run)")
        lines.append(
            f"{gpu}, driver {m.get('driver', '-')}, CUDA {m.get('cuda', '-')}, cuDNN {m.get('cudnn', '-')}; "
            f"{m.get('cpu_cores')} cores ({m.get('cpu')}); Python {m.get('python')}, torch {m.get('torch')}, "
            f"timm {m.get('timm')}, OpenCV {m.get('opencv')}; {data.get('started')}"
        )
        lines.append("")
    steps = data.get("steps", {})
    lines += ["| step | status | seconds |", "|---|---|---|"]
    for name, step in steps.items():
        lines.append(f"| {name} | {step.get('status', '-')} | {step.get('seconds', '-')} |")
    for name in ("repro", "repro448"):
        step = steps.get(name)
        if not step or not step.get("stages"):
            continue
        lines += [
            "",
            f"**{name}**: stage seconds: " + ", ".join(f"{k} {v}" for k, v in step["stages"].items()),
        ]
        lines += [
            "",
            "| phase | val top-1 | test top-1 | img/s (median epoch) | data wait (median) |",
            "|---|---|---|---|---|",
        ]
        for phase in PHASES:
            f = step["metrics"].get(phase, {})
            ips, wait = f.get("throughput") or [], f.get("data_wait") or []
            lines.append(
                f"| {phase} | {_fmt(f.get('val_top1'))} | {_fmt(f.get('test_top1'))} | "
                f"{_fmt(statistics.median(ips) if ips else None, 1)} | "
                f"{_pct(statistics.median(wait) if wait else None)} |"
            )
        lines.append(
            f"\nkNN test top-1 {_fmt(step['metrics'].get('knn_test_top1'))}, "
            f"submission test top-1 {_fmt(step['metrics'].get('submission_test_top1'))}"
        )
    p = steps.get("peer")
    if p and p.get("settings"):
        s = p["settings"]
        lines += [
            "",
            f"**peer** ({s['arch']} at {s['resolution']}, batch {s['batch']}, {s['workers']} workers, "
            f"bf16 {'on' if s['amp'] else 'off'}, channels-last on, {p.get('images', {}).get('train', '?')} "
            f"train images, {s['epochs']} epochs; median of the epochs after the first):",
            "",
            "| trainer | img/s | data wait |",
            "|---|---|---|",
        ]
        for side in ("ours", "timm"):
            r = p.get(side, {})
            lines.append(f"| {side} | {_fmt(r.get('img_per_s'), 1)} | {_pct(r.get('data_wait'))} |")
        if p.get("ratio"):
            lines.append(f"\nours / timm: {p['ratio']:.2f}x")
    b = steps.get("bench")
    if b and b.get("rows"):
        lines += [
            "",
            "**bench_train** (optimizer steps on random batches):",
            "",
            "| model | res | batch | classes | bf16 | channels-last | compile | img/s | GPU GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            lines.append(
                f"| {r['arch']} | {r['resolution']} | {r['batch']} | {r['classes']} | {_on(r['amp'])} | "
                f"{_on(r['channels_last'])} | {_on(r['compile'])} | "
                f"{r['img_per_s']:.1f} | {_fmt(r['gpu_gib'], 1)} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheelhouse", type=Path, default=None, help="install these wheels first (no registry)")
    p.add_argument("--target", type=Path, default=Path(tempfile.gettempdir()) / "products10k-site")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny settings: a CPU runs every step in minutes")
    p.add_argument("--steps", default="repro,peer,repro448,bench", help="which steps, in this order")
    p.add_argument("--timm-train", type=Path, default=None, help="timm's train.py (from timm's repository)")
    p.add_argument("--peer-images", type=int, default=6400, help="training images of the peer comparison")
    p.add_argument("--peer-epochs", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="bench: also time torch.compile")
    p.add_argument("--budget-s", type=float, default=540.0, help="the whole run's seconds")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = float(os.environ.get("P10K_GPU_CHECK_START", time.time()))
    args = parse_args(argv)
    record = Record(args.out)
    if args.wheelhouse and not os.environ.get("P10K_GPU_CHECK_TARGET"):
        try:
            record.step("install", install(args.wheelhouse, args.target))
        except (OSError, subprocess.CalledProcessError) as e:
            record.step("install", {"status": f"failed: {e}"})
            return 1
        # again, with the wheels first on the path (they hold what this process could not import)
        env = dict(os.environ, P10K_GPU_CHECK_TARGET=str(args.target), P10K_GPU_CHECK_START=str(t_start))
        env["P10K_GPU_CHECK_RECORD"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(args.target), str(ROOT), env.get("PYTHONPATH")] if p
        )
        return subprocess.run(
            [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env
        ).returncode

    sys.path.insert(0, str(ROOT))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu for the CPU run)")
    unknown = [n for n in args.steps.split(",") if n not in STEP_CAPS]
    if unknown:
        raise SystemExit(f"--steps: unknown {unknown}; the steps are {', '.join(STEP_CAPS)}")
    record.set("machine", machine(args.device))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    env = tool_env(work / "bin")
    base = dict(TINY) if args.tiny else {}
    failed = False
    for name in args.steps.split(","):
        remaining = args.budget_s - (time.time() - t_start)
        if remaining < 20:
            record.step(name, {"status": f"skipped: {remaining:.0f} s of the budget left"})
            continue
        timeout = min(STEP_CAPS[name], remaining - 10)
        print(f"gpu-check: {name} (at most {timeout:.0f} s)", flush=True)
        t_step = time.perf_counter()
        try:
            report = run_step(name, args, base, env, timeout, work)
        except Exception:  # noqa: BLE001 - a broken step is reported, and the next one still runs
            report = {"status": "error", "tail": traceback.format_exc().splitlines()[-25:]}
        report.setdefault("seconds", round(time.perf_counter() - t_step, 1))
        failed |= report.get("status") != "ok"
        record.step(name, report)
        print(f"gpu-check: {name}: {report.get('status')}", flush=True)
    print(markdown(record.data))
    return 1 if failed else 0


def run_step(name: str, args, base: dict, env: dict, timeout: float, work: Path) -> dict:
    """One step's figures (``status`` "ok" or what went wrong)."""
    if name == "repro":
        project = make_project(work / "repro", base, env)
        return repro(project, env, timeout, work / "repro.log")
    if name == "repro448":  # on the repro step's project: dvc re-runs what the change touches
        project = work / "repro"
        if not project.exists():
            project = make_project(project, base, env)
        workers = max(1, min(15, len(os.sched_getaffinity(0)) - 1))
        big = {
            "train.resolution": 64 if args.tiny else 448,
            "train.num_workers": min(2, workers) if args.tiny else workers,
        }
        write_params(project, {**base, **big})
        return {"settings": big, **repro(project, env, timeout, work / "repro448.log")}
    if name == "peer":
        return peer(args, env, timeout, work)
    if name == "bench":
        return bench(args.device, args.tiny, args.compile, env, timeout, work)
    raise ValueError(f"--steps: unknown step {name!r} (repro, repro448, peer, bench)")


if __name__ == "__main__":
    sys.exit(main())
