"""Robust image decoding and the one-time pre-resize of the prepare stage.

Contract of :func:`prepare_image`: bytes of any image file in, an upright 3-channel RGB image
resized so that its shorter side is ``size`` (never upscaled), re-encoded as a baseline JPEG
without EXIF, out. A file that cannot be read raises :class:`ImageDefect` carrying a short
machine-readable ``reason`` (``empty``, ``truncated``, ``undecodable``, ``unreadable``,
``too-large``) for the prepare report and predict's rows.

Decisions, and why:

- **Never upscale.** The training transforms resize to their own resolution anyway; upscaling
  here would add bytes and interpolation blur and bake in one upscaling choice for every model.
  Images whose shorter side is already <= ``size`` are only normalised (RGB, upright, JPEG).
- **OpenCV first, Pillow as fallback.** ``cv2.imdecode(IMREAD_COLOR)`` reads greyscale, CMYK/YCCK
  JPEG, palette/16-bit PNG (whatever the file extension says) into 3-channel BGR and applies
  the EXIF orientation of JPEGs (checked by the tests with an orientation-6 file, OpenCV >= 3.1).
  Formats OpenCV lacks go through Pillow with ``exif_transpose`` + ``convert("RGB")``.
- **Reduced JPEG decode.** libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT domain at a
  fraction of the cost. We use it only when the reduced image still has its shorter side
  >= ``size``, so the final resize is always a downscale from at least the target resolution.
- **A pixel budget, from a header the project reads itself.** Every decode is bounded by
  :class:`ImageLimits` (``prepare.max_pixels``, ``prepare.max_aspect_ratio``; recorded in the export's
  ``preprocess.json`` for the runtime: params.yaml is their one home), checked on the file's own header
  (imaging/headers.py) before any pixel is decoded, so one file cannot take the memory of the run: a
  5 KB JPEG claiming 60000 x 60000 pixels, a PNG decompression bomb, a JPEG whose header Pillow cannot
  parse, a GIF whose 12000 x 12000 frame lies on a 64 x 64 screen (an animation's size is the union of
  every frame; Pillow's fallback, whose own limit is a global, checks the size it opened by the same
  budget before it loads a pixel). A JPEG over the budget is decoded at the largest reduction that
  fits (libjpeg's 1/2, 1/4, 1/8), even below ``min_side``: a 20000 x 20000 photo costs 2500 x 2500
  pixels, not 1.2 GB. Other
  formats have no reduced decode and are refused (``too-large``), and so is an aspect ratio over the
  limit (a 1 x 20000 strip would be resized into gigabytes: its shorter side goes to the model's
  resize). A file whose size the project cannot read is refused (``unreadable``), one in a format it
  does not read (Radiance HDR, PPM, EXR ...) is ``undecodable``: never decoded whole on a guess.
  OpenCV's own limit, ``OPENCV_IO_MAX_IMAGE_PIXELS``, is set to the ceiling of any budget
  (products10k/__init__.py) as a second fence.
- **Nothing a file holds raises anything but ImageDefect.** OpenCV raises ``cv2.error`` on some
  headers and Pillow raises a zoo of exceptions (SyntaxError, struct.error, ValueError ...) on broken
  files; both are caught and become ``undecodable`` with the decoder's words, because one hostile
  file must never stop a run.
- **Interpolation by factor.** Shrinking by 2x or more uses INTER_AREA (it averages source pixels;
  INTER_LINEAR would skip pixels and alias fine print, which is what tells SKUs apart). Below 2x -
  the usual case after a reduced decode - INTER_LINEAR still reads every source pixel, and measured
  against a Lanczos reference it is as close as INTER_AREA (800->512: 35.5 vs 34.1 dB PSNR) at an
  eighth of the cost (0.5 vs 4 ms), INTER_AREA being slow at fractional factors.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from products10k.imaging.archive import open_zip, read_member
from products10k.imaging.defects import DECODE_CEILING, ImageDefect
from products10k.imaging.headers import FORMATS, HeaderError, png_chunk_overrun, read_header

# The reduced-decode flags OpenCV offers, largest reduction first.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND"
#: the ceiling of any budget (imaging/defects.py, its one home)
MAX_PIXELS_CEILING = DECODE_CEILING


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost, from params.yaml's ``prepare`` section (or an export's record of it).

    ``max_pixels``: decoded pixels; ``max_aspect_ratio``: longer over shorter side (the resize to a
    shorter side multiplies a thin strip's pixels by the target squared); ``max_file_bytes``: the
    bytes of one file or zip member, checked on the declared size before it is read."""

    max_pixels: int
    max_aspect_ratio: float
    max_file_bytes: int

    @classmethod
    def from_prepare(cls, section) -> ImageLimits:
        """From a ``PrepareConfig`` or the ``prepare`` record of ``preprocess.json`` (a dict)."""
        get = section.get if isinstance(section, dict) else lambda key: getattr(section, key)
        return cls(
            int(get("max_pixels")), float(get("max_aspect_ratio")), int(float(get("max_file_mb")) * 2**20)
        )


