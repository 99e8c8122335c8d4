"""Training throughput (images/s) and peak memory of a training phase on this machine.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--phase-data data/prepared]

1. Throughput of optimizer steps (forward + backward + Adam) on random batches, for the default
   model of params.yaml at its resolution and batch, and for efficientnet_b3 at 448 (the paper's
   model and resolution; batch 16 on CPU, the paper's 64 on CUDA with the real 9,691-way head),
   with mixed precision (bf16 autocast) and channels_last each off and on, and torch.compile with
   ``--compile``. Warm-up steps, then the median of ``--steps`` timed (CUDA-synchronised) steps;
   on CUDA the GPU's name and peak allocated memory are printed. ``--device cuda`` on a GPU box.
2. Peak resident memory of the default ``train`` phase (stages/train.py in a child process, for
   ``--phase-epochs`` epochs) when ``--phase-data`` points at a prepared folder (e.g. after
   ``dvc repro balance``): ``ru_maxrss`` of the training process and of its DataLoader worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from products10k.config import (  # noqa: E402
    ModelConfig,
    load_section,
    load_yaml,
    member_params,
    phase_config,
    section,
)
from products10k.dist.devices import resolve_device  # noqa: E402
from products10k.models.model import create_model  # noqa: E402

log = logging.getLogger("bench_train")
ROOT = Path(__file__).resolve().parents[1]


def step_throughput(
    arch: str,
    res: int,
    batch: int,
    amp: bool,
    channels_last: bool,
    steps: int,
    device: torch.device | None = None,
    num_classes: int = 100,
    compile_model: bool = False,
) -> float:
    """Optimizer steps per second x batch on random data; CUDA timings are synchronised."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model_cfg = load_section(ROOT / "params.yaml", "model", ModelConfig).model_copy(update={"arch": arch})
    model = create_model(model_cfg, num_classes, pretrained=False).train().to(device)
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    run = torch.compile(model) if compile_model else model
    warmup = 3 if compile_model else 1  # compilation happens in the first steps
    times = []
    for i in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = torch.nn.functional.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:  # the first steps pay for allocation, kernel selection and compilation
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def phase_memory(data: Path, epochs: int) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB of the training process, of the largest child) of a train phase."""
    params = load_yaml(ROOT / "params.yaml")
    params["train"]["epochs"] = epochs
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        argv = ["train.py", "--phase", "train", "--member", "m0", "--params", str(path)]
        argv += ["--train-csv", str(data / "train.csv"), "--val-csv", str(data / "val.csv")]
        argv += ["--label-map", str(data / "label_map.csv"), "--images", str(data)]
        argv += ["--out", str(Path(tmp) / "out")]
        # the child reports its own peak RSS and its largest child's (the DataLoader worker)
        code = (
            "import resource, runpy, sys;"
            f"sys.argv = {argv!r};"
            f"runpy.run_path({str(ROOT / 'stages' / 'train.py')!r}, run_name='__main__');"
            # VmHWM, not ru_maxrss: ru_maxrss survives exec, so it would report this benchmark's
            # own peak (efficientnet_b3 at 448) inherited through fork
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
            "print('MAXRSS_SELF', hwm);"
            "print('MAXRSS_CHILD', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - t0
    values = dict(line.split() for line in proc.stdout.splitlines() if line.startswith("MAXRSS"))
    return elapsed, int(values["MAXRSS_SELF"]) / 1024, int(values["MAXRSS_CHILD"]) / 1024  # kB -> MiB


def write_rows(path: Path, rows: list[tuple], classes: int) -> None:
    """The rows so far as JSON, replaced atomically: a run stopped half-way keeps what it measured."""
    keys = ("arch", "resolution", "batch", "amp", "channels_last", "compile", "img_per_s", "gpu_gib")
    out = [{**dict(zip(keys, row, strict=True)), "classes": classes} for row in rows]
    for row in out:
        row["gpu_gib"] = None if row["gpu_gib"] != row["gpu_gib"] else round(row["gpu_gib"], 2)  # NaN: CPU
        row["img_per_s"] = round(row["img_per_s"], 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"rows": out}, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--phase-data", type=Path, default=None, help="prepared folder for the memory run")
    p.add_argument("--phase-epochs", type=int, default=1)
    p.add_argument("--skip-b3", action="store_true")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--b3-batch", type=int, default=None, help="efficientnet_b3 batch (default: 16 CPU, 64 CUDA)"
    )
    p.add_argument("--classes", type=int, default=None, help="head size (default: 100 CPU, 9691 CUDA)")
    p.add_argument(
        "--resolution", type=int, default=None, help="the default model's (default: params.yaml's)"
    )
    p.add_argument("--batch", type=int, default=None, help="the default model's (default: params.yaml's)")
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile with bf16 and channels_last on"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows here, after each one")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = member_params(load_yaml(ROOT / "params.yaml"), "m0")
    model_cfg = section(params, "model", ModelConfig)
    train = phase_config(params, "train")
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    classes = args.classes or (9691 if cuda else 100)  # on a GPU, the real 9,691-way head
    cases = [(model_cfg.arch, args.resolution or train.resolution, args.batch or train.batch_size)]
    if not args.skip_b3:
        cases.append(("efficientnet_b3", 448, args.b3_batch or (64 if cuda else 16)))
    memory = None
    if args.phase_data is not None:  # first, while this process is still small
        memory = phase_memory(args.phase_data, args.phase_epochs)
    rows = []
    for arch, res, batch in cases:
        for amp in (False, True):
            for cl in (False, True):
                # compiling takes a minute or more a model: only the configuration a GPU run uses
                for comp in (False, True) if args.compile and amp and cl else (False,):
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    ips = step_throughput(arch, res, batch, amp, cl, args.steps, device, classes, comp)
                    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
                    rows.append((arch, res, batch, amp, cl, comp, ips, mem))
                    if args.json:
                        write_rows(args.json, rows, classes)
                    log.info(
                        "%s %d b%d amp=%s cl=%s compile=%s: %.1f img/s", arch, res, batch, amp, cl, comp, ips
                    )
    log.info("")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if cuda else ""
    log.info(
        "machine: %s%s; torch %s, %d threads", describe(), gpu, torch.__version__, torch.get_num_threads()
    )
    log.info(
        "| model | resolution | batch | classes | bf16 autocast | channels_last | compile | img/s | GPU GiB |"
    )
    log.info("|---|---|---|---|---|---|---|---|---|")
    for arch, res, batch, amp, cl, comp, ips, mem in rows:
        flags = ("on" if amp else "off", "on" if cl else "off", "on" if comp else "off")
        log.info(
            "| %s | %d | %d | %d | %s | %s | %s | %.1f | %.1f |", arch, res, batch, classes, *flags, ips, mem
        )
    if memory is not None:
        seconds, self_mb, child_mb = memory
        log.info("")
        log.info(
            "train phase (%s, default params, %d epoch(s)): %.0f s, peak RSS %.0f MiB (trainer), "
            "%.0f MiB (largest child: DataLoader worker)",
            model_cfg.arch,
            args.phase_epochs,
            seconds,
            self_mb,
            child_mb,
        )


if __name__ == "__main__":
    main()
