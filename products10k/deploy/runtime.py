"""The exported model at run time: images in, classifier / kNN / fused top-k SKU ids out.

``ExportedModel`` reads an export folder (``model.onnx`` + ``preprocess.json``) and runs it with
onnxruntime; image bytes are prepared exactly as the model's evaluation images were: the prepare
stage's bounded decode, resize and JPEG re-encode (``prepare_image``), then the evaluate stage's
reduced decode and centre crop (``centre_crop_input``: albumentations' eval transform redone in
OpenCV and NumPy, checked against it by a test). The runtime imports no torch, albumentations,
pandas or DVC: numpy, OpenCV, Pillow (the decoder's header reads), onnxruntime and Faiss.
``Scorer`` turns a batch of model outputs into top-k SKU ids and scores, with the classifier, kNN
over an index folder, or their fusion with the weight the index stage fitted on val. An index that
names SKUs the classifier does not know (``products10k-enrol``) extends the label space: kNN can
name them, and the fusion treats their classifier score as unknown, not 0 (``knn.fuse_with_enrolled``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from products10k.common import Products10kError
from products10k.imaging.images import ImageDefect, ImageLimits, decode_rgb, prepare_image
from products10k.knn import Gallery, fuse_with_enrolled, knn_scores, load_gallery
from products10k.scores import SplitScores, combine_topk

MODES = ("classifier", "knn", "fused")


class ExportedModel:
    """An export folder, loaded: ``preprocess(rgb)`` -> CHW float32, ``run(batch)`` -> (logits, embedding)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        folder = Path(folder)
        model, spec = folder / "model.onnx", folder / "preprocess.json"
        for path in (model, spec):
            if not path.is_file():
                raise Products10kError(
                    f"{folder}: not an export folder ({path.name} is missing; run the export stage)"
                )
        self.folder = folder
        try:
            self.spec = json.loads(spec.read_text(encoding="utf-8"))
            self.limits = ImageLimits.from_prepare(self.spec["prepare"])
        except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8, a key missing, a wrong type
            raise Products10kError(
                f"{spec}: not a preprocess record this runtime reads ({type(exc).__name__}: {exc}); "
                "re-run the export stage"
            ) from None
        self.skus = np.asarray(self.spec["skus"], dtype=np.int64)
        self.mean = np.asarray(self.spec["mean"], dtype=np.float32)
        self.std = np.asarray(self.spec["std"], dtype=np.float32)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types are not public API
            raise Products10kError(
                f"{model}: onnxruntime cannot load it ({exc}); re-run the export stage"
            ) from None

    @property
    def min_side(self) -> int:
        """The smallest decode that still downsizes to the model's input (a reduced JPEG decode)."""
        return int(self.spec["resize_shorter_side"])

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """An upright RGB image (already prepared, see :meth:`load`) -> the model's CHW input."""
        return centre_crop_input(rgb, self.min_side, int(self.spec["center_crop"]), self.mean, self.std)

    def load(self, data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
        """Image file bytes -> the model's CHW input, as the evaluate stage saw its images.

        ``limits``: what one image may cost; the export's record of params.yaml's (the training data's)
        by default. Raises ImageDefect (empty, truncated, undecodable, unreadable, too-large) for a file
        that cannot be used.
        """
        limits = limits or self.limits
        prepare = self.spec["prepare"]
        jpeg, w, h = prepare_image(
            data, int(prepare["resize_shorter_side"]), int(prepare["jpeg_quality"]), limits=limits
        )
        # the model's resize takes the shorter side to min_side: bounded by the aspect-ratio limit
        # already; checked again on the numbers, as the resize is where a thin image would explode
        scale = self.min_side / min(w, h)
        if round(w * scale) * round(h * scale) > limits.max_pixels:
            raise ImageDefect(
                "too-large", f"{w}x{h} resized for the model would be over {limits.max_pixels} pixels"
            )
        return self.preprocess(decode_rgb(jpeg, min_side=self.min_side, limits=limits))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self.session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return logits, embedding


def centre_crop_input(
    rgb: np.ndarray, resize: int, crop: int, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """The evaluate stage's centre crop (data/transforms.py ``eval_transform``) without torch.

    Shorter side to ``resize`` (INTER_AREA; the other side rounded half to even, as albumentations'
    SmallestMaxSize does), a ``crop`` x ``crop`` centre crop (offsets floored), then
    ``(x / 255 - mean) / std`` in float32, as CHW.
    """
    h, w = rgb.shape[:2]
    scale = resize / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    h, w = rgb.shape[:2]
    if h < crop or w < crop:
        raise ValueError(f"a {w}x{h} image cannot be centre-cropped to {crop}x{crop}")
    top, left = (h - crop) // 2, (w - crop) // 2
    patch = rgb[top : top + crop, left : left + crop].astype(np.float32)
    patch = (patch - mean * np.float32(255.0)) * (np.float32(1.0) / (std * np.float32(255.0)))
    return np.ascontiguousarray(patch.transpose(2, 0, 1))


@dataclass
class TopK:
    skus: np.ndarray  # (B, k) int64 original SKU ids, best first
    scores: np.ndarray  # (B, k) float32 probabilities


class Scorer:
    """Top-k SKU ids from model outputs, by ``mode`` (classifier | knn | fused)."""

    def __init__(
        self,
        model: ExportedModel,
        mode: str,
        top_k: int,
        index: str | os.PathLike | None = None,
        gallery: Gallery | None = None,
    ):
        """``index``: an index folder to load; or ``gallery``, one already loaded (and checked against
        ``model``: the service keeps one per index version)."""
        if mode not in MODES:
            raise Products10kError(f"mode '{mode}' is not one of {', '.join(MODES)}")
        if mode != "classifier" and index is None and gallery is None:
            raise Products10kError(f"mode '{mode}' needs an index folder (--index models/<member>/index)")
        self.mode = mode
        if gallery is None and index is not None:
            gallery = load_gallery(index)
            check_same_model(model, gallery, Path(index))
        self.gallery = gallery
        self.skus = model.skus if gallery is None else gallery.skus  # the classifier's, then enrolled ones
        self.top_k = min(top_k, len(self.skus))

    def __call__(self, logits: np.ndarray, embedding: np.ndarray) -> TopK:
        n, num_classes = len(logits), len(self.skus)
        members, weights = [], []
        if self.mode in ("classifier", "fused"):
            padded = np.full((n, num_classes), -np.inf, dtype=np.float32)
            padded[:, : logits.shape[1]] = logits  # enrolled SKUs: probability 0 under the classifier
            members.append(SplitScores.from_logits(np.arange(n), np.full(n, -1), padded, num_classes))
            weights.append(1.0)
        if self.mode in ("knn", "fused"):
            meta = self.gallery.meta
            rule = {key: meta[key] for key in ("k", "temperature", "smoothing")}
            members.append(
                knn_scores(
                    self.gallery,
                    embedding,
                    np.arange(n),
                    np.full(n, -1),
                    kind=meta["vote"],
                    shots=meta.get("vote_shots", 5),  # indexes built before expected_best lack it
                    batch=max(n, 1),
                    progress=False,
                    **rule,
                )  # fmt: skip
            )
            weights.append(1.0)
        if self.mode == "fused":
            w = float(self.gallery.meta["fusion_weight"])
            weights = [1.0 - w, w]
            if logits.shape[1] < num_classes:  # enrolled SKUs: the classifier cannot say, see knn.py
                labels, probs = fuse_with_enrolled(logits, members[1], w, num_classes, self.top_k)
                return TopK(self.skus[labels], probs)
        top = combine_topk(members, weights, num_classes, self.top_k)
        return TopK(self.skus[top.labels], top.probs)


def check_same_model(model: ExportedModel, gallery: Gallery, index: Path) -> None:
    """An index is only meaningful with the model whose embeddings it holds."""
    ours, theirs = model.spec.get("checkpoint_sha256"), gallery.meta.get("checkpoint_sha256")
    if ours != theirs:
        raise Products10kError(
            f"{index} was built from another checkpoint than {model.folder} "
            f"({gallery.meta.get('member')}/{gallery.meta.get('phase')} vs "
            f"{model.spec.get('member')}/{model.spec.get('phase')}): set export.member/export.phase "
            "to the index's member and retrieval.phase, or use that member's index"
        )
    known = gallery.skus[: len(model.skus)]
    if not np.array_equal(known, model.skus):
        raise Products10kError(f"{index}: its label map does not start with {model.folder}'s SKUs")
