"""A corpus of hostile and odd image files, and of hostile zip archives, built here from real encoders.

Every reader of user input (prepare, products10k-predict, products10k-enrol) is run over it: each file
is either read or reported with its reason, never a traceback, and the rest of the run completes.

``corpus(base)`` returns ``{name: Case}``: the bytes of one file and what a reader must make of it,
``OK`` (decoded, upright RGB), a reason (``empty``, ``truncated``, ``undecodable``, ``unreadable``,
``too-large``) or
``ANY`` for damage whose outcome is the decoder's call (a flipped byte may still decode); readers are run
with ``BUDGET`` pixels, so the "genuinely huge" files here stay cheap to build. ``hostile_zip`` writes an
archive whose members a zip reader cannot read (encrypted, an unsupported compression method) beside a
traversal entry, a symlink entry, a nested zip and a name that is not UTF-8.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

OK, ANY = "ok", "any"
#: the pixel budget the corpus is run with (readers' max_pixels): 1 MP
BUDGET = 1_000_000
#: what the readers are told about EXIF orientation k: Pillow's transpose of the stored pixels
ORIENTATIONS = range(1, 9)


@dataclass(frozen=True)
class Case:
    data: bytes
    expect: str  # OK, ANY or the reason a reader must report
    # for OK cases of known content: the upright RGB image a decode must be close to (None: not checked)
    upright: np.ndarray | None = None


def base_image(w: int = 120, h: int = 90) -> np.ndarray:
    """An asymmetric RGB picture: a gradient with a dark corner, so every flip and turn tells apart."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    img[: h // 3, : w // 4] = 10
    return img


def _save(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _encode(ext: str, rgb: np.ndarray) -> bytes:
    return cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int = 20000) -> bytes:
    """A valid greyscale PNG of ``side`` x ``side`` zero pixels: ~400 KB that would decode to side^2 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int, progressive: bool = False) -> bytes:
    """A small valid JPEG whose frame header (SOF0, or SOF2) is rewritten to claim ``width`` x ``height``."""
    data = bytearray(_save(base_image(64, 48), "JPEG", quality=80, progressive=progressive))
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    """A small valid TIFF whose first IFD's ImageWidth/ImageLength are rewritten to claim more."""
    data = bytearray(_save(base_image(64, 48), "TIFF"))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, at)
        if tag in (256, 257):
            value = width if tag == 256 else height
            data[at + 8 : at + 12] = (
                struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
            )
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header claims ``width`` x ``height`` (at most 16384 each)."""
    data = bytearray(_save(base_image(64, 48), "WEBP", lossless=True))
    (bits,) = struct.unpack_from("<I", data, 21)
    bits = (bits & ~0xFFFFFFF) | (width - 1) | ((height - 1) << 14)
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


def png_chunk_claiming(length: int) -> bytes:
    """A small valid PNG whose IDAT chunk's length field claims ``length`` bytes."""
    data = bytearray(_save(base_image(96, 64), "PNG"))
    at = data.index(b"IDAT") - 4
    struct.pack_into(">I", data, at, length)
    return bytes(data)


def thin_png(width: int = 1, height: int = 20000) -> bytes:
    """A valid greyscale PNG strip: ~140 bytes that a resize to a shorter side would blow up."""
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw, 9))
        + _png_chunk(b"IEND", b"")
    )


