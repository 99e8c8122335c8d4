"""The machine description every benchmark prints next to its figures."""

from __future__ import annotations

import os
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    import cv2
    import PIL

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"CPU {cpu_model()}, {cores} cores usable, Python {sys.version.split()[0]}, "
        f"OpenCV {cv2.__version__}, Pillow {PIL.__version__}, {platform.system()} {platform.release()}"
    )
