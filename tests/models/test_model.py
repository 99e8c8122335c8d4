"""The timm model: shapes per pooling and head, GeM, unknown archs, local pretrained weights."""

import pytest
import timm
import torch

from products10k.common import ConfigError, Products10kError
from products10k.models.model import GeM, create_model
from tests.helpers import config


@pytest.mark.parametrize("head", ["linear", "arcface", "cosface"])
@pytest.mark.parametrize("pool", ["avg", "gem"])
def test_model_forward_shapes(head, pool):
    model = create_model(config("model", arch="resnet10t", pretrained=False, head=head, pool=pool), 7)
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
        create_model(config("model", arch="not-a-net"), 3)


def test_pretrained_without_weights_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(Products10kError, match="model.pretrained_file") as err:
        create_model(config("model", arch="resnet10t", pretrained=True), 3)
    assert "resnet10t" in str(err.value)
    with pytest.raises(Products10kError, match="does not exist"):
        create_model(
            config("model", arch="resnet10t", pretrained=True, pretrained_file=str(tmp_path / "x.pth")), 3
        )


def test_pretrained_file_loads_those_weights(tmp_path):
    torch.manual_seed(123)
    reference = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(config("model", arch="resnet10t", pretrained=True, pretrained_file=str(path)), 5)
    ref = reference.state_dict()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, ref[name]), name
    # and a file for another architecture is an error naming the file and the arch
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(Products10kError, match="resnet10t"):
        create_model(
            config("model", arch="resnet10t", pretrained=True, pretrained_file=str(tmp_path / "r18.pth")), 5
        )


@pytest.mark.parametrize("arch", ["mobilenetv4_conv_small", "mobilenetv3_small_100", "resnet10t"])
def test_every_parameter_gets_a_gradient(arch):
    """DDP refuses parameters that get no gradient: timm heads after pooling must not stay dead."""
    model = create_model(config("model", arch=arch, pretrained=False), num_classes=5)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_sync_batchnorm_keeps_the_activations_of_timms_norm_layers():
    # the default family (EfficientNet-Lite) fuses norm and activation in BatchNormAct2d: torch's own
    # converter drops the activation (a linear network), timm's keeps it; eval mode runs on a CPU
    import copy

    from products10k.models.model import sync_batchnorm

    model = create_model(config("model", pretrained=False), 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        synced = sync_batchnorm(copy.deepcopy(model)).eval()
        dropped = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        assert torch.equal(synced(x), before)
        assert not torch.allclose(dropped(x), before)  # what the test guards against


def test_pooled_features_are_float32_under_autocast():
    model = create_model(config("model", pretrained=False), 10).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.features(torch.randn(2, 3, 64, 64)).dtype == torch.float32
