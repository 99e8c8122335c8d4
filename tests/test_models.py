"""Models, checkpoints, transforms, datasets and samplers used by the training phases."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from train_fixtures import make_prepared

from products10k import checkpoint as ckpt_lib
from products10k.atomic import save_torch
from products10k.config import from_dict
from products10k.datasets import (
    ClassBalancedSampler,
    EpochSampler,
    PreparedImageDataset,
    read_label_map,
    read_prepared,
)
from products10k.errors import ConfigError, DataError, Products10kError
from products10k.images import reduced_decode_flag
from products10k.models import GeM, create_model, model_config_dict
from products10k.params import ModelConfig, PhaseConfig
from products10k.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    resolve_resize,
    train_transform,
)

TINY = ModelConfig(arch="resnet10t")


@pytest.mark.parametrize("head", ["linear", "arcface", "cosface"])
@pytest.mark.parametrize("pool", ["avg", "gem"])
def test_model_forward_shapes(head, pool):
    model = create_model(from_dict(ModelConfig, {"arch": "resnet10t", "head": head, "pool": pool}), 7)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert model(x, torch.tensor([0, 6])).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.features(x).shape == (2, model.backbone.num_features)


def test_gem_reduces_to_mean_for_p1_and_approaches_max():
    x = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(GeM(p=64.0)(x), x.amax(dim=(2, 3)), rtol=0.05)


def test_unknown_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="not-a-net"):
        create_model(ModelConfig(arch="not-a-net"), 3)


def test_pretrained_without_weights_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(Products10kError, match="model.pretrained_file") as err:
        create_model(ModelConfig(arch="resnet10t", pretrained=True), 3)
    assert "resnet10t" in str(err.value)
    with pytest.raises(Products10kError, match="does not exist"):
        create_model(
            ModelConfig(arch="resnet10t", pretrained=True, pretrained_file=str(tmp_path / "x.pth")), 3
        )


def test_pretrained_file_loads_those_weights(tmp_path):
    torch.manual_seed(123)
    reference = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(ModelConfig(arch="resnet10t", pretrained=True, pretrained_file=str(path)), 5)
    ref = reference.state_dict()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, ref[name]), name
    # and a file for another architecture is an error naming the file and the arch
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(Products10kError, match="resnet10t"):
        create_model(
            ModelConfig(arch="resnet10t", pretrained=True, pretrained_file=str(tmp_path / "r18.pth")), 5
        )


def _save_ckpt(path: Path, model, cfg: ModelConfig, labels: list[int]) -> None:
    save_torch(
        path,
        {
            "model": model.state_dict(),
            "model_config": model_config_dict(cfg, len(labels)),
            "labels": labels,
            "phase": "train",
            "member": "m0",
            "epoch": 1,
            "resolution": 32,
            "resize": 37,
            "val_top1": 0.5,
        },
    )


def test_load_model_round_trip_and_clear_errors(tmp_path):
    cfg = ModelConfig(arch="resnet10t", pool="gem", head="cosface")
    torch.manual_seed(0)
    model = create_model(cfg, 3).eval()
    path = tmp_path / "best.pt"
    _save_ckpt(path, model, cfg, [11, 22, 33])
    loaded, meta = ckpt_lib.load_model(path)
    assert not loaded.training
    assert meta["labels"] == [11, 22, 33] and meta["model_config"]["arch"] == "resnet10t"
    assert "model" not in meta
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    with pytest.raises(Products10kError, match="'resnet10t'.*'resnet18'"):
        ckpt_lib.load_model(path, expected_arch="resnet18")
    label_map = pd.DataFrame({"label": [0, 1, 2], "sku": [11, 22, 34]})
    with pytest.raises(Products10kError, match=r"best\.pt.*label_map\.csv.*label 2 is SKU 33"):
        ckpt_lib.check_labels(meta, label_map, path, "data/label_map.csv")
    ckpt_lib.check_labels(meta, label_map.assign(sku=[11, 22, 33]), path)
    with pytest.raises(Products10kError, match="not found"):
        ckpt_lib.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Products10kError, match="junk.pt"):
        ckpt_lib.load_model(tmp_path / "junk.pt")


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
        cfg = PhaseConfig(resolution=40, crop=crop, color_jitter=0.3, random_erasing=1.0)
        assert train_transform(cfg)(image=img)["image"].shape == (3, 40, 40)
        # shopper-photo augmentation: rotation, perspective and blur keep the output size
        cfg = PhaseConfig(resolution=40, crop=crop, rotate=20.0, perspective=0.08, blur=1.0)
        assert train_transform(cfg)(image=img)["image"].shape == (3, 40, 40)


@pytest.mark.parametrize(
    "bad", [{"rotate": -1.0}, {"rotate": 200.0}, {"perspective": 0.6}, {"blur": 1.5}, {"blur": -0.1}]
)
def test_augmentation_ranges_are_checked(bad):
    with pytest.raises(ValueError):
        PhaseConfig(**bad).validate()


def test_rotation_and_blur_change_the_image_and_are_off_by_default():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 28:36] = 255  # a vertical bar: any rotation or blur moves or spreads it
    plain = PhaseConfig(resolution=48, resize=48, hflip=0.0)
    assert plain.rotate == 0.0 and plain.perspective == 0.0 and plain.blur == 0.0
    a = train_transform(plain)(image=img)["image"]
    b = train_transform(plain)(image=img)["image"]
    assert torch.equal(a, b)  # a centre-sized crop of an unchanged image: deterministic
    warped = PhaseConfig(resolution=48, resize=48, hflip=0.0, rotate=30.0, blur=1.0)
    t = train_transform(warped)
    t.set_random_seed(0)
    outs = [t(image=img)["image"] for _ in range(4)]
    assert any(not torch.equal(o, a) for o in outs)


def test_eval_transform_is_centre_crop_of_shorter_side_resize():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 90:110] = 255  # a bar in the middle survives a centre crop
    out = eval_transform(50, 40)(image=img)["image"]
    assert out[:, :, 20].mean() > out[:, :, 0].mean()


def test_reduced_decode_flag():
    import cv2

    assert reduced_decode_flag(512, 512, 146) == cv2.IMREAD_REDUCED_COLOR_2
    assert reduced_decode_flag(512, 700, 128) == cv2.IMREAD_REDUCED_COLOR_4
    assert reduced_decode_flag(512, 512, 512) == cv2.IMREAD_COLOR
    assert reduced_decode_flag(512, 512, 60) == cv2.IMREAD_REDUCED_COLOR_8
    # libjpeg rounds scaled sides up: 1023 at 1/2 scale is 512 pixels, enough for a 512 target
    assert reduced_decode_flag(1023, 1100, 512) == cv2.IMREAD_REDUCED_COLOR_2
    assert reduced_decode_flag(1021, 1100, 512) == cv2.IMREAD_COLOR
    ok, jpeg = cv2.imencode(".jpg", np.zeros((1100, 1023, 3), np.uint8))
    assert ok and cv2.imdecode(jpeg, cv2.IMREAD_REDUCED_COLOR_2).shape[:2] == (550, 512)


def test_dataset_reads_packed_images_and_padding_has_zero_weight(tmp_path):
    data = make_prepared(tmp_path / "data", num_classes=3, train_per_class=2)
    df = read_prepared(data / "train.csv", read_label_map(data / "label_map.csv"))
    ds = PreparedImageDataset(df, data, eval_transform(37, 32), min_side=37)
    image, label, index, weight = ds[4]
    assert image.shape == (3, 32, 32) and label == df.label[4] and index == 4 and weight == 1.0
    _, label_pad, index_pad, weight_pad = ds[len(ds) + 4]
    assert (label_pad, index_pad, weight_pad) == (label, 4, 0.0)


def test_prepared_csv_errors_name_file_row_and_column(tmp_path):
    data = make_prepared(tmp_path / "data", num_classes=2, train_per_class=2)
    df = pd.read_csv(data / "train.csv")
    df.drop(columns=["offset"]).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(DataError, match=r"a\.csv: missing column 'offset'"):
        read_prepared(tmp_path / "a.csv")
    df.assign(label=[0, 1, 5, 1]).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match=r"b\.csv: row 4 column 'label' is 5"):
        read_prepared(tmp_path / "b.csv", read_label_map(data / "label_map.csv"))
    df.assign(label=[0, -1, 1, 1]).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DataError, match=r"c\.csv: row 3 column 'label' is -1"):
        read_prepared(tmp_path / "c.csv")  # -1 (SKU unknown to training) only in the test split
    df.assign(offset=df["offset"].astype(float) + 0.5).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"d\.csv: row 2 column 'offset' is .*non-negative integer"):
        read_prepared(tmp_path / "d.csv")
    pd.DataFrame({"label": [0, 2], "sku": [1, 2]}).to_csv(tmp_path / "lm.csv", index=False)
    with pytest.raises(DataError, match=r"lm\.csv: column 'label'"):
        read_label_map(tmp_path / "lm.csv")


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 2), (7, 3), (2, 4), (9, 2), (5, 1)])
def test_epoch_sampler_covers_every_sample_once_across_ranks(n, world):
    for epoch in range(2):
        shards = []
        for rank in range(world):
            s = EpochSampler(n, rank, world, shuffle=True, seed=3)
            s.set_epoch(epoch)
            shards.append(list(s))
        assert len({len(x) for x in shards}) == 1  # same number of steps on every rank
        real = [i for shard in shards for i in shard if i < n]
        assert sorted(real) == list(range(n))  # weight-1 entries: each sample exactly once
        assert all(i - n in range(n) for shard in shards for i in shard if i >= n)
    # with a batch size, no rank ends an epoch on a 1-sample batch (BatchNorm needs 2)
    for rank in range(world):
        s = EpochSampler(n, rank, world, seed=3, batch_size=4)
        idx = list(s)
        assert len(idx) == len(s) and len(idx) % 4 != 1
        plain = EpochSampler(n, rank, world, seed=3)
        assert sorted(i for i in idx if i < n) == sorted(i for i in plain if i < n)
    a, b = EpochSampler(n, 0, 1, seed=3), EpochSampler(n, 0, 1, seed=3)
    b.set_epoch(1)
    assert list(a) != list(b) or n < 3  # a new order every epoch


def test_class_balanced_sampler_evens_out_the_long_tail():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    s = ClassBalancedSampler(labels, seed=0)
    counts = np.zeros(3)
    for epoch in range(20):
        s.set_epoch(epoch)
        counts += np.bincount(labels[list(s)], minlength=3)
    shares = counts / counts.sum()
    assert np.all(np.abs(shares - 1 / 3) < 0.05), shares


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create ``marker`` if unpickling were allowed to call it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_read_checkpoint_never_executes_code(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(Products10kError, match=r"evil\.pt: not a readable checkpoint"):
        ckpt_lib.read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("arch", ["mobilenetv4_conv_small", "mobilenetv3_small_100", "resnet10t"])
def test_every_parameter_gets_a_gradient(arch):
    """DDP refuses parameters that get no gradient: timm heads after pooling must not stay dead."""
    model = create_model(ModelConfig(arch=arch), num_classes=5)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_random_resized_crop_takes_its_pixels_from_the_stored_image():
    # 1-pixel stripes at 512 px: resizing to 73 px first (the old order) averages them to grey;
    # a small crop of the stored image, scaled to 64 px, keeps their contrast
    img = np.zeros((512, 512, 3), np.uint8)
    img[:, ::2] = 255
    cfg = PhaseConfig(resolution=64, crop="random_resized", rrc_scale=(0.012, 0.012), hflip=0.0)
    t = train_transform(cfg)
    t.set_random_seed(0)
    out = t(image=img)["image"]
    assert out.shape == (3, 64, 64)
    assert float(out.std()) > 1.0  # ~2.1 for intact 0/255 stripes; < 0.3 once averaged away


def test_normalisation_constants_come_from_timms_config_and_reach_the_transforms():
    from products10k.models import input_normalization

    assert input_normalization("resnet10t") == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    inception = input_normalization("tf_efficientnet_b3.ap_in1k")
    assert inception == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    img = np.full((40, 40, 3), 255, np.uint8)
    assert float(eval_transform(40, 40, inception)(image=img)["image"].max()) == pytest.approx(1.0)
    assert float(eval_transform(40, 40)(image=img)["image"].max()) == pytest.approx((1 - 0.406) / 0.225)


def test_random_erasing_replaces_a_patch_with_noise():
    img = np.full((48, 48, 3), 128, np.uint8)
    plain = train_transform(PhaseConfig(resolution=40, resize=48, hflip=0.0))
    erased = train_transform(PhaseConfig(resolution=40, resize=48, hflip=0.0, random_erasing=1.0))
    plain.set_random_seed(0)
    erased.set_random_seed(0)
    a, b = plain(image=img)["image"], erased(image=img)["image"]
    changed = (a != b).any(dim=0)
    assert 0.02 * 40 * 40 <= int(changed.sum()) <= 0.3 * 40 * 40  # a patch of 2-25% of the area
    assert float(b[:, changed].std()) > 0.1  # filled with per-pixel noise, not a flat colour


def test_drop_last_keeps_whole_global_batches_and_varies_the_dropped_images():
    from products10k.datasets import EpochSampler

    samplers = [EpochSampler(21, rank, 2, True, seed=0, batch_size=4, global_batch=8) for rank in (0, 1)]
    dropped = []
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        seen = [i for s in samplers for i in s]
        assert len(seen) == 16 and len(set(seen)) == 16 and all(i < 21 for i in seen)  # no padding
        assert all(len(s) == 8 for s in samplers)
        dropped.append(set(range(21)) - set(seen))
        sizes = samplers[0].update_sizes(micro_batch=4, grad_accum=1)
        assert sizes.tolist() == [8.0, 8.0]  # every update a whole global batch
    assert dropped[0] != dropped[1]  # a different remainder each epoch
    # fewer images than one global batch: nothing is dropped
    small = EpochSampler(5, 0, 1, True, seed=0, batch_size=8, global_batch=8)
    assert sorted(small) == list(range(5))
