"""The export stage's work: a checkpoint -> ONNX model + preprocessing, checked with onnxruntime.

The folder it writes (``models/export``) is all a user needs to run the model anywhere:

- ``model.onnx``: input ``image`` (N, 3, H, W) float32, outputs ``logits`` (N, K) and ``embedding``
  (N, D), the L2-normalised pooled feature the Faiss index holds (so one forward pass serves the
  classifier, kNN and their fusion). Dynamic batch size; exported with ``torch.onnx.export``'s
  torch.export-based exporter (the TorchScript one is deprecated since PyTorch 2.9).
- ``preprocess.json``: how an image becomes that input (the prepare stage's resize and JPEG re-encode,
  then RGB, shorter side to ``resize`` with area
  interpolation, centre crop ``resolution``, /255, mean/std, NCHW), the label -> original SKU id
  map (``skus``), and the checkpoint's SHA-256 (an index is only used with the model it was built by).

The check runs ``check_images`` prepared test images (evenly spaced over test.csv) through the
PyTorch model and the ONNX session on the same input tensors and reports the largest absolute
logit and embedding difference and the top-1 agreement; beyond ``LOGIT_ATOL`` the stage fails.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from products10k import common
from products10k.common import Products10kError
from products10k.config import ExportConfig, PrepareConfig
from products10k.config.stage import StageFiles, option
from products10k.contracts.prepared import LABEL_MAP_ALL_COLUMNS, read_label_map, read_prepared
from products10k.data.datasets import PreparedImageDataset
from products10k.data.transforms import embedding_transform
from products10k.models.checkpoint import check_labels, load_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
#: float32 in both runtimes: differences are ~1e-5; 1e-3 means a different graph, not rounding
LOGIT_ATOL = 1e-3


class ExportedNet(nn.Module):
    """The classifier as deployed: one pass -> (logits, L2-normalised embedding)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.features(image).float()
        head = self.net.head
        logits = head(features) if isinstance(head, nn.Linear) else head(features, None)
        return logits, F.normalize(features, dim=1)


