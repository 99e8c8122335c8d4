"""Losses: the paper's accuracy loss against hand-computed values, its gradient, CE mixing."""

import math

import pytest
import torch

from products10k.models.model import MarginHead
from products10k.training.losses import (
    PhaseLoss,
    accuracy_loss,
    accuracy_loss_per_sample,
    log_prior,
    supcon_per_sample,
)


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


def test_log_prior_is_the_sampled_mix_with_empty_skus_counted_once():
    prior = log_prior([0, 0, 0, 1], num_classes=3).exp()
    assert prior.tolist() == pytest.approx([3 / 5, 1 / 5, 1 / 5])


def _skewed_toy(seed: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping 2-D Gaussians, one sample count each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [1.2, 0.0], [0.0, 1.2]])
    xs = [centres[k] + torch.randn(n, 2, generator=g) for k, n in enumerate(counts)]
    ys = [torch.full((n,), k) for k, n in enumerate(counts)]
    return torch.cat(xs), torch.cat(ys)


def _fit_linear(x, y, loss: PhaseLoss) -> torch.nn.Linear:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    return model


def test_balanced_softmax_moves_tail_predictions_on_a_skewed_toy_problem():
    """Trained on 500/25/25 draws, CE predicts the head where the classes overlap; balanced
    softmax learns the balanced posterior: tail recall on a balanced test rises, and with it the
    mean per-class accuracy."""
    x, y = _skewed_toy(0, [500, 25, 25])
    xt, yt = _skewed_toy(1, [400, 400, 400])
    ce = _fit_linear(x, y, PhaseLoss())
    bsm = _fit_linear(x, y, PhaseLoss(logit_offset=log_prior(y, 3)))
    with torch.no_grad():
        pred_ce, pred_bsm = ce(xt).argmax(1), bsm(xt).argmax(1)
    tail = yt > 0
    recall_ce = (pred_ce[tail] == yt[tail]).float().mean().item()
    recall_bsm = (pred_bsm[tail] == yt[tail]).float().mean().item()
    assert recall_bsm > recall_ce + 0.2
    assert (pred_bsm == yt).float().mean() > (pred_ce == yt).float().mean() + 0.05
    # the offset is the log prior: with a uniform one the loss is plain CE
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    uniform = PhaseLoss(logit_offset=log_prior([0, 1, 2], 3))
    assert uniform(logits, target).item() == pytest.approx(PhaseLoss()(logits, target).item(), abs=1e-6)


def _supcon_by_hand(z, y, tau):
    z = torch.nn.functional.normalize(z.double(), dim=1)
    out = []
    for i in range(len(y)):
        others = [a for a in range(len(y)) if a != i]
        positives = [p for p in others if y[p] == y[i]]
        if not positives:
            out.append(0.0)
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in others)
        log_probs = [math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in positives]
        out.append(-sum(log_probs) / len(positives))
    return torch.tensor(out, dtype=torch.float64)


def test_supcon_matches_its_definition_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # SKUs 2 and 3: no positive, no loss
    got = supcon_per_sample(z, y, None, 0.1)
    assert torch.allclose(got.double(), _supcon_by_hand(z, y, 0.1), atol=1e-4)
    assert got[5] == 0 and got[6] == 0 and (got[:5] > 0).all()
    # a zero-weight (padding) copy of image 0 is neither a positive nor a negative of anyone
    weight = torch.tensor([1.0] * 7 + [0.0])
    padded = supcon_per_sample(torch.cat([z, z[:1]]), torch.cat([y, y[:1]]), weight, 0.1)
    assert torch.allclose(padded[:7], got, atol=1e-5)


def test_phase_loss_adds_the_weighted_metric_loss_and_its_gradient_reaches_the_features():
    g = torch.Generator().manual_seed(1)
    logits, features = torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    plain = PhaseLoss()(logits, y)
    mixed = PhaseLoss(metric_weight=0.5, metric_temperature=0.2)(logits, y, features=features)
    assert torch.isclose(mixed, plain + 0.5 * supcon_per_sample(features, y, None, 0.2).mean())
    mixed.backward()
    assert features.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the batch's features"):
        PhaseLoss(metric_weight=0.5)(logits, y)
