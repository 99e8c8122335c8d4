"""Test-time augmentation views: scales x crops x horizontal flip, logits averaged.

A *base view* is one geometric transform of the decoded image (a scale and a crop); the flip is
applied to the base view's tensor in the prediction loop (``torch.flip``), so flipping costs no
extra decode or resize. Scales multiply the checkpoint's ``resolution`` and ``resize`` together:
scale 8/7 of a 448/512 model looks at 512 px crops of 585 px images, the multi-scale TTA that
Products-10K and GLR winners used (CNNs with global pooling accept any input size).

View names carry pixel sizes, not scale factors (``448px-center``, ``512px-center-flip``), so they
contain no dots and read cleanly as flattened ``dvc metrics`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from products10k.common import ConfigError
from products10k.config import TTAConfig
from products10k.contracts.preprocessing import DEFAULT_NORMALIZE, resolve_resize
from products10k.data.transforms import eval_transform

FIVE_CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class BaseView:
    """One geometric view: shorter side to ``resize``, then the ``crop`` of ``resolution`` pixels."""

    resolution: int
    resize: int
    crop: str  # one of FIVE_CROPS
    normalize: tuple = ()  # ((mean), (std)) of the backbone; () = ImageNet's

    @property
    def name(self) -> str:
        return f"{self.resolution}px-{self.crop.replace('_', '')}"

    def transform(self) -> Callable[[np.ndarray], object]:
        """RGB uint8 HxWx3 -> normalised CHW float tensor."""
        norm = {"mean": self.normalize[0], "std": self.normalize[1]} if self.normalize else DEFAULT_NORMALIZE
        if self.crop == "center":
            # the training helper's eval transform: the single-view result equals plain evaluation
            tf = eval_transform(self.resize, self.resolution, norm)
            return lambda image: tf(image=image)["image"]
        resize = A.SmallestMaxSize(max_size=self.resize, interpolation=cv2.INTER_AREA)
        tail = A.Compose([A.Normalize(mean=tuple(norm["mean"]), std=tuple(norm["std"])), ToTensorV2()])
        res, crop = self.resolution, self.crop

        def apply(image: np.ndarray):
            img = resize(image=image)["image"]
            h, w = img.shape[:2]
            top = 0 if crop.startswith("top") else h - res
            left = 0 if crop.endswith("left") else w - res
            return tail(image=np.ascontiguousarray(img[top : top + res, left : left + res]))["image"]

        return apply


@dataclass(frozen=True)
class View:
    """A base view, optionally flipped horizontally."""

    base: BaseView
    flip: bool

    @property
    def name(self) -> str:
        return self.base.name + ("-flip" if self.flip else "")


def build_views(
    cfg: TTAConfig, resolution: int, resize: int | None, normalize: dict | None = None
) -> list[View]:
    """All views of ``cfg`` for a model trained at ``resolution``/``resize`` (first = plain eval).

    ``normalize``: the checkpoint's ``{"mean", "std"}`` (ImageNet's when None).
    """
    norm = (tuple(normalize["mean"]), tuple(normalize["std"])) if normalize else ()
    base_resize = resolve_resize(resolution, resize)
    crops = FIVE_CROPS if cfg.crops == "five" else ("center",)
    views = []
    for scale in cfg.scales:
        res = int(round(resolution * scale))
        rsz = max(res, int(round(base_resize * scale)))
        for crop in crops:
            base = BaseView(res, rsz, crop, norm)
            views.append(View(base, False))
            if cfg.flip:
                views.append(View(base, True))
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ConfigError(f"params.yaml: tta.scales give duplicate view sizes: {names}")
    return views


def base_views(views: list[View]) -> list[BaseView]:
    """The distinct base views, in order (each decoded image is transformed once per base view)."""
    out: list[BaseView] = []
    for v in views:
        if v.base not in out:
            out.append(v.base)
    return out
