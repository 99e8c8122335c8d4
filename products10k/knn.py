"""The gallery index (Faiss), kNN classification, and its fusion with the classifier.

**Index.** ``faiss.IndexFlatIP``: exact inner product, which on unit vectors is the cosine. At the
real size (142k training images x 1,280-1,536 dims) a flat index is 0.7-0.9 GB and one query
batch of 4,096 costs ~0.6 GFLOP per gallery thousand, seconds on a CPU for the whole test set:
an approximate index (IVF, HNSW) would trade recall for a speed the job does not need, and would
need training and tuning. The index holds only vectors; labels, names and the label -> SKU map
live beside it (``gallery.npz``), so SKUs can be enrolled by appending to both.

**Vote.** The k nearest gallery images name a SKU by one of the rules of ``retrieval.vote``
(products10k/votes.py: ``softmax``, ``count``, ``best``, ``centroid``, ``expected_best``); the
kNN probabilities are a predictions block (``SplitScores``).

**Fusion.** ``(1 - w) x classifier softmax + w x kNN probability``: the two are combined like two
ensemble members, ``w`` maximising the val log-likelihood (``ensemble.fit_fusion_weight``, on
the pipeline side: a concave fit, SLSQP), so the result is a predictions file the submit stage
reads as it reads the classifier's.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from products10k import common
from products10k.common import DataError, Products10kError
from products10k.scores import SplitScores, combine_topk
from products10k.votes import VOTES, Members, expected_best, vote

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
GALLERY_FILE = "gallery.npz"
META_FILE = "meta.json"
THUMBS_DIR = "thumbs"  # <sku>.jpg: one small photo per SKU (products10k-serve's page)


@dataclass(frozen=True)
class Prototypes:
    """Each label's gallery vectors summed, and how many there are: the ``centroid`` rule's SKU
    prototypes (the normalised sums) kept as sums, so that enrolling a few images updates them."""

    sums: np.ndarray  # (K, D) float32
    counts: np.ndarray  # (K,) int64

    @classmethod
    def of(cls, vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> Prototypes:
        empty = cls(np.zeros((num_classes, vectors.shape[1]), np.float32), np.zeros(num_classes, np.int64))
        return empty.plus(vectors, labels, num_classes)

    def plus(self, vectors: np.ndarray, labels: np.ndarray, num_classes: int) -> Prototypes:
        """These prototypes with ``vectors`` of ``labels`` added (new labels up to ``num_classes``)."""
        sums = np.zeros((num_classes, self.sums.shape[1]), np.float32)
        counts = np.zeros(num_classes, np.int64)
        sums[: len(self.sums)], counts[: len(self.counts)] = self.sums, self.counts
        labels = np.asarray(labels, np.int64)
        if len(labels):  # rows grouped by label and summed per group (np.add.at is ~50x slower)
            order = np.argsort(labels, kind="stable")
            grouped = labels[order]
            starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
            sums[grouped[starts]] += np.add.reduceat(np.asarray(vectors, np.float32)[order], starts, axis=0)
            counts += np.bincount(labels, minlength=num_classes)
        return Prototypes(sums, counts)

    def gallery(self, skus: np.ndarray) -> Gallery:
        """A gallery of one unit vector per label that has images (its ``labels`` are those labels)."""
        present = np.flatnonzero(self.counts > 0)
        means = self.sums[present]
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return build_gallery(means, present, present.astype(str), skus, {})


@dataclass
class Gallery:
    """An index and what its rows are: ``labels[i]`` of vector ``i``, ``skus[label]`` its SKU id."""

    index: faiss.Index
    labels: np.ndarray  # (N,) int64 label of each gallery vector
    names: np.ndarray  # (N,) str image name of each gallery vector
    skus: np.ndarray  # (K,) int64 label -> SKU id; enrolled SKUs are appended
    meta: dict
    # the centroid rule's prototypes and their gallery, computed at first use and kept up to date
    # by enrol(); a composed version (deploy/versions.py) starts from its base's
    _prototypes: Prototypes | None = field(default=None, repr=False, compare=False)
    _centroids: Gallery | None = field(default=None, repr=False, compare=False)
    _members: Members | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.skus)

    def prototypes(self) -> Prototypes:
        """Each label's summed gallery vectors (read from the index once, in blocks)."""
        if self._prototypes is None or len(self._prototypes.counts) != self.num_classes:
            protos = Prototypes.of(np.zeros((0, self.index.d), np.float32), [], self.num_classes)
            for start, block in stored_vectors(self.index):
                protos = protos.plus(block, self.labels[start : start + len(block)], self.num_classes)
            self._prototypes = protos
        return self._prototypes

    def centroids(self) -> Gallery:
        """The gallery of SKU prototypes the ``centroid`` rule searches."""
        if self._centroids is None or self._centroids.num_classes != self.num_classes:
            self._centroids = self.prototypes().gallery(self.skus)
        return self._centroids

    def members(self) -> Members:
        """Each label's gallery ids, grouped (the ``expected_best`` rule's lookup), kept while the
        gallery holds the same number of vectors (enrolment appends)."""
        if self._members is None or len(self._members.ids) != len(self.labels):
            self._members = Members(self.labels, self.num_classes)
        return self._members

    @property
    def cached_prototypes(self) -> Prototypes | None:
        """The prototypes if they were computed (:meth:`prototypes`), else None."""
        return self._prototypes

    def with_prototypes(self, protos: Prototypes | None) -> Gallery:
        """This gallery, its prototypes given (None: computed at first use)."""
        self._prototypes, self._centroids = protos, None
        return self


