"""Limits applied before any work: a token bucket per camera and a bounded inbound command gate.

Both exist so that a flood on a shared broker costs the agent almost nothing: a command over its
camera's rate is answered `rate_limited` (while the reply budget lasts) or only counted, and the
network thread stops queueing commands once `mqtt.inbound_queue` of them wait for the agent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` says whether one was available.

    Owned by one thread (the agent loop), so it needs no lock.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def seconds_to_next(self) -> float:
        """How long until the next token (0 if one is available now)."""
        return max(0.0, (1.0 - self._tokens) / self.rate)


class InboundGate:
    """Counts commands between paho's network thread and the agent loop, and sheds beyond a bound.

    The network thread calls `admit()` before it enqueues a command; the agent calls `done()` after
    handling one. The event queue itself stays unbounded (shutdown and recorder events must never
    be refused), but commands in it are bounded. Messages on the extra topics (group commands, the
    desired configuration, Home Assistant's birth) may hold at most half of the bound, so a flood on
    a group topic can never shed the device's own camera commands.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._waiting = 0
        self._waiting_extra = 0
        self.shed = 0  # commands dropped because `limit` were already waiting

    def admit(self, extra: bool = False) -> bool:
        with self._lock:
            if self._waiting >= self.limit or (extra and self._waiting_extra >= max(1, self.limit // 2)):
                self.shed += 1
                return False
            self._waiting += 1
            self._waiting_extra += extra
            return True

    def done(self, extra: bool = False) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - 1)
            if extra:
                self._waiting_extra = max(0, self._waiting_extra - 1)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting
