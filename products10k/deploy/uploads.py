"""Reading a request's uploads within the service's limits: the body's size while it streams in, the
image count, a zip's members and their declared sizes from its central directory before anything is
inflated, each member only up to its declared size. What is over a limit is a ``RequestError`` (413),
an upload that is not an image is an error in its own result (products10k-serve)."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import Request

from products10k.deploy.predict import printable
from products10k.imaging.archive import (
    ZIP_READ_ERRORS,
    ArchiveTooLarge,
    check_members,
    image_members,
    read_member,
)
from products10k.imaging.images import ImageDefect, ImageLimits


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 32 << 20
    max_images: int = 64
    max_top_k: int = 100
    max_inflated_bytes: int = 128 << 20  # zip members of one request, by their declared sizes
    max_pixels: int | None = None  # None: the export's (params.yaml prepare.max_pixels)


class RequestError(Exception):
    """A request that cannot be served as sent: answered with ``status`` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_images(
    request: Request, limits: Limits, image_limits: ImageLimits
) -> list[tuple[str, bytes | None, str]]:
    """The request's images as (source, bytes or None, error), zips expanded.

    RequestError 413 over a limit, 400 without images."""
    length = request.headers.get("content-length")
    limit = limits.max_request_bytes
    if length is not None and length.isdigit() and int(length) > limit:
        await _drain(request, 4 * limit)
        raise RequestError(413, f"the request is {int(length)} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            await _drain(request, 4 * limit - len(body))
            raise RequestError(413, f"the request is over the limit of {limit} bytes")
    replay = _replay(bytes(body))
    form = await Request(request.scope, replay).form(max_files=10_000, max_fields=100)
    items: list[tuple[str, bytes | None, str]] = []
    inflated = 0  # bytes the request's zip members declare, all zips together
    try:
        for upload in form.getlist("images"):
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "the field 'images' must hold files (multipart uploads)")
            data = await upload.read()
            name = printable(upload.filename or "image")
            if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
                room = limits.max_images - len(items)
                zipped, declared = _zip_items(
                    name, data, room, limits.max_inflated_bytes - inflated, image_limits
                )
                items.extend(zipped)
                inflated += declared
            else:
                items.append((name, data, ""))
            if len(items) > limits.max_images:
                raise RequestError(413, f"more than {limits.max_images} images in one request")
    finally:
        await form.close()
    if not items:
        raise RequestError(400, "no images: send them as multipart field 'images'")
    return items


def _zip_items(
    name: str, data: bytes, room: int, inflated_room: int, limits: ImageLimits
) -> tuple[list[tuple[str, bytes | None, str]], int]:
    """A zip upload's image members as items (nested zips and unreadable members as errors), and the
    bytes its members declare. The member count (``room``: what the request may still hold) and the
    declared total (``inflated_room``) are checked from the central directory before anything is
    inflated (RequestError 413); each member is read only up to its declared size, itself within
    the per-file limit."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = image_members(archive)
        check_members([info for info, _ in members], room, inflated_room)
    except ArchiveTooLarge as exc:
        raise RequestError(413, f"{name}: {exc}") from None
    except ZIP_READ_ERRORS as exc:
        return [(name, None, f"unreadable: {type(exc).__name__}: {exc}")], 0
    items = []
    for info, error in members:
        label = f"{name}:{printable(info.filename)}"
        if error:
            items.append((label, None, error))
            continue
        try:
            items.append((label, read_member(archive, info, limits.max_file_bytes), ""))
        except ImageDefect as exc:
            items.append((label, None, f"{exc.reason}: {exc.detail}"))
    return items, sum(info.file_size for info, _ in members)


async def _drain(request: Request, budget: int) -> None:
    """Read and drop up to ``budget`` more bytes of an oversize body, so that an ordinary client,
    still sending, reads the 413 instead of a reset connection; past that the connection is dropped."""
    async for chunk in request.stream():
        budget -= len(chunk)
        if budget < 0:
            break


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