def preprocess_spec(
    meta: dict, skus: np.ndarray, checkpoint: Path, member: str, phase: str, prepare: PrepareConfig
) -> dict:
    """``preprocess.json``: what the model expects and what its outputs mean.

    ``prepare``: every image the model was trained and evaluated on went through the prepare stage's
    resize (shorter side ``size``) and JPEG re-encode (``jpeg_quality``) first; deploy repeats both,
    so a raw photo reaches the model as evaluation's images did (skipping them moved the network's
    input by up to 0.40 in normalised units on a 1200 x 900 photo).
    """
    _, resize = embedding_transform(meta)
    normalize = meta.get("normalize") or {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return {
        "input": "image",
        "outputs": ["logits", "embedding"],
        "color": "RGB",
        "layout": "NCHW",
        "prepare": {
            "resize_shorter_side": int(prepare.size),
            "jpeg_quality": int(prepare.jpeg_quality),
            # what one image may cost at run time: the training data's own limits (one home: params.yaml)
            "max_pixels": int(prepare.max_pixels),
            "max_aspect_ratio": float(prepare.max_aspect_ratio),
            "max_file_mb": float(prepare.max_file_mb),
        },
        "resize_shorter_side": int(resize),
        "interpolation": "area",
        "center_crop": int(meta["resolution"]),
        "scale": 1 / 255,
        "mean": [float(v) for v in normalize["mean"]],
        "std": [float(v) for v in normalize["std"]],
        "skus": [int(s) for s in skus],
        "arch": meta["model_config"]["arch"],
        "member": member,
        "phase": phase,
        "checkpoint_sha256": common.file_sha256(checkpoint),
    }


@dataclass
class ExportFiles(StageFiles):
    """The export stage's files (its command line: stages/export.py)."""

    checkpoint: Path = option("best.pt of export.member/export.phase")
    label_map: Path = option("prepared label_map.csv")
    test: Path = option("prepared test CSV (images for the check)")
    images_root: Path = option("folder holding images/shard-*.bin")
    out: Path = option("output folder: model.onnx, preprocess.json")
    metrics: Path = option("output: the check's metrics JSON")


def export_model(files: ExportFiles, cfg: ExportConfig, prepare: PrepareConfig) -> dict:
    """Export, check against PyTorch, publish ``files.out`` whole; return the check's metrics."""
    checkpoint, label_map_path, out = files.checkpoint, files.label_map, files.out
    label_map = read_label_map(label_map_path, LABEL_MAP_ALL_COLUMNS)
    if not checkpoint.is_file():
        raise Products10kError(
            f"export.member '{cfg.member}', export.phase '{cfg.phase}': checkpoint {checkpoint} not found "
            f"(run `dvc repro {cfg.phase}@{cfg.member}`)"
        )
    model, meta = load_model(checkpoint)
    check_labels(meta, label_map, checkpoint, label_map_path)
    net = ExportedNet(model).eval()
    images = _check_batch(
        meta, read_prepared(files.test, label_map, usage=True), files.images_root, cfg.check_images
    )

    staging = out.with_name(out.name + ".tmp")
    if staging.exists():  # left by a killed run
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    _export_onnx(net, images[:2], staging / MODEL_FILE, cfg.opset)
    spec = preprocess_spec(meta, label_map["sku"].to_numpy(), checkpoint, cfg.member, cfg.phase, prepare)
    (staging / PREPROCESS_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    metrics = compare(net, staging / MODEL_FILE, images)
    metrics["onnx_mb"] = round((staging / MODEL_FILE).stat().st_size / 2**20, 2)
    metrics["opset"] = cfg.opset
    if not metrics["max_abs_logit_diff"] <= LOGIT_ATOL:
        raise Products10kError(
            f"{checkpoint}: the ONNX model's logits differ from PyTorch's by up to "
            f"{metrics['max_abs_logit_diff']:.3g} (> {LOGIT_ATOL}) on {metrics['n_images']} test images"
        )
    common.swap_in(staging, out)
    common.write_json(files.metrics, metrics)
    log.info(
        "exported %s to %s: max |logit diff| %.2e, top-1 agreement %.4f on %d images",
        checkpoint,
        out / MODEL_FILE,
        metrics["max_abs_logit_diff"],
        metrics["top1_agreement"],
        metrics["n_images"],
    )
    return metrics


def _check_batch(meta: dict, test, images_root: Path, n: int) -> torch.Tensor:
    """``n`` prepared test images (evenly spaced rows) as the evaluate stage's centre-crop tensors."""
    if len(test) == 0:
        raise Products10kError("export: test.csv has no rows to check the exported model on")
    rows = test.iloc[np.unique(np.linspace(0, len(test) - 1, min(n, len(test))).round().astype(int))]
    transform, resize = embedding_transform(meta)
    dataset = PreparedImageDataset(rows, images_root, transform, min_side=resize)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    # two images at least: torch.export specialises a batch dimension it only ever saw as 1
    return images if len(images) > 1 else images.repeat(2, 1, 1, 1)


#: the exporter's node metadata holding a Python stack trace (file paths of the exporting machine)
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits", "embedding"],
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=False,  # one self-contained file (< 2 GB for every timm classifier used here)
            verbose=False,
        )
    _strip_stack_traces(path)


def _strip_stack_traces(path: Path) -> None:
    """Drop the exporter's per-node Python stack traces: they name the files of the machine that
    exported (its checkout and its environment), so the same model exported from two checkouts
    differed in bytes, and a shipped model carried the builder's paths."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare(net: nn.Module, onnx_path: Path, images: torch.Tensor) -> dict:
    """PyTorch vs onnxruntime on the same input tensors."""
    logits, embedding = net(images)
    ort_logits, ort_embedding = session(onnx_path).run(None, {"image": images.numpy()})
    logits, embedding = logits.numpy(), embedding.numpy()
    return {
        "n_images": len(images),
        "max_abs_logit_diff": float(np.abs(ort_logits - logits).max()),
        "max_abs_embedding_diff": float(np.abs(ort_embedding - embedding).max()),
        "top1_agreement": float((ort_logits.argmax(1) == logits.argmax(1)).mean()),
    }
