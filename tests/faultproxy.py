"""A TCP fault proxy for the tests, in the spirit of Toxiproxy: a weak link between a client and a server.

``FaultProxy(target).start()`` listens on a free port of 127.0.0.1 and forwards every connection
to ``target``. Faults, each settable while it runs:

- ``rate``: a bandwidth limit in bytes/s on the client->server direction (the uplink of a field
  device). ``shared=True`` gives all connections one budget (the whole link is limited: minio-py and
  urllib3 open several connections, and a per-connection limit would multiply the real bandwidth);
  ``shared=False`` gives each connection its own.
- ``cut_after``: every connection is cut abruptly (both sides reset, nothing flushed) once it is
  that many seconds old, as a flaky radio drops; the counter ``cuts`` says how many were.
- ``cut_on_answer(marker)``: the next server->client data containing ``marker`` is not delivered and
  its connection is cut (once): the server did the work, the client never hears of it.
- ``freeze()`` / ``thaw()``: a dead link that says nothing (no reset, no close): nothing is read or
  forwarded in either direction until thawed, so a sender blocks once its socket buffer is full.

``bytes_up`` / ``bytes_down`` count the bytes that entered the link (read from the client / from
the server), whether or not a cut lost them afterwards: what a metered uplink bills. The proxy's
accepted sockets get a small receive buffer, so bytes the kernel holds for it unread (and which a
cut loses uncounted) stay below ``RCVBUF`` per connection.

Threads are named ``faultproxy.<name>.accept`` and ``.<conn>.up`` / ``.<conn>.down``; every wait has
a timeout; ``stop()`` closes everything and joins every thread within a bound.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

log = logging.getLogger("faultproxy")

LOCALHOST = "127.0.0.1"
CHUNK = 64 * 1024
RCVBUF = 64 * 1024  # Linux doubles it: at most 128 KiB sit unread (and uncounted) per connection
POLL = 0.05  # longest a pipe thread waits before it looks at the cut deadline and the stop flag again


class Bucket:
    """A token bucket in bytes/s as a virtual clock: `take(n)` says when n bytes may go.

    A short burst (``burst_seconds`` of rate) lets a thread that woke late catch up, so the link
    runs at its rate on a busy machine instead of below it. Thread-safe: shared connections call it.
    """

    def __init__(self, rate: float, burst_seconds: float = 0.05) -> None:
        self.rate = rate
        self.burst_seconds = burst_seconds
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, n: int) -> float:
        """Reserves n bytes; returns the monotonic time at which they may be sent."""
        with self._lock:
            now = time.monotonic()
            start = max(now - self.burst_seconds, self._next)
            self._next = start + n / self.rate
            return start


class _Conn:
    """One proxied connection: the client's socket, the server's socket, and its cut deadline."""

    def __init__(self, num: int, client: socket.socket, server: socket.socket, deadline: float | None,
                 bucket: Bucket | None, on_cut: Callable[[], None]) -> None:  # fmt: skip
        self.num = num
        self.on_cut = on_cut
        self.client = client
        self.server = server
        self.deadline = deadline
        self.bucket = bucket
        self.cut = False
        self._lock = threading.Lock()
        self._closing = False
        self._pipes_left = 2

    def abort(self, cut: bool) -> bool:
        """Ends the connection abruptly: RST on both sides. Returns True for the first caller only.

        A cut is counted before either side can notice it. SO_LINGER 0 makes the final close send
        RST; `shutdown` wakes the other pipe thread at once without freeing its file descriptor under
        it (the last pipe thread closes the sockets).
        """
        with self._lock:
            if self._closing:
                return False
            self._closing = True
            self.cut = cut
        if cut:
            self.on_cut()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return True

    @property
    def closing(self) -> bool:
        with self._lock:
            return self._closing

    def pipe_done(self) -> bool:
        """One pipe thread has ended; the last one closes both sockets and returns True."""
        with self._lock:
            self._pipes_left -= 1
            last = self._pipes_left == 0
        if last:
            for sock in (self.client, self.server):
                with contextlib.suppress(OSError):
                    sock.close()
        return last


class FaultProxy:
    """See the module docstring. ``endpoint`` is ``127.0.0.1:<port>`` for a client's config."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rate: float | None = None,
        shared: bool = True,
        cut_after: float | None = None,
        name: str = "proxy",
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.name = name
        self.shared = shared
        self.connect_timeout = connect_timeout
        self._rate = rate
        self._cut_after = cut_after
        self._lock = threading.Lock()
        self._bucket: Bucket | None = Bucket(rate) if rate else None
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[_Conn] = set()
        self._seq = itertools.count(1)
        self._bytes_up = 0
        self._bytes_down = 0
        self._connections = 0
        self._cuts = 0
        self._answer_marker: bytes | None = None
        self.answers_cut = 0
        self.port = 0

    # ---- configuration (may change while running; applies to new connections and new bytes)

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    def set_rate(self, rate: float | None) -> None:
        """New bandwidth limit (None: unlimited) for connections accepted from now on."""
        with self._lock:
            self._rate = rate
            self._bucket = Bucket(rate) if rate else None

    def set_cut_after(self, seconds: float | None) -> None:
        """Cut connections accepted from now on once they are `seconds` old (None: never)."""
        with self._lock:
            self._cut_after = seconds

    def cut_on_answer(self, marker: bytes) -> None:
        """Once: swallow the server->client data that contains `marker` and cut its connection."""
        with self._lock:
            self._answer_marker = marker

    def _count_cut(self) -> None:
        with self._lock:
            self._cuts += 1

    def freeze(self) -> None:
        """From now on nothing moves on any connection (nor on new ones) until `thaw`."""
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def _answer_hit(self, seen: bytes) -> bool:
        with self._lock:
            if self._answer_marker is None or self._answer_marker not in seen:
                return False
            self._answer_marker = None
            self.answers_cut += 1
            return True

    # ---- counters

    @property
    def bytes_up(self) -> int:
        """Bytes read from clients (client->server) since start or the last `reset_counters`."""
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        with self._lock:
            return self._bytes_down

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def cuts(self) -> int:
        with self._lock:
            return self._cuts

    def reset_counters(self) -> None:
        with self._lock:
            self._bytes_up = self._bytes_down = self._connections = self._cuts = 0

    def cut_all(self) -> int:
        """Cut every open connection now (a link drop on demand); returns how many."""
        with self._lock:
            conns = list(self._conns)
        return sum(1 for c in conns if c.abort(cut=True))

    # ---- lifecycle

    def start(self, timeout: float = 5.0) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # inherited by accepted sockets
        listener.bind((LOCALHOST, 0))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        ready = threading.Event()
        t = threading.Thread(target=self._accept_loop, args=(ready,), name=f"faultproxy.{self.name}.accept",
                             daemon=True)  # fmt: skip
        self._threads.append(t)
        t.start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"fault proxy {self.name} did not start within {timeout} s")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Closes the listener and every connection; joins all threads within `timeout` (or raises)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._threads:  # the accept thread first: no new connection after this
            self._threads[0].join(timeout)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort(cut=False)
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"fault proxy {self.name}: threads still running after {timeout} s: {alive}")

    def __enter__(self) -> Self:
        return self if self.port else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"<FaultProxy {self.name} {self.endpoint} -> {self.target[0]}:{self.target[1]} rate={self._rate} "
                f"shared={self.shared} cut_after={self._cut_after} up={self.bytes_up} cuts={self.cuts}>")  # fmt: skip

    # ---- threads

    def _accept_loop(self, ready: threading.Event) -> None:
        assert self._listener is not None
        ready.set()
        while not self._stop.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], POLL)
            except (OSError, ValueError):
                return
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            accepted = time.monotonic()
            try:
                server = socket.create_connection(self.target, timeout=self.connect_timeout)
            except OSError as exc:
                log.warning("faultproxy %s: cannot reach %s: %s", self.name, self.target, exc)
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                continue
            for sock in (client, server):
                sock.settimeout(None)  # the pipes wait with select, bounded by POLL
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
                cut_after, rate, bucket = self._cut_after, self._rate, self._bucket
                conn = _Conn(next(self._seq), client, server,
                             accepted + cut_after if cut_after else None,
                             (bucket if self.shared else Bucket(rate)) if rate else None, self._count_cut)  # fmt: skip
                self._conns.add(conn)
            self._threads = [self._threads[0], *(t for t in self._threads[1:] if t.is_alive())]
            for direction, src, dst in (("up", client, server), ("down", server, client)):
                t = threading.Thread(target=self._pipe, args=(conn, direction, src, dst),
                                     name=f"faultproxy.{self.name}.{conn.num}.{direction}", daemon=True)  # fmt: skip
                self._threads.append(t)
                t.start()

    def _pipe(self, conn: _Conn, direction: str, src: socket.socket, dst: socket.socket) -> None:
        up = direction == "up"
        bucket = conn.bucket if up else None
        size = CHUNK if bucket is None else max(1024, min(CHUNK, int(bucket.rate / 50)))  # ~20 ms slices
        tail = b""  # the end of the previous chunk: a marker may straddle two reads
        try:
            while not self._stop.is_set() and not conn.closing:
                if self._due(conn):
                    return
                if self._frozen.is_set():
                    self._stop.wait(POLL)
                    continue
                wait = POLL if conn.deadline is None else max(0.0, min(POLL, conn.deadline - time.monotonic()))
                try:
                    readable, _, _ = select.select([src], [], [], wait)
                except (OSError, ValueError):
                    return
                if not readable:
                    continue
                try:
                    data = src.recv(size)
                except OSError:
                    conn.abort(cut=False)
                    return
                if not data:  # orderly close by this side: pass it on, keep the other direction open
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                with self._lock:
                    if up:
                        self._bytes_up += len(data)
                    else:
                        self._bytes_down += len(data)
                if bucket is not None and not self._pace(conn, bucket.take(len(data))):
                    return
                if not up and self._answer_hit(tail + data):
                    conn.abort(cut=True)
                    return
                tail = data[-256:]
                try:
                    dst.sendall(data)
                except OSError:
                    conn.abort(cut=False)
                    return
        finally:
            if conn.pipe_done():
                with self._lock:
                    self._conns.discard(conn)

    def _pace(self, conn: _Conn, when: float) -> bool:
        """Waits until `when`, in POLL steps; False if the connection was cut or closed meanwhile."""
        while True:
            if self._stop.is_set() or conn.closing or self._due(conn):
                return False
            left = when - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, POLL))

    def _due(self, conn: _Conn) -> bool:
        """Cuts `conn` if its deadline has passed; True if it is cut (by this or another thread)."""
        if conn.deadline is None or time.monotonic() < conn.deadline:
            return conn.cut
        conn.abort(cut=True)
        return True
