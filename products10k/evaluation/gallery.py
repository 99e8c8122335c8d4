"""A PNG gallery of the worst test errors, drawn with OpenCV.

Each row shows a misclassified test image, a training image of the SKU it was predicted as and a
training image of its true SKU, so one look tells a near-duplicate SKU (same group, tiny detail)
from a label or image problem. "Worst" = the most confident mistakes (highest softmax probability
of the wrong class): those are what a better model or a cleaner label would fix first.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from products10k.contracts.shards import ImageStore
from products10k.scores import SplitScores

HEADER = 36
CAPTION = 34
PAD = 6


def worst_errors(scores: SplitScores, count: int) -> pd.DataFrame:
    """Rows (index, pred, prob) of the ``count`` most confident wrong predictions, worst first.

    The confidence is the exact softmax probability of the top label, from the predictions
    file's top-k and log-sum-exp: no (N, K) array is needed.
    """
    pred = scores.topk_labels[:, 0].astype(np.int64)
    conf = np.exp(scores.topk_logits[:, 0].astype(np.float64) - scores.logsumexp)
    wrong = np.flatnonzero(pred != np.asarray(scores.labels))
    order = wrong[np.argsort(-conf[wrong], kind="stable")][:count]
    return pd.DataFrame({"index": order, "pred": pred[order], "prob": conf[order]})


def _tile(image: np.ndarray | None, size: int) -> np.ndarray:
    """Letterbox an RGB image into a ``size`` x ``size`` grey tile (grey with an X when missing)."""
    tile = np.full((size, size, 3), 64, dtype=np.uint8)
    if image is None:
        cv2.line(tile, (0, 0), (size - 1, size - 1), (128, 128, 128), 1)
        cv2.line(tile, (0, size - 1), (size - 1, 0), (128, 128, 128), 1)
        return tile
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = (size - nh) // 2, (size - nw) // 2
    tile[top : top + nh, left : left + nw] = small
    return tile


def _text(canvas: np.ndarray, text: str, x: int, y: int, color=(235, 235, 235), scale: float = 0.4) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)


def draw_gallery(
    errors: pd.DataFrame,
    test_rows: pd.DataFrame,
    exemplars: pd.DataFrame,
    label_skus: np.ndarray,
    store: ImageStore,
    tile: int,
    title: str = "",
) -> np.ndarray:
    """The gallery as an RGB uint8 image.

    ``errors``: from ``worst_errors``; ``test_rows``: the test CSV rows (``name``, ``label``,
    ``sku``, ``shard``/``offset``/``length``); ``exemplars``: one training row per label, indexed
    by label.
    """
    cols = ["test image", "predicted SKU (train)", "true SKU (train)"]
    width = PAD + len(cols) * (tile + PAD)
    rows = max(1, len(errors))
    height = HEADER + rows * (tile + CAPTION + PAD) + PAD
    canvas = np.full((height, width, 3), 24, dtype=np.uint8)
    _text(canvas, title, PAD, 12, scale=0.4)
    for c, name in enumerate(cols):
        _text(canvas, name, PAD + c * (tile + PAD), HEADER - 6, color=(170, 200, 255))
    if errors.empty:
        _text(canvas, "no errors", PAD, HEADER + tile // 2)
        return canvas

    def exemplar(label: int) -> np.ndarray | None:
        if label < 0 or label not in exemplars.index:
            return None
        return store.read_row(exemplars.loc[label])

    for r, err in enumerate(errors.itertuples(index=False)):
        row = test_rows.iloc[int(err.index)]
        true_label, pred_label = int(row["label"]), int(err.pred)
        images = [store.read_row(row), exemplar(pred_label), exemplar(true_label)]
        captions = [
            (f"{row['name']}", f"p={err.prob:.2f}"),
            (f"SKU {int(label_skus[pred_label])}", "predicted"),
            (f"SKU {int(row['sku'])}", "true" if true_label >= 0 else "true (not in train)"),
        ]
        y = HEADER + r * (tile + CAPTION + PAD)
        for c, (image, (line1, line2)) in enumerate(zip(images, captions, strict=True)):
            x = PAD + c * (tile + PAD)
            canvas[y : y + tile, x : x + tile] = _tile(image, tile)
            colour = (255, 140, 140) if c == 1 else (235, 235, 235)
            _text(canvas, line1[:24], x, y + tile + 13, color=colour)
            _text(canvas, line2[:24], x, y + tile + 27, color=colour)
    return canvas


def encode_png(image_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode the gallery as PNG")
    return buf.tobytes()
