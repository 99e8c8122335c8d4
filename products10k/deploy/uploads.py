"""Reading a request's uploads within the service's limits: the body's size and pace while it streams
in, the image count, a zip's members and their declared sizes from its central directory before
anything is inflated, each member only up to its declared size. What is over a limit is a
``RequestError`` (413; 408 for a body slower than the floor rate), an upload that is not an image is
an error in its own result (products10k-serve).

The body is parsed as it arrives (Starlette's multipart parser: a part over 1 MB is spooled to a
temporary file, not held in memory) and each upload is then read once into the bytes the decoders
take: a request's body is held once, never buffered whole and copied. What all requests hold at once
is bounded by :class:`InFlight`, a byte budget a request reserves before its body is read."""

from __future__ import annotations

import asyncio
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
    max_inflight_bytes: int = 128 << 20  # request bodies held at once, all requests together
    queue_wait_s: float = 5.0  # how long a request may wait for room in that budget (then 503)
    min_upload_bytes_per_s: int = 32 << 10  # a body's floor rate, after a grace of upload_grace_s
    upload_grace_s: float = 10.0


class RequestError(Exception):
    """A request that cannot be served as sent: answered with ``status`` and the message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


class InFlight:
    """A budget of request-body bytes held at once by every request together (memory and spool files).

    A request reserves what its ``Content-Length`` declares (a chunked body: the request limit) before
    its body is read, and gives it back when its answer is ready; one that cannot have its share
    within ``wait_s`` is answered 503 with ``Retry-After`` instead, its body unread."""

    def __init__(self, budget_bytes: int, wait_s: float):
        self.budget, self.wait_s, self.used = budget_bytes, wait_s, 0
        self.refused = 0  # 503s answered: /healthz
        self._changed = asyncio.Condition()

    async def acquire(self, n: int) -> bool:
        async with self._changed:
            if self.used + n > self.budget:  # waits only when there is no room (a 0 s wait still admits)
                try:
                    room = self._changed.wait_for(lambda: self.used + n <= self.budget)
                    await asyncio.wait_for(room, self.wait_s)
                except TimeoutError:
                    self.refused += 1
                    return False
            self.used += n
            return True

    async def release(self, n: int) -> None:
        async with self._changed:
            self.used -= n
            self._changed.notify_all()


def declared_bytes(request: Request, limits: Limits) -> int:
    """What a request's body will hold, for its reservation: its Content-Length, or the request limit
    for a chunked body (RequestError 413 over the limit, before anything is read)."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return limits.max_request_bytes
    if int(length) > limits.max_request_bytes:
        raise RequestError(
            413, f"the request is {int(length)} bytes, over the limit of {limits.max_request_bytes}"
        )
    return int(length)


async def read_images(
    request: Request, limits: Limits, image_limits: ImageLimits
) -> list[tuple[str, bytes | None, str]]:
    """The request's images as (source, bytes or None, error), zips expanded.

    RequestError 413 over a limit, 408 for a body slower than the floor rate, 400 without images."""
    paced = _Paced(request.receive, limits)
    try:
        form = await Request(request.scope, paced).form(max_files=10_000, max_fields=100)
    except _TooSlow:
        raise RequestError(
            408, f"the body arrived slower than {limits.min_upload_bytes_per_s} bytes/s"
        ) from None
    except _TooLarge:
        await drain(request, 4 * limits.max_request_bytes - paced.seen)
        raise RequestError(
            413, f"the request is over the limit of {limits.max_request_bytes} bytes"
        ) from None
    try:
        return await _form_items(form, limits, image_limits)
    finally:
        await form.close()


async def _form_items(form, limits: Limits, image_limits: ImageLimits) -> list[tuple[str, bytes | None, str]]:
    items: list[tuple[str, bytes | None, str]] = []
    inflated = 0  # bytes the request's zip members declare, all zips together
    for upload in form.getlist("images"):
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "the field 'images' must hold files (multipart uploads)")
        data = await upload.read()
        await upload.close()  # its spool file goes now: the bytes above are the one copy kept
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
    if not items:
        raise RequestError(400, "no images: send them as multipart field 'images'")
    return items


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class _Paced:
    """The request's ``receive``, counting the body's bytes (``_TooLarge`` past the request limit) and
    timing them: after a grace, the body must keep up the floor rate (``_TooSlow``), so a client
    trickling a byte a second cannot hold a request, its reservation and a decoder's input for ever."""

    def __init__(self, receive, limits: Limits):
        self.receive, self.limits, self.seen = receive, limits, 0
        self.start = asyncio.get_running_loop().time()

    async def __call__(self):
        due = self.start + self.limits.upload_grace_s + self.seen / self.limits.min_upload_bytes_per_s
        try:
            message = await asyncio.wait_for(
                self.receive(), max(due - asyncio.get_running_loop().time(), 0.001)
            )
        except TimeoutError:
            raise _TooSlow from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limits.max_request_bytes:
                raise _TooLarge
        return message


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


async def drain(request: Request, budget: int) -> None:
    """Read and drop up to ``budget`` more bytes of an oversize body, so that an ordinary client,
    still sending, reads the 413 instead of a reset connection; past that the connection is dropped."""
    async for chunk in request.stream():
        budget -= len(chunk)
        if budget < 0:
            break
