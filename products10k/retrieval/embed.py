"""Embeddings of prepared images: one centre crop at the checkpoint's resolution, the model's
L2-normalised pooled feature (``Products10kNet.embedding``).

One view, not the TTA set: the gallery holds 142k training images on the real data, and a
single crop is what the index stage can afford per image and what ``products10k-predict``
computes per query, so that gallery and query vectors come from the same preprocessing.
The output is preallocated (N, D) float32 and filled batch by batch: 142k x 1,536
(EfficientNet-B3) is 873 MB, the largest array of the stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from products10k.common import DataError
from products10k.data.datasets import PreparedImageDataset
from products10k.data.transforms import embedding_transform
from products10k.dist.devices import host_transfer, to_inference, to_model_input


@torch.inference_mode()
def embed_rows(
    model: torch.nn.Module,
    meta: dict,
    df: pd.DataFrame,
    images_root: str | Path,
    *,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp: torch.dtype | None = None,
    desc: str = "embed",
    on_logits: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(N, D) float32 unit vectors of the rows of a prepared CSV, in row order.

    ``on_logits(start, logits)``: also hand over the classifier's (B, K) float32 logits of rows
    ``start:start+B`` from the same forward pass, one centre crop: what ``products10k-predict``
    computes (the index stage fits the deploy fusion weight on them). Streamed, never (N, K).
    """
    if len(df) == 0:
        raise DataError(f"{desc}: no rows to embed (the split is empty)")
    device = torch.device(device)
    flags = host_transfer(device)
    transform, resize = embedding_transform(meta)
    # a reduced JPEG decode down to the resize at most: the crop is then a downscale, as in evaluate
    dataset = PreparedImageDataset(df, images_root, transform, min_side=resize)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=flags["pin_memory"]
    )
    model = to_inference(model, device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    out: np.ndarray | None = None
    start = 0
    for images, _labels, _index, _weight in tqdm(
        loader, desc=desc, unit="batch", leave=False, mininterval=1.0, disable=not progress
    ):
        with autocast:
            features = model.features(to_model_input(images, device, flags))
        vectors = F.normalize(features.float(), dim=1).cpu().numpy()  # = model.embedding
        if on_logits is not None:
            on_logits(start, model.classify(features).float().cpu().numpy())
        if out is None:
            out = np.empty((len(dataset), vectors.shape[1]), dtype=np.float32)
        out[start : start + len(vectors)] = vectors
        start += len(vectors)
    return out
