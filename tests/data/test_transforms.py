"""Training and evaluation transforms: sizes, augmentation ranges, crops, normalisation."""

import numpy as np
import pytest
import torch

from products10k.common import ConfigError
from products10k.contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD, resolve_resize
from products10k.data.transforms import eval_transform, seed_sample, train_transform
from tests.helpers import config


def plain_phase(**overrides):
    """params.yaml's train section without its colour jitter and random erasing, plus ``overrides``."""
    return config("train", **{"color_jitter": 0.0, "random_erasing": 0.0, **overrides})


def test_resolve_resize_and_transform_sizes():
    assert resolve_resize(448, None) == 512  # the paper's 512/448
    assert resolve_resize(224, None) == 256  # and 256/224
    assert resolve_resize(100, 120) == 120
    with pytest.raises(ValueError):
        resolve_resize(100, 90)
    img = np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    out = eval_transform(resolve_resize(48, None), 48)(image=img)["image"]
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    for crop in ("resize_random", "random_resized"):
        cfg = plain_phase(resolution=40, crop=crop, color_jitter=0.3, random_erasing=1.0)
        assert train_transform(cfg)(image=img)["image"].shape == (3, 40, 40)
        # shopper-photo augmentation: rotation, perspective and blur keep the output size
        cfg = plain_phase(resolution=40, crop=crop, rotate=20.0, perspective=0.08, blur=1.0)
        assert train_transform(cfg)(image=img)["image"].shape == (3, 40, 40)


@pytest.mark.parametrize(
    "bad", [{"rotate": -1.0}, {"rotate": 200.0}, {"perspective": 0.6}, {"blur": 1.5}, {"blur": -0.1}]
)
def test_augmentation_ranges_are_checked(bad):
    with pytest.raises(ConfigError, match=f"key 'train.{next(iter(bad))}'"):
        plain_phase(**bad)


def test_rotation_and_blur_change_the_image_and_are_off_by_default():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 28:36] = 255  # a vertical bar: any rotation or blur moves or spreads it
    plain = plain_phase(resolution=48, resize=48, hflip=0.0)
    assert plain.rotate == 0.0 and plain.perspective == 0.0 and plain.blur == 0.0
    a = train_transform(plain)(image=img)["image"]
    b = train_transform(plain)(image=img)["image"]
    assert torch.equal(a, b)  # a centre-sized crop of an unchanged image: deterministic
    warped = plain_phase(resolution=48, resize=48, hflip=0.0, rotate=30.0, blur=1.0)
    t = train_transform(warped)
    t.set_random_seed(0)
    outs = [t(image=img)["image"] for _ in range(4)]
    assert any(not torch.equal(o, a) for o in outs)


def test_eval_transform_is_centre_crop_of_shorter_side_resize():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 90:110] = 255  # a bar in the middle survives a centre crop
    out = eval_transform(50, 40)(image=img)["image"]
    assert out[:, :, 20].mean() > out[:, :, 0].mean()


def test_random_resized_crop_takes_its_pixels_from_the_stored_image():
    # 1-pixel stripes at 512 px: resizing to 73 px first (the old order) averages them to grey;
    # a small crop of the stored image, scaled to 64 px, keeps their contrast
    img = np.zeros((512, 512, 3), np.uint8)
    img[:, ::2] = 255
    cfg = plain_phase(resolution=64, crop="random_resized", rrc_scale=(0.012, 0.012), hflip=0.0)
    t = train_transform(cfg)
    t.set_random_seed(0)
    out = t(image=img)["image"]
    assert out.shape == (3, 64, 64)
    assert float(out.std()) > 1.0  # ~2.1 for intact 0/255 stripes; < 0.3 once averaged away


def test_normalisation_constants_come_from_timms_config_and_reach_the_transforms():
    from products10k.models.model import input_normalization

    assert input_normalization("resnet10t") == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    inception = input_normalization("tf_efficientnet_b3.ap_in1k")
    assert inception == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    img = np.full((40, 40, 3), 255, np.uint8)
    assert float(eval_transform(40, 40, inception)(image=img)["image"].max()) == pytest.approx(1.0)
    assert float(eval_transform(40, 40)(image=img)["image"].max()) == pytest.approx((1 - 0.406) / 0.225)


def test_random_erasing_replaces_a_patch_with_noise():
    img = np.full((48, 48, 3), 128, np.uint8)
    plain = train_transform(plain_phase(resolution=40, resize=48, hflip=0.0))
    erased = train_transform(plain_phase(resolution=40, resize=48, hflip=0.0, random_erasing=1.0))
    plain.set_random_seed(0)
    erased.set_random_seed(0)
    a, b = plain(image=img)["image"], erased(image=img)["image"]
    changed = (a != b).any(dim=0)
    assert 0.02 * 40 * 40 <= int(changed.sum()) <= 0.3 * 40 * 40  # a patch of 2-25% of the area
    assert float(b[:, changed].std()) > 0.1  # filled with per-pixel noise, not a flat colour


def test_each_transform_of_a_sample_draws_from_a_stream_of_its_own():
    cfg = plain_phase(color_jitter=0.4, random_erasing=0.5)
    t = train_transform(cfg)
    inner = [x for x in t.transforms if hasattr(x, "py_random")]
    t.set_random_seed(7)  # albumentations' own: one seed for all, so equal streams (what seed_sample avoids)
    assert len({x.py_random.random() for x in inner}) == 1
    seed_sample(t, 7)
    draws = [x.py_random.random() for x in inner]
    assert len(set(draws)) == len(inner) >= 4
    seed_sample(t, 7)
    assert [x.py_random.random() for x in inner] == draws  # the sample's seed alone sets them


def test_a_sample_seed_fixes_its_augmentation():
    img = np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)
    t = train_transform(
        plain_phase(resolution=40, crop="random_resized", color_jitter=0.4, random_erasing=0.5)
    )

    def out(seed):
        seed_sample(t, seed)
        return t(image=img)["image"]

    a = out(3)
    t(image=img)  # draws in between do not matter: the seed sets every stream
    assert torch.equal(out(3), a)
    assert not all(torch.equal(out(s), a) for s in (4, 5, 6))
