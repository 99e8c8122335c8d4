"""Losses: cross-entropy (with label smoothing) and the paper's accuracy loss, optionally mixed.

The accuracy loss (Products-10K paper, Sec. 4) is a differentiable surrogate of top-1 error:

    L_acc = 1 - sum_i softmax(logits_i) . onehot(y_i) / N

i.e. one minus the mean probability of the true class. It only pushes the true-class probability
up (its gradient w.r.t. the true logit is negative), and unlike CE it saturates on confident
examples, so the paper uses it for a short finetune after CE training.

Balanced softmax (Ren et al., NeurIPS 2020): trained on long-tailed draws, softmax learns the
posterior of the training mix, so tail SKUs lose every close call. Adding ``log prior(y)`` (the
sampler's SKU mix) to the logits inside the loss lets the model learn the *balanced* posterior
instead; at test time the raw logits are used. It is the training-time twin of post-hoc logit
adjustment (products10k/choose.py).

All losses take per-sample ``weight``s (0 for the DDP samplers' padding entries) and average over
the weight sum, so padding never counts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def accuracy_loss_per_sample(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - softmax(logits)[y]`` per sample, computed in float32."""
    prob = logits.float().softmax(dim=1)
    return 1.0 - prob.gather(1, target.view(-1, 1)).squeeze(1)


def accuracy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's ``L_acc = 1 - sum(softmax(logits) * onehot(y)) / N``."""
    return accuracy_loss_per_sample(logits, target).mean()


def log_prior(labels, num_classes: int) -> torch.Tensor:
    """``log`` of the SKU mix of ``labels`` (K,), float32; an SKU without images counts as one
    (a ``-inf`` logit offset would turn label smoothing's sum over every SKU into NaN)."""
    counts = torch.bincount(torch.tensor(np.asarray(labels), dtype=torch.long), minlength=num_classes).float()
    counts = counts.clamp(min=1.0)
    return (counts / counts.sum()).log()


class PhaseLoss(torch.nn.Module):
    """``(1 - w) * CE(label_smoothing) + w * L_acc``, weighted by per-sample weights; with
    ``logit_offset`` (balanced softmax: the log prior) both parts see ``logits + logit_offset``."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        accuracy_loss_weight: float = 0.0,
        logit_offset: torch.Tensor | None = None,
    ):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.w = accuracy_loss_weight
        self.register_buffer("logit_offset", logit_offset, persistent=False)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The weighted mean loss; ``reduction="sum"``: the weighted sum (the training loop
        divides it by the optimizer update's global sample count)."""
        per_sample = torch.zeros(target.shape[0], device=logits.device, dtype=torch.float32)
        if self.logit_offset is not None:
            logits = logits.float() + self.logit_offset.to(logits.device)
        if self.w < 1.0:
            ce = F.cross_entropy(
                logits.float(), target, reduction="none", label_smoothing=self.label_smoothing
            )
            per_sample = per_sample + (1.0 - self.w) * ce
        if self.w > 0.0:
            per_sample = per_sample + self.w * accuracy_loss_per_sample(logits, target)
        if weight is None:
            return per_sample.mean()
        weight = weight.to(per_sample.dtype)
        if reduction == "sum":
            return (per_sample * weight).sum()
        # clamp: a batch made only of padding contributes zero loss (and zero gradient)
        return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)
