"""A seeded mutation fuzzer over valid JPEG, PNG, WebP and zip bytes through the one decoder and the
zip reader: only the project's defect types ever come out, and nothing decodes past the budget.

A few thousand cases here; benchmarks/ has no longer run of it yet (raise CASES locally to run more).
"""

import io
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from products10k.deploy.serve import RequestError, _zip_items
from products10k.prepared.images import ImageDefect, decode_rgb
from tests.helpers import limits
from tests.hostile import base_image

CASES = 600  # per seed format: 2,400 in all
BUDGET = 200_000
LIMITS = limits(max_pixels=BUDGET, max_file_bytes=1 << 20)


def _seeds() -> dict[str, bytes]:
    img = Image.fromarray(base_image(96, 64))
    out = {}
    for fmt, kw in (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 80})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.jpg", out["JPEG"])
        z.writestr("b.png", out["PNG"])
    out["ZIP"] = buf.getvalue()
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four of: flip a byte, write a 16-bit big or small number (a size field), cut the
    end, duplicate a slice, delete a slice, insert random bytes."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 5)):
        kind = rng.integers(0, 6)
        pos = int(rng.integers(0, max(1, len(data))))
        if kind == 0 and data:
            data[pos % len(data)] ^= int(rng.integers(1, 256))
        elif kind == 1 and len(data) > 2:
            value = int(rng.choice([0, 1, 0xFFFF, 0x7FFF, int(rng.integers(0, 0x10000))]))
            data[pos % (len(data) - 1) : pos % (len(data) - 1) + 2] = value.to_bytes(2, "big")
        elif kind == 2:
            del data[pos:]
        elif kind == 3:
            data[pos:pos] = data[pos : pos + int(rng.integers(1, 200))]
        elif kind == 4:
            del data[pos : pos + int(rng.integers(1, 50))]
        else:
            data[pos:pos] = rng.bytes(int(rng.integers(1, 20)))
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "ZIP"])
def test_mutated_files_raise_only_the_projects_defects_and_stay_in_budget(fmt):
    seed = _seeds()[fmt]
    rng = np.random.default_rng(["JPEG", "PNG", "WEBP", "ZIP"].index(fmt))
    outcomes: dict[str, int] = {}
    slowest = 0.0
    for _ in range(CASES):
        data = mutate(seed, rng)
        t0 = time.perf_counter()
        if fmt == "ZIP":
            try:
                items, _ = _zip_items("fuzz.zip", data, room=8, inflated_room=8 << 20, limits=LIMITS)
            except RequestError as exc:  # over the member count or inflated total: the request's 413
                assert exc.status == 413
                items = []
                outcomes["413"] = outcomes.get("413", 0) + 1
            for _, _, error in items:
                if error:  # a member refused before decoding, with its reason
                    key = error.split(":")[0]
                    outcomes[key] = outcomes.get(key, 0) + 1
            members = [d for _, d, err in items if d is not None]
        else:
            members = [data]
        for member in members:
            try:
                rgb = decode_rgb(member, limits=LIMITS)
                assert rgb.shape[0] * rgb.shape[1] <= BUDGET and rgb.ndim == 3 and rgb.shape[2] == 3
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except ImageDefect as exc:
                outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        slowest = max(slowest, time.perf_counter() - t0)
    assert slowest < 5.0  # generous: a case that hangs in a decoder would stop here, not in CI's limit
    assert len(outcomes) >= 2, outcomes  # the mutations reach both sides: decoded and refused
