"""Image dimensions read from the file's own header, by the project, before any decoder sees the file.

The pixel budget of every decode (imaging/images.py) rests on this: a decoder's header reader is
not a fence (Pillow gave up on a JPEG with a 5-byte APP14 segment and OpenCV then decoded all of its
100 MP; OpenCV decodes formats Pillow does not know, such as Radiance HDR). So the formats the
project accepts are exactly those whose size this module reads, each from the fields the format's
own decoder sizes its output by, and for an animation from every frame, not only the first: a
decoder may size its output by a frame (Pillow grew a GIF's 64 x 64 screen to its 12000 x 12000
frame, 1.6 GB from a 100 KB file), so the size is the union of the canvas and every frame's extent:

- JPEG: the first SOF marker's height and width (libjpeg decodes the first frame, sized by it),
  found by walking the marker segments from SOI by their lengths;
- PNG: IHDR, which the specification requires first, and for an APNG the union with every fcTL
  frame (x_offset + width, y_offset + height), the chunks walked by their lengths;
- WebP: the VP8X canvas and the union with every ANMF frame of an animation (the RIFF chunks walked
  by their sizes), else the VP8 key frame's or the VP8L header's dimensions;
- BMP: the DIB header's width and |height|;
- GIF: the union of the logical screen and every frame (left + width, top + height), the blocks
  walked to the trailer (a byte that starts no block is skipped, as Pillow skips it);
- TIFF: the first IFD's ImageWidth and ImageLength: OpenCV and Pillow open page 0 alone, so the
  later IFDs (pages) are never decoded and not read.

A walk stops where the file is cut (the decoder then reports it truncated) and moves forward at every
step, so it ends, in time linear in the file's size.

:func:`read_size` returns ``(format, width, height)``; a file in another format is ``None``
(undecodable: not a format the project reads) and a file in one of these whose size fields are
missing or cut off raises :class:`HeaderError` (unreadable: never decoded whole on a guess).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
#: markers without a length field (RSTn, SOI, EOI, TEM)
_STANDALONE = {0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0x01}
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
#: chunk headers: a PNG's length and type, a RIFF chunk's type and size
_PNG_CHUNK, _RIFF_CHUNK = struct.Struct(">I4s"), struct.Struct("<4sI")
#: the bytes that start a GIF block: extension, image descriptor, trailer
_GIF_BLOCK = re.compile(rb"[\x21\x2c\x3b]")


class HeaderError(ValueError):
    """A file of an accepted format whose size cannot be read from its header."""


#: SOF markers of progressive JPEGs (Huffman and arithmetic): libjpeg decodes them through a
#: coefficient buffer of the whole frame at full size, whatever scale the output is reduced to
PROGRESSIVE_SOF = {0xFFC2, 0xFFC6, 0xFFCA, 0xFFCE}


def read_size(data: bytes) -> tuple[str, int, int] | None:
    """``(format, width, height)`` from the header; None for a format the project does not read."""
    header = read_header(data)
    return None if header is None else header[:3]


def read_header(data: bytes) -> tuple[str, int, int, bool] | None:
    """``(format, width, height, progressive)``: :func:`read_size` and whether a JPEG's first frame
    is progressive (see PROGRESSIVE_SOF), from one walk of its segments."""
    if data.startswith(b"\xff\xd8"):
        marker, width, height = jpeg_frame(data)
        return ("JPEG", width, height, marker in PROGRESSIVE_SOF)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ("PNG", *_png(data), False)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WEBP", *_webp(data), False)
    if data.startswith(b"BM"):
        return ("BMP", *_bmp(data), False)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ("GIF", *_gif(data), False)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ("TIFF", *_tiff(data), False)
    return None


def _unpack(data: bytes, offset: int, fmt: str, what: str) -> tuple:
    size = struct.calcsize(fmt)
    if offset < 0 or len(data) < offset + size:
        raise HeaderError(f"{what}: the file ends at byte {len(data)}, before its size fields")
    return struct.unpack_from(fmt, data, offset)


def _positive(width: int, height: int, what: str) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise HeaderError(f"{what} declares {width}x{height} pixels")
    return width, height


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """(SOF marker, width, height) of a JPEG's first frame; HeaderError if it cannot be read."""
    pos = 2
    while True:
        if pos >= len(data):
            raise HeaderError("JPEG: no SOF marker before the end of the file")
        if data[pos] != 0xFF:
            raise HeaderError(f"JPEG: byte {pos} is not a marker (the segments before it are broken)")
        while pos < len(data) and data[pos] == 0xFF:  # a marker may follow any number of fill bytes
            pos += 1
        if pos >= len(data):
            raise HeaderError("JPEG: no SOF marker before the end of the file")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            if marker == 0xD9:
                raise HeaderError("JPEG: the file ends (EOI) before any SOF marker")
            continue
        (length,) = _unpack(data, pos, ">H", "JPEG segment")
        if length < 2:
            raise HeaderError(f"JPEG: a segment at byte {pos} declares a length of {length}")
        if marker in _SOF:
            height, width = _unpack(data, pos + 3, ">HH", "JPEG SOF")
            return (0xFF00 | marker, *_positive(width, height, "JPEG SOF"))
        if marker == 0xDA:  # SOS: entropy-coded data follows; a frame must have been declared before
            raise HeaderError("JPEG: scan data (SOS) before any SOF marker")
        pos += length


