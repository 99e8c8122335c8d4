"""Loading params.yaml: every section types, errors name the file and the dotted key, no defaults
outside params.yaml, member overrides and finetune sections on top of train."""

import pytest
from pydantic import ValidationError

from products10k.common import ConfigError
from products10k.config import (
    SECTIONS,
    DataConfig,
    PhaseConfig,
    TTAConfig,
    apply_overrides,
    load_section,
    load_yaml,
    member_names,
    member_params,
    phase_config,
    section,
)
from tests.helpers import ROOT, config, params_tree, write_params


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_section_of_the_project_params_loads(name):
    cfg = load_section(ROOT / "params.yaml", name, SECTIONS[name])
    assert isinstance(cfg, SECTIONS[name])


def _required_everywhere(model) -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        if not info.is_required():
            out.append(f"{model.__name__}.{name}")
        if isinstance(info.annotation, type) and hasattr(info.annotation, "model_fields"):
            out += _required_everywhere(info.annotation)
    return out


def test_the_schema_holds_no_default_params_yaml_holds_them_all():
    assert [f for model in SECTIONS.values() for f in _required_everywhere(model)] == []


def test_a_key_missing_from_params_is_named():
    tree = params_tree()
    del tree["train"]["min_lr"]
    with pytest.raises(ConfigError, match=r"p.yaml: missing key 'train.min_lr'"):
        section(tree, "train", PhaseConfig, where="p.yaml")


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("train.resolutoin", 224, r"unknown key 'train.resolutoin' \(known keys of 'train': seed, epochs"),
        ("data.synthetic.sedd", 1, r"unknown key 'data.synthetic.sedd'"),
        ("train.resolution", "224", r"key 'train.resolution' is '224': Input should be a valid integer"),
        ("train.resolution", True, r"key 'train.resolution' is True"),
        ("train.ema", 1, r"key 'train.ema' is 1: Input should be a valid boolean"),
        ("train.rrc_scale", [0.3, "a"], r"key 'train.rrc_scale\[1\]' is 'a'"),
        ("train.amp", "fp8", r"key 'train.amp' is 'fp8': Input should be 'auto', 'off', 'bf16' or 'fp16'"),
        ("data.synthetic.seed", 1.5, r"key 'data.synthetic.seed' is 1.5"),
        ("evaluate.num_workers", "many", r"key 'evaluate.num_workers' is 'many'"),
        ("evaluate.phases", ["train", "warmup"], r"key 'evaluate.phases\[1\]' is 'warmup'"),
        ("tta.scales", [1, "8/0"], r"key 'tta.scales\[1\]' is '8/0'"),
        ("prepare.val_fraction", 1.5, r"key 'prepare.val_fraction' is 1.5: Input should be less than 1"),
        ("data.source", "dir", r"section 'data': source is 'dir' but data.dir is not set"),
        (
            "data.synthetic.num_skus",
            12,
            r"section 'data.synthetic': set exactly one of skus_per_group and num_skus",
        ),
        ("ensemble.weights", {"m1": 1.0}, r"section 'ensemble': weights names unknown member 'm1'"),
    ],
)
def test_bad_values_name_the_file_and_the_dotted_key(dotted, value, message):
    name = dotted.split(".")[0]
    tree = apply_overrides(params_tree(), {dotted: value})
    with pytest.raises(ConfigError, match=r"^p\.yaml: " + message):
        section(tree, name, SECTIONS[name], where="p.yaml")


def test_numbers_fractions_and_lists():
    assert config("train", lr=1).lr == 1.0 and isinstance(config("train", lr=1).lr, float)
    assert config("train", milestones=[3, 4]).milestones == (3, 4)
    tta = config("tta", scales=[1, "8/7"])
    assert isinstance(tta, TTAConfig) and tta.scales == (1.0, 8 / 7)


def test_configs_are_frozen():
    cfg = config("data")
    assert isinstance(cfg, DataConfig)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.source = "dir"  # type: ignore[misc]


