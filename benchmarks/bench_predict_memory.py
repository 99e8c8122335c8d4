"""Peak memory of ``products10k-predict`` over one giant photo, with the pixel budget's reduced decode
and without it (a full decode, forced), against the same run over a small photo.

    .venv/bin/python benchmarks/bench_predict_memory.py [--model models/export] [--side 12000]

Each run is a fresh process (``ru_maxrss`` of that process); the photo is a ``side`` x ``2/3 side``
JPEG. Results: benchmarks/results/predict_memory.json. Needs an export folder (``make repro``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402
from machine import describe  # noqa: E402

RUN = """
import resource, sys
import cv2
import products10k.imaging.images as images
if sys.argv[1] == "full":  # what decoding cost before the budget: every pixel of the photo
    images.reduced_decode_flag = lambda *args, **kwargs: cv2.IMREAD_COLOR
from products10k.deploy import predict
predict.main(sys.argv[2:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mb(mode: str, photo: Path, model: Path, out: Path) -> float:
    args = [str(photo), "--model", str(model), "--out", str(out), "--threads", "1"]
    if mode == "full":
        args += ["--max-pixels", str(10**12)]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, mode, *args], capture_output=True, text=True, check=True
    )
    rows = json.loads(out.read_text())
    assert rows[0]["status"] == "ok", rows[0]
    return int(proc.stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/export"))
    p.add_argument("--side", type=int, default=12000)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "predict_memory.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w, h = args.side, args.side * 2 // 3
        ramp = np.linspace(0, 255, w, dtype=np.float32).astype(np.uint8)
        giant = tmp / "giant.jpg"
        giant.write_bytes(
            cv2.imencode(".jpg", np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (h, w, 3))))[1]
        )
        small = tmp / "small.jpg"
        small.write_bytes(cv2.imencode(".jpg", np.full((600, 800, 3), 128, np.uint8))[1])
        out = tmp / "rows.json"
        result = {
            "machine": describe(),
            "photo": f"{w}x{h} JPEG ({w * h / 1e6:.0f} MP, {giant.stat().st_size / 1e6:.1f} MB)",
            "small_photo_peak_mb": round(peak_mb("budget", small, args.model, out), 1),
            "giant_photo_peak_mb": round(peak_mb("budget", giant, args.model, out), 1),
            "giant_photo_full_decode_peak_mb": round(peak_mb("full", giant, args.model, out), 1),
        }
    result["giant_minus_small_mb"] = round(result["giant_photo_peak_mb"] - result["small_photo_peak_mb"], 1)
    result["full_decode_minus_small_mb"] = round(
        result["giant_photo_full_decode_peak_mb"] - result["small_photo_peak_mb"], 1
    )
    write_results(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
