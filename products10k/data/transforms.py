"""Image transforms (albumentations): the paper's resize-then-crop for training and evaluation.

Training resizes the shorter side to ``resize`` and takes a random ``resolution`` crop (or a
random-resized crop); evaluation resizes the same way and takes the centre crop. ``resize``
defaults to ``round(resolution * 8 / 7)`` (``contracts.preprocessing``): the paper's 256/224 and
512/448 ratio, so ``-S train.resolution=224`` alone gives the low-resolution baseline.

Each training sample is augmented from a seed of its own (:func:`seed_sample`, drawn by the
sampler in the main process): the augmentation of an image depends on neither the DataLoader
worker that loads it nor the worker count.
"""

from __future__ import annotations

from collections.abc import Iterator

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from products10k.config import PhaseConfig
from products10k.contracts.preprocessing import DEFAULT_NORMALIZE, resolve_resize

#: odd 64-bit constants (splitmix64's) that spread a sample seed over its transforms' seeds
_GOLDEN, _MIX = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9


def seed_sample(transform: A.BaseCompose, seed: int) -> None:
    """Seed the augmentation of one sample: every transform in ``transform`` gets a stream of its own.

    albumentations' ``set_random_seed`` hands every transform of a Compose the *same* seed, so their
    streams are equal: the number that decides a flip is the one that placed the crop, the one that
    decides colour jitter too. Each transform here gets its own seed, spread from ``seed`` by its
    place in the tree (the seeds go through numpy's SeedSequence hashing in ``default_rng``).
    """
    for k, t in enumerate(_walk(transform)):
        t.set_random_seed((seed * _GOLDEN + (k + 1) * _MIX) % 2**64)


def _walk(transform) -> Iterator:
    """The transform and every transform inside it, parents first (a parent's seed reaches its
    children, which then get their own)."""
    yield transform
    if isinstance(transform, A.BaseCompose):
        for child in transform.transforms:
            yield from _walk(child)


def eval_transform(resize: int, resolution: int, normalize: dict | None = None) -> A.Compose:
    """Shorter side to ``resize``, centre crop ``resolution``, normalise, CHW float tensor.

    ``normalize``: ``{"mean", "std"}`` of the backbone (timm's pretrained config, stored in the
    checkpoint); ImageNet's when None.
    """
    norm = normalize or DEFAULT_NORMALIZE
    return A.Compose(
        [
            # INTER_AREA: downscaling from the 512 px prepared image without aliasing fine text
            A.SmallestMaxSize(max_size=resize, interpolation=cv2.INTER_AREA),
            A.CenterCrop(height=resolution, width=resolution),
            A.Normalize(mean=tuple(norm["mean"]), std=tuple(norm["std"])),
            ToTensorV2(),
        ]
    )


def embedding_transform(meta: dict):
    """The centre-crop transform a checkpoint's metadata asks for (resolution, resize, normalize),
    and its resize: what the index embeds with and the export checks against."""
    resolution = int(meta["resolution"])
    resize = resolve_resize(resolution, meta.get("resize"))
    return eval_transform(resize, resolution, meta.get("normalize")), resize


def train_transform(cfg: PhaseConfig, normalize: dict | None = None) -> A.Compose:
    """ImageNet-style training augmentation at ``cfg.resolution`` (see PhaseConfig for the knobs).

    ``normalize``: the backbone's ``{"mean", "std"}`` (see :func:`eval_transform`).
    """
    norm = normalize or DEFAULT_NORMALIZE
    res = cfg.resolution
    resize = resolve_resize(res, cfg.resize)
    if cfg.crop == "resize_random":
        # the paper: resize 512 (256), random crop 448 (224)
        geometry = [
            A.SmallestMaxSize(max_size=resize, interpolation=cv2.INTER_AREA),
            A.RandomCrop(height=res, width=res),
        ]
    else:
        # crop first, then scale the crop to `res` (the classic Inception/ImageNet recipe), from
        # the stored image: a small crop keeps the pixels the image has, never an upsampled
        # crop of a downscaled copy (the dataset decodes no smaller than `resize`)
        geometry = [
            A.RandomResizedCrop(size=(res, res), scale=tuple(cfg.rrc_scale), interpolation=cv2.INTER_AREA),
        ]
    if cfg.rotate > 0 or cfg.perspective > 0:
        # shopper-photo geometry (tilted, seen at an angle), applied to the resized image before
        # the crop so that most of the filled-in border is cropped away
        warp = []
        if cfg.rotate > 0:
            warp.append(A.Affine(rotate=(-cfg.rotate, cfg.rotate), border_mode=cv2.BORDER_REFLECT_101, p=1.0))
        if cfg.perspective > 0:
            warp.append(
                A.Perspective(scale=(0.0, cfg.perspective), border_mode=cv2.BORDER_REFLECT_101, p=1.0)
            )
        warp_op = A.Sequential(warp, p=0.8)
        # before the crop, so that most of the filled-in border is cropped away
        geometry = [*geometry[:-1], warp_op, geometry[-1]]
    ops = list(geometry)
    if cfg.hflip > 0:
        ops.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.color_jitter > 0:
        s = cfg.color_jitter
        ops.append(
            A.ColorJitter(
                brightness=(max(0.0, 1 - s), 1 + s),
                contrast=(max(0.0, 1 - s), 1 + s),
                saturation=(max(0.0, 1 - s), 1 + s),
                # hue shifts change a product's colour identity: keep them small
                hue=(-min(0.5, s / 8), min(0.5, s / 8)),
                p=0.8,
            )
        )
    if cfg.blur > 0:
        ops.append(
            A.OneOf(
                [A.GaussianBlur(sigma_limit=(0.3, 1.2), p=1.0), A.MotionBlur(blur_limit=(3, 5), p=1.0)],
                p=cfg.blur,
            )
        )
    ops.append(A.Normalize(mean=tuple(norm["mean"]), std=tuple(norm["std"])))
    if cfg.random_erasing > 0:
        # after normalising, like timm's RandomErasing: the hole holds per-pixel noise
        ops.append(A.Erasing(p=cfg.random_erasing, scale=(0.02, 0.25), fill="random"))
    ops.append(ToTensorV2())
    return A.Compose(ops)
