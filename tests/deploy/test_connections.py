"""products10k/deploy/connections.py against a real uvicorn: a tiny Starlette app served by
``connections.run`` in a subprocess, talked to over raw sockets (the clients a slow or greedy peer
would be), and the accept-error handler called as asyncio calls it."""

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from products10k.deploy import connections
from tests.helpers import ROOT, free_port

SERVER = textwrap.dedent(
    """
    import contextlib, logging, os, sys
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from products10k.deploy import connections

    port, header_timeout_s, max_connections, leave_fds = sys.argv[1:5]

    async def healthz(request):
        return PlainTextResponse("ok")

    async def echo(request):
        logging.getLogger("echo").info("echo request started")  # a test waits for it
        return PlainTextResponse(str(len(await request.body())))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # open files until none is left, then give back a few: a process short of descriptors
        held = []
        if int(leave_fds) >= 0:
            with contextlib.suppress(OSError):
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            for fd in held[: int(leave_fds)]:
                os.close(fd)
        yield

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    routes = [Route("/healthz", healthz), Route("/echo", echo, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    connections.run(
        app, "127.0.0.1", int(port), header_timeout_s=float(header_timeout_s),
        max_connections=None if max_connections == "none" else int(max_connections),
    )
    """
)


@contextlib.contextmanager
def serve(tmp_path, header_timeout_s=10.0, max_connections=None, leave_fds=-1, file_limit=None):
    """A server process on a free port; yields (port, pid, a function returning its log so far)."""
    script, logfile = tmp_path / "server.py", tmp_path / "server.log"
    script.write_text(SERVER)
    port = free_port()
    limit = (
        (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))) if file_limit else None
    )
    args = [str(port), str(header_timeout_s), str(max_connections or "none"), str(leave_fds)]
    with open(logfile, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=limit,
        )
    try:
        deadline = time.monotonic() + 30
        while get(port) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{logfile.read_text()}")
            time.sleep(0.1)
        yield port, proc.pid, logfile.read_text
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def get(port, path="/healthz", timeout=2.0):
    """The status of a GET (urllib closes the connection after it), or None when it cannot connect."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_until_closed(sock, seconds, trickle=b"", every=0.4):
    """(bytes read, seconds until the server closed the connection or None if it did not), sending a
    byte of ``trickle`` every ``every`` seconds meanwhile (a client that is never idle)."""
    start, data, sent = time.monotonic(), b"", 0
    while (now := time.monotonic()) - start < seconds:
        sock.settimeout(every)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if sent < len(trickle):
                with contextlib.suppress(OSError):
                    sock.sendall(trickle[sent : sent + 1])
                sent += 1
            continue
        except ConnectionResetError:
            return data, now - start
        if not chunk:
            return data, now - start
        data += chunk
    return data, None


def read_answer(sock, ending, seconds=3.0):
    """What the server sends until it ends with ``ending`` (an answer's head and body come in two
    writes), or all it sent if it stops or closes first."""
    sock.settimeout(seconds)
    answer = b""
    with contextlib.suppress(OSError):
        while not answer.endswith(ending) and (chunk := sock.recv(4096)):
            answer += chunk
    return answer


def server_sockets(pid):
    """How many sockets the server process holds open."""
    fds = os.listdir(f"/proc/{pid}/fd")
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds if os.path.exists(f"/proc/{pid}/fd/{fd}")]
    return sum(link.startswith("socket:") for link in links)


def settled_sockets(pid):
    """The server's socket count once it stops changing (the last check's connection closed)."""
    count = server_sockets(pid)
    for _ in range(20):
        time.sleep(0.1)
        count, before = server_sockets(pid), count
        if count == before:
            break
    return count


# --- (a) the request-head deadline ---------------------------------------------------------------


def test_a_client_trickling_its_request_head_is_cut_at_the_deadline_while_others_are_served(tmp_path):
    with serve(tmp_path, header_timeout_s=1.0) as (port, _, server_log):
        results = {}

        def fresh_trickler():  # half a head, then a byte every 0.4 s: never idle, never done
            with connect(port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                results["fresh"] = read_until_closed(sock, 4.0, trickle=b"a" * 20)

        def keep_alive_trickler():  # one request answered, then the next head trickled
            with connect(port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                read_answer(sock, b"\r\n\r\nok")
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
                results["keep-alive"] = read_until_closed(sock, 4.0, trickle=b"st: x\r\nX-Slow: aaaaaaaaaaaa")

        def silent():  # connects and sends nothing
            with connect(port) as sock:
                results["silent"] = read_until_closed(sock, 4.0)

        def slow_body():  # a complete head, then the body a byte every 0.6 s: the head was in time
            with connect(port) as sock:
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
                for _ in range(3):
                    time.sleep(0.6)
                    sock.sendall(b"a")
                results["slow body"] = read_answer(sock, b"\r\n\r\n3")

        clients = (fresh_trickler, keep_alive_trickler, silent, slow_body)
        threads = [threading.Thread(target=f) for f in clients]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        started = time.monotonic()
        assert get(port) == 200, "an ordinary client is answered while the slow ones trickle"
        assert time.monotonic() - started < 1.0
        for thread in threads:
            thread.join()
        for name in ("fresh", "keep-alive", "silent"):
            data, closed_after = results[name]
            assert closed_after is not None, f"{name}: the connection was still open after 4 s"
            assert 0.8 < closed_after < 2.0, f"{name}: closed after {closed_after:.2f} s, the deadline is 1 s"
        assert results["fresh"][0].startswith(b"HTTP/1.1 408 Request Timeout")
        assert results["keep-alive"][0].startswith(b"HTTP/1.1 408 Request Timeout")
        assert results["silent"][0] == b"", "a connection that sent nothing is closed without an answer"
        answer = results["slow body"]
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n3"), (
            "only the head has a deadline"
        )
        assert "request head after 1 s (--header-timeout-s)" in server_log()


# --- (b) the connection cap ---------------------------------------------------------------------


def test_b_at_most_max_connections_are_held_and_the_rest_refused_at_once(tmp_path):
    with serve(tmp_path, header_timeout_s=10.0, max_connections=5) as (port, pid, server_log):
        baseline = settled_sockets(pid)
        clients = [connect(port) for _ in range(20)]
        try:
            time.sleep(0.3)
            held = server_sockets(pid) - baseline
            assert held <= 5, f"the server holds {held} connections, the cap is 5"
            closed = [read_until_closed(sock, 0.2) for sock in clients]
            refused = [data for data, after in closed if after is not None]
            assert len(refused) >= 15, f"{len(refused)} of 20 connections were refused, 15 should be"
            # the first five keep their slots: a connection younger than EVICT_AFTER_S is never evicted
            assert [after is None for _, after in closed] == [True] * 5 + [False] * 15
            assert all(data == b"" or data.startswith(b"HTTP/1.1 503") for data in refused)
            assert any(data.startswith(b"HTTP/1.1 503") for data in refused)
        finally:
            for sock in clients:
                sock.close()
        assert get(port) == 200, "a fresh request is answered once they are gone"
        assert server_log().count("refused a connection") == 1, "refusals are logged at a bounded rate"


def test_b_at_the_cap_a_new_client_takes_the_slot_of_the_longest_idle_one(tmp_path):
    with serve(tmp_path, header_timeout_s=10.0, max_connections=5) as (port, _, _server_log):
        idle = [connect(port) for _ in range(5)]
        try:
            time.sleep(connections.EVICT_AFTER_S + 0.3)
            assert get(port) == 200, "a client sending its request at once is served at the cap"
            data, closed_after = read_until_closed(idle[0], 0.5)
            assert closed_after is not None and data == b"", "the oldest idle connection made room"
            assert all(read_until_closed(sock, 0.1)[1] is None for sock in idle[1:])
        finally:
            for sock in idle:
                sock.close()


def test_b_when_every_connection_is_inside_a_request_a_new_one_gets_503(tmp_path):
    with serve(tmp_path, header_timeout_s=10.0, max_connections=5) as (port, _, _server_log):
        busy = [connect(port) for _ in range(5)]
        try:
            for sock in busy:  # a complete head, the body still to come: inside a request
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            time.sleep(connections.EVICT_AFTER_S + 0.3)
            with connect(port) as extra:
                with contextlib.suppress(OSError):
                    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data, closed_after = read_until_closed(extra, 1.0)
            assert closed_after is not None and closed_after < 0.5
            assert data == b"" or data.startswith(b"HTTP/1.1 503 Service Unavailable")
            for sock in busy:  # the requests in progress were not disturbed
                sock.sendall(b"hello")
                assert read_answer(sock, b"\r\n\r\n5").startswith(b"HTTP/1.1 200")
        finally:
            for sock in busy:
                sock.close()
        time.sleep(0.2)
        assert get(port) == 200


# --- (c) accept errors ---------------------------------------------------------------------------


def accept_error(code=errno.EMFILE):
    return {
        "message": "socket.accept() out of system resource",
        "exception": OSError(code, os.strerror(code)),
    }


def test_c_repeated_accept_errors_are_logged_at_a_bounded_rate(caplog):
    now = [0.0]
    passed = []
    handler = connections.AcceptErrorHandler(lambda loop, ctx: passed.append(ctx), 10.0, lambda: now[0])
    caplog.set_level(logging.INFO, logger="products10k.serve.connections")
    for i in range(1000):
        now[0] = i * 0.005  # 1000 failures in 5 s
        handler(None, accept_error())
    lines = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0].getMessage()
    assert lines[0].exc_info is None, "no traceback per failed accept"
    now[0] = 10.5
    handler(None, accept_error())
    lines = [r.getMessage() for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(lines) == 2 and "(999 more since the last such line)" in lines[1]
    handler(None, accept_error(errno.ENFILE))  # another error is not held back by the first
    assert sum("out of system resource" in r.getMessage() for r in caplog.records) == 3
    stale = {
        "message": "Exception in callback BaseSelectorEventLoop._start_serving(<function Server...>)",
        "exception": ValueError("Invalid file descriptor: -1"),
    }
    for _ in range(2048):  # every retry asyncio scheduled, failing on the socket closed at shutdown
        handler(None, stale)
    assert sum("retry ran after its socket closed" in r.getMessage() for r in caplog.records) == 1
    ordinary = {"message": "Task exception was never retrieved", "exception": ValueError("boom")}
    for _ in range(3):
        handler(None, ordinary)
    assert passed == [ordinary] * 3, "other errors pass through, every one"


def test_c_without_a_previous_handler_other_errors_go_to_the_loops_default(caplog):
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            connections.AcceptErrorHandler()(
                loop, {"message": "something else", "exception": ValueError("x")}
            )
    finally:
        loop.close()
    assert any("something else" in r.getMessage() for r in caplog.records if r.name == "asyncio")


def test_c_a_server_out_of_descriptors_logs_accept_errors_once_and_recovers(tmp_path):
    # 80 files at most, all but 4 taken once the app starts: the listening socket takes one, three
    # connections the rest, and asyncio's accept fails (and retries each second) for the others
    with serve(tmp_path, max_connections=16, leave_fds=4, file_limit=80) as (port, pid, server_log):
        clients = [connect(port) for _ in range(8)]
        time.sleep(2.5)
        for sock in clients:
            sock.close()
        deadline = time.monotonic() + 5
        while get(port) != 200:
            assert time.monotonic() < deadline, "the server answers again once descriptors are free"
        # out of descriptors again when it stops, and kept running by a request in progress: the
        # accept retries asyncio scheduled then fail on the closed socket (thousands of tracebacks
        # without the handler)
        busy = connect(port)
        busy.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
        # in progress only once the app has it: on a loaded machine the server may not have read
        # its head yet when SIGTERM comes, and then closes it as idle
        deadline = time.monotonic() + 10
        while "echo request started" not in server_log():
            assert time.monotonic() < deadline, "the server never started the request"
            time.sleep(0.05)
        clients = [connect(port) for _ in range(8)]
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        time.sleep(1.5)  # every retry due by now
        busy.sendall(b"a")
        assert read_answer(busy, b"\r\n\r\n1").startswith(b"HTTP/1.1 200"), "the request in progress finished"
        stopping = time.monotonic()
    stopped_after = time.monotonic() - stopping
    for sock in [busy, *clients]:
        sock.close()
    log_text = server_log()
    assert log_text.count("socket.accept() out of system resource") == 1, log_text[-3000:]
    assert log_text.count("an accept() retry ran after its socket closed") <= 1, log_text[-3000:]
    assert "Traceback" not in log_text, log_text[-3000:]
    assert stopped_after < 3.0, f"the server took {stopped_after:.1f} s to stop after its last request"


# --- the command line ----------------------------------------------------------------------------


def parse(*argv):
    parser = argparse.ArgumentParser(prog="products10k-serve")
    connections.add_arguments(parser)
    args = parser.parse_args(argv)
    connections.check_arguments(parser, args)
    return args


def test_the_options_default_and_are_checked(capsys):
    args = parse()
    assert args.header_timeout_s == connections.DEFAULT_HEADER_TIMEOUT_S and args.max_connections is None
    assert parse("--header-timeout-s", "2.5", "--max-connections", "7").max_connections == 7
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for argv, words in [
        (["--header-timeout-s", "0"], "--header-timeout-s must be a positive number of seconds"),
        (["--header-timeout-s", "nan"], "--header-timeout-s must be a positive number of seconds"),
        (["--max-connections", "0"], "--max-connections must be >= 1"),
        (["--max-connections", str(hard)], "needs more open files than this process may have"),
    ]:
        with pytest.raises(SystemExit):
            parse(*argv)
        assert words in capsys.readouterr().err


def test_the_default_cap_stays_below_the_file_limit():
    assert connections.resolve_max_connections(None, 1_048_576) == 1000
    assert connections.resolve_max_connections(None, 1024) == 1024 - connections.RESERVED_FDS
    with pytest.raises(ValueError, match="at most 960"):
        connections.resolve_max_connections(961, 1024)