def _gif_zeros(pixels: int, min_size: int = 2) -> bytes:
    """GIF LZW data for ``pixels`` zero pixels, as data sub-blocks: one code per run of zeros, each run
    one longer than the last (a 12000 x 12000 frame is ~100 KB; its decode, 144 MB of pixels)."""
    clear, end = 1 << min_size, (1 << min_size) + 1
    codes = [(clear, min_size + 1)]  # (code, width in bits)
    next_code, run, left, table = end + 1, 1, pixels, {}  # table: run length -> code (0 is a run of 1)
    while left:
        length = min(run, left)
        # the decoder adds its entries one code behind the encoder: it reads this code at the width
        # of the last code it has, next_code - 1 (and the end code, below, after adding one more)
        codes.append((table.get(length, 0), min(12, (next_code - 1).bit_length())))
        left -= length
        if not left:
            break
        if next_code == 4096:  # a full table: start over
            codes.append((clear, 12))
            next_code, run, table = end + 1, 1, {}
            continue
        table[length + 1] = next_code
        next_code, run = next_code + 1, length + 1
    codes.append((end, min(12, next_code.bit_length())))
    out, acc, bits = bytearray(), 0, 0
    for code, width in codes:  # packed least significant bit first
        acc |= code << bits
        bits += width
        while bits >= 8:
            out.append(acc & 0xFF)
            acc, bits = acc >> 8, bits - 8
    if bits:
        out.append(acc)
    blocks = b"".join(bytes([len(out[i : i + 255])]) + out[i : i + 255] for i in range(0, len(out), 255))
    return bytes([min_size]) + blocks + b"\x00"


def gif_frames(screen: tuple[int, int], frames: list[tuple[int, int, int, int]], junk: bytes = b"") -> bytes:
    """A valid GIF89a of a ``screen`` (width, height) logical screen and one black frame per (left, top,
    width, height), each behind a graphic control extension and ``junk`` (bytes Pillow skips)."""
    palette = bytes([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255])
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x81, 0, 0) + palette  # 4-colour global table
    for left, top, width, height in frames:
        out += b"\x21\xf9\x04\x00\x0a\x00\x00\x00" + junk  # graphic control: 0.1 s per frame
        out += b"\x2c" + struct.pack("<HHHHB", left, top, width, height, 0) + _gif_zeros(width * height)
    return out + b"\x3b"


def gif_frame_beyond_screen(screen: int = 64, frame: int = 12000) -> bytes:
    """A GIF of a ``screen`` square logical screen whose one frame is ``frame`` square: ~100 KB that Pillow
    grew to the frame and decoded whole (1.6 GB) before the header reader judged every frame."""
    return gif_frames((screen, screen), [(0, 0, frame, frame)])


def animation(fmt: str, w: int = 96, h: int = 64, **kw) -> bytes:
    """A three-frame animation by Pillow: the base picture, a changed block (written as a smaller frame
    at an offset where the encoder crops to the change), the picture mirrored."""
    base = base_image(w, h)
    changed = base.copy()
    changed[h // 4 : h // 2, w // 3 : w // 2] = (250, 250, 0)
    frames = [Image.fromarray(img) for img in (base, changed, np.ascontiguousarray(base[:, ::-1]))]
    if fmt == "GIF":
        frames = [im.convert("P", palette=Image.ADAPTIVE) for im in frames]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, **kw)
    return buf.getvalue()


def apng_frame_beyond(x: int, y: int, width: int, height: int) -> bytes:
    """A Pillow APNG (96 x 64) whose second fcTL is rewritten to a ``width`` x ``height`` frame at
    (``x``, ``y``), its CRC kept valid."""
    data = bytearray(animation("PNG"))
    at = data.index(b"fcTL", data.index(b"fcTL") + 4) - 4  # the second frame's control chunk
    struct.pack_into(">IIII", data, at + 12, width, height, x, y)
    struct.pack_into(">I", data, at + 34, zlib.crc32(data[at + 4 : at + 34]))
    return bytes(data)


