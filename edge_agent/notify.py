"""Minimal sd_notify(3): READY/STOPPING/WATCHDOG/STATUS over `$NOTIFY_SOCKET`, no dependency.

Every function is a no-op (returning False) when NOTIFY_SOCKET is unset, so the agent behaves the
same outside systemd. Abstract sockets (`@name`) are supported; errors are logged, never raised.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send one datagram such as `READY=1`; True if it was sent."""
    environ = os.environ if env is None else env
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r is not a unix socket path; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", message.split("=", 1)[0], exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog_seconds(env: dict[str, str] | None = None) -> float | None:
    """systemd's WatchdogSec for this process (from WATCHDOG_USEC/WATCHDOG_PID), or None."""
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000


class Watchdog:
    """A daemon thread sending WATCHDOG=1 every `interval` seconds while `alive()` is true.

    When `alive()` turns false the pings stop, so systemd kills and restarts the service after
    WatchdogSec; `stop()` ends the thread.
    """

    def __init__(self, interval: float, alive: Callable[[], bool]) -> None:
        self.interval = interval
        self.alive = alive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self.pings = 0

    @classmethod
    def from_env(cls, alive: Callable[[], bool], env: dict[str, str] | None = None) -> Watchdog | None:
        """A watchdog pinging at half of WATCHDOG_USEC, or None when systemd did not ask for one."""
        seconds = watchdog_seconds(env)
        return None if seconds is None else cls(seconds / 2, alive)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                healthy = self.alive()
            except Exception:
                log.exception("watchdog liveness check failed")
                healthy = False
            if healthy:
                watchdog()
                self.pings += 1
            else:
                log.error("main loop not alive: withholding the systemd watchdog ping")
            self._stop.wait(self.interval)


class LoopHeartbeat:
    """Liveness of a loop that blocks in `queue.get`: alive while waiting, or busy for less than `max_busy` s.

    `waiting()` is called just before the loop blocks for its next event and `busy()` when it has
    one; a loop stuck handling one event for longer than `max_busy` is reported dead.
    """

    def __init__(self, max_busy: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_busy = max_busy
        self._clock = clock
        self._busy_since: float | None = clock()

    def waiting(self) -> None:
        self._busy_since = None

    def busy(self) -> None:
        self._busy_since = self._clock()

    def alive(self) -> bool:
        since = self._busy_since
        return since is None or self._clock() - since < self.max_busy
