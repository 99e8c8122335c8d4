"""Decoding of real image files with real defects, and the resize contract of prepare_image."""

import io
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from products10k.imaging.images import (
    ImageDefect,
    decode_rgb,
    encode_jpeg,
    prepare_image,
    reduced_decode_flag,
    resize_shorter,
    target_size,
)
from tests.helpers import limits

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(w=80, h=40) -> np.ndarray:
    """RGB image, left half red, right half blue: orientation and channel order are visible."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = RED
    img[:, w // 2 :] = BLUE
    return img


def jpeg_bytes(img: np.ndarray | Image.Image, **save_kw) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **save_kw)
    return buf.getvalue()


def near(pixel, color, tol=40) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(color, int)) <= tol))


def test_plain_jpeg_is_rgb():
    rgb = decode_rgb(jpeg_bytes(halves()), limits=limits())
    assert rgb.shape == (40, 80, 3) and rgb.dtype == np.uint8
    assert near(rgb[20, 5], RED) and near(rgb[20, 75], BLUE)


def test_greyscale_jpeg_becomes_three_channels():
    data = jpeg_bytes(Image.fromarray(halves()).convert("L"))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"  # really a 1-channel file
    rgb = decode_rgb(data, limits=limits())
    assert rgb.shape == (40, 80, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def test_cmyk_jpeg_colours_survive():
    data = jpeg_bytes(Image.fromarray(halves()).convert("CMYK"))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    rgb = decode_rgb(data, limits=limits())
    assert rgb.shape == (40, 80, 3)
    assert near(rgb[20, 5], RED) and near(rgb[20, 75], BLUE)


def test_png_saved_as_jpg_name_is_read_by_content():
    buf = io.BytesIO()
    Image.fromarray(np.dstack([halves(), np.full((40, 80), 200, np.uint8)])).save(buf, "PNG")  # RGBA
    rgb = decode_rgb(buf.getvalue(), limits=limits())
    assert rgb.shape == (40, 80, 3)
    assert tuple(rgb[20, 5]) == RED and tuple(rgb[20, 75]) == BLUE


def test_exif_orientation_6_is_applied():
    # Stored landscape 80x40; orientation 6 means "rotate 90 degrees clockwise to display", so the
    # upright image is portrait 40x80 with red (the stored left half) on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(halves(), exif=exif.tobytes())
    rgb = decode_rgb(data, limits=limits())
    assert rgb.shape == (80, 40, 3)
    assert near(rgb[5, 20], RED) and near(rgb[75, 20], BLUE)
    # The reduced decode path honours it as well.
    big = cv2.resize(halves(), (800, 400), interpolation=cv2.INTER_NEAREST)
    data = jpeg_bytes(big, exif=exif.tobytes())
    out, w, h = prepare_image(data, size=100, quality=90, limits=limits())
    assert (w, h) == (100, 200)
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert near(img[10, 50], RED) and near(img[190, 50], BLUE)


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PPM"])
def test_a_format_whose_size_the_project_does_not_read_is_refused_not_decoded_on_a_guess(fmt):
    # Pillow (ICO, TGA) or OpenCV (PPM) would decode these, sized by headers nothing here checks
    buf = io.BytesIO()
    Image.fromarray(halves()).save(buf, fmt)
    with pytest.raises(ImageDefect) as info:
        decode_rgb(buf.getvalue(), limits=limits())
    assert info.value.reason == "undecodable"
    assert "not an image format this project reads" in info.value.detail


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda good: b"", "empty"),
        (lambda good: good[: len(good) // 2], "truncated"),
        (lambda good: good[:-2], "truncated"),  # only the end-of-image marker is missing
        (lambda good: np.random.default_rng(0).bytes(5000), "undecodable"),
        (lambda good: b"<html>404 Not Found</html>", "undecodable"),
    ],
    ids=["zero-bytes", "half", "no-eoi", "random-bytes", "html"],
)
def test_defects_are_classified(make, reason):
    rng = np.random.default_rng(1)
    good = jpeg_bytes(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    with pytest.raises(ImageDefect) as info:
        prepare_image(make(good), size=64, quality=90, limits=limits())
    assert info.value.reason == reason


def test_truncated_png_is_truncated():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    with pytest.raises(ImageDefect) as info:
        decode_rgb(buf.getvalue()[:-100], limits=limits())
    assert info.value.reason == "truncated"


def test_target_size_never_upscales():
    assert target_size(800, 600, 512) == (683, 512)
    assert target_size(600, 800, 512) == (512, 683)
    assert target_size(300, 900, 512) == (300, 900)
    assert target_size(512, 512, 512) == (512, 512)


@pytest.mark.parametrize(("w", "h"), [(2000, 1500), (1500, 2000), (1030, 1100), (800, 800), (300, 200)])
def test_prepare_image_sizes_and_reduced_decode_match_full_decode(w, h):
    rng = np.random.default_rng(3)
    # Smooth content (as photos are) so reduced and full decodes are comparable pixel for pixel.
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    data = jpeg_bytes(img)
    out, ow, oh = prepare_image(data, size=256, quality=95, limits=limits())
    assert (ow, oh) == target_size(w, h, 256)
    assert min(ow, oh) == min(256, w, h)
    dec = cv2.cvtColor(cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert dec.shape == (oh, ow, 3)
    # full-resolution decode, then INTER_AREA
    reference = resize_shorter(decode_rgb(data, limits=limits()), 256)
    assert reference.shape == dec.shape
    assert np.abs(dec.astype(int) - reference.astype(int)).mean() < 3.0


@pytest.mark.parametrize(("w", "h", "fmt"), [(800, 800, "JPEG"), (2000, 1500, "JPEG"), (640, 480, "PNG")])
def test_prepare_image_bytes_equal_the_public_rgb_path(w, h, fmt):
    # prepare_image stays in OpenCV's BGR order (no colour conversions); resizing per channel makes
    # that byte-identical to decode_rgb -> resize_shorter -> encode_jpeg, which is what it documents.
    rng = np.random.default_rng(5)
    img = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)  # fine detail
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    data = buf.getvalue()
    out, ow, oh = prepare_image(data, size=256, quality=90, limits=limits())
    full_wh = (w, h) if fmt == "JPEG" else None
    rgb = resize_shorter(decode_rgb(data, min_side=256, limits=limits()), 256, full_wh=full_wh)
    assert (ow, oh) == (rgb.shape[1], rgb.shape[0])
    assert out == encode_jpeg(rgb, 90)


def test_reduced_decode_flag():
    import cv2

    assert reduced_decode_flag(512, 512, 146) == cv2.IMREAD_REDUCED_COLOR_2
    assert reduced_decode_flag(512, 700, 128) == cv2.IMREAD_REDUCED_COLOR_4
    assert reduced_decode_flag(512, 512, 512) == cv2.IMREAD_COLOR
    assert reduced_decode_flag(512, 512, 60) == cv2.IMREAD_REDUCED_COLOR_8
    # libjpeg rounds scaled sides up: 1023 at 1/2 scale is 512 pixels, enough for a 512 target
    assert reduced_decode_flag(1023, 1100, 512) == cv2.IMREAD_REDUCED_COLOR_2
    assert reduced_decode_flag(1021, 1100, 512) == cv2.IMREAD_COLOR
    ok, jpeg = cv2.imencode(".jpg", np.zeros((1100, 1023, 3), np.uint8))
    assert ok and cv2.imdecode(jpeg, cv2.IMREAD_REDUCED_COLOR_2).shape[:2] == (550, 512)


# --- the hostile corpus (tests/hostile.py) and the pixel budget ----------------------------------


@pytest.fixture(scope="module")
def hostile_corpus():
    from tests.hostile import corpus

    return corpus()


def test_every_hostile_file_is_read_or_named_never_raised(hostile_corpus):
    from tests.hostile import ANY, BUDGET, OK

    outcomes = {}
    for name, case in hostile_corpus.items():
        try:
            rgb = decode_rgb(case.data, limits=limits(max_pixels=BUDGET))
        except ImageDefect as exc:  # anything else fails the test: a traceback in a real run
            outcomes[name] = exc.reason
            continue
        outcomes[name] = OK
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
        assert rgb.shape[0] * rgb.shape[1] <= BUDGET, name
        if case.upright is not None:  # the right picture, the right way up (every EXIF orientation)
            assert rgb.shape == case.upright.shape, name
            assert np.abs(rgb.astype(int) - case.upright).mean() < 6, name
    expected = {name: case.expect for name, case in hostile_corpus.items() if case.expect != ANY}
    assert {name: outcomes[name] for name in expected} == expected


def test_a_jpeg_over_the_budget_is_decoded_reduced_and_others_refused():
    from tests.hostile import base_image, jpeg_claiming, png_bomb

    big = cv2.resize(base_image(), (4000, 3000))
    data = cv2.imencode(".jpg", big)[1].tobytes()
    assert decode_rgb(data, limits=limits()).shape == (3000, 4000, 3)  # 12 MP: within the default budget
    assert decode_rgb(data, limits=limits(max_pixels=3_000_000)).shape == (1500, 2000, 3)  # 1/2 fits exactly
    assert decode_rgb(data, limits=limits(max_pixels=2_999_999)).shape == (750, 1000, 3)  # 1/4
    # prepare keeps its output size from the header, so a reduced decode changes no dimension
    assert prepare_image(data, 256, 90, limits=limits(max_pixels=2_000_000))[1:] == (341, 256)
    with pytest.raises(ImageDefect, match="over the budget of 100000 even decoded at 1/8") as info:
        decode_rgb(data, limits=limits(max_pixels=100_000))
    assert info.value.reason == "too-large"
    png = cv2.imencode(".png", big)[1].tobytes()
    with pytest.raises(ImageDefect, match="PNG of 4000x3000 pixels") as info:
        decode_rgb(png, limits=limits(max_pixels=3_000_000))
    assert info.value.reason == "too-large"
    for hostile in (jpeg_claiming(60000, 60000), png_bomb()):  # tiny files, giant headers
        with pytest.raises(ImageDefect) as info:
            decode_rgb(hostile, limits=limits())
        assert info.value.reason == "too-large"


def test_reduced_decode_flag_obeys_the_budget_before_min_side():
    assert reduced_decode_flag(4000, 3000, 256) == cv2.IMREAD_REDUCED_COLOR_8
    assert reduced_decode_flag(4000, 3000, 1000, max_pixels=12_000_000) == cv2.IMREAD_REDUCED_COLOR_2
    assert reduced_decode_flag(4000, 3000, 3000, max_pixels=3_000_000) == cv2.IMREAD_REDUCED_COLOR_2
    assert reduced_decode_flag(4000, 3000, None, max_pixels=12_000_000) == cv2.IMREAD_COLOR
    with pytest.raises(ImageDefect):
        reduced_decode_flag(40000, 30000, None, max_pixels=1_000_000)


def test_the_params_ceiling_is_pillows():
    import os

    from PIL import Image

    from products10k.config.schema import PrepareConfig
    from products10k.imaging.defects import DECODE_CEILING
    from products10k.imaging.images import MAX_PIXELS_CEILING

    assert DECODE_CEILING == 2 * Image.MAX_IMAGE_PIXELS == MAX_PIXELS_CEILING  # Pillow's refusal
    assert PrepareConfig.model_fields["max_pixels"].metadata[1].le == DECODE_CEILING
    assert os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] == str(DECODE_CEILING)


# --- animations: a frame past the screen or canvas is judged before any decoder runs --------------


def test_a_gif_frame_past_its_screen_is_refused_before_any_decoder_runs():
    from tests.hostile import gif_frame_beyond_screen

    # a 64 x 64 screen, a 12000 x 12000 frame (144 MP, over the 50 MP budget): ~100 KB of LZW data
    # that Pillow decoded whole (+1.6 GB) before the check "decoded to 12000x12000" refused it
    with pytest.raises(ImageDefect, match="GIF of 12000x12000 pixels, over the budget") as info:
        decode_rgb(gif_frame_beyond_screen(64, 12000), limits=limits())
    assert info.value.reason == "too-large"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux's /proc")
@pytest.mark.parametrize("path", ["decode_rgb", "_decode_pil"])
def test_a_gif_frame_past_its_screen_costs_no_memory(path):
    # the peak resident memory of a fresh process around one decode: VmHWM, not ru_maxrss, which Linux
    # carries over from the parent (pytest's own peak) through fork and exec
    budget = limits()
    script = f"""