def test_finetune_sections_state_only_what_differs_from_train():
    tree = params_tree()
    for phase in ("finetune_balanced", "finetune_accuracy"):
        same = {k: v for k, v in tree[phase].items() if tree["train"].get(k) == v}
        assert same == {}, f"{phase} restates train's {same}"
    low = apply_overrides(tree, {"train.min_lr": 3.0e-6})
    assert phase_config(low, "finetune_balanced").min_lr == 3.0e-6  # -S train.* reaches the finetunes
    bad = apply_overrides(tree, {"finetune_accuracy.lrr": 1.0})
    with pytest.raises(ConfigError, match=r"unknown key 'finetune_accuracy.lrr'"):
        phase_config(bad, "finetune_accuracy")


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)


def test_member_overrides_follow_base():
    params = {
        "train": {"resolution": 224, "seed": 0},
        "ensemble": {"members": {"a": {}, "b": {"train.seed": 7}}},
    }
    assert member_names(params) == ["a", "b"]
    assert member_params(params, "a")["train"] == {"resolution": 224, "seed": 0}
    assert member_params(params, "b")["train"] == {"resolution": 224, "seed": 7}
    assert params["train"]["seed"] == 0  # the input is not modified
    with pytest.raises(ConfigError, match="unknown ensemble member 'c'"):
        member_params(params, "c")
    with pytest.raises(ConfigError, match="no section 'model'"):
        apply_overrides(params, {"model.arch": "x"})
    # the launcher reads the top-level dist for every member's stages: a member's own would be ignored
    params["ensemble"]["members"]["d"] = {"dist.nproc_per_node": 2}
    with pytest.raises(ConfigError, match="ensemble.members.d overrides dist.nproc_per_node"):
        member_params(params, "d")
    # one set of folds for every member: their out-of-fold val rows must be the same rows
    params["ensemble"]["members"]["e"] = {"cv.folds": 3}
    with pytest.raises(ConfigError, match="ensemble.members.e overrides cv.folds: 'cv' is one for the whole"):
        member_params(params, "e")


def test_finetune_sections_override_train_and_reject_unknown_keys(tmp_path):
    params = load_yaml(write_params(tmp_path / "p.yaml"))
    params["train"]["resolution"] = 48
    params["finetune_balanced"] = {"epochs": 2, "lr": 1.0e-4}
    ft = phase_config(params, "finetune_balanced")
    assert (ft.epochs, ft.lr, ft.resolution, ft.batch_size) == (2, 1.0e-4, 48, 8)
    params["finetune_balanced"]["lr_typo"] = 1
    with pytest.raises(ConfigError, match="unknown key 'finetune_balanced.lr_typo'"):
        phase_config(params, "finetune_balanced")
    params["finetune_balanced"] = {"epochs": "three"}
    with pytest.raises(ConfigError, match="finetune_balanced.epochs"):
        phase_config(params, "finetune_balanced")
    params["train"]["resolutoin"] = 1
    with pytest.raises(ConfigError, match="unknown key 'train.resolutoin'"):
        phase_config(params, "train")


def test_member_overrides_reach_the_phase_config(tmp_path):
    path = write_params(tmp_path / "p.yaml", ensemble={"members": {"m0": {}, "m1": {"train.resolution": 64}}})
    params = load_yaml(path)
    assert phase_config(member_params(params, "m1"), "finetune_accuracy").resolution == 64
    assert phase_config(member_params(params, "m0"), "finetune_accuracy").resolution == 32


def test_the_embedded_default_params_type_check():
    params = member_params(load_yaml(ROOT / "params.yaml"), "m0")
    for phase in ("train", "finetune_balanced", "finetune_accuracy"):
        phase_config(params, phase)
    assert phase_config(params, "finetune_accuracy").accuracy_loss_weight == 1.0


def test_pk_batches_must_hold_whole_sku_groups():
    tree = apply_overrides(params_tree(), {"train.sampler": "pk", "train.pk_images": 5})
    with pytest.raises(ConfigError, match=r"^p\.yaml: .*batch_size \(32\) must be a multiple of it"):
        section(tree, "train", SECTIONS["train"], where="p.yaml")
    section(apply_overrides(tree, {"train.sampler": "random"}), "train", SECTIONS["train"], where="p.yaml")
    shared = apply_overrides(params_tree(), {"train.pk_group_share": 0.5})
    with pytest.raises(ConfigError, match=r"pk_group_share \(0\.5\) needs sampler: pk, not random"):
        section(shared, "train", SECTIONS["train"], where="p.yaml")
    section(apply_overrides(shared, {"train.sampler": "pk"}), "train", SECTIONS["train"], where="p.yaml")
