"""The three training phases on a tiny fixture, their params handling, and their faults."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from products10k.common import ConfigError, Products10kError
from products10k.models import checkpoint as ckpt_lib
from products10k.training.loop import PhasePaths, freeze_batchnorm
from products10k.training.losses import PhaseLoss
from tests.helpers import make_training_data, phase_args, stage_module, train_phase, write_params

train_main = stage_module("train").main
CONTRACT_KEYS = {
    "model",
    "model_config",
    "labels",
    "phase",
    "member",
    "epoch",
    "resolution",
    "resize",
    "normalize",
    "val_top1",
}


def _paths(data: Path, out: Path, phase: str = "train", csv: str = "train.csv", init=None) -> PhasePaths:
    return PhasePaths(
        train_csv=data / csv,
        val_csv=data / "val.csv",
        label_map=data / "label_map.csv",
        images=data,
        out=out / "models" / phase,
        live=out / "dvclive" / phase,
        init=init,
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """train -> finetune_balanced -> finetune_accuracy through the stage script's main()."""
    root = tmp_path_factory.mktemp("phases")
    data = make_training_data(root / "data", num_classes=4, train_per_class=10, val_per_class=4)
    params = write_params(root / "params.yaml", train={"epochs": 3, "ema": True, "ema_decay": 0.5})
    train_main(["--params", str(params), *phase_args(data, root, "train")])
    models = root / "models"
    for phase, init in (("finetune_balanced", "train"), ("finetune_accuracy", "finetune_balanced")):
        args = phase_args(data, root, phase, "balanced.csv", models / init / "best.pt")
        train_main(["--params", str(params), *args])
    return root, data, params


@pytest.mark.parametrize("phase", ["train", "finetune_balanced", "finetune_accuracy"])
def test_each_phase_writes_contract_checkpoints_and_learns(pipeline, phase):
    root, data, _ = pipeline
    out = root / "models" / phase
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert CONTRACT_KEYS <= set(best) and CONTRACT_KEYS <= set(last)
    assert best["phase"] == phase and best["member"] == "m0"
    assert best["labels"] == [1000, 1007, 1014, 1021]
    assert best["model_config"]["arch"] == "resnet10t" and best["model_config"]["num_classes"] == 4
    assert best["resolution"] == 32 and best["resize"] == 37
    assert best["normalize"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert "train_state" in last and {"optimizer", "scheduler", "ema", "global_step"} <= set(
        last["train_state"]
    )
    expected_epochs = {"train": 3, "finetune_balanced": 1, "finetune_accuracy": 1}[phase]
    assert last["epoch"] == expected_epochs and len(last["history"]) == expected_epochs
    assert best["val_top1"] == max(row["val/top1"] for row in last["history"])
    # the published model holds no wall-clock figure (same training, same bytes); last.pt keeps them
    assert all("epoch_time_s" in row for row in last["history"])
    assert not any(set(row) & {"throughput", "epoch_time_s", "data_wait"} for row in best["history"])
    # 4 classes: chance is 0.25; colour + shape is learnable in a few epochs
    assert best["val_top1"] >= 0.5, last["history"]
    model, meta = ckpt_lib.load_model(out / "best.pt")
    assert meta["val_top1"] == best["val_top1"]
    # saved weights are the evaluated (EMA) ones: reloading reproduces the recorded val top-1
    from products10k.contracts.prepared import read_prepared
    from products10k.data.datasets import PreparedImageDataset
    from products10k.data.transforms import eval_transform

    ds = PreparedImageDataset(read_prepared(data / "val.csv"), data, eval_transform(37, 32))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(best["val_top1"], abs=1e-6)

    metrics = json.loads((root / "dvclive" / phase / "metrics.json").read_text())
    assert {"loss", "top1"} <= set(metrics["train"]) and {"top1", "best_top1", "loss"} <= set(metrics["val"])
    assert "lr" in metrics and "throughput" in metrics and metrics["step"] == expected_epochs - 1
    lines = (root / "dvclive" / phase / "plots" / "metrics" / "val" / "top1.tsv").read_text().splitlines()
    assert len(lines) == expected_epochs + 1


def _distance(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if v.is_floating_point() and "running" not in k]
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in keys) ** 0.5)