def _png(data: bytes) -> tuple[int, int]:
    length, kind = _unpack(data, 8, ">I4s", "PNG")
    if kind != b"IHDR" or length < 8:
        raise HeaderError(f"PNG: the first chunk is {kind!r}, not IHDR")
    width, height = _positive(*_unpack(data, 16, ">II", "PNG IHDR"), "PNG IHDR")
    for pos, _, kind in _png_chunks(data):
        # an APNG frame: sequence number, width, height, x_offset, y_offset (the specification keeps
        # it inside IHDR; a decoder need not check, so a frame past it counts, where the file has it)
        if kind == b"fcTL" and pos + 28 <= len(data):
            w, h, x, y = struct.unpack_from(">IIII", data, pos + 12)
            width, height = max(width, x + w), max(height, y + h)
    return width, height


def _png_chunks(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """``(offset, declared length, type)`` of each PNG chunk up to IEND, or the end of the file: the
    last one may declare more bytes than the file holds."""
    pos, last, chunk = 8, len(data) - 8, _PNG_CHUNK.unpack_from  # bound once: a hostile file has millions
    while pos <= last:
        length, kind = chunk(data, pos)
        yield pos, length, kind
        if kind == b"IEND":
            return
        pos += 12 + length  # length, type, data, CRC: at least 12 bytes on


def png_chunk_overrun(data: bytes) -> str | None:
    """Where a PNG's chunk declares more bytes than the file holds, in words; None if every chunk
    up to IEND (or the end) fits. OpenCV's PNG reader allocates a chunk's declared length before
    reading it: the fuzzer found a 377-byte file whose IDAT claims 4 GB taking 4 GB and 5 s."""
    for pos, length, kind in _png_chunks(data):
        if pos + 12 + length > len(data):
            return (
                f"PNG chunk {kind!r} at byte {pos} declares {length} bytes; the file ends at byte {len(data)}"
            )
    return None


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        if len(data) < 30:
            raise HeaderError("WebP VP8X: the file ends before its canvas size")
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return _anmf_union(data, w, h)
    if chunk == b"VP8 ":
        start = _unpack(data, 23, "3s", "WebP VP8")[0]
        if start != b"\x9d\x01\x2a":
            raise HeaderError("WebP VP8: no key frame start code")
        w, h = _unpack(data, 26, "<HH", "WebP VP8")
        return _positive(w & 0x3FFF, h & 0x3FFF, "WebP VP8")
    if chunk == b"VP8L":
        signature, bits = _unpack(data, 20, "<BI", "WebP VP8L")
        if signature != 0x2F:
            raise HeaderError("WebP VP8L: no signature byte")
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "WebP VP8L")
    raise HeaderError(f"WebP: unknown first chunk {chunk!r}")