def _looks_truncated(data: bytes) -> bool:
    """True when a JPEG lacks its end-of-image marker or a PNG its IEND chunk.

    Only consulted after decoding failed, to tell "cut off" (a partial download) from "not an
    image"; trailing zero padding, which some writers add, is ignored.
    """
    tail = data.rstrip(b"\x00")[-64:]
    if data.startswith(_JPEG_SOI):
        return not tail.endswith(_JPEG_EOI)
    if data.startswith(_PNG_SIG):
        return _PNG_IEND not in tail
    return False


def _checked_header(data: bytes, limits: ImageLimits) -> tuple[str, int, int, bool]:
    """(format, width, height, progressive) from the project's own header reader, within the
    aspect-ratio limit; ImageDefect otherwise (undecodable: a format not read; unreadable: its size
    cannot be read)."""
    try:
        header = read_header(data)
    except HeaderError as exc:
        raise ImageDefect("unreadable", str(exc)) from exc
    if header is None:
        raise ImageDefect("undecodable", f"not an image format this project reads ({', '.join(FORMATS)})")
    fmt, width, height, _ = header
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ImageDefect(
            "too-large",
            f"{fmt} of {width}x{height} pixels: "
            f"an aspect ratio over the limit of {limits.max_aspect_ratio:g}:1",
        )
    return header