def test_finetunes_start_from_the_previous_best(pipeline):
    root, data, params = pipeline
    base = torch.load(root / "models/train/best.pt", weights_only=True)
    tuned = torch.load(root / "models/finetune_balanced/best.pt", weights_only=True)
    # the same finetune started from scratch (no --init): where the phase would end if it
    # ignored its init checkpoint; the real finetune must stay much closer to train's best
    fresh = root / "fresh"
    from products10k.training.loop import PhasePaths as _P

    train_phase(
        params,
        "train",
        "m0",
        _P(data / "balanced.csv", data / "val.csv", data / "label_map.csv", data, fresh, None),
    )
    scratch = torch.load(fresh / "last.pt", weights_only=True)
    assert _distance(tuned["model"], base["model"]) < 0.5 * _distance(scratch["model"], base["model"])
    first = torch.load(root / "models/finetune_balanced/last.pt", weights_only=True)["history"][0]
    assert first["val/top1"] >= base["val_top1"] - 0.25
    # the accuracy-loss phase's train loss is L_acc, in [0, 1]
    acc_hist = torch.load(root / "models/finetune_accuracy/last.pt", weights_only=True)["history"]
    assert all(0.0 <= row["train/loss"] <= 1.0 for row in acc_hist)


def test_a_short_finetunes_ema_moves_with_timms_warm_up(pipeline, tmp_path):
    root, data, _ = pipeline
    # 18 updates at a realistic decay: without warm-up timm's EMA copies the weights after the
    # first update and then keeps 0.998^17 = 97% of them - it would barely move past step 1
    params = write_params(
        tmp_path / "p.yaml",
        train={"epochs": 3, "ema": True, "ema_decay": 0.998, "batch_size": 2},
        finetune_balanced={"epochs": 3},
    )
    init = root / "models/train/best.pt"
    paths = _paths(data, tmp_path, "finetune_balanced", "balanced.csv", init=init)
    train_phase(params, "finetune_balanced", "m0", paths)
    last = torch.load(paths.out / "last.pt", weights_only=True)
    start = torch.load(init, weights_only=True)["model"]
    ema, raw = last["model"], last["train_state"]["model"]
    assert _distance(ema, start) > 0.5 * _distance(raw, start) > 0


