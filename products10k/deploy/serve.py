"""``products10k-serve``: the exported model and its index behind HTTP (Starlette under uvicorn).

    products10k-serve --model models/export --index models/m0/index [--host 127.0.0.1] [--port 8000]
                      [--token-file token.txt]

Endpoints:

- ``GET /healthz``: the model (checkpoint hash, member, phase, SKUs) and the index (version, SKUs,
  images), as JSON.
- ``POST /v1/recognize?mode=classifier|knn|fused&top_k=5``: multipart field ``images`` (a zip counts
  as its image members). One result per image in input order: ``source``, ``status`` (ok | error),
  ``error`` (the reason, as products10k-predict reports it), ``skus`` (original SKU ids), ``scores``.
  A bad image is an error in its own result, never a failed request; a body over ``--max-request-mb``,
  more than ``--max-images`` images (a zip's members counted from its directory before anything is
  inflated) or zip members declaring more than ``--max-inflated-mb`` is a 413 with a message. Each
  image is bounded as the training data were (the export's record of params.yaml's ``prepare``
  limits: bytes, decoded pixels, aspect ratio), judged on headers before it is inflated or decoded.
- ``POST /v1/skus/{sku_id}/images`` (``Authorization: Bearer <token>``; off without ``--token-file``):
  enrols the images for that SKU. The new index version is built beside the old one (a folder
  ``vNNNN`` under ``--versions``, default ``<index>.versions/``; the input index is never modified)
  and swapped in with one assignment: a request reads the version once when it starts, so requests
  in flight are answered by one version or the other, never a mix. Enrolments run one at a time.
  Enrolments are data: the service starts from the newest version under ``--versions`` (it says
  which), a version folder once written is never replaced, one service at a time writes a versions
  folder (a lock: a second writer stops at start, naming the holder), and versions no longer needed
  by the newest ``--keep-versions`` are removed once no request reads them. An enrolment writes only
  what it adds (a segment; the whole index every ``--compact-every`` enrolments: versions.py). A full
  disk is a 507 that says so, the previous version still served.
  ``--follow`` runs a read-only replica on the same ``--versions``: it picks up each new version
  within ``--poll-s`` and answers enrolments with 403 (send them to the writer).
- ``GET /``: a page to drop or pick photos and see each one's top-5 SKUs, with a thumbnail per SKU
  (``GET /v1/skus/{sku_id}/thumbnail``: from the index's ``thumbs/`` folder) and errors in words.

Concurrent requests are batched into the model: images wait at most ``--batch-wait-ms`` for others
to fill a batch of ``--batch-size``, and one onnxruntime run serves them all, so throughput under
load approaches the offline batched figure. Only localhost listens unless ``--host`` says otherwise.
The service imports no torch, albumentations, pandas or DVC (the ``serve`` install extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from products10k import common
from products10k.common import Products10kError
from products10k.deploy import connections
from products10k.deploy.batching import Batcher
from products10k.deploy.options import parse_args, read_token
from products10k.deploy.runtime import MODES, ExportedModel, Scorer
from products10k.deploy.uploads import InFlight, Limits, RequestError, declared_bytes, drain, read_images
from products10k.deploy.versions import DiskFull, IndexVersion, VersionStore
from products10k.imaging.images import ImageDefect, ImageLimits
from products10k.knn import thumbnail_jpeg

log = logging.getLogger("products10k.serve")

PAGE = Path(__file__).with_name("page.html")


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
        limits: Limits | None = None,
        batch_size: int = 32,
        batch_wait_ms: float = 5.0,
        threads: int | None = None,
        keep_versions: int = 3,
        compact_every: int = 256,
        follow: bool = False,
        poll_s: float = 1.0,
    ):
        self.model = ExportedModel(model_dir, threads=threads)
        self.limits = limits or Limits()
        self.image_limits: ImageLimits = self.model.limits
        if self.limits.max_pixels is not None:
            self.image_limits = replace(self.image_limits, max_pixels=self.limits.max_pixels)
        self.token = token
        self.poll_s = poll_s
        self.store: VersionStore | None = None
        if index_dir is not None:
            self.store = VersionStore(
                self.model,
                index_dir,
                versions_dir or index_dir.with_name(index_dir.name + ".versions"),
                keep=keep_versions,
                compact_every=compact_every,
                follow=follow,
            )
        self.enrol_lock = asyncio.Lock()
        self.batcher = Batcher(self.model, batch_size, batch_wait_ms / 1000)
        self.decode_threads = common.process_cores()
        self.decoders = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="decode")
        self.inflight = InFlight(self.limits.max_inflight_bytes, self.limits.queue_wait_s)

    # -- reading requests

    @contextlib.asynccontextmanager
    async def uploads(self, request: Request):
        """The request's images as (source, bytes or None, error), zips expanded (uploads.py), read
        within the request's share of the in-flight budget, which it holds until the block ends.

        RequestError: 413 over a limit (what a client still sends is read and dropped first), 503
        with Retry-After when the budget has no room for it within ``--queue-wait-s``."""
        try:
            size = declared_bytes(request, self.limits)
        except RequestError:
            await drain(request, 4 * self.limits.max_request_bytes)
            raise
        if not await self.inflight.acquire(size):
            raise RequestError(
                503,
                f"busy: {self.inflight.used} bytes of uploads are being read, over what this service holds "
                f"at once with this one ({self.inflight.budget}); try again shortly",
                headers={"Retry-After": "2"},
            )
        try:
            yield await read_images(request, self.limits, self.image_limits)
        finally:
            await self.inflight.release(size)

    async def embed(self, items) -> tuple[list, np.ndarray, np.ndarray, list[int]]:
        """Decode and prepare every readable image on the decode threads, run them through the batcher.

        Returns (errors per item, logits, embeddings, positions of the readable items)."""
        loop = asyncio.get_running_loop()

        def load(data: bytes):
            try:
                return self.model.load(data, self.image_limits), ""
            except ImageDefect as exc:
                return None, f"{exc.reason}: {exc.detail}"

        turns = asyncio.Semaphore(self.decode_threads)

        async def decode(data: bytes | None, error: str):
            if data is None:
                return None, error
            # a request has at most one image per decode thread queued: a 64-image request cannot put
            # 64 decodes ahead of another client's one; they interleave
            async with turns:
                return await loop.run_in_executor(self.decoders, load, data)

        loaded = await asyncio.gather(*(decode(data, error) for _, data, error in items))
        errors = [error for _, error in loaded]
        ok = [i for i, (x, _) in enumerate(loaded) if x is not None]
        if not ok:
            return errors, np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), ok
        inputs = np.stack([loaded[i][0] for i in ok])
        step = self.batcher.max_batch  # a request larger than a batch is run as several
        parts = await asyncio.gather(
            *(self.batcher.submit(inputs[i : i + step]) for i in range(0, len(inputs), step))
        )
        logits = np.concatenate([p[0] for p in parts])
        embedding = np.concatenate([p[1] for p in parts])
        return errors, logits, embedding, ok

    # -- endpoints

    @property
    def version(self) -> IndexVersion | None:
        """The index version a request starting now reads (None without --index)."""
        return None if self.store is None else self.store.current

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
                    "skus": int(len(version.gallery.skus)),
                    "images": int(version.gallery.index.ntotal),
                },
                "enrolment": self.token is not None and not self.following,
                "follows": self.following,
                "batches": {"runs": self.batcher.batches, "images": self.batcher.images},
                "uploads": {
                    "bytes_in_flight": self.inflight.used,
                    "budget_bytes": self.inflight.budget,
                    "refused_busy": self.inflight.refused,
                },
            }
        )

    async def recognize(self, request: Request) -> Response:
        version = self.version  # read once: this request is answered by this version throughout
        with self.reading(version):
            return await self._recognize(request, version)

    @contextlib.contextmanager
    def reading(self, version: IndexVersion | None):
        """Mark ``version`` as read by a request until it ends (see VersionStore.reading)."""
        if version is None:
            yield
            return
        with self.store.reading(version):
            yield

    @property
    def following(self) -> bool:
        return self.store is not None and self.store.follow

    async def _recognize(self, request: Request, version: IndexVersion | None) -> Response:
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
            async with self.uploads(request) as items:
                errors, logits, embedding, ok = await self.embed(items)
        except RequestError as exc:
            return _error(exc.status, str(exc), exc.headers)
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

    def refused_writer(self, request: Request) -> Response | None:
        """The answer to a request that may not write (None: it may): writes are off without
        --token-file (403), a follower never writes (403), and the bearer token must match (401).
        Every route that changes the index asks this first."""
        if self.token is None:
            return _error(403, "enrolment is off: start the service with --token-file")
        if self.following:
            return _error(
                403, f"this service follows {self.store.versions_dir}: enrol on the service that writes it"
            )
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110); the token is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return _error(401, "a valid 'Authorization: Bearer <token>' header is required")
        return None

    async def enrol_sku(self, request: Request) -> Response:
        if (refused := self.refused_writer(request)) is not None:
            return refused
        if self.version is None:
            return _error(400, "enrolment needs an index: start the service with --index")
        raw = request.path_params["sku_id"]
        sku = common.parse_sku_id(raw)
        if sku is None:
            return _error(400, f"SKU id '{raw[:40]}' is not {common.SKU_ID_RULE}")
        try:
            async with self.uploads(request) as items:
                errors, _, embedding, ok = await self.embed(items)
        except RequestError as exc:
            return _error(exc.status, str(exc), exc.headers)
        skipped = [{"source": name, "error": e} for (name, _, _), e in zip(items, errors, strict=True) if e]
        if not ok:
            return JSONResponse(
                {"error": "none of the images could be read", "skipped": skipped}, status_code=422
            )
        async with self.enrol_lock:  # one enrolment at a time: each builds on the version before it
            current, loop = self.version, asyncio.get_running_loop()
            names, thumb = [items[i][0] for i in ok], None
            if not current.thumbnail(sku).is_file():  # a SKU new to the index: its first photo shows it
                thumb = await loop.run_in_executor(
                    self.decoders, thumbnail_jpeg, items[ok[0]][1], self.image_limits
                )
            try:
                with self.reading(current):  # read from while the new version is built
                    version = await loop.run_in_executor(None, self.store.enrol, embedding, sku, names, thumb)
            except (DiskFull, OSError) as exc:  # a full disk is a 507, another write error a 500
                log.error("enrolment of SKU %d not saved: %s", sku, exc)
                full = isinstance(exc, DiskFull)
                why = f"no space left for index versions ({exc})" if full else exc.strerror or str(exc)
                return _error(
                    507 if full else 500,
                    f"the enrolment was not saved: {why}; version {current.number} is still served",
                )
            self.store.publish(version)  # the swap: one assignment
        log.info("enrolled %d image(s) of SKU %d -> index version %d", len(ok), sku, version.number)
        return JSONResponse(
            {"sku": sku, "added": len(ok), "skipped": skipped, "index_version": version.number},
            status_code=201,
        )

    async def thumbnail(self, request: Request) -> Response:
        version = self.version
        sku = common.parse_sku_id(request.path_params["sku_id"])
        if version is None or sku is None:
            return _error(404, "no such thumbnail")
        with self.reading(version):
            try:
                data = version.thumbnail(sku).read_bytes()
            except OSError:  # none, or a follower's version pruned by the writer meanwhile
                return _error(404, f"no thumbnail for SKU {sku}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def follow_versions(self) -> None:
        """A follower's loop: every ``poll_s``, swap in the newest version the writer published (read
        on a worker thread: only the segments this one lacks). A version it cannot read yet (pruned
        meanwhile, a disk error) is logged once and tried again at the next poll."""
        loop, failed = asyncio.get_running_loop(), ""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                version = await loop.run_in_executor(None, self.store.newer)
            except (Products10kError, OSError) as exc:
                if str(exc) != failed:
                    log.warning("cannot read the newest index version yet (trying again): %s", exc)
                failed = str(exc)
                continue
            failed = ""
            if version is not None:
                self.store.publish(version)
                log.info(
                    "following: index version %d (%d images)", version.number, version.gallery.index.ntotal
                )

    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(service: Service) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        follower = asyncio.create_task(service.follow_versions()) if service.following else None
        yield
        if follower is not None:
            follower.cancel()
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, __doc__)
    common.setup_logging()
    try:
        service = Service(
            args.model,
            args.index,
            token=read_token(args.token_file) if args.token_file else None,
            versions_dir=args.versions,
            limits=Limits(
                int(args.max_request_mb * 2**20),
                args.max_images,
                max_inflated_bytes=int(args.max_inflated_mb * 2**20),
                max_pixels=args.max_pixels,
                max_inflight_bytes=int(args.max_inflight_mb * 2**20),
                queue_wait_s=args.queue_wait_s,
                min_upload_bytes_per_s=int(args.min_upload_kbps * 1024),
                upload_grace_s=args.upload_grace_s,
            ),
            batch_size=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
            threads=args.threads,
            keep_versions=args.keep_versions,
            compact_every=args.compact_every,
            follow=args.follow,
            poll_s=args.poll_s,
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
    try:
        connections.run(
            create_app(service),
            args.host,
            args.port,
            header_timeout_s=args.header_timeout_s,
            max_connections=args.max_connections,
            log_level="info",
            access_log=False,
        )
    except ValueError as exc:  # a --max-connections the open-file limit cannot hold
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
