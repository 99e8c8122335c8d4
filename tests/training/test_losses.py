"""Losses: the paper's accuracy loss against hand-computed values, its gradient, CE mixing."""

import math

import pytest
import torch

from products10k.training.losses import PhaseLoss, accuracy_loss, accuracy_loss_per_sample
from products10k.training.model import MarginHead


def test_accuracy_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]])
    target = torch.tensor([1, 1, 0])
    # softmax rows: [1/4, 3/4], [2/3, 1/3], [1/2, 1/2]; true-class probs 3/4, 1/3, 1/2
    expected = 1.0 - (0.75 + 1.0 / 3.0 + 0.5) / 3.0
    assert accuracy_loss(logits, target).item() == pytest.approx(expected, abs=1e-6)
    per = accuracy_loss_per_sample(logits, target)
    assert per.tolist() == pytest.approx([0.25, 2.0 / 3.0, 0.5], abs=1e-6)


def test_accuracy_loss_bounds():
    target = torch.tensor([2])
    confident = torch.tensor([[-20.0, -20.0, 20.0]])
    wrong = torch.tensor([[20.0, -20.0, -20.0]])
    assert accuracy_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    assert accuracy_loss(wrong, target).item() == pytest.approx(1.0, abs=1e-6)


def test_accuracy_loss_gradient_sign():
    logits = torch.tensor([[0.3, -0.2, 0.1, 0.0]], requires_grad=True)
    target = torch.tensor([2])
    accuracy_loss(logits, target).backward()
    g = logits.grad[0]
    p = torch.softmax(logits.detach()[0], 0)
    # d(1 - p_y)/dz_y = -p_y (1 - p_y) < 0: gradient descent raises the true logit
    assert g[2].item() < 0
    assert g[2].item() == pytest.approx(-(p[2] * (1 - p[2])).item(), abs=1e-6)
    # d(1 - p_y)/dz_j = p_y p_j > 0 for the other classes
    for j in (0, 1, 3):
        assert g[j].item() > 0
        assert g[j].item() == pytest.approx((p[2] * p[j]).item(), abs=1e-6)


def test_phase_loss_mixes_ce_and_accuracy_loss():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    target = torch.randint(0, 5, (6,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    acc = accuracy_loss(logits, target)
    assert PhaseLoss()(logits, target).item() == pytest.approx(ce.item(), abs=1e-6)
    assert PhaseLoss(accuracy_loss_weight=1.0)(logits, target).item() == pytest.approx(acc.item(), abs=1e-6)
    mixed = PhaseLoss(accuracy_loss_weight=0.25)(logits, target).item()
    assert mixed == pytest.approx(0.75 * ce.item() + 0.25 * acc.item(), abs=1e-6)
    smooth = PhaseLoss(label_smoothing=0.1)(logits, target).item()
    ref = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1).item()
    assert smooth == pytest.approx(ref, abs=1e-6)


def test_phase_loss_ignores_zero_weight_padding():
    torch.manual_seed(1)
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 0])
    weight = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss = PhaseLoss(accuracy_loss_weight=0.5)(logits, target, weight)
    ref = PhaseLoss(accuracy_loss_weight=0.5)(logits[:2], target[:2])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert PhaseLoss()(logits, target, torch.zeros(4)).item() == 0.0


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_head_penalises_only_the_target_in_training(kind):
    torch.manual_seed(0)
    head = MarginHead(8, 5, kind, margin=0.3, scale=10.0)
    f = torch.randn(4, 8)
    target = torch.tensor([0, 1, 2, 3])
    head.eval()
    plain = head(f, target)
    cos = torch.nn.functional.linear(
        torch.nn.functional.normalize(f), torch.nn.functional.normalize(head.weight)
    )
    assert torch.allclose(plain, 10.0 * cos, atol=1e-5)  # eval: scale * cos, no margin
    head.train()
    margin = head(f, target)
    onehot = torch.nn.functional.one_hot(target, 5).bool()
    assert torch.allclose(margin[~onehot], plain[~onehot], atol=1e-5)
    assert (margin[onehot] < plain[onehot]).all()  # the target logit is made harder
    if kind == "cosface":
        assert torch.allclose(margin[onehot], plain[onehot] - 10.0 * 0.3, atol=1e-5)
    assert torch.allclose(head(f), plain, atol=1e-5)  # no targets: no margin even in training