def test_no_val_split_keeps_the_last_epoch_as_best(tmp_path, caplog):
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    (data / "val.csv").write_text((data / "val.csv").read_text().splitlines()[0] + "\n")  # header only
    params = write_params(tmp_path / "p.yaml", train={"epochs": 2})
    paths = _paths(data, tmp_path)
    out = train_phase(params, "train", "m0", paths)
    best = torch.load(paths.out / "best.pt", weights_only=True)
    last = torch.load(paths.out / "last.pt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 2 and len(out["history"]) == 2
    assert all("val/top1" not in row for row in out["history"])
    for key, value in last["model"].items():
        assert torch.equal(value, best["model"][key]), key


@pytest.mark.parametrize(("choice", "kept_epoch"), [("best", 2), ("last", 3)])
def test_checkpoint_choice_picks_the_best_val_epoch_or_the_final_one(
    tmp_path, monkeypatch, choice, kept_epoch
):
    import products10k.training.loop as loop

    # val top-1 falls every epoch while the estimate of the test metric peaks at epoch 2: best is
    # chosen by the estimate (val weighted to evaluate.target_prior), and best and last differ
    rows = iter([(0.9, 0.3), (0.5, 0.6), (0.2, 0.4)])

    def validate(state):
        top1, est = next(rows)
        return {"val/loss": 1.0, "val/top1": top1, "val/estimate": est}

    monkeypatch.setattr(loop, "validate", validate)
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    params = write_params(tmp_path / "p.yaml", train={"epochs": 3, "checkpoint": choice})
    paths = _paths(data, tmp_path)
    train_phase(params, "train", "m0", paths)
    best = torch.load(paths.out / "best.pt", weights_only=True)
    assert best["epoch"] == kept_epoch


def test_val_estimate_weights_val_to_the_target_prior(tmp_path):
    """The estimate is val top-1 re-weighted to evaluate.target_prior: on a balanced val under
    `train`'s mix it is top-1 itself; under a mix that is all one SKU it is that SKU's accuracy
    (counted here from the saved model's own val predictions)."""
    from products10k.contracts.prepared import read_label_map, read_prepared
    from products10k.data.datasets import PreparedImageDataset
    from products10k.data.transforms import eval_transform

    data = make_training_data(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=4)
    plain = write_params(tmp_path / "p.yaml", train={"epochs": 1}, evaluate={"target_prior": "train"})
    row = train_phase(plain, "train", "m0", _paths(data, tmp_path / "p"))["history"][0]
    assert row["val/estimate"] == pytest.approx(row["val/top1"])

    label_map = read_label_map(data / "label_map.csv")
    one_sku = tmp_path / "one.csv"
    pd.DataFrame({"sku": [int(label_map["sku"][1])], "weight": [1.0]}).to_csv(one_sku, index=False)
    skewed = write_params(tmp_path / "q.yaml", train={"epochs": 1}, evaluate={"target_prior": str(one_sku)})
    paths = _paths(data, tmp_path / "q")
    row = train_phase(skewed, "train", "m0", paths)["history"][0]
    model, meta = ckpt_lib.load_model(paths.out / "last.pt")
    val = read_prepared(data / "val.csv", label_map)
    tf = eval_transform(meta["resize"], meta["resolution"], meta["normalize"])
    ds = PreparedImageDataset(val, data, tf, min_side=meta["resize"])
    with torch.no_grad():
        pred = torch.cat([model(torch.stack([ds[i][0] for i in range(len(ds))])).argmax(1)])
    labels = torch.tensor(val["label"].to_numpy())
    assert row["val/estimate"] == pytest.approx((pred[labels == 1] == 1).float().mean().item())
    assert row["val/top1"] == pytest.approx((pred == labels).float().mean().item())


def test_a_finished_phase_is_kept_not_retrained(tmp_path, caplog):
    # killed after its final last.pt but before DVC recorded the stage: the rerun keeps the result
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=4, val_per_class=1)
    params = write_params(tmp_path / "p.yaml", train={"epochs": 1})
    paths = _paths(data, tmp_path)
    train_phase(params, "train", "m0", paths)
    before = (paths.out / "last.pt").read_bytes()
    caplog.set_level("INFO", logger="products10k.training.loop")
    out = train_phase(params, "train", "m0", paths)
    assert "finished run (epoch 1): keeping it" in caplog.text
    assert (paths.out / "last.pt").read_bytes() == before and len(out["history"]) == 1


def test_batch_not_divisible_names_the_keys(tmp_path):
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=1)
    params = write_params(tmp_path / "p.yaml", train={"batch_size": 9, "grad_accum": 2})
    with pytest.raises(ConfigError, match=r"train.batch_size=9 .*train.grad_accum"):
        train_phase(params, "train", "m0", _paths(data, tmp_path))


