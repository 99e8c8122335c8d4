"""Inference throughput (images/s) of the evaluate stage's predict loop, without and with TTA.

    .venv/bin/python benchmarks/bench_inference.py [--arch resnet10t] [--resolution 128] \
        [--n 256] [--batch-size 32] [--num-workers 0] [--device auto]

Writes ``n`` prepared-style 512 px JPEGs into a packed shard (as the prepare stage does), builds
the model with random weights (no download) and times ``products10k.predict.predict`` end to end:
shard read, JPEG decode, resize/crop/normalise, forward pass, logit averaging. Configurations:

- 1 view: the plain evaluation (centre crop at ``resolution``);
- flip: + horizontal flip (2 views, one decode);
- the ``tta`` section of params.yaml (default: scales 1 and 8/7, flip: 4 views);
- five crops + flip at scale 1 (10 views).

A warm-up batch runs first so one-off costs (thread pools, allocator) do not count.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from machine import describe

from products10k.config import ModelConfig, PhaseConfig, TTAConfig, load_section
from products10k.contracts.shards import ShardWriter
from products10k.dist.devices import amp_dtype, resolve_device
from products10k.evaluation.predict import predict
from products10k.evaluation.views import build_views
from products10k.models.model import create_model

log = logging.getLogger("bench_inference")
ROOT = Path(__file__).resolve().parents[1]


def write_images(root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` photo-like 512x640 JPEGs in a shard; returns prepared-CSV-like rows."""
    rng = np.random.default_rng(seed)
    rows = []
    with ShardWriter(root, shard_mb=256.0) as writer:
        for i in range(n):
            base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = cv2.resize(base, (640, 512), interpolation=cv2.INTER_CUBIC)
            cv2.putText(img, f"SKU {i}", (40, 260), cv2.FONT_HERSHEY_SIMPLEX, 3, (255, 255, 255), 4)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 93])
            assert ok
            shard, offset, length = writer.add(buf.tobytes())
            rows.append(
                {"name": f"{i}.jpg", "label": i % 10, "shard": shard, "offset": offset, "length": length}
            )
    df = pd.DataFrame(rows)
    df["width"], df["height"] = 640, 512
    return df


def time_predict(model, df, root, views, batch_size, num_workers, device, amp=None) -> float:
    kw = dict(batch_size=batch_size, top_k=100, device=device, amp=amp)
    predict(model, df.iloc[:batch_size], root, views, num_workers=0, desc="warm-up", **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    predict(model, df, root, views, num_workers=num_workers, desc="bench", **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(df) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None, help="timm model (default: params.yaml model.arch)")
    p.add_argument("--resolution", type=int, default=None, help="default: params.yaml train.resolution")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--classes", type=int, default=1000, help="head size (9691 = Products-10K)")
    p.add_argument("--amp", default="auto", help="auto (bf16 on CUDA) | off | bf16 | fp16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    params = ROOT / "params.yaml"
    model_cfg = load_section(params, "model", ModelConfig)
    if args.arch:
        model_cfg = model_cfg.model_copy(update={"arch": args.arch})
    resolution = args.resolution or load_section(params, "train", PhaseConfig).resolution
    tta_params = load_section(params, "tta", TTAConfig)
    device = resolve_device(args.device)
    model = create_model(model_cfg, args.classes, pretrained=False).eval().to(device)
    if args.compile:
        model = torch.compile(model)
    amp = amp_dtype(args.amp, device)
    configs = {
        "1 view (centre)": TTAConfig(scales=[1.0], crops="center", flip=False),
        "flip (2 views)": TTAConfig(scales=[1.0], crops="center", flip=True),
        f"params tta {list(tta_params.scales)} flip={tta_params.flip} crops={tta_params.crops}": tta_params,
        "five crops + flip": TTAConfig(scales=[1.0], crops="five", flip=True),
    }
    print(describe())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"model {model_cfg.arch} (random init, {args.classes} classes), resolution {resolution}, "
        f"{args.n} images, batch {args.batch_size}, {args.num_workers} workers, autocast {amp}, "
        f"channels-last (predict's layout), compile {args.compile}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        df = write_images(Path(tmp), args.n)
        base = None
        for name, cfg in configs.items():
            views = build_views(cfg, resolution, None)
            ips = time_predict(model, df, tmp, views, args.batch_size, args.num_workers, device, amp)
            base = base or ips
            print(f"{name:<55} {len(views):>2} views  {ips:8.1f} images/s  ({base / ips:4.1f}x the time)")


if __name__ == "__main__":
    main()