def stored_vectors(index: faiss.Index, block: int = 65536):
    """(first id, (n, D) float32 vectors) blocks of every vector a flat index, or a
    ``faiss.IndexShards`` of flat ones with successive ids, holds, in id order."""
    if isinstance(index, faiss.IndexShards):
        offset = 0
        for i in range(index.count()):
            shard = faiss.downcast_index(index.at(i))
            for start, vectors in stored_vectors(shard, block):
                yield offset + start, vectors
            offset += shard.ntotal
        return
    for start in range(0, index.ntotal, block):
        yield start, index.reconstruct_n(start, min(block, index.ntotal - start))


def build_gallery(vectors: np.ndarray, labels, names, skus, meta: dict) -> Gallery:
    """An exact inner-product index over unit ``vectors`` (N, D) float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return Gallery(
        index,
        np.asarray(labels, dtype=np.int64),
        np.asarray(names).astype(str),
        np.asarray(skus, dtype=np.int64),
        dict(meta),
    )


def save_gallery(
    gallery: Gallery,
    folder: str | Path,
    thumbs: dict[int, bytes] | None = None,
    thumbs_from: str | Path | None = None,
) -> None:
    """Write index, labels and meta into ``folder`` (staged, then swapped in whole).

    ``thumbs``: a small JPEG per SKU id, written to ``thumbs/<sku>.jpg`` (what products10k-serve's
    page shows beside a SKU); ``thumbs_from``: an index folder whose thumbnails are carried over
    (hard-linked where the file system allows) unless ``thumbs`` replaces them.
    """
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".tmp")
    if staging.exists():  # left by a killed run
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _write_index(gallery.index, staging / INDEX_FILE)
        with open(staging / GALLERY_FILE, "wb") as f:
            np.savez(f, labels=gallery.labels, names=gallery.names, skus=gallery.skus)
        (staging / META_FILE).write_text(json.dumps(gallery.meta, indent=2, sort_keys=True) + "\n")
        carried = Path(thumbs_from) / THUMBS_DIR if thumbs_from else None
        _write_thumbs(staging / THUMBS_DIR, thumbs or {}, carried)
    except Exception:  # a full disk above all: the partial copy goes at once, not at the next write
        shutil.rmtree(staging, ignore_errors=True)
        raise
    common.swap_in(staging, folder)


def _write_index(index: faiss.Index, path: Path) -> None:
    """``faiss.write_index`` with its write errors as the OSError they are: Faiss reports a full disk
    as a RuntimeError whose message ends in the system's words ("... (No space left on device)")."""
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:
        text = str(exc)
        full = "No space left on device" in text or "Disk quota exceeded" in text
        raise OSError(errno.ENOSPC if full else errno.EIO, text.strip().splitlines()[-1], str(path)) from None


def thumbnail_jpeg(data: bytes, limits, side: int = 96) -> bytes:
    """A SKU's thumbnail from any image file's bytes (decoded within ``limits``, an ImageLimits):
    shorter side ``side``, JPEG quality 85."""
    from products10k.imaging.images import prepare_image

    return prepare_image(data, side, 85, limits=limits)[0]


def _write_thumbs(out: Path, thumbs: dict[int, bytes], carried: Path | None) -> None:
    if not thumbs and not (carried and carried.is_dir()):
        return
    out.mkdir()
    if carried is not None and carried.is_dir():
        for path in carried.iterdir():
            try:
                os.link(path, out / path.name)
            except OSError:  # another file system: a copy
                shutil.copy2(path, out / path.name)
    for sku, data in thumbs.items():
        (out / f"{int(sku)}.jpg").unlink(missing_ok=True)  # never write through a hard link
        (out / f"{int(sku)}.jpg").write_bytes(data)


