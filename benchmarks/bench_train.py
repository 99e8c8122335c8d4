"""Training throughput (images/s) and peak memory of a training phase on this machine.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--phase-data data/prepared]

1. Throughput of optimizer steps (forward + backward + Adam) on random batches, for the default
   model of params.yaml at its resolution and batch, and for efficientnet_b3 at 448 with batch 16
   (the paper's model and resolution), with mixed precision (bf16 autocast) and channels_last
   each off and on. One warm-up step, then the median of ``--steps`` timed steps.
2. Peak resident memory of the default ``train`` phase (stages/train.py in a child process, for
   ``--phase-epochs`` epochs) when ``--phase-data`` points at a prepared folder (e.g. after
   ``dvc repro balance``): ``ru_maxrss`` of the training process and of its DataLoader worker.
"""

from __future__ import annotations

import argparse
import contextlib
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

from products10k.config import load_yaml, member_params, section  # noqa: E402
from products10k.models import create_model  # noqa: E402
from products10k.params import ModelConfig  # noqa: E402
from products10k.train_loop import resolve_phase_config  # noqa: E402

log = logging.getLogger("bench_train")
ROOT = Path(__file__).resolve().parents[1]


def step_throughput(arch: str, res: int, batch: int, amp: bool, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch=arch), 100, pretrained=False).train()
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 100, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:  # the first step pays for allocation and kernel selection
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--phase-data", type=Path, default=None, help="prepared folder for the memory run")
    p.add_argument("--phase-epochs", type=int, default=1)
    p.add_argument("--skip-b3", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    params = member_params(load_yaml(ROOT / "params.yaml"), "m0")
    model_cfg = section(params, "model", ModelConfig)
    train = resolve_phase_config(params, "train")
    cases = [(model_cfg.arch, train.resolution, train.batch_size)]
    if not args.skip_b3:
        cases.append(("efficientnet_b3", 448, 16))
    memory = None
    if args.phase_data is not None:  # first, while this process is still small
        memory = phase_memory(args.phase_data, args.phase_epochs)
    rows = []
    for arch, res, batch in cases:
        for amp in (False, True):
            for cl in (False, True):
                ips = step_throughput(arch, res, batch, amp, cl, args.steps)
                rows.append((arch, res, batch, amp, cl, ips))
                log.info("%s %d b%d amp=%s channels_last=%s: %.1f img/s", arch, res, batch, amp, cl, ips)
    log.info("")
    log.info("machine: %s; torch %s, %d threads", describe(), torch.__version__, torch.get_num_threads())
    log.info("| model | resolution | batch | bf16 autocast | channels_last | train img/s |")
    log.info("|---|---|---|---|---|---|")
    for arch, res, batch, amp, cl, ips in rows:
        flags = ("on" if amp else "off", "on" if cl else "off")
        log.info("| %s | %d | %d | %s | %s | %.1f |", arch, res, batch, *flags, ips)
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