def webp_frame_beyond(x: int, y: int) -> bytes:
    """A Pillow animated WebP (96 x 64 canvas) whose last ANMF frame (the whole picture, mirrored) is
    moved to (``x``, ``y``): the offsets are stored halved, in 24 bits (so even, up to 2^25)."""
    data = bytearray(animation("WEBP", lossless=True))
    at = data.rindex(b"ANMF")
    data[at + 8 : at + 14] = (x // 2).to_bytes(3, "little") + (y // 2).to_bytes(3, "little")
    return bytes(data)


def with_app14(jpeg: bytes) -> bytes:
    """``jpeg`` with a 5-byte APP14 segment after SOI: Pillow's header reader gives up on it (it
    expects Adobe's 12-byte payload), libjpeg does not."""
    return jpeg[:2] + b"\xff\xee\x00\x05Ado" + jpeg[2:]


def radiance(width: int = 1000, height: int = 1000) -> bytes:
    """A run-length encoded Radiance HDR picture: a few KB that OpenCV decodes to width x height x 12
    bytes."""
    head = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode()
    runs = b""
    left = width
    while left:
        n = min(127, left)
        runs += bytes([128 + n, 100])
        left -= n
    line = bytes([2, 2, width >> 8, width & 0xFF]) + runs * 4
    return head + line * height


def corpus(huge_side: int = 2400) -> dict[str, Case]:
    """The hostile and odd files; ``huge_side``: the genuinely huge JPEG/PNG (over BUDGET at full size)."""
    base = base_image()
    huge = cv2.resize(base, (huge_side, huge_side * 3 // 4))
    jpeg = _save(base, "JPEG", quality=92)
    cases: dict[str, Case] = {
        "plain.jpg": Case(jpeg, OK, base),
        "empty.jpg": Case(b"", "empty"),
        "text.jpg": Case(b"Dear customer, the photo follows.\n" * 20, "undecodable"),
        "zeros.jpg": Case(bytes(4096), "undecodable"),
        "progressive.jpg": Case(_save(base, "JPEG", quality=92, progressive=True), OK, base),
        "cmyk.jpg": Case(_save(Image.fromarray(base).convert("CMYK"), "JPEG", quality=95), OK, base),
        "grey.jpg": Case(_save(Image.fromarray(base).convert("L"), "JPEG"), OK),
        "png16.png": Case(_encode(".png", base.astype(np.uint16) * 257), OK, base),
        "palette.png": Case(_save(Image.fromarray(base).convert("P", palette=Image.ADAPTIVE), "PNG"), OK),
        "rgba.png": Case(_save(Image.fromarray(base).convert("RGBA"), "PNG"), OK, base),
        "gif-as.jpg": Case(_save(base, "GIF"), OK),
        "webp-as.jpg": Case(_save(base, "WEBP", lossless=True), OK, base),
        "tiff-as.jpg": Case(_save(base, "TIFF"), OK, base),
        "bmp-as.jpg": Case(_save(base, "BMP"), OK, base),
        "claims-60000x60000.jpg": Case(jpeg_claiming(60000, 60000), "too-large"),
        "png-bomb.png": Case(png_bomb(), "too-large"),
        # over BUDGET at full size: a JPEG is decoded reduced, a PNG has no reduced decode
        "huge.jpg": Case(_encode(".jpg", huge), OK),
        "huge.png": Case(_encode(".png", huge), "too-large"),
        # the project reads the size itself: where Pillow's header reader gives up, where a resize
        # would explode, and formats whose size it does not read
        "app14-claims-10000x10000.jpg": Case(with_app14(jpeg_claiming(10000, 10000)), "too-large"),
        "app14.jpg": Case(with_app14(jpeg), OK, base),
        "thin-1x20000.png": Case(thin_png(), "too-large"),
        "radiance-as.jpg": Case(radiance(), "undecodable"),
        # found by the fuzzer: OpenCV allocated a chunk's declared length (4 GB, 5 s for 377 bytes)
        "png-idat-claims-4gb.png": Case(png_chunk_claiming(4_278_190_281), "truncated"),
        # a progressive frame is held at full size by libjpeg: no reduced decode for it (1.2 GB before)
        "progressive-claims-20000x20000.jpg": Case(jpeg_claiming(20000, 20000, True), "too-large"),
        "tiff-claims-60000x60000.tif": Case(tiff_claiming(60000, 60000), "too-large"),
        "webp-claims-16384x16384.webp": Case(webp_claiming(16384, 16384), "too-large"),
        "ppm-as.png": Case(_save(base, "PPM"), "undecodable"),
        # animations are judged by every frame: Pillow grew a GIF to its frame (1.6 GB for ~100 KB)
        "animated.gif": Case(animation("GIF"), OK),
        "animated.png": Case(animation("PNG"), OK, base_image(96, 64)),
        "animated.webp": Case(animation("WEBP", lossless=True), OK, base_image(96, 64)),
        "gif-frame-12000x12000-on-64x64.gif": Case(gif_frame_beyond_screen(64, 12000), "too-large"),
        "apng-frame-past-ihdr.png": Case(apng_frame_beyond(0, 0, 2000, 2000), "too-large"),
        "webp-frame-past-canvas.webp": Case(webp_frame_beyond(2000, 2000), "too-large"),
        "ico-as.jpg": Case(_save(base, "ICO"), "undecodable"),
    }  # fmt: skip
    for k in ORIENTATIONS:
        exif = Image.Exif()
        exif[0x0112] = k
        stored = _save(base, "JPEG", quality=95, exif=exif.tobytes())
        with Image.open(io.BytesIO(stored)) as im:
            upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        cases[f"exif-{k}.jpg"] = Case(stored, OK, upright)
    for offset in (1, 2, 3, 10, 100, 300, len(jpeg) // 2, len(jpeg) - 2):
        cases[f"cut-{offset}.jpg"] = Case(jpeg[:offset], ANY)
    png = _save(base, "PNG")
    for offset in (8, 30, len(png) // 2, len(png) - 12):
        cases[f"cut-{offset}.png"] = Case(png[:offset], ANY)
    for offset in (2, 3, 6, 20, 100, 160, 170, 200, 400, 600):
        flipped = bytearray(jpeg)
        flipped[offset] ^= 0xFF
        cases[f"flip-{offset}.jpg"] = Case(bytes(flipped), ANY)
    return cases


def _patch_member(data: bytearray, name: str, *, flags: int | None = None, method: int | None = None) -> None:
    """Rewrite the general-purpose flags / compression method of member ``name`` in both its local
    header and its central-directory entry (zipfile cannot write encrypted or imploded members)."""
    encoded = name.encode()
    for sig, flags_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        pos = 0
        while (pos := data.find(sig, pos)) != -1:
            if data[pos + name_at : pos + name_at + len(encoded)] == encoded:
                if flags is not None:
                    data[pos + flags_at : pos + flags_at + 2] = struct.pack("<H", flags)
                if method is not None:
                    data[pos + method_at : pos + method_at + 2] = struct.pack("<H", method)
            pos += 4


#: member -> what a reader must make of it ("ok", or the reason its row must give)
ZIP_EXPECT = {
    "shelf/good.jpg": OK,
    "shelf/encrypted.jpg": "unreadable",
    "shelf/imploded.jpg": "unreadable",
    "shelf/../../escape.jpg": OK,  # read in place, never extracted: the name is only a label
    "shelf/link.jpg": "undecodable",  # a symlink entry's bytes are its target's path
    "shelf/inner.zip": "unsupported",
    "shelf/caf\u00e9-\u0192.jpg": OK,  # stored in cp437, no UTF-8 flag
}


def append_members(
    path: Path,
    members: dict[str, bytes],
    *,
    encrypted: tuple[str, ...] = (),
    imploded: tuple[str, ...] = (),
    links: tuple[str, ...] = (),
) -> None:
    """Append ``members`` to the zip at ``path`` (made if absent); ``encrypted`` get the encryption flag,
    ``imploded`` compression method 6 (zipfile reads neither), ``links`` the symlink mode. A name that
    cp437 can spell is stored in cp437 without the UTF-8 flag, as old archivers write it."""
    renames = {}
    with zipfile.ZipFile(path, "a" if path.exists() else "w", zipfile.ZIP_STORED) as zf:
        for i, (name, data) in enumerate(members.items()):
            stored = name
            if not name.isascii():  # zipfile writes non-ASCII names as UTF-8: renamed below
                size = len(name.encode("cp437"))
                stored = ("~" * size + str(i))[-size:]
                renames[stored.encode()] = name.encode("cp437")
            info = zipfile.ZipInfo(stored, date_time=(2020, 1, 1, 0, 0, 0))
            if name in links:
                info.create_system = 3
                info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK
            zf.writestr(info, data)
    raw = bytearray(path.read_bytes())
    for placeholder, real in renames.items():
        raw = bytearray(raw.replace(placeholder, real))
    for name in encrypted:
        _patch_member(raw, name, flags=0x1)
    for name in imploded:
        _patch_member(raw, name, method=6)
    path.write_bytes(bytes(raw))


def hostile_zip(path: Path, good: bytes) -> Path:
    """A zip with the members of :data:`ZIP_EXPECT`; ``good`` is a readable image's bytes."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as nested:
        nested.writestr("deep.jpg", good)
    members = {name: good for name in ZIP_EXPECT}
    members["shelf/link.jpg"] = b"/etc/passwd"
    members["shelf/inner.zip"] = inner.getvalue()
    append_members(
        path,
        members,
        encrypted=("shelf/encrypted.jpg",),
        imploded=("shelf/imploded.jpg",),
        links=("shelf/link.jpg",),
    )
    return path


# --- the mutation fuzzer (tests/prepared/test_fuzz.py, benchmarks/bench_fuzz.py) ---------------


def fuzz_seeds() -> dict[str, bytes]:
    """Valid files the mutation fuzzer starts from: JPEG, PNG, WebP, GIF, BMP, TIFF, a zip of two images,
    and three-frame animations (GIF, APNG, WebP), whose every frame the header reader walks."""
    img = Image.fromarray(base_image(96, 64))
    out = {}
    for fmt, kw in (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 80}), ("GIF", {}),
                    ("BMP", {}), ("TIFF", {})):  # fmt: skip
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[fmt] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.jpg", out["JPEG"])
        z.writestr("b.png", out["PNG"])
    out["ZIP"] = buf.getvalue()
    out["GIF-ANIM"] = animation("GIF")
    out["APNG"] = animation("PNG")
    out["WEBP-ANIM"] = animation("WEBP", lossless=True)
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


FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ZIP", "GIF-ANIM", "APNG", "WEBP-ANIM"]


def fuzz(fmt: str, cases: int, seed: int, max_pixels: int) -> dict:
    """``cases`` mutations of the ``fmt`` seed file through the upload zip reader (ZIP) and the one
    decoder; only ImageDefect and the zip reader's 413 are caught, anything else propagates.
    Returns the outcomes by reason, the largest decode in pixels and the slowest case in seconds."""
    import time

    from products10k.deploy.uploads import RequestError, _zip_items
    from products10k.imaging.images import ImageDefect, decode_rgb
    from tests.helpers import limits

    budget = limits(max_pixels=max_pixels, max_file_bytes=1 << 20)
    original = fuzz_seeds()[fmt]
    rng = np.random.default_rng(seed)
    outcomes: dict[str, int] = {}
    largest, slowest = 0, 0.0

    def count(key: str) -> None:
        outcomes[key] = outcomes.get(key, 0) + 1

    for _ in range(cases):
        data = mutate(original, rng)
        t0 = time.perf_counter()
        members = [data]
        if fmt == "ZIP":
            try:
                items, _ = _zip_items("fuzz.zip", data, room=8, inflated_room=8 << 20, limits=budget)
            except RequestError as exc:  # over the member count or inflated total: the request's 413
                assert exc.status == 413, exc
                items = []
                count("413")
            for _, _, error in items:
                if error:  # a member refused before decoding, with its reason
                    count(error.split(":")[0])
            members = [d for _, d, _ in items if d is not None]
        for member in members:
            try:
                rgb = decode_rgb(member, limits=budget)
            except ImageDefect as exc:
                count(exc.reason)
                continue
            assert rgb.ndim == 3 and rgb.shape[2] == 3, rgb.shape
            largest = max(largest, rgb.shape[0] * rgb.shape[1])
            count("ok")
        slowest = max(slowest, time.perf_counter() - t0)
    return {"outcomes": outcomes, "largest_decode": largest, "slowest_s": round(slowest, 4)}
