"""Connection guards for the HTTP service: what a slow or greedy client may hold, and for how long.

uvicorn alone holds a connection for as long as its client keeps it open: a client that sends a
request head one byte a second is never cut (uvicorn's keep-alive timeout covers only an idle
connection after a response, and any byte received cancels it; a fresh connection has no timeout at
all), so a few hundred such clients exhaust the process's open files. Past the limit every
``accept()`` fails, asyncio logs each failure with its traceback (197 MB of log in 45 s, measured),
and ``/healthz`` goes unanswered. This module adds, around uvicorn 0.55's h11 protocol:

- **a deadline for the request head** (``header_timeout_s``): counted from connecting, and from the
  end of the previous response on a keep-alive connection; a connection without a complete head by
  then is closed, after a ``408 Request Timeout`` if part of a head arrived;
- **a cap on open connections** (``max_connections``, below the open-file limit, whose soft value is
  raised to the hard one at start): at the cap a new connection takes the slot of the connection that
  has waited longest for a request head (an idle keep-alive one or a trickler, once it has waited
  ``evict_after_s``), so a client that sends its request at once is served during a flood of slow
  ones; when every open connection is inside a request, the new one is answered 503 and closed at
  once in ``connection_made``, so it never holds a descriptor past that turn of the event loop;
- **accept errors logged at a bounded rate**: an exception handler on the running loop logs
  asyncio's "socket.accept() out of system resource" (and the failed retries it leaves behind at
  shutdown) once per interval with the count held back, and passes every other error on.

uvicorn's ``limit_concurrency`` is not used: it limits nothing before a request head is complete.
Every connection is accepted and kept, however many; a trickler is never refused (the check runs
when a head has been parsed), and once the count of connections, tricklers included, reaches the
limit every complete request is answered 503: a flood of slow clients then turns ``/healthz`` into
503s while they keep their descriptors.

The uvicorn internals relied on (read in ``uvicorn/protocols/http/h11_impl.py``, 0.55):
``H11Protocol.connection_made`` / ``connection_lost`` / ``handle_events`` / ``on_response_complete``
keep their names and roles; ``self.cycle`` is replaced exactly when ``handle_events`` parses a
request head; ``self.conn`` is the h11 connection and ``self.transport`` / ``self.loop`` are the
asyncio ones; ``connection_lost`` copes with a protocol whose ``connection_made`` only set
``self.transport``; ``Config(http=<class>)`` builds one instance per connection. The h11 protocol is
forced (``auto`` would pick httptools where it is installed, which these guards do not cover) and
websockets are off: the service has no websocket endpoint, and an upgrade hands the transport to
another protocol behind this one's back.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import math
import resource
import time
from collections.abc import Callable
from typing import Any, ClassVar

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http import h11_impl

log = logging.getLogger("products10k.serve.connections")

# h11 is reached through uvicorn's module: it is uvicorn's own dependency, which the protocol
# subclassed here is built on, not one more package of the runtime.
_IDLE = h11_impl.h11.IDLE

RESERVED_FDS = 64  # descriptors kept for the model, the index, thumbnails, spool files and logs
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HEADER_TIMEOUT_S = 10.0
EVICT_AFTER_S = 1.0  # a connection younger than this is never evicted: its head may be on its way
LOG_EVERY_S = 10.0  # the interval of the rate-limited log lines

ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"  # asyncio's words (selector_events)
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _plain_response(status: str, text: str, *extra: str) -> bytes:
    body = text.encode() + b"\n"
    head = [f"HTTP/1.1 {status}", "content-type: text/plain; charset=utf-8", "connection: close", *extra]
    head.append(f"content-length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_BUSY = _plain_response(
    "503 Service Unavailable", "the server holds its maximum of connections; try again", "retry-after: 1"
)
_HEAD_TIMEOUT = _plain_response("408 Request Timeout", "the request head did not arrive in time")


class RateLimit:
    """Lets a repeated event through at most once per ``interval_s``; counts the ones held back."""

    def __init__(self, interval_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.last = -math.inf
        self.held = 0

    def due(self) -> int | None:
        """The number held back since the last one let through if this one goes through, else None."""
        now = self.clock()
        if now - self.last < self.interval_s:
            self.held += 1
            return None
        self.last, held, self.held = now, self.held, 0
        return held


def _held(count: int) -> str:
    return f" ({count} more since the last such line)" if count else ""


class AcceptErrorHandler:
    """An asyncio exception handler: accept errors at most once per ``interval_s`` each, no traceback.

    asyncio calls the loop's exception handler for every failed ``accept()`` (EMFILE, ENFILE,
    ENOBUFS, ENOMEM), and its default handler logs a traceback each time. The asyncio of Python 3.11
    (this project's) also goes on calling ``accept()`` after the first failure (CPython gh-151615,
    fixed upstream in 2026): one
    readiness event makes up to ``backlog`` (uvicorn: 2048) failures, each logged and each
    scheduling its own retry a second later, so the log grows by megabytes a second; and retries
    still pending when the server stops fail on the closed socket ("Exception in callback
    ..._start_serving(...)", ValueError), thousands of tracebacks at shutdown. Both are logged here at
    most once per interval with the count held back; every other context goes to ``previous`` (the
    loop's default handler when None).
    """

    def __init__(
        self,
        previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None,
        interval_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.previous, self.interval_s, self.clock = previous, interval_s, clock
        self.limits: dict[object, RateLimit] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc, message = context.get("exception"), str(context.get("message", ""))
        if message == ACCEPT_ERROR_MESSAGE and isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            key: object = exc.errno
            line = f"{ACCEPT_ERROR_MESSAGE}: {exc}%s; new connections wait in the listen backlog"
        elif message.startswith("Exception in callback") and "._start_serving(" in message:
            key = "stale retry"
            line = f"an accept() retry ran after its socket closed: {exc!r}%s (CPython gh-151615)"
        else:
            if self.previous is not None:
                self.previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        held = self.limits.setdefault(key, RateLimit(self.interval_s, self.clock)).due()
        if held is not None:
            log.error(line, _held(held))


class Slots:
    """The connections of one server: those open, and those waiting for a request head, oldest first."""

    def __init__(self, cap: int, evict_after_s: float = EVICT_AFTER_S):
        self.cap, self.evict_after_s = cap, evict_after_s
        self.open: set[GuardedH11Protocol] = set()
        # insertion order is the order they began waiting: a protocol is re-inserted when it starts
        # waiting again, so the first entry old enough is the one to evict
        self.waiting: dict[GuardedH11Protocol, float] = {}
        self.refused_log, self.evicted_log, self.timeout_log = RateLimit(), RateLimit(), RateLimit()

    def forget(self, protocol: GuardedH11Protocol) -> None:
        self.open.discard(protocol)
        self.waiting.pop(protocol, None)

    def victim(self, now: float) -> GuardedH11Protocol | None:
        """The connection that has waited longest for a head, if it has waited ``evict_after_s``."""
        for protocol, since in self.waiting.items():
            if now - since < self.evict_after_s:
                return None  # the rest began waiting later still
            if not protocol.transport.is_closing():
                return protocol
        return None


def _shut(transport: asyncio.Transport, farewell: bytes = b"") -> None:
    """Close after ``farewell``; abort when it cannot be written now, since a client that does not
    read would otherwise keep the descriptor this close is meant to free."""
    if farewell:
        transport.write(farewell)
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()


class GuardedH11Protocol(h11_impl.H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a cap on open connections.

    Built per server by :func:`protocol_class`, which sets the class attributes.
    """

    slots: ClassVar[Slots]
    header_timeout_s: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        slots = self.slots
        if len(slots.open) >= slots.cap and not self._make_room():
            self.transport = transport  # the base's connection_lost closes it again
            _shut(transport, _BUSY)
            held = slots.refused_log.due()
            if held is not None:
                log.warning(
                    "refused a connection: %d are open (--max-connections), none waiting over %g s "
                    "for a request head%s",
                    len(slots.open),
                    slots.evict_after_s,
                    _held(held),
                )
            return
        super().connection_made(transport)
        slots.open.add(self)
        self._await_head()

    def _make_room(self) -> bool:
        victim = self.slots.victim(self.loop.time())
        if victim is None:
            return False
        waited = self.loop.time() - self.slots.waiting[victim]
        victim._drop()
        held = self.slots.evicted_log.due()
        if held is not None:
            log.warning(
                "at %d connections (--max-connections): closed one that waited %.1f s without a "
                "request head to admit a new one%s",
                self.slots.cap,
                waited,
                _held(held),
            )
        return True

    def _drop(self, farewell: bytes = b"") -> None:
        self.slots.forget(self)
        self._cancel_deadline()
        _shut(self.transport, farewell)

    def _cancel_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _await_head(self) -> None:
        """From now the client has ``header_timeout_s`` to complete a request head."""
        self._cancel_deadline()
        self.head_deadline = self.loop.call_later(self.header_timeout_s, self._head_overdue)
        self.slots.waiting.pop(self, None)
        self.slots.waiting[self] = self.loop.time()

    def _head_overdue(self) -> None:
        self.head_deadline = None
        if self not in self.slots.waiting or self.transport.is_closing():
            return
        # part of a head in h11's buffer: the client is sending a request, and a 408 tells it why it
        # is cut; nothing at all: an idle connection, closed without a word as keep-alive ones are
        partial = self.conn.their_state is _IDLE and bool(self.conn.trailing_data[0])
        self._drop(_HEAD_TIMEOUT if partial else b"")
        held = self.slots.timeout_log.due()
        if held is not None:
            log.info(
                "closed a connection with %s request head after %g s (--header-timeout-s)%s",
                "an incomplete" if partial else "no",
                self.header_timeout_s,
                _held(held),
            )

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            # a request head was parsed: the body and the answer are the application's business
            self.slots.waiting.pop(self, None)
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        # armed before the base runs, since it parses a pipelined request at once (which disarms it)
        if not self.transport.is_closing():
            self._await_head()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.slots.forget(self)
        self._cancel_deadline()
        super().connection_lost(exc)


def protocol_class(
    header_timeout_s: float, max_connections: int, evict_after_s: float = EVICT_AFTER_S
) -> type[GuardedH11Protocol]:
    """A protocol class for one server (``uvicorn.Config(http=...)``): its own slots and deadline."""
    attrs = {
        "slots": Slots(max_connections, min(evict_after_s, header_timeout_s)),
        "header_timeout_s": header_timeout_s,
    }
    return type("ServerGuardedH11Protocol", (GuardedH11Protocol,), attrs)


class GuardedServer(uvicorn.Server):
    """uvicorn's server with :class:`AcceptErrorHandler` on its loop, installed before it listens."""

    async def startup(self, sockets: Any = None) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(AcceptErrorHandler(loop.get_exception_handler()))
        await super().startup(sockets=sockets)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # an unlimited hard limit some systems refuse as soft
            log.warning("could not raise the open-file limit from %d to %s: %s", soft, hard, exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _finite(soft)


def _finite(limit: int) -> int:
    return 2**31 - 1 if limit == resource.RLIM_INFINITY else limit


def connections_allowed(file_limit: int) -> int:
    """The most connections an open-file limit leaves room for, the reserve kept."""
    return file_limit - RESERVED_FDS


def resolve_max_connections(max_connections: int | None, file_limit: int) -> int:
    allowed = connections_allowed(file_limit)
    if max_connections is None:
        max_connections = min(DEFAULT_MAX_CONNECTIONS, allowed)
    if not 1 <= max_connections <= allowed:
        raise ValueError(
            f"{max_connections} connections do not fit the open-file limit of {file_limit} "
            f"({RESERVED_FDS} kept for the model, index, spool files and logs): at most {allowed}"
        )
    return max_connections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The connection options of ``products10k-serve``; check them with :func:`check_arguments`."""
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds a connection gets to send a complete request head, counted from connecting or "
        "from the end of its previous response; a late one is closed (with 408 if part of a head "
        f"came) (default {DEFAULT_HEADER_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help=f"open connections at most (default: {DEFAULT_MAX_CONNECTIONS}, or the open-file limit "
        f"less {RESERVED_FDS} if lower); at the cap a new one takes the place of the one waiting "
        "longest for a request head, or is answered 503 and closed when all are inside requests",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for values :func:`run` would refuse, judged against the hard file limit
    (the soft one is raised to it at start)."""
    timeout = args.header_timeout_s
    if not (math.isfinite(timeout) and timeout > 0):
        parser.error(f"--header-timeout-s must be a positive number of seconds, got {timeout:g}")
    if args.max_connections is None:
        return
    hard = _finite(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    allowed = connections_allowed(hard)
    if args.max_connections < 1:
        parser.error(f"--max-connections must be >= 1, got {args.max_connections}")
    if args.max_connections > allowed:
        parser.error(
            f"--max-connections {args.max_connections} needs more open files than this process may "
            f"have (hard limit {hard}, {RESERVED_FDS} of them kept for the model, index and spool "
            f"files): at most {allowed}; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, "
            "docker --ulimit nofile=) or lower --max-connections"
        )


def run(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    max_connections: int | None = None,
    log_level: str = "info",
    access_log: bool = False,
    **config: Any,
) -> None:
    """Serve ``app`` with uvicorn and the guards above in this process; ``config`` goes to
    ``uvicorn.Config`` (not ``reload`` or ``workers``: the guards are built for one process here).

    Raises ValueError for a ``max_connections`` the open-file limit cannot hold; exits with uvicorn's
    start-up failure status when the server does not start (a port in use, a lifespan failure).
    """
    if config.get("reload") or (config.get("workers") or 1) > 1:
        raise ValueError("run() serves in this process: reload and workers are not supported")
    if not (math.isfinite(header_timeout_s) and header_timeout_s > 0):
        raise ValueError(f"header_timeout_s must be a positive number of seconds, got {header_timeout_s}")
    file_limit = raise_open_file_limit()
    cap = resolve_max_connections(max_connections, file_limit)
    protocol = protocol_class(header_timeout_s, cap)
    log.info(
        "connections: at most %d open (open-file limit %d), a request head within %g s",
        cap,
        file_limit,
        header_timeout_s,
    )
    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        log_level=log_level,
        access_log=access_log,
        **config,
    )
    server = GuardedServer(uvicorn_config)
    try:
        server.run()
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl+C during start-up is a quiet stop
        pass
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
