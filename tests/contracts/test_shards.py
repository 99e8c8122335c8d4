import pickle

import cv2
import numpy as np
import pytest

from products10k.common import DataError
from products10k.contracts.shards import ImageStore, ShardWriter


def _jpeg(color, size=(40, 60)):
    img = np.zeros((*size, 3), np.uint8)
    img[:] = color
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def test_roundtrip_across_shards(tmp_path):
    blobs = [_jpeg((i * 40, 0, 255 - i * 40)) for i in range(5)]
    with ShardWriter(tmp_path, shard_mb=len(blobs[0]) * 2.5 / 2**20) as w:
        locs = [w.add(b) for b in blobs]
    assert len({s for s, _, _ in locs}) >= 2  # rolled over into several shards
    assert not list((tmp_path / "images").glob(".tmp-*"))
    store = pickle.loads(pickle.dumps(ImageStore(tmp_path)))  # as a DataLoader worker gets it
    for blob, (shard, off, n) in zip(blobs, locs, strict=True):
        img = store.read(shard, off, n)
        expect = cv2.cvtColor(
            cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        )
        assert img.shape == (40, 60, 3)
        np.testing.assert_array_equal(img, expect)


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(DataError, match="shard-00003.bin"):
        ImageStore(tmp_path).read("shard-00003.bin", 0, 10)


def test_failed_write_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_mb=1.0) as w:
            w.add(_jpeg((1, 2, 3)))
            raise RuntimeError("killed")
    assert list((tmp_path / "images").iterdir()) == []
