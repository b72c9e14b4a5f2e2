"""The /metrics endpoint under socket abuse: a real MetricsServer on port 0 and real client sockets.

Idle connections used to hold one thread each for ever. Now at most ``max_connections`` are served
at once (the rest closed at once), each lives at most ``timeout`` seconds (idle or drip-fed), and a
scrape answers again as soon as a slot frees up.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from edge_agent.metrics import MetricsServer

SNAPSHOT = {"device_id": "dev1", "version": "1.2.3", "queue_length": 2, "camera_status": {"cam1": "recording"}}


ServerFactory = Callable[..., MetricsServer]


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    """``server_factory(timeout=..., max_connections=...)``: a started server on a free port, stopped at teardown."""
    started: list[MetricsServer] = []

    def make(*, timeout: float = 5.0, max_connections: int = 8) -> MetricsServer:
        server = MetricsServer("127.0.0.1", 0, lambda: SNAPSHOT, timeout=timeout, max_connections=max_connections)
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
        return body.decode()


def idle_sockets(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset); never blocks."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Polls ``condition`` until true; returns the time it took (fails after ``timeout`` s)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def test_scrape_answers_prometheus_text(server_factory: ServerFactory) -> None:
    server = server_factory()
    text = scrape(server.port)
    assert 'edge_agent_info{device="dev1",version="1.2.3"} 1' in text
    assert "edge_agent_upload_queue_length 2" in text
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    assert err.value.code == 404
    wait_for(lambda: server.active_connections == 0, 5, "connections released after the scrapes")


def test_idle_connections_are_capped_and_closed_after_the_timeout(server_factory: ServerFactory) -> None:
    timeout, cap, opened = 2.0, 8, 20
    server = server_factory(timeout=timeout, max_connections=cap)
    threads_before = threading.active_count()
    t0 = time.monotonic()
    socks = idle_sockets(server.port, opened)
    closed_at: dict[int, float] = {}  # socket index -> seconds after t0 when the server closed it

    def poll_closed() -> int:
        for i, s in enumerate(socks):
            if i not in closed_at and closed_by_server(s):
                closed_at[i] = time.monotonic() - t0
        return len(closed_at)

    try:
        # Over the cap: closed at once (long before the timeout), without a thread.
        wait_for(lambda: poll_closed() >= opened - cap, timeout / 2, "over-cap sockets closed at once")
        assert server.refused_connections == opened - cap and server.active_connections == cap
        assert poll_closed() == opened - cap, closed_at
        refused = set(closed_at)
        # Bounded threads: a handler and a deadline timer per served connection, nothing per refused one.
        assert threading.active_count() - threads_before <= 2 * cap, threading.active_count() - threads_before

        # While the cap is full a new scrape is refused too; it answers once the idle ones time out.
        def scrape_ok() -> bool:
            try:
                return "edge_agent_info" in scrape(server.port, timeout=1)
            except (OSError, urllib.error.URLError):
                return False

        wait_for(scrape_ok, timeout + 3.0, "a scrape answers again")

        # Every held socket was closed by the server, and not before its timeout (the deadline
        # starts at accept, after our connect): it is the timeout that ended them.
        wait_for(lambda: poll_closed() == opened, timeout + 3.0, "idle sockets closed by the server")
        held = {i: t for i, t in closed_at.items() if i not in refused}
        assert len(held) == cap and min(held.values()) >= timeout - 0.05, held
        wait_for(lambda: server.active_connections == 0, 3, "slots released")
        assert scrape_ok()
    finally:
        for s in socks:
            s.close()


def test_a_drip_fed_request_is_cut_at_the_deadline(server_factory: ServerFactory) -> None:
    timeout = 1.0
    server = server_factory(timeout=timeout, max_connections=8)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    try:
        start = time.monotonic()
        # One byte every 0.2 s never lets the per-socket timeout fire; the whole-connection deadline does.
        for byte in b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 100:
            if time.monotonic() - start > timeout + 3.0:
                pytest.fail("the server kept a drip-fed connection open past its deadline")
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([sock], [], [], 0.2)[0]:
                break  # the server closed (EOF readable)
        elapsed = time.monotonic() - start
        sock.settimeout(2)
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass
        assert timeout - 0.05 <= elapsed <= timeout + 3.0, elapsed
    finally:
        sock.close()
    wait_for(lambda: server.active_connections == 0, 3, "slot released")
    assert "edge_agent_info" in scrape(server.port)


def test_a_reset_connection_prints_no_traceback(
    server_factory: ServerFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    server = server_factory(timeout=5.0)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    wait_for(lambda: server.active_connections == 1, 3, "connection served")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST while the handler waits for the request line: ConnectionResetError in its thread
    wait_for(lambda: server.active_connections == 0, 3, "slot released after the reset")
    assert "Traceback" not in capfd.readouterr().err
    assert "edge_agent_info" in scrape(server.port)
