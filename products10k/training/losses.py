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

The supervised contrastive loss (Khosla et al., NeurIPS 2020) pulls a batch's images of one SKU
together on the unit sphere and pushes the rest apart, on the very vector the kNN index compares:
cross-entropy only asks each SKU to be separable from the others by a linear head, not that a new
SKU's images land near each other and away from a look-alike's. ``train.sampler: pk`` gives every
image positives in its batch. An image with none adds nothing.

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


def supcon_per_sample(
    features: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """Each image's supervised contrastive loss, (B,) float32: minus the mean log-probability, over
    its positives (the batch's other images of its SKU), of picking that positive among every
    other image, by ``softmax(cosine / temperature)``. Zero-weight images (padding) are neither
    positives nor negatives; an image without a positive gets 0."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    present = torch.ones_like(target, dtype=torch.bool) if weight is None else weight > 0
    others = present[None, :] & ~torch.eye(len(target), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(~others, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    positive = others & (target[:, None] == target[None, :])
    count = positive.sum(dim=1)
    total = log_prob.masked_fill(~positive, 0.0).sum(dim=1)
    return torch.where(count > 0, -total / count.clamp(min=1), torch.zeros_like(total))


class PhaseLoss(torch.nn.Module):
    """``(1 - w) * CE(label_smoothing) + w * L_acc``, weighted by per-sample weights; with
    ``logit_offset`` (balanced softmax: the log prior) both parts see ``logits + logit_offset``;
    with ``metric_weight`` > 0, plus that times the supervised contrastive loss of the batch's
    ``features`` (:func:`supcon_per_sample`)."""

    def __init__(
        self,
        label_smoothing: float = 0.0,
        accuracy_loss_weight: float = 0.0,
        logit_offset: torch.Tensor | None = None,
        metric_weight: float = 0.0,
        metric_temperature: float = 0.1,
    ):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.w = accuracy_loss_weight
        self.metric_weight = metric_weight
        self.metric_temperature = metric_temperature
        self.register_buffer("logit_offset", logit_offset, persistent=False)

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weighted mean loss; ``reduction="sum"``: the weighted sum (the training loop
        divides it by the optimizer update's global sample count). ``features``: the pooled
        embeddings of the batch, needed when ``metric_weight`` > 0."""
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
        if self.metric_weight > 0.0:
            if features is None:
                raise ValueError("metric_weight > 0 needs the batch's features")
            metric = supcon_per_sample(features, target, weight, self.metric_temperature)
            per_sample = per_sample + self.metric_weight * metric
        if weight is None:
            return per_sample.mean()
        weight = weight.to(per_sample.dtype)
        if reduction == "sum":
            return (per_sample * weight).sum()
        # clamp: a batch made only of padding contributes zero loss (and zero gradient)
        return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)
