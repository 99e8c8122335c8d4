"""Index versions on disk (products10k/deploy/versions.py): segments, compaction, followers, a full disk.

In process, on the deploy fixture's export and index: what a restart or a follower reads back is what
the writer served, an enrolment writes only what it adds, and a failed write leaves nothing behind.
"""

import errno
import json

import numpy as np
import pytest

from products10k.deploy import enrol as enrol_tool
from products10k.deploy.runtime import ExportedModel
from products10k.deploy.versions import DiskFull, VersionStore, list_versions
from products10k.knn import Prototypes, search, stored_vectors


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def answers(version, queries: np.ndarray, k: int = 5):
    sims, ids = search(version.gallery.index, queries, k, batch=64, progress=False)
    return np.round(sims, 5), version.gallery.labels[ids], version.gallery.skus


@pytest.fixture
def store_parts(project, tmp_path):
    root = project[0]
    model = ExportedModel(root / "models" / "export")
    return model, root / "models" / "m0" / "index", tmp_path / "versions"


def test_segments_compaction_restart_and_a_follower_read_what_the_writer_served(store_parts):
    model, index, versions = store_parts
    writer = VersionStore(model, index, versions, keep=2, compact_every=3)
    follower = VersionStore(model, index, versions, follow=True)
    dim = writer.current.gallery.index.d
    queries = unit(20, dim, 99)
    served = {}
    writer.current.gallery.prototypes()  # the centroid rule's: then each version adds its delta's
    for i in range(7):  # v1, v2 segments, v3 whole, v4, v5 segments, v6 whole, v7 a segment
        version = writer.enrol(
            unit(5, dim, i), 930000 + i % 3, [f"{i}-{j}.jpg" for j in range(5)], b"\xff\xd8"
        )
        writer.publish(version)
        served[version.number] = answers(version, queries)
        gallery = version.gallery  # the prototypes carried along equal those read from every vector
        read = np.concatenate([block for _, block in stored_vectors(gallery.index, block=7)])
        whole = Prototypes.of(read, gallery.labels, gallery.num_classes)
        np.testing.assert_allclose(gallery.cached_prototypes.sums, whole.sums, atol=1e-4)
        assert np.array_equal(gallery.cached_prototypes.counts, whole.counts)
        seen = follower.newer()  # the follower reads only the segments it lacks, on the same base
        follower.current = seen
        assert seen.number == version.number and seen.gallery.index.ntotal == version.gallery.index.ntotal
        for a, b in zip(answers(seen, queries), served[version.number], strict=True):
            np.testing.assert_array_equal(a, b)
    assert [n for n, _ in list_versions(versions)] == [6, 7]  # the newest 2 need only v6 (whole) and v7
    assert (versions / "v0006" / "index.faiss").is_file() and (versions / "v0007" / "delta.json").is_file()
    segment = sum(p.stat().st_size for p in (versions / "v0007").rglob("*") if p.is_file())
    assert segment < 20_000  # 5 vectors, their names, the record: not a copy of the index
    assert follower.newer() is None

    writer._lock.close()  # a restart: the newest version read from disk serves what was served
    again = VersionStore(model, index, versions)
    assert again.current.number == 7
    for a, b in zip(answers(again.current, queries), served[7], strict=True):
        np.testing.assert_array_equal(a, b)
    assert list(again.current.gallery.skus[-3:]) == [930000, 930001, 930002]
    assert len(again.current.gallery.meta["enrolled"]) == 7


def test_a_full_disk_while_a_segment_is_written_leaves_nothing_and_keeps_the_version(
    store_parts, monkeypatch
):
    model, index, versions = store_parts
    store = VersionStore(model, index, versions)
    dim = store.current.gallery.index.d

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("products10k.deploy.versions.os.fsync", full)
    with pytest.raises(DiskFull, match="No space left on device"):
        store.enrol(unit(2, dim, 0), 940000, ["a.jpg", "b.jpg"], b"\xff\xd8")
    assert sorted(p.name for p in versions.iterdir()) == [".lock"]  # no staging folder left
    assert store.current.number == 0
    monkeypatch.undo()
    store.publish(store.enrol(unit(2, dim, 0), 940000, ["a.jpg", "b.jpg"], b"\xff\xd8"))
    assert store.current.number == 1 and 940000 in store.current.gallery.skus


def test_products10k_enrol_on_a_full_disk_says_so_and_leaves_out_as_it_was(
    project, tmp_path, monkeypatch, caplog
):
    from tests.deploy.test_deploy import prepared_image

    root, prepared, _ = project
    images = tmp_path / "new" / "950000"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(prepared_image(prepared, "test.csv", 0))
    out = tmp_path / "out"
    args = [str(images.parent), "--model", str(root / "models" / "export"),
            "--index", str(root / "models" / "m0" / "index"), "--out", str(out)]  # fmt: skip
    enrol_tool.main(args)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("products10k.knn.np.savez", full)
    with pytest.raises(SystemExit):
        enrol_tool.main(args)
    assert "could not be written (No space left on device); --out is as it was" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no staging folder left
    assert json.loads((out / "meta.json").read_text())["enrolled"][0]["images"] == 1
