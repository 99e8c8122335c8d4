"""onnxruntime vs PyTorch eager: images/s of the exported model on this CPU.

The model as the export stage writes it (``ExportedNet``: logits + embedding) with params.yaml's
``model`` section and the real cardinality (9,691 SKUs), at the default resolution and at the
paper's 448, both runtimes on the same input batches and the same number of threads (all cores).
Random weights: speed does not depend on them. Writes benchmarks/results/onnx.json.

    python benchmarks/bench_onnx.py [--arch efficientnet_b3] [--resolutions 128 448]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import params as load_params  # noqa: E402
from benchmarks.harness import write_results  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from products10k.config import ModelConfig, from_dict  # noqa: E402
from products10k.export.export import ExportedNet, _export_onnx  # noqa: E402
from products10k.models.model import create_model  # noqa: E402

NUM_CLASSES = 9691


def rate(fn, batch: np.ndarray, min_seconds: float) -> float:
    fn(batch)  # warm-up: first-call allocations and kernel selection
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None, help="timm arch (default: params.yaml model.arch)")
    p.add_argument(
        "--resolutions", type=int, nargs="+", default=None, help="default: train.resolution and 448"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per runtime and resolution")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx.json")
    args = p.parse_args()
    params = load_params()
    model_params = dict(params["model"], **({"arch": args.arch} if args.arch else {}))
    cfg = from_dict(ModelConfig, model_params, "params.yaml", "model")
    resolutions = args.resolutions or [params["train"]["resolution"], 448]
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    net = ExportedNet(create_model(cfg, NUM_CLASSES, pretrained=False)).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in resolutions:
            batch = np.random.default_rng(0).standard_normal((args.batch, 3, res, res)).astype(np.float32)
            path = Path(tmp) / f"m{res}.onnx"
            _export_onnx(net, torch.from_numpy(batch[:2]), path, opset=18)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            def run_torch(x):
                with torch.inference_mode():
                    return net(torch.from_numpy(x))

            def run_ort(x, session=session):
                return session.run(None, {"image": x})

            row = {
                "resolution": res,
                "batch": args.batch,
                "torch_img_s": round(rate(run_torch, batch, args.seconds), 1),
                "onnxruntime_img_s": round(rate(run_ort, batch, args.seconds), 1),
            }
            row["speedup"] = round(row["onnxruntime_img_s"] / row["torch_img_s"], 2)
            rows.append(row)
            print(row, flush=True)
    report = {
        "machine": describe(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "arch": cfg.arch,
        "num_classes": NUM_CLASSES,
        "threads": threads,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, report)
    print(f"\n{cfg.arch}, {NUM_CLASSES} classes, batch {args.batch}, {threads} threads ({describe()})")
    print("| resolution | PyTorch eager img/s | onnxruntime img/s | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {r['torch_img_s']} | {r['onnxruntime_img_s']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
