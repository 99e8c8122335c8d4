"""presets/paper.yaml applied to params.yaml: the paper's recipe, comments kept, 224 on top."""

import shutil

import pytest

from products10k.common import ConfigError
from products10k.config import (
    CVConfig,
    ModelConfig,
    apply_overrides,
    load_yaml,
    member_params,
    phase_config,
    section,
)
from products10k.config.presets import apply_preset, available
from products10k.config.presets import main as presets_main
from products10k.contracts.preprocessing import resolve_resize
from tests.helpers import ROOT


def test_paper_preset_gives_the_papers_recipe(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    before = params_path.read_text()
    presets_main(["apply", "paper", "--params", str(params_path)])
    text = params_path.read_text()
    # round-trip: the file's own comments and untouched sections survive
    assert text.splitlines()[0] == before.splitlines()[0]
    assert "# Each member is a complete train -> finetune chain" in text
    params = member_params(load_yaml(params_path), "m0")
    model = section(params, "model", ModelConfig)
    assert (model.arch, model.pretrained) == ("efficientnet_b3", True)
    train = phase_config(params, "train")
    assert (train.resolution, resolve_resize(train.resolution, train.resize)) == (448, 512)
    assert (train.optimizer, train.lr, train.weight_decay, train.batch_size) == ("adam", 3e-4, 1e-4, 64)
    assert (train.schedule, train.milestones, train.gamma) == ("step", (20, 40, 60), 0.1)
    assert (train.color_jitter, train.random_erasing, train.label_smoothing) == (0.0, 0.0, 0.0)
    assert not train.freeze_bn  # the paper trains BatchNorm (the embedded default freezes it)
    balanced = phase_config(params, "finetune_balanced")
    assert (balanced.lr, balanced.milestones, balanced.accuracy_loss_weight) == (3e-5, (), 0.0)
    accuracy = phase_config(params, "finetune_accuracy")
    assert (accuracy.lr, accuracy.accuracy_loss_weight) == (3e-5, 1.0) and 2 <= accuracy.epochs <= 3
    assert params["prepare"]["size"] == 512

    # `dvc exp run -S train.resolution=224` on top: the 256/224 baseline in every phase
    low = apply_overrides(params, {"train.resolution": 224})
    for phase in ("train", "finetune_balanced", "finetune_accuracy"):
        cfg = phase_config(low, phase)
        assert (cfg.resolution, resolve_resize(cfg.resolution, cfg.resize)) == (224, 256)

    assert apply_preset("paper", params_path) == []  # applying again changes nothing


def test_offline_preset_on_top_of_paper_uses_the_registry_lite2_at_448(tmp_path):
    from products10k.models.weights import registry_file

    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    presets_main(["apply", "paper", "offline", "--params", str(params_path)])
    params = member_params(load_yaml(params_path), "m0")
    model = section(params, "model", ModelConfig)
    assert (model.arch, model.pretrained, model.pretrained_file) == ("tf_efficientnet_lite2", True, None)
    assert registry_file(model.arch) is not None  # its weights install with the project
    train = phase_config(params, "train")
    assert (train.resolution, train.lr, train.milestones) == (448, 3e-4, (20, 40, 60))  # the paper's, kept


def test_scratch_preset_trains_the_mobilenet_from_random_weights(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    presets_main(["apply", "scratch", "--params", str(params_path)])
    params = member_params(load_yaml(params_path), "m0")
    model = section(params, "model", ModelConfig)
    assert (model.arch, model.pretrained) == ("mobilenetv4_conv_small", False)
    assert phase_config(params, "train").lr == 3e-3
    for phase in ("finetune_balanced", "finetune_accuracy"):
        cfg = phase_config(params, phase)
        assert (cfg.freeze_bn, cfg.checkpoint) == (True, "best")


def test_cv_preset_turns_five_folds_on_and_nothing_else(tmp_path):
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    before = load_yaml(params_path)
    presets_main(["apply", "cv", "--params", str(params_path)])
    after = load_yaml(params_path)
    assert section(after, "cv", CVConfig).folds == 5
    assert {k: v for k, v in after.items() if k != "cv"} == {k: v for k, v in before.items() if k != "cv"}


def test_unknown_preset_and_bad_preset_values_fail(tmp_path):
    assert "paper" in available()
    with pytest.raises(ConfigError, match="no preset 'nope'.*paper"):
        apply_preset("nope", ROOT / "params.yaml")
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "bad.yaml").write_text("train:\n  resolutoin: 224\n")
    params_path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_path)
    before = params_path.read_text()
    with pytest.raises(ConfigError, match="train.resolutoin"):
        apply_preset("bad", params_path, preset_dir=presets)
    assert params_path.read_text() == before  # nothing written on error
