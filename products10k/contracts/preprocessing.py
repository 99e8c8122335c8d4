"""The preprocessing a checkpoint is trained, evaluated, exported and served with: the input
normalisation and the resize rule (the paper's resize-then-crop, ``products10k.data.transforms``)."""

from __future__ import annotations

from fractions import Fraction

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the resize rule: shorter side = resolution x 8/7 (the paper's 256/224 and 512/448)
RESIZE_RATIO = Fraction(8, 7)
#: what a checkpoint without stored constants was trained with (every model before they were stored)
DEFAULT_NORMALIZE = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def resolve_resize(resolution: int, resize: int | None) -> int:
    """Shorter side before cropping: ``resize`` if set, else ``round(resolution * RESIZE_RATIO)``."""
    if resize is not None:
        if resize < resolution:
            raise ValueError(f"resize ({resize}) must be >= resolution ({resolution})")
        return int(resize)
    return round(resolution * RESIZE_RATIO)