def test_init_from_another_arch_or_label_map_fails_naming_both(pipeline, tmp_path):
    root, data, _ = pipeline
    init = root / "models" / "train" / "best.pt"
    params = write_params(tmp_path / "p.yaml", model={"arch": "resnet14t"})
    with pytest.raises(Products10kError, match="'resnet10t'.*'resnet14t'"):
        train_phase(params, "finetune_balanced", "m0", _paths(data, tmp_path, "finetune_balanced", init=init))
    other = make_training_data(tmp_path / "other", num_classes=3, train_per_class=2, val_per_class=1)
    params = write_params(tmp_path / "p2.yaml")
    with pytest.raises(Products10kError, match=r"best\.pt.*label_map\.csv"):
        train_phase(
            params, "finetune_balanced", "m0", _paths(other, tmp_path, "finetune_balanced", init=init)
        )


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_last_good(tmp_path, monkeypatch):
    data = make_training_data(tmp_path / "data", num_classes=2, train_per_class=8, val_per_class=2)
    params = write_params(tmp_path / "p.yaml", train={"epochs": 3})
    calls = {"n": 0}
    real_forward = PhaseLoss.forward

    def poisoned(self, logits, target, weight=None, **kw):
        calls["n"] += 1
        loss = real_forward(self, logits, target, weight, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss  # 2 steps per epoch: epoch 2 step 1

    monkeypatch.setattr(PhaseLoss, "forward", poisoned)
    paths = _paths(data, tmp_path)
    with pytest.raises(Products10kError, match=r"NaN/inf at epoch 2, step 1.*last\.pt"):
        train_phase(params, "train", "m0", paths)
    last = torch.load(paths.out / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "train",
    [
        {"head": None, "sampler": "class_balanced", "grad_accum": 2, "clip_grad": 1.0, "schedule": "step",
         "milestones": [1], "random_erasing": 0.5, "color_jitter": 0.3, "crop": "random_resized",
         "channels_last": True, "label_smoothing": 0.1, "num_workers": 1},
        {"head": "arcface", "amp": "bf16", "optimizer": "adamw", "warmup_epochs": 0.5},
    ],
)  # fmt: skip
def test_optional_tricks_run(tmp_path, train):
    data = make_training_data(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2)
    head = train.pop("head")
    model = {"head": head, "pool": "gem"} if head else {}
    params = write_params(tmp_path / "p.yaml", model=model, train={"epochs": 2, **train})
    result = train_phase(params, "train", "m0", _paths(data, tmp_path))
    assert len(result["history"]) == 2
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in result["history"])
    # the options took effect in what was trained and saved, not just ran
    last = torch.load(tmp_path / "models" / "train" / "last.pt", weights_only=True)
    model, meta = ckpt_lib.load_model(tmp_path / "models" / "train" / "last.pt")
    if head:
        assert meta["model_config"]["head"] == "arcface" and meta["model_config"]["pool"] == "gem"
        assert float(last["model"]["pool.p"]) != 3.0  # GeM's exponent is learned
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            logits = model(x)
        assert float(logits.abs().max()) <= meta["model_config"]["scale"] + 1e-4  # s * cos: a cosine head
        assert {"train/loss", "lr"} <= set(result["history"][0])
    else:
        # step schedule, milestone at epoch 1 (gamma 0.1): the 2nd epoch starts at a tenth of the lr
        lrs = [r["lr"] for r in result["history"]]
        assert lrs[1] == pytest.approx(lrs[0] * 0.1)
        # grad_accum 2, drop_last: 16 of 18 draws in micro-batches of 4 = 2 optimizer updates an epoch
        assert last["phase_config"]["sampler"] == "class_balanced" and last["train_state"]["global_step"] == 4


@pytest.mark.parametrize("group_share", [0.0, 1.0])
def test_pk_batches_feed_the_metric_loss_groups_of_one_sku(tmp_path, monkeypatch, group_share):
    """train.sampler pk + metric_loss_weight: every batch the supervised contrastive loss sees is
    made of whole same-SKU groups, and it adds to the training loss; with pk_group_share 1 its SKUs
    are of one product group (label_map's ``group``: label // 2 here)."""
    from products10k.training import losses

    seen = []
    real = losses.supcon_per_sample

    def spy(features, target, weight, temperature):
        out = real(features, target, weight, temperature)
        seen.append((target.tolist(), float(out.detach().mean())))
        return out

    monkeypatch.setattr(losses, "supcon_per_sample", spy)
    data = make_training_data(tmp_path / "data", num_classes=3, train_per_class=6, val_per_class=2)
    train = {"epochs": 1, "batch_size": 4, "sampler": "pk", "pk_images": 2, "metric_loss_weight": 1.0,
             "pk_group_share": group_share}  # fmt: skip
    params = write_params(tmp_path / "p.yaml", train=train)
    result = train_phase(params, "train", "m0", _paths(data, tmp_path))
    assert len(seen) == 4  # 18 draws, whole batches of 4
    for target, loss in seen:
        assert target[0] == target[1] and target[2] == target[3]
        assert loss > 0 if target[0] != target[2] else loss >= 0  # one SKU: no negatives
        if group_share:
            assert target[0] // 2 == target[2] // 2
    assert math.isfinite(result["history"][0]["train/loss"])