def _anmf_union(data: bytes, width: int, height: int) -> tuple[int, int]:
    """The union of a VP8X canvas and every ANMF frame of an animated WebP, walking the RIFF chunks
    by their sizes (each padded to an even length) to the end of the file."""
    pos, last, chunk = 12, len(data) - 8, _RIFF_CHUNK.unpack_from  # bound once: a hostile file has millions
    while pos <= last:
        kind, size = chunk(data, pos)
        if kind == b"ANMF" and pos + 20 <= len(data):
            # X and Y offsets (stored halved), width - 1 and height - 1: 24-bit little endian each;
            # libwebp refuses a frame past the canvas today, a bound must not rest on that
            x, y, w, h = (int.from_bytes(data[at : at + 3], "little") for at in range(pos + 8, pos + 20, 3))
            width, height = max(width, 2 * x + w + 1), max(height, 2 * y + h + 1)
        pos += 8 + size + (size & 1)
    return width, height


def _bmp(data: bytes) -> tuple[int, int]:
    (header_size,) = _unpack(data, 14, "<I", "BMP DIB header")
    if header_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h = _unpack(data, 18, "<HH", "BMP core header")
    else:
        w, h = _unpack(data, 18, "<ii", "BMP info header")
    return _positive(w, abs(h), "BMP")


def _tiff(data: bytes) -> tuple[int, int]:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = _unpack(data, 4, endian + "I", "TIFF")
    (count,) = _unpack(data, ifd, endian + "H", "TIFF IFD")
    size: dict[int, int] = {}
    for i in range(count):
        tag, kind, _, value = _unpack(data, ifd + 2 + 12 * i, endian + "HHI4s", "TIFF IFD entry")
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT or LONG, stored in the value field
            if kind == 3:
                size[tag] = struct.unpack(endian + "H", value[:2])[0]
            elif kind == 4:
                size[tag] = struct.unpack(endian + "I", value)[0]
            else:
                raise HeaderError(f"TIFF: tag {tag} has type {kind}, not SHORT or LONG")
    if 256 not in size or 257 not in size:
        raise HeaderError("TIFF: the first IFD has no ImageWidth/ImageLength")
    return _positive(size[256], size[257], "TIFF")


def _gif(data: bytes) -> tuple[int, int]:
    """The union of a GIF's logical screen and every frame: Pillow grows the image to a frame that
    extends past the screen (the frame is what it decodes), so the screen alone bounds nothing."""
    width, height = _unpack(data, 6, "<HH", "GIF logical screen")
    pos = 13 + _gif_colour_table(data[10] if len(data) > 10 else 0)  # a cut file: the walk ends at once
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer: Pillow reads no frame after it
            break
        if block == 0x21:  # extension: label, then data sub-blocks
            pos = _gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor: left, top, width, height, flags
            if pos + 10 > len(data):
                break  # cut inside the descriptor: the decoder reports it
            left, top, w, h, flags = struct.unpack_from("<HHHHB", data, pos + 1)
            width, height = max(width, left + w), max(height, top + h)
            # the local colour table and the LZW minimum code size byte, then the image's sub-blocks
            pos = _gif_sub_blocks(data, pos + 10 + _gif_colour_table(flags) + 1)
        else:  # Pillow skips bytes that start no block and reads on: so must the walk (at C speed)
            found = _GIF_BLOCK.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return _positive(width, height, "GIF")


def _gif_colour_table(flags: int) -> int:
    """Bytes of the colour table a logical screen's or image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    """The offset after the chain of data sub-blocks at ``pos`` (a length byte, that many bytes; a zero
    length ends it), or the end of the file where it is cut first."""
    end = len(data)
    while pos < end:
        size = data[pos]
        pos += size + 1
        if size == 0:
            return pos
    return end