def load_gallery(folder: str | Path) -> Gallery:
    """Read an index folder written by :func:`save_gallery`; a missing part is a clear error."""
    folder = Path(folder)
    for name in (INDEX_FILE, GALLERY_FILE, META_FILE):
        if not (folder / name).is_file():
            raise Products10kError(f"{folder}: not an index folder ({name} is missing; run the index stage)")
    try:
        index = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError as exc:  # faiss reports a corrupt or cut-off file this way
        raise DataError(
            f"{folder / INDEX_FILE}: Faiss cannot read it ({str(exc).strip().splitlines()[0]})"
        ) from None
    try:
        with np.load(folder / GALLERY_FILE, allow_pickle=False) as data:
            labels, names, skus = data["labels"], data["names"], data["skus"]
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, EOFError) as exc:  # zip/npz, JSON and UTF-8 errors
        raise DataError(
            f"{folder}: {GALLERY_FILE} or {META_FILE} cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    if index.ntotal != len(labels):
        raise DataError(
            f"{folder}: the index holds {index.ntotal} vectors but {GALLERY_FILE} {len(labels)} labels"
        )
    return Gallery(index, labels, names, skus, meta)


def enrol(gallery: Gallery, vectors: np.ndarray, skus, names) -> dict:
    """Append ``vectors`` of SKU ids ``skus`` to ``gallery`` in place; return what was added.

    A SKU id the gallery knows keeps its label (more reference images for it); an unknown one gets
    the next free label, appended to ``gallery.skus``, so labels of the classifier's SKUs never move.
    """
    skus = np.asarray(skus, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) != len(skus) or len(skus) != len(names):
        raise ValueError(f"{len(vectors)} vectors, {len(skus)} SKU ids, {len(names)} names")
    if vectors.shape[1] != gallery.index.d:
        raise DataError(f"embeddings have {vectors.shape[1]} dims, the index {gallery.index.d}")
    label_of = {int(s): i for i, s in enumerate(gallery.skus)}
    new = [int(s) for s in dict.fromkeys(skus.tolist()) if int(s) not in label_of]
    for sku in new:
        label_of[sku] = len(label_of)
    gallery.skus = np.concatenate([gallery.skus, np.asarray(new, dtype=np.int64)])
    gallery.index.add(vectors)
    added = np.array([label_of[int(s)] for s in skus], np.int64)
    gallery.labels = np.concatenate([gallery.labels, added])
    gallery.names = np.concatenate([gallery.names, np.asarray(names).astype(str)])
    if gallery.cached_prototypes is not None:  # kept current rather than read back from the index
        gallery.with_prototypes(gallery.cached_prototypes.plus(vectors, added, gallery.num_classes))
    return {"images": int(len(skus)), "skus": int(len(set(skus.tolist()))), "new_skus": len(new)}


def search(index: faiss.Index, queries: np.ndarray, k: int, batch: int, desc: str = "search", progress=True):
    """The ``k`` most similar gallery vectors of each query: (similarities, ids), (N, k) each.

    In blocks of ``batch`` queries: Faiss itself tiles the distance computation, the blocks give a
    progress bar and bound the result arrays being built.
    """
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    blocks = range(0, len(queries), batch)
    for start in tqdm(blocks, desc=desc, unit="block", leave=False, mininterval=1.0, disable=not progress):
        stop = min(start + batch, len(queries))
        sims[start:stop], ids[start:stop] = index.search(queries[start:stop], k)
    return sims, ids


def knn_scores(
    gallery: Gallery,
    queries: np.ndarray,
    names,
    labels,
    *,
    k,
    kind,
    temperature,
    smoothing,
    batch,
    shots: int = 5,
    progress: bool = True,
) -> SplitScores:
    """Search the gallery and vote: the kNN :class:`SplitScores` of ``queries`` (``centroid``: the
    SKU prototypes are searched, each scored by its cosine as ``best`` scores an image;
    ``expected_best``: each SKU among the neighbours by the expected best of ``shots`` photos)."""
    if kind not in VOTES:
        raise ValueError(f"unknown vote '{kind}' ({' | '.join(VOTES)})")
    searched = gallery.centroids() if kind == "centroid" else gallery
    sims, ids = search(searched.index, queries, k, batch, progress=progress)
    rule = dict(kind=kind, temperature=temperature, smoothing=smoothing, shots=shots)
    return voted(gallery, searched, queries, sims, ids, names=names, labels=labels, **rule)


def knn_search(
    gallery: Gallery, queries: np.ndarray, names, labels, *, k, kind, temperature, smoothing, batch, shots=5
) -> tuple[SplitScores, np.ndarray]:
    """:func:`knn_scores` and each query's cosine similarity to its nearest gallery image, (N,)."""
    rule = dict(kind=kind, temperature=temperature, smoothing=smoothing, shots=shots)
    if kind == "centroid":  # the prototypes vote; the nearest image is one more (k = 1) search
        sims, _ = search(gallery.index, queries, 1, batch, desc="nearest")
        scores = knn_scores(gallery, queries, names, labels, k=k, batch=batch, **rule)
    else:
        sims, ids = search(gallery.index, queries, k, batch)
        scores = voted(gallery, gallery, queries, sims, ids, names=names, labels=labels, **rule)
    return scores, sims[:, 0] if sims.shape[1] else np.zeros(len(queries), np.float32)


def voted(gallery, searched, queries, sims, ids, *, kind, temperature, smoothing, shots, names, labels,
          hidden=None) -> SplitScores:  # fmt: skip
    """The rule ``kind`` over what a search of ``searched`` (the gallery, or its prototypes) found, as
    labels of ``gallery`` (``hidden``: gallery ids the search left out, which no rule may read)."""
    rule = dict(temperature=temperature, smoothing=smoothing, names=names, labels=labels)
    found = searched.labels[ids]
    if kind == "expected_best":
        members = (
            gallery.members() if hidden is None else Members(gallery.labels, gallery.num_classes, hidden)
        )
        return expected_best(gallery.index, members, queries, found, gallery.num_classes, shots=shots, **rule)
    return vote(sims, found, gallery.num_classes, kind="best" if kind == "centroid" else kind, **rule)


def fuse(
    classifier: SplitScores, knn: SplitScores, weight: float, num_classes: int, top_k: int
) -> SplitScores:
    """``(1 - weight) x classifier + weight x kNN`` as a predictions block (log-probabilities)."""
    if not np.array_equal(classifier.names, knn.names):
        raise DataError("classifier and kNN scores are of different rows (names differ)")
    fused = combine_topk([classifier, knn], [1.0 - weight, weight], num_classes, top_k)
    with np.errstate(divide="ignore"):
        logits = np.log(fused.probs.astype(np.float64)).astype(np.float32)
    return SplitScores(
        names=classifier.names,
        labels=classifier.labels,
        topk_labels=fused.labels.astype(np.int32),
        topk_logits=logits,
        logsumexp=np.zeros(len(logits), dtype=np.float32),
        label_logprob=fused.label_logprob.astype(np.float32),
        prob_error=fused.error_bound.astype(np.float32),  # estimates: an ensemble of this carries it on
    )


def fuse_with_enrolled(
    logits: np.ndarray, knn: SplitScores, weight: float, num_classes: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fusion when the index names SKUs the classifier was never trained on (enrolled ones): the
    classifier's score of such a SKU is unknown, not 0. (top-k labels, probabilities), (n, top_k) each.

    ``logits``: the classifier's (n, K0) over the SKUs it knows (labels 0..K0-1); ``knn``: the kNN's
    probabilities over all ``num_classes`` labels. The kNN alone decides how much goes to the enrolled
    SKUs (its mass m on them), and the usual fusion shares the rest among the trained ones:

        p(enrolled s) = p_knn(s);   p(trained s) = (1 - w)(1 - m) p_cls(s) + w p_knn(s)

    which sums to 1 and is the plain fusion when m = 0. A zero classifier score instead would cap an
    enrolled SKU at w x its kNN probability: the classifier, sure of a look-alike, outvoted it.
    """
    known = logits.shape[1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    p_cls = np.exp(shifted)
    p_cls /= p_cls.sum(axis=1, keepdims=True)
    rows = np.arange(len(logits))[:, None]
    # the kNN's dense probabilities: its kept labels, and the left-out mass shared equally elsewhere
    kept = np.exp(knn.topk_logits.astype(np.float64) - knn.logsumexp[:, None])
    rest = np.clip(1.0 - kept.sum(axis=1), 0.0, None) / max(num_classes - kept.shape[1], 1)
    p_knn = np.repeat(rest[:, None], num_classes, axis=1)
    p_knn[rows, knn.topk_labels] = kept
    enrolled_mass = p_knn[:, known:].sum(axis=1, keepdims=True)
    fused = p_knn.copy()
    fused[:, :known] = (1.0 - weight) * (1.0 - enrolled_mass) * p_cls + weight * p_knn[:, :known]
    top_k = min(top_k, num_classes)
    top = np.argpartition(-fused, top_k - 1, axis=1)[:, :top_k]
    order = np.argsort(-fused[rows, top], axis=1, kind="stable")
    labels = top[rows, order]
    return labels, fused[rows, labels].astype(np.float32)