def test_freeze_bn_keeps_running_statistics_and_trains_the_affine_weights(pipeline, tmp_path):
    """finetune_balanced with train.freeze_bn: BN running stats stay those of the init checkpoint."""
    root, data, _ = pipeline
    init = root / "models" / "train" / "best.pt"
    params = write_params(
        tmp_path / "p.yaml",
        finetune_balanced={"epochs": 2, "lr": 1e-2, "freeze_bn": True, "ema": False},
    )
    train_phase(
        params, "finetune_balanced", "m0", _paths(data, tmp_path, "finetune_balanced", "balanced.csv", init)
    )
    before = ckpt_lib.read_checkpoint(init)["model"]
    after = ckpt_lib.read_checkpoint(tmp_path / "models" / "finetune_balanced" / "last.pt")["model"]
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    affine = [k.replace("running_mean", "weight") for k in before if k.endswith("running_mean")]
    assert stats and affine
    for k in stats:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in affine)  # BN weights still learn
    # without freeze_bn the same finetune moves the running statistics
    params = write_params(
        tmp_path / "q.yaml", finetune_balanced={"epochs": 1, "lr": 1e-2, "freeze_bn": False, "ema": False}
    )
    train_phase(
        params,
        "finetune_balanced",
        "m0",
        _paths(data, tmp_path / "q", "finetune_balanced", "balanced.csv", init),
    )
    moved = ckpt_lib.read_checkpoint(tmp_path / "q" / "models" / "finetune_balanced" / "last.pt")["model"]
    assert any(not torch.equal(before[k], moved[k]) for k in stats)


def test_freeze_batchnorm_puts_only_bn_layers_in_eval_mode():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2)
    )
    model.train()
    assert freeze_batchnorm(model) == 2
    assert not model[1].training and not model[3].training
    assert model[0].training and model[2].training


def test_crt_trains_only_a_reset_head_and_balanced_softmax_changes_the_loss(pipeline, tmp_path):
    """finetune_balanced as cRT: backbone, pooling and BN statistics exactly those of the init
    checkpoint; the head re-initialised (it starts far from the init's) and trained."""
    root, data, _ = pipeline
    init = root / "models" / "train" / "best.pt"
    crt = {"epochs": 1, "lr": 1e-3, "ema": False, "freeze_backbone": True, "reset_head": True}
    params = write_params(tmp_path / "p.yaml", finetune_balanced=crt)
    paths = _paths(data, tmp_path, "finetune_balanced", "train.csv", init)
    train_phase(params, "finetune_balanced", "m0", paths)
    before = ckpt_lib.read_checkpoint(init)["model"]
    after = ckpt_lib.read_checkpoint(paths.out / "last.pt")["model"]
    body = [k for k in before if not k.startswith("head.")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    # one epoch at 1e-3 moves a kept head by < 0.1; a reset one starts a whole init away
    assert _distance({"w": before["head.weight"]}, {"w": after["head.weight"]}) > 0.5
    # without the reset, the head is trained from the init's head
    kept = write_params(tmp_path / "q.yaml", finetune_balanced={**crt, "reset_head": False})
    kept_paths = _paths(data, tmp_path / "q", "finetune_balanced", "train.csv", init)
    train_phase(kept, "finetune_balanced", "m0", kept_paths)
    moved = ckpt_lib.read_checkpoint(kept_paths.out / "last.pt")["model"]
    assert 0 < _distance({"w": before["head.weight"]}, {"w": moved["head.weight"]}) < 0.5
    assert all(torch.equal(before[k], moved[k]) for k in body)

    # balanced softmax on a skewed copy of train.csv (10/4/2/2 images): the loss differs from CE's
    train = pd.read_csv(data / "train.csv")
    keep = train.groupby("label").cumcount() < train["label"].map({0: 10, 1: 4}).fillna(2)
    skewed = train[keep]
    skewed.to_csv(data / "skewed.csv", index=False)
    losses = {}
    for loss in ("ce", "balanced_softmax"):
        cfg = write_params(tmp_path / f"{loss}.yaml", finetune_balanced={**crt, "loss": loss})
        out = _paths(data, tmp_path / loss, "finetune_balanced", "skewed.csv", init)
        train_phase(cfg, "finetune_balanced", "m0", out)
        losses[loss] = ckpt_lib.read_checkpoint(out.out / "last.pt")["history"][0]["train/loss"]
    assert losses["ce"] != pytest.approx(losses["balanced_softmax"], abs=1e-4)
