"""The tests' TCP fault proxy (tests/faultproxy.py): counts bytes, limits bandwidth, cuts connections."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy

KB = 1000


class Sink:
    """A TCP server that reads each connection to EOF and answers with the byte count it got."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, name="sink.accept", daemon=True)
        self._accept.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="sink.conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        got = 0
        with conn, contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                got += len(chunk)
                with self._lock:
                    self.received += len(chunk)
            conn.sendall(str(got).encode())

    def close(self) -> None:
        self._stop.set()
        self._accept.join(5)
        for t in self._threads:
            t.join(5)
        self.listener.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    try:
        yield server
    finally:
        server.close()


def send_all(port: int, size: int, timeout: float = 20) -> int:
    """Sends `size` bytes, half-closes, returns the count the sink says it received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"x" * size)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(100):
            reply += chunk
    return int(reply)


def test_bytes_are_counted_both_ways(sink: Sink) -> None:
    with FaultProxy(("127.0.0.1", sink.port), name="count") as proxy:
        assert send_all(proxy.port, 300 * KB) == 300 * KB
        assert send_all(proxy.port, 5) == 5
        assert proxy.bytes_up == 300 * KB + 5 and sink.received == 300 * KB + 5
        assert proxy.bytes_down == len(b"300000") + len(b"5")
        assert proxy.connections == 2 and proxy.cuts == 0


def _two_at_once(port: int, size: int) -> float:
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(send_all(port, size)), name=f"sender{i}")
               for i in range(2)]  # fmt: skip
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [size, size]
    return time.monotonic() - t0


def test_bandwidth_shared_by_the_link_or_per_connection(sink: Sink) -> None:
    rate, size = 2_000 * KB, 1_000 * KB
    with FaultProxy(("127.0.0.1", sink.port), rate=rate, shared=True, name="shared") as proxy:
        shared = _two_at_once(proxy.port, size)
    with FaultProxy(("127.0.0.1", sink.port), rate=rate, shared=False, name="each") as proxy:
        each = _two_at_once(proxy.port, size)
    # One budget: 2 MB over a 2 MB/s link takes ~1 s; a budget each: ~0.5 s. Upper bounds leave room
    # for a loaded machine; the lower bounds are the limit itself (minus the 50 ms burst allowance).
    assert 0.9 <= shared < 3.0, shared
    assert 0.4 <= each < 2.0, each
    assert each < shared


def test_connections_are_cut_by_age(sink: Sink) -> None:
    with FaultProxy(("127.0.0.1", sink.port), rate=100 * KB, cut_after=0.5, name="cut") as proxy:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock, \
                pytest.raises(OSError):  # fmt: skip
            for _ in range(1000):  # 10 s of data at the limit: the cut comes first
                sock.sendall(b"y" * 1000)
                time.sleep(0.001)
            pytest.fail("10 s of data went through a link cut after 0.5 s")
        elapsed = time.monotonic() - t0
        assert 0.45 <= elapsed < 3.0, elapsed
        assert proxy.cuts == 1
        assert 0 < proxy.bytes_up < 200 * KB  # ~0.5 s at 100 KB/s, plus what sat in buffers
        # Only that connection: a new one works (and is cut too only once it is old enough).
        assert send_all(proxy.port, 10 * KB) == 10 * KB
        assert proxy.cuts == 1


def test_cut_all_and_stop_are_bounded(sink: Sink) -> None:
    proxy = FaultProxy(("127.0.0.1", sink.port), name="stop").start()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        sock.sendall(b"z" * 1000)
        deadline = time.monotonic() + 5
        while proxy.bytes_up < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.cut_all() == 1
        with pytest.raises(OSError):
            for _ in range(100):
                sock.sendall(b"z" * 10000)
                time.sleep(0.01)
    finally:
        sock.close()
        t0 = time.monotonic()
        proxy.stop(timeout=5)
        assert time.monotonic() - t0 < 2
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy.stop.")]


def test_an_answer_is_swallowed_once(sink: Sink) -> None:
    with FaultProxy(("127.0.0.1", sink.port), name="answer") as proxy:
        proxy.cut_on_answer(b"4242")
        with pytest.raises((OSError, ValueError)):  # reset, or EOF: int(b"") is a ValueError
            send_all(proxy.port, 4242)
        assert sink.received == 4242  # the server did the work; only its answer was lost
        assert proxy.answers_cut == 1 and proxy.cuts == 1
        assert send_all(proxy.port, 4242) == 4242  # once only


def test_a_frozen_link_moves_nothing_until_thawed(sink: Sink) -> None:
    with FaultProxy(("127.0.0.1", sink.port), name="freeze") as proxy:
        proxy.freeze()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # buffers fill, then the sender is stuck: no reset, no close
                for _ in range(10_000):
                    sock.send(b"f" * 65536)
            assert proxy.bytes_up == 0 and sink.received == 0
            proxy.thaw()
            sock.settimeout(10)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(100):
                reply += chunk
        assert int(reply) == proxy.bytes_up == sink.received > 0