def _decode_pil(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Pillow fallback: upright RGB uint8, or ImageDefect; refused by the project's budget before Pillow
    allocates a pixel (its own bomb check stands on the global ``Image.MAX_IMAGE_PIXELS``)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            # im.size is what load() allocates: Pillow grows a GIF to a frame past its screen on open
            width, height = im.size
            if width * height > limits.max_pixels:
                raise ImageDefect(
                    "too-large",
                    f"{im.format} of {width}x{height} pixels, over the budget of {limits.max_pixels} pixels",
                )
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))  # frame 0 only: the frames after it are never loaded
    except ImageDefect:
        raise
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit, on open
        raise ImageDefect("too-large", f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - hostile input: see the module docstring
        # Pillow raises OSError("image file is truncated ...") for cut-off files.
        reason = "truncated" if ("truncated" in str(exc) or _looks_truncated(data)) else "undecodable"
        raise ImageDefect(reason, f"{type(exc).__name__}: {exc}") from exc


def reduced_decode_flag(width: int, height: int, min_side: int | None, max_pixels: int | None = None) -> int:
    """The cheapest OpenCV flag to decode a ``width`` x ``height`` JPEG with shorter side >= ``min_side``
    and at most ``max_pixels`` decoded pixels; ImageDefect("too-large") when even 1/8 scale is over.

    ``IMREAD_REDUCED_COLOR_<f>`` makes libjpeg scale in the DCT domain, and libjpeg sizes the
    output ``ceil(side / f)`` (``jdiv_round_up`` in ``jpeg_calc_output_dimensions``). So the
    decoded shorter side is exactly ``ceil(short / f)``: testing that value is what guarantees
    it is >= ``min_side`` while still picking the cheapest such scale (rounding down would be
    safe too, but would full-decode e.g. a 1023-pixel side for a 512 target that 1/2 scale serves).
    The budget wins over ``min_side``: a photo too large for it is decoded at the largest reduction
    that fits. For JPEG bytes only (OpenCV resizes other formats with its own rounding); the prepared
    image shards hold JPEGs only. EXIF rotation swaps width and height, which changes neither bound.
    """
    scales = [(factor, flag) for factor, flag in _REDUCED] + [(1, cv2.IMREAD_COLOR)]  # cheapest first
    fits = [
        (factor, flag)
        for factor, flag in scales
        if max_pixels is None or math.ceil(width / factor) * math.ceil(height / factor) <= max_pixels
    ]
    if not fits:
        raise ImageDefect(
            "too-large",
            f"{width}x{height} pixels, over the budget of {max_pixels} even decoded at 1/8 scale",
        )
    if min_side is None:
        return fits[-1][1]  # the full decode if it fits, else the largest image that does
    short = min(int(width), int(height))
    for factor, flag in fits:
        if math.ceil(short / factor) >= min_side:
            return flag
    return fits[-1][1]  # nothing in budget reaches min_side: the largest image that fits


def _decode_bgr(
    data: bytes, min_side: int | None, limits: ImageLimits
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Decode to upright BGR (OpenCV's order); also return the full-resolution (width, height) read
    from a JPEG header."""
    if len(data) == 0:
        raise ImageDefect("empty", "file has 0 bytes")
    if len(data) > limits.max_file_bytes:
        raise ImageDefect("too-large", f"{len(data)} bytes, over the limit of {limits.max_file_bytes}")
    fmt, width, height, progressive = _checked_header(data, limits)
    if fmt == "PNG" and (overrun := png_chunk_overrun(data)):
        raise ImageDefect("truncated", overrun)
    flag, full_wh = cv2.IMREAD_COLOR, None
    if progressive and width * height > limits.max_pixels:
        # libjpeg holds a progressive frame's coefficients at full size whatever the output scale:
        # a 2 KB file claiming 20000 x 20000 took 1.2 GB decoded at 1/4 (bench_fuzz found the kind)
        raise ImageDefect(
            "too-large",
            f"progressive JPEG of {width}x{height} pixels, over the budget of {limits.max_pixels} "
            "(a progressive frame is decoded at full size in memory, so no reduced decode helps)",
        )
    if fmt == "JPEG":  # and MPO (a camera's JPEG with extra frames): libjpeg can decode it reduced
        full_wh = (width, height)
        flag = reduced_decode_flag(width, height, min_side, limits.max_pixels)
    elif width * height > limits.max_pixels:
        raise ImageDefect(
            "too-large", f"{fmt} of {width}x{height} pixels, over the budget of {limits.max_pixels} pixels"
        )
    try:
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    except cv2.error as exc:  # e.g. a header beyond OpenCV's own pixel limit
        raise ImageDefect("undecodable", f"OpenCV: {str(exc).strip().splitlines()[-1]}") from exc
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.size == 0:
        if _looks_truncated(data):
            raise ImageDefect("truncated", f"{len(data)} bytes, image data ends before the end marker")
        bgr = cv2.cvtColor(_decode_pil(data, limits), cv2.COLOR_RGB2BGR)
    # the last fence: the decoder must have honoured the header it was judged by (a lying field,
    # a frame the walk missed)
    if bgr.shape[0] * bgr.shape[1] > width * height:
        raise ImageDefect(
            "too-large", f"{fmt} decoded to {bgr.shape[1]}x{bgr.shape[0]}, not its {width}x{height}"
        )
    return bgr, full_wh


def decode_rgb(data: bytes, min_side: int | None = None, *, limits: ImageLimits) -> np.ndarray:
    """Decode image bytes into an upright HxWx3 RGB uint8 array within ``limits``.

    With ``min_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, but only at a scale whose
    shorter side is still >= ``min_side`` (so callers that downscale to ``min_side`` lose
    nothing), unless the budget needs more. Raises :class:`ImageDefect` for empty, truncated,
    undecodable, unreadable or too-large bytes.
    """
    return cv2.cvtColor(_decode_bgr(data, min_side, limits)[0], cv2.COLOR_BGR2RGB)


def target_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``size``; unchanged if already <= size."""
    short = min(width, height)
    if short <= size:
        return width, height
    scale = size / short
    if width <= height:
        return size, max(size, round(height * scale))
    return max(size, round(width * scale)), size


def resize_shorter(rgb: np.ndarray, size: int, full_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Downscale so the shorter side is ``size``; never upscale.

    ``full_wh`` is the (width, height) of the full-resolution image when ``rgb`` came from a
    reduced decode: the output size is computed from it so that reduced and full decodes give the
    same output dimensions (the reduced image's sides are rounded up by libjpeg).
    """
    h, w = rgb.shape[:2]
    if full_wh is not None:
        fw, fh = full_wh
        # EXIF rotation may have swapped the sides relative to the header; match the decoded layout.
        if (w >= h) != (fw >= fh):
            fw, fh = fh, fw
        tw, th = target_size(fw, fh, size)
    else:
        tw, th = target_size(w, h, size)
    if (tw, th) == (w, h):
        return rgb
    factor = min(w, h) / min(tw, th)
    interpolation = cv2.INTER_AREA if factor >= 2.0 else cv2.INTER_LINEAR  # why: module docstring
    return cv2.resize(rgb, (tw, th), interpolation=interpolation)


def encode_jpeg(image: np.ndarray, quality: int, *, bgr: bool = False) -> bytes:
    """Baseline JPEG bytes (no EXIF, so readers need no orientation handling) at ``quality``.

    ``image`` is RGB, or in OpenCV's BGR order with ``bgr=True`` (no colour conversion then).
    The one JPEG encoder of the project: the prepare stage and the synthetic data both use it.
    """
    if not bgr:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # only for empty/odd arrays, which decode_rgb never returns
        raise ImageDefect("undecodable", f"JPEG encoding failed for an array of shape {image.shape}")
    return buf.tobytes()


def prepare_image(data: bytes, size: int, quality: int, *, limits: ImageLimits) -> tuple[bytes, int, int]:
    """Decode (within ``limits``), orient, downscale (shorter side ``size``) and JPEG-encode one image.

    Returns (jpeg_bytes, width, height) of the prepared image; raises :class:`ImageDefect`.
    """
    # Decode, resize and encode all stay in OpenCV's BGR order: resizing works per channel, so this
    # gives the same bytes as going through RGB, without two colour conversions (~0.3 ms/image).
    bgr, full_wh = _decode_bgr(data, size, limits)
    out = resize_shorter(bgr, size, full_wh=full_wh)
    h, w = out.shape[:2]
    return encode_jpeg(out, quality, bgr=True), w, h


def prepare_zip_members(
    zip_path: str, members: list[str], size: int, quality: int, limits: ImageLimits
) -> list[tuple[bytes | None, int, int, str, str]]:
    """:func:`prepare_image` for ``members`` of one archive: (jpeg, width, height, reason, detail) each.

    The prepare stage's task, run on its worker threads (OpenCV's decode, resize and encode release
    the GIL, so threads scale across cores without process start-up or pickling). A defect of one image
    is returned (reason non-empty, jpeg None) rather than raised, so one bad file does not cost the
    rest of the chunk; a member must exist (the caller checks the archive's index). A member is read
    only up to its declared size, and only if that is within ``limits.max_file_bytes``.
    """
    zf = open_zip(zip_path)
    out = []
    for member in members:
        try:
            data = read_member(zf, zf.getinfo(member), limits.max_file_bytes)
            jpeg, w, h = prepare_image(data, size, quality, limits=limits)
        except ImageDefect as exc:
            out.append((None, 0, 0, exc.reason, exc.detail))
            continue
        out.append((jpeg, w, h, "", ""))
    return out
