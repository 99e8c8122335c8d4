"""``products10k-serve``: the exported model and its index behind HTTP (Starlette under uvicorn).

    products10k-serve --model models/export --index models/m0/index [--host 127.0.0.1] [--port 8000]
                      [--token-file token.txt]

Endpoints:

- ``GET /healthz``: the model (checkpoint hash, member, phase, SKUs) and the index (version, SKUs,
  images), as JSON.
- ``POST /v1/recognize?mode=classifier|knn|fused&top_k=5``: multipart field ``images`` (a zip counts
  as its image members). One result per image in input order: ``source``, ``status`` (ok | error),
  ``error`` (the reason, as products10k-predict reports it), ``skus`` (original SKU ids), ``scores``.
  A bad image is an error in its own result, never a failed request; a body over ``--max-request-mb``
  or more than ``--max-images`` images is a 413 with a message.
- ``POST /v1/skus/{sku_id}/images`` (``Authorization: Bearer <token>``; off without ``--token-file``):
  enrols the images for that SKU. The new index version is built beside the old one (a folder
  under ``--versions``, default ``<index>.versions/``; the input index is never modified) and swapped
  in with one assignment: a request reads the version once when it starts, so requests in flight
  are answered by one version or the other, never a mix. Enrolments run one at a time.
- ``GET /``: a page to drop or pick photos and see each one's top-5 SKUs, with a thumbnail per SKU
  (``GET /v1/skus/{sku_id}/thumbnail``: from the index's ``thumbs/`` folder) and errors in words.

Concurrent requests are batched into the model: images wait at most ``--batch-wait-ms`` for others
to fill a batch of ``--batch-size``, and one onnxruntime run serves them all, so throughput under
load approaches the offline batched figure. Only localhost listens unless ``--host`` says otherwise.
The service imports no torch, albumentations, pandas or DVC (the ``serve`` install extra).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import io
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from products10k import common
from products10k.common import Products10kError
from products10k.deploy.predict import printable, zip_members
from products10k.deploy.runtime import MODES, ExportedModel, Scorer, check_same_model
from products10k.prepared.images import DEFAULT_MAX_PIXELS, ZIP_READ_ERRORS, ImageDefect
from products10k.retrieval.knn import THUMBS_DIR, Gallery, enrol, load_gallery, save_gallery, thumbnail_jpeg

log = logging.getLogger("products10k.serve")

PAGE = Path(__file__).with_name("page.html")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 32 << 20
    max_images: int = 64
    max_top_k: int = 100
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class IndexVersion:
    """One immutable version of the index: what a request reads once and keeps to its end."""

    number: int
    folder: Path
    gallery: Gallery


class RequestError(Exception):
    """A request that cannot be served as sent: answered with ``status`` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- dynamic batching ---------------------------------------------------------------------------


class Batcher:
    """Runs the model on batches gathered from concurrent requests.

    ``submit(inputs)`` queues a request's images; a single worker takes what is queued, waits up to
    ``wait_s`` for more while the batch is under ``max_batch``, runs one onnxruntime call on a
    dedicated thread (onnxruntime uses its own intra-op threads) and hands each request its rows.
    """

    def __init__(self, model: ExportedModel, max_batch: int, wait_s: float):
        self.model, self.max_batch, self.wait_s = model, max_batch, wait_s
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.task: asyncio.Task | None = None
        self.batches = 0  # counters for /healthz: how well requests were merged
        self.images = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            size = len(pending[0][0])
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
                pending.append(item)
                size += len(item[0])
            batch = np.concatenate([inputs for inputs, _ in pending])
            try:
                logits, embedding = await loop.run_in_executor(self.executor, self.model.run, batch)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the loop lives
                for _, future in pending:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for inputs, future in pending:
                stop = start + len(inputs)
                if not future.done():  # a client gone away cancels its future
                    future.set_result((logits[start:stop], embedding[start:stop]))
                start = stop


# --- the service --------------------------------------------------------------------------------