import warnings
from products10k.imaging.images import ImageDefect, ImageLimits, _decode_pil, decode_rgb
from tests.hostile import gif_frame_beyond_screen

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM:"))

warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning (144 MP) where it gets that far
limits = ImageLimits({budget.max_pixels}, {budget.max_aspect_ratio}, {budget.max_file_bytes})
data = gif_frame_beyond_screen(64, 12000)
before = peak_mib()
try:
    decode_rgb(data, limits=limits) if "{path}" == "decode_rgb" else _decode_pil(data, limits)
    reason = "ok"
except ImageDefect as exc:
    reason = exc.reason
print(reason, peak_mib() - before)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    reason, grown_mib = run.stdout.split()[-2:]
    assert reason == "too-large", run.stdout
    # the frame alone is 144 MB as palette indices and 432 MB as RGB: 1.6 GB in all, decoded
    assert int(grown_mib) < 200, f"{path} grew the peak by {grown_mib} MiB"


def test_the_pillow_fallback_refuses_by_the_projects_budget_before_it_decodes():
    from products10k.imaging.images import _decode_pil

    buf = io.BytesIO()
    Image.fromarray(halves(400, 300)).save(buf, "TGA")  # a format only Pillow reads
    assert _decode_pil(buf.getvalue(), limits()).shape == (300, 400, 3)
    with pytest.raises(ImageDefect, match="400x300 pixels, over the budget of 100000") as info:
        _decode_pil(buf.getvalue(), limits(max_pixels=100_000))
    assert info.value.reason == "too-large"


def test_an_ordinary_animation_still_decodes_its_first_frame():
    from tests.hostile import animation, base_image

    for fmt, kw in (("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})):
        rgb = decode_rgb(animation(fmt, **kw), limits=limits(max_pixels=96 * 64))
        assert rgb.shape == (64, 96, 3), fmt
        assert np.abs(rgb.astype(int) - base_image(96, 64)).mean() < 12, fmt


def test_an_apng_or_animated_webp_frame_past_its_canvas_is_judged_by_the_union():
    from tests.hostile import apng_frame_beyond, webp_frame_beyond

    for data, size in ((apng_frame_beyond(0, 0, 5000, 4000), "5000x4000"), (webp_frame_beyond(10000, 6000),
                       "10096x6064")):  # fmt: skip
        with pytest.raises(ImageDefect, match=f"of {size} pixels, over the budget") as info:
            decode_rgb(data, limits=limits(max_pixels=10_000_000))
        assert info.value.reason == "too-large"
