"""imaging/headers.py: image sizes read by the project itself, the fence every decode budget stands on."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from products10k.imaging.headers import HeaderError, read_size
from tests.hostile import (
    OK,
    animation,
    apng_frame_beyond,
    base_image,
    corpus,
    gif_frame_beyond_screen,
    gif_frames,
    jpeg_claiming,
    radiance,
    webp_frame_beyond,
    with_app14,
)


def _save(fmt: str, w: int = 37, h: int = 23, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(base_image(w, h)).convert(mode).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("WEBP", {"lossless": False}),  # VP8
        ("WEBP", {"lossless": True}),  # VP8L
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_each_format_reads_the_size_its_encoder_wrote(fmt, kw):
    for w, h in ((37, 23), (1, 300), (300, 1), (2048, 3)):
        assert read_size(_save(fmt, w, h, **kw)) == (fmt, w, h), (fmt, w, h)


def test_webp_with_alpha_has_a_canvas_chunk():
    rgba = np.dstack([base_image(41, 17), np.arange(41 * 17, dtype=np.uint8).reshape(17, 41)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "WEBP", lossless=False)
    data = buf.getvalue()
    assert data[12:16] == b"VP8X" and read_size(data) == ("WEBP", 41, 17)


def test_a_top_down_bmp_has_a_negative_height():
    data = bytearray(_save("BMP", 20, 10))
    data[22:26] = struct.pack("<i", -10)
    assert read_size(bytes(data)) == ("BMP", 20, 10)


def test_jpeg_segments_pillow_gives_up_on_are_walked_by_their_lengths():
    claim = with_app14(jpeg_claiming(10000, 10000))
    assert read_size(claim) == ("JPEG", 10000, 10000)
    padded = b"\xff\xd8\xff\xff\xff" + jpeg_claiming(300, 200)[3:]  # fill bytes before a marker
    assert read_size(padded) == ("JPEG", 300, 200)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xff\xd8", "no SOF"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "no SOF"),  # cut inside a segment before the SOF
        (b"\xff\xd8\xff\xda\x00\x08" + bytes(8), "before any SOF"),  # scan data first
        (b"\xff\xd8\xff\xd9", "ends \\(EOI\\)"),
        (b"\xff\xd8\x12\x34", "not a marker"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x04gAMA", "not IHDR"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00", "ends at byte"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + bytes(8), "declares 0x0"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8Z", "unknown first chunk"),
        (b"GIF89a\x01", "ends at byte"),
        (b"II*\x00\x08\x00\x00\x00\x00\x00", "no ImageWidth"),
        (b"II*\x00\xff\xff\xff\x7f", "ends at byte"),  # an IFD offset past the end
    ],
)
def test_an_accepted_format_whose_size_cannot_be_read_says_why(data, words):
    with pytest.raises(HeaderError, match=words):
        read_size(data)


def test_formats_the_project_does_not_read_are_none():
    for data in (radiance(64, 64), _save("PPM"), _save("ICO"), b"", b"hello", bytes(100)):
        assert read_size(data) is None


def test_the_reader_agrees_with_pillow_on_every_readable_file_of_the_hostile_corpus():
    checked = 0
    for name, case in corpus(huge_side=600).items():
        if case.expect != OK:
            continue
        with Image.open(io.BytesIO(case.data)) as im:
            size = im.size
        assert read_size(case.data)[1:] == size, name
        checked += 1
    assert checked > 15


def test_reading_a_size_never_depends_on_the_pixel_data():
    # the same header, any bytes after it: the size is the header's (a budget judged before decoding)
    jpeg = _save("JPEG", 64, 48)
    sos = jpeg.index(b"\xff\xda")
    noise = np.random.default_rng(0).bytes(5000)
    assert read_size(jpeg[:sos] + noise) == ("JPEG", 64, 48)


# --- animations: every frame is judged, not only the screen or canvas ---------------------------


def test_a_gif_is_judged_by_the_union_of_its_screen_and_every_frame():
    # Pillow grows the image to a frame past the screen: the 64 x 64 screen was all that was judged
    assert read_size(gif_frame_beyond_screen(64, 12000)) == ("GIF", 12000, 12000)
    inside = gif_frames((64, 48), [(0, 0, 64, 48), (10, 5, 20, 30)])
    assert read_size(inside) == ("GIF", 64, 48)
    later = gif_frames((64, 48), [(0, 0, 64, 48), (60, 40, 100, 20)])  # the second frame sticks out
    assert read_size(later) == ("GIF", 160, 60)
    # Pillow skips bytes it does not know between blocks and reads the frame after them: so does the walk
    assert read_size(gif_frames((64, 48), [(0, 0, 300, 200)], junk=b"\x00\x07\xff")) == ("GIF", 300, 200)


def test_an_apng_is_judged_by_the_union_of_ihdr_and_every_fctl():
    assert read_size(animation("PNG")) == ("PNG", 96, 64)  # Pillow's frames lie inside IHDR
    assert read_size(apng_frame_beyond(0, 0, 5000, 4000)) == ("PNG", 5000, 4000)
    assert read_size(apng_frame_beyond(90, 60, 20, 10)) == ("PNG", 110, 70)


def test_an_animated_webp_is_judged_by_the_union_of_its_canvas_and_every_anmf_frame():
    assert read_size(animation("WEBP", lossless=True)) == ("WEBP", 96, 64)
    assert read_size(webp_frame_beyond(10000, 6000)) == ("WEBP", 10096, 6064)  # a 96 x 64 frame moved


def test_a_cut_or_padded_animation_is_walked_to_the_cut_in_linear_time():
    import time

    gif = gif_frames((64, 48), [(0, 0, 64, 48), (0, 0, 500, 400)])
    cut = gif.index(b"\x2c", 40)  # the second frame's descriptor
    assert read_size(gif[: cut + 3]) == ("GIF", 64, 48)  # cut inside it: the frames before are judged
    assert read_size(gif[: cut + 12]) == ("GIF", 500, 400)  # cut in its data: the frame is judged
    assert read_size(gif[:-5]) == ("GIF", 500, 400)
    apng, webp = apng_frame_beyond(0, 0, 500, 400), webp_frame_beyond(1000, 0)
    for data in (apng, webp):
        for end in range(40, len(data), 7):
            assert read_size(data[:end])[1:] in ((96, 64), (500, 400), (1096, 64))
    # the worst walk: 4 MB of one-byte sub-blocks (a hostile file may be 64 MB): bounded, linear
    slow = gif[: 13 + 12] + b"\x21\xfe" + b"\x01x" * (2 << 20) + b"\x00\x3b"
    start = time.perf_counter()
    assert read_size(slow) == ("GIF", 64, 48)
    assert time.perf_counter() - start < 3.0
    # a zero-size RIFF chunk still advances by its 8-byte header; a garbage tail ends the walk
    riff = webp[:30] + b"JUNK\x00\x00\x00\x00" * 1000 + webp[30:] + b"\xff" * 7
    assert read_size(riff) == ("WEBP", 1096, 64)