class Service:
    """The loaded model, the current index version and the enrolment lock, shared by the handlers."""

    def __init__(
        self,
        model_dir: Path,
        index_dir: Path | None,
        *,
        token: str | None,
        versions_dir: Path | None = None,
        limits: Limits = Limits(),
        batch_size: int = 32,
        batch_wait_ms: float = 5.0,
        threads: int | None = None,
    ):
        self.model = ExportedModel(model_dir, threads=threads)
        self.limits = limits
        self.token = token
        self.version: IndexVersion | None = None
        if index_dir is not None:
            gallery = load_gallery(index_dir)
            check_same_model(self.model, gallery, index_dir)
            self.version = IndexVersion(0, index_dir, gallery)
            self.versions_dir = versions_dir or index_dir.with_name(index_dir.name + ".versions")
        self.enrol_lock = asyncio.Lock()
        self.batcher = Batcher(self.model, batch_size, batch_wait_ms / 1000)
        self.decoders = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="decode")

    # -- reading requests

    async def read_images(self, request: Request) -> list[tuple[str, bytes | None, str]]:
        """The request's images as (source, bytes or None, error), zips expanded.

        RequestError 413 over a limit, 400 without images."""
        length = request.headers.get("content-length")
        limit = self.limits.max_request_bytes
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
        try:
            for upload in form.getlist("images"):
                if not isinstance(upload, UploadFile):
                    raise RequestError(400, "the field 'images' must hold files (multipart uploads)")
                data = await upload.read()
                name = printable(upload.filename or "image")
                if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
                    items.extend(_zip_items(name, data))
                else:
                    items.append((name, data, ""))
                if len(items) > self.limits.max_images:
                    raise RequestError(413, f"more than {self.limits.max_images} images in one request")
        finally:
            await form.close()
        if not items:
            raise RequestError(400, "no images: send them as multipart field 'images'")
        return items

    async def embed(self, items) -> tuple[list, np.ndarray, np.ndarray, list[int]]:
        """Decode and prepare every readable image on the decode threads, run them through the batcher.

        Returns (errors per item, logits, embeddings, positions of the readable items)."""
        loop = asyncio.get_running_loop()

        def load(data: bytes):
            try:
                return self.model.load(data, self.limits.max_pixels), ""
            except ImageDefect as exc:
                return None, f"{exc.reason}: {exc.detail}"

        loaded = await asyncio.gather(
            *(
                loop.run_in_executor(self.decoders, load, data) if data is not None else _done((None, error))
                for _, data, error in items
            )
        )
        errors = [error for _, error in loaded]
        ok = [i for i, (x, _) in enumerate(loaded) if x is not None]
        if not ok:
            return errors, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), ok
        logits, embedding = await self.batcher.submit(np.stack([loaded[i][0] for i in ok]))
        return errors, logits, embedding, ok

    # -- endpoints

    async def healthz(self, request: Request) -> JSONResponse:
        version = self.version
        spec = self.model.spec
        return JSONResponse(
            {
                "status": "ok",
                "model": {
                    "checkpoint_sha256": spec.get("checkpoint_sha256"),
                    "member": spec.get("member"),
                    "phase": spec.get("phase"),
                    "skus": int(len(self.model.skus)),
                },
                "index": None
                if version is None
                else {
                    "version": version.number,
                    "path": str(version.folder),
                    "skus": int(len(version.gallery.skus)),
                    "images": int(version.gallery.index.ntotal),
                },
                "enrolment": self.token is not None,
                "batches": {"runs": self.batcher.batches, "images": self.batcher.images},
            }
        )

    async def recognize(self, request: Request) -> Response:
        version = self.version  # read once: this request is answered by this version throughout
        mode = request.query_params.get("mode") or ("fused" if version is not None else "classifier")
        try:
            top_k = int(request.query_params.get("top_k", "5"))
        except ValueError:
            return _error(400, "top_k must be an integer")
        if mode not in MODES:
            return _error(400, f"mode '{mode}' is not one of {', '.join(MODES)}")
        if mode != "classifier" and version is None:
            return _error(400, f"mode '{mode}' needs an index: start the service with --index")
        if not 1 <= top_k <= self.limits.max_top_k:
            return _error(400, f"top_k must be between 1 and {self.limits.max_top_k}")
        try:
            items = await self.read_images(request)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        errors, logits, embedding, ok = await self.embed(items)
        results = [
            {"source": name, "status": "error" if error else "ok", "error": error, "skus": [], "scores": []}
            for (name, _, _), error in zip(items, errors, strict=True)
        ]
        if ok:
            scorer = Scorer(self.model, mode, top_k, gallery=version.gallery if version else None)
            top = await asyncio.get_running_loop().run_in_executor(self.decoders, scorer, logits, embedding)
            for row, i in enumerate(ok):
                results[i]["skus"] = [int(s) for s in top.skus[row]]
                results[i]["scores"] = [round(float(s), 6) for s in top.scores[row]]
        return JSONResponse(
            {"mode": mode, "index_version": None if version is None else version.number, "results": results}
        )

    async def enrol_sku(self, request: Request) -> Response:
        if self.token is None:
            return _error(403, "enrolment is off: start the service with --token-file")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return _error(401, "a valid 'Authorization: Bearer <token>' header is required")
        if self.version is None:
            return _error(400, "enrolment needs an index: start the service with --index")
        raw = request.path_params["sku_id"]
        if not raw.isdigit():
            return _error(400, f"SKU id '{raw}' is not a non-negative integer")
        sku = int(raw)
        try:
            items = await self.read_images(request)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        errors, _, embedding, ok = await self.embed(items)
        skipped = [{"source": name, "error": e} for (name, _, _), e in zip(items, errors, strict=True) if e]
        if not ok:
            return JSONResponse(
                {"error": "none of the images could be read", "skipped": skipped}, status_code=422
            )
        async with self.enrol_lock:  # one enrolment at a time: each builds on the version before it
            current = self.version
            folder = self.versions_dir / f"v{current.number + 1:04d}"
            thumb = items[ok[0]][1]
            loop = asyncio.get_running_loop()
            gallery = await loop.run_in_executor(
                None, _build_version, current, folder, embedding, sku, [items[i][0] for i in ok], thumb
            )
            self.version = IndexVersion(current.number + 1, folder, gallery)  # the swap: one assignment
        log.info("enrolled %d image(s) of SKU %d -> index version %d", len(ok), sku, self.version.number)
        return JSONResponse(
            {"sku": sku, "added": len(ok), "skipped": skipped, "index_version": self.version.number},
            status_code=201,
        )

    async def thumbnail(self, request: Request) -> Response:
        version = self.version
        raw = request.path_params["sku_id"]
        if version is None or not raw.isdigit():
            return _error(404, "no such thumbnail")
        path = version.folder / THUMBS_DIR / f"{int(raw)}.jpg"
        if not path.is_file():
            return _error(404, f"no thumbnail for SKU {raw}")
        return Response(path.read_bytes(), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def _build_version(current: IndexVersion, folder: Path, vectors, sku: int, names, photo: bytes) -> Gallery:
    """A copy of ``current`` with the images added, written to ``folder`` (staged, swapped in whole)."""
    gallery = load_gallery(current.folder)  # a private copy: the current version stays as it is
    added = enrol(gallery, vectors, np.full(len(vectors), sku, np.int64), [f"enrolled:{n}" for n in names])
    gallery.meta.setdefault("enrolled", []).append({"source": "products10k-serve", **added})
    known = (current.folder / THUMBS_DIR / f"{sku}.jpg").is_file()
    thumbs = {} if known else {sku: thumbnail_jpeg(photo)}
    save_gallery(gallery, folder, thumbs=thumbs, thumbs_from=current.folder)
    return gallery


def _zip_items(name: str, data: bytes) -> list[tuple[str, bytes | None, str]]:
    """A zip upload's image members as items (nested zips and unreadable members as errors)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = zip_members(archive)
    except ZIP_READ_ERRORS as exc:
        return [(name, None, f"unreadable: {type(exc).__name__}: {exc}")]
    items = []
    for member, error in members:
        label = f"{name}:{printable(member)}"
        if error:
            items.append((label, None, error))
            continue
        try:
            items.append((label, archive.read(member), ""))
        except ZIP_READ_ERRORS as exc:
            items.append((label, None, f"unreadable: {type(exc).__name__}: {exc}"))
    return items


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


async def _done(value):
    return value


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(service: Service) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        yield
        await service.batcher.stop()

    routes = [
        Route("/", service.page),
        Route("/healthz", service.healthz),
        Route("/v1/recognize", service.recognize, methods=["POST"]),
        Route("/v1/skus/{sku_id}/images", service.enrol_sku, methods=["POST"]),
        Route("/v1/skus/{sku_id}/thumbnail", service.thumbnail),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="products10k-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, type=Path, help="export folder (model.onnx + preprocess.json)")
    p.add_argument("--index", type=Path, help="index folder (models/<member>/index): knn, fused, enrolment")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", type=Path, help="file holding the bearer token enrolment requires")
    p.add_argument(
        "--versions", type=Path, help="where enrolled index versions go (default <index>.versions)"
    )
    p.add_argument("--max-request-mb", type=float, default=32.0)
    p.add_argument("--max-images", type=int, default=64, help="images per request, zip members included")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decoded pixels per image")
    p.add_argument("--batch-size", type=int, default=32, help="largest batch the model runs")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long an image waits for a batch")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    args = p.parse_args(argv)
    if args.max_images < 1 or args.batch_size < 1 or args.max_request_mb <= 0 or args.batch_wait_ms < 0:
        p.error("--max-images and --batch-size must be >= 1, --max-request-mb > 0, --batch-wait-ms >= 0")
    return args


def read_token(path: Path) -> str:
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise Products10kError(f"{path}: the token must have at least 16 characters")
    return token


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    common.setup_logging()
    try:
        service = Service(
            args.model,
            args.index,
            token=read_token(args.token_file) if args.token_file else None,
            versions_dir=args.versions,
            limits=Limits(int(args.max_request_mb * 2**20), args.max_images, max_pixels=args.max_pixels),
            batch_size=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
            threads=args.threads,
        )
    except (Products10kError, OSError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    log.info(
        "serving %s%s on http://%s:%d",
        args.model,
        f" and {args.index}" if args.index else "",
        args.host,
        args.port,
    )
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
