"""What the MQTT link keeps of its publishes: messages in flight, retained values waiting for room,
counters, and which publish to drop when the broker keeps closing the connection over it.

Bookkeeping only (no paho calls), so `MqttLink` stays the one place that talks to paho.
"""

from __future__ import annotations

import threading
import time

PACKET_OVERHEAD = 4096  # fixed header, topic and v5 properties on top of a command's payload
# v5 DISCONNECT reasons that blame what we sent: malformed packet, protocol error, not authorized,
# topic name invalid, packet too large, payload format invalid.
INPUT_REASONS = frozenset({0x81, 0x82, 0x87, 0x90, 0x95, 0x99})
POISON_STRIKES = 3  # quick disconnects with the same message outstanding before it is dropped
QUICK_SECONDS = 15.0


class Outbox:
    """Bookkeeping of what the link publishes: messages in flight, retained values waiting for room,
    and counters. `lock` serialises the agent's publishes; `_mids_lock` (in-flight table) is the only
    lock taken on paho's network thread, and never while holding paho's own lock in the other order.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lock = threading.RLock()
        self._mids_lock = threading.Lock()
        self._inflight: dict[int, tuple[str, float, int]] = {}  # mid -> (topic, sent at, packet bytes)
        self.max_acked = 0  # largest packet the broker has acknowledged
        self._held: dict[str, bytes] = {}  # topic -> newest retained payload not yet handed to paho
        self._counters = {"publishes_refused": 0, "publishes_dropped": 0, "publishes_poisoned": 0,
                          "retained_coalesced": 0}  # fmt: skip
        self.ready_posted = False

    def count(self, key: str, n: int = 1) -> None:
        self._counters[key] += n

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["retained_waiting"] = len(self._held)
        return out

    def holds(self, topic: str) -> bool:
        return topic in self._held

    def hold(self, topic: str, payload: bytes) -> None:
        if topic in self._held:
            self._counters["retained_coalesced"] += 1
        self._held[topic] = payload

    def has_held(self) -> bool:
        return bool(self._held)

    def take_held(self, n: int) -> list[tuple[str, bytes]]:
        with self.lock:
            topics = list(self._held)[: max(0, n)]
            return [(t, self._held.pop(t)) for t in topics]

    def sent(self, mid: int, topic: str, size: int) -> None:
        with self._mids_lock:
            self._inflight[mid] = (topic, time.monotonic(), size)

    def done(self, mid: int) -> int:
        """Called on paho's thread when `mid` is acknowledged; returns how many remain in flight."""
        with self._mids_lock:
            entry = self._inflight.pop(mid, None)
            if entry is not None:
                self.max_acked = max(self.max_acked, entry[2])
            return len(self._inflight)

    def room(self) -> int:
        with self._mids_lock:
            return max(0, self.capacity // 2 - len(self._inflight))

    def outstanding(self) -> dict[int, tuple[str, float, int]]:
        with self._mids_lock:
            return dict(self._inflight)

    def forget(self, mid: int) -> None:
        with self._mids_lock:
            self._inflight.pop(mid, None)




class PoisonGuard:
    """Which publish to blame when the broker keeps closing the connection while it is in flight.

    A message gets a strike at every disconnect that comes within `QUICK_SECONDS` of connecting while
    it is in flight; one the broker blames outright (a v5 DISCONNECT saying we sent something wrong)
    is judged at once. The oldest struck-out message is the one to drop. A dropped message bigger than
    anything the broker ever acknowledged teaches the size limit a 3.1.1 broker cannot announce.
    """

    def __init__(self) -> None:
        self.strikes: dict[int, int] = {}  # mid -> quick disconnects while it was in flight
        self.learned_max_packet: int | None = None

    def judge(self, outstanding: dict[int, tuple[str, float, int]], lived: float,
              blamed: bool) -> tuple[int, int] | None:  # fmt: skip
        """(mid, strikes) of the message to drop after this disconnect, or None.

        `outstanding`: mid -> (topic, time sent, packet size) of every message still in flight;
        `lived`: seconds the connection lasted; `blamed`: the broker's DISCONNECT blamed our input.
        """
        if not outstanding or (lived > QUICK_SECONDS and not blamed):
            self.strikes.clear()
            return None
        # Every message still in flight gets a strike; one that was acknowledged in between is cleared.
        self.strikes = {mid: self.strikes.get(mid, 0) + 1 for mid in outstanding}
        struck = [m for m, n in self.strikes.items() if blamed or n >= POISON_STRIKES]
        if not struck:
            return None
        mid = min(struck, key=lambda m: outstanding[m][1])  # the oldest of them
        return mid, self.strikes.pop(mid)

    def dropped(self, size: int, max_acked: int) -> None:
        """A message of `size` bytes was dropped; `max_acked` is the largest the broker acknowledged."""
        if size > max_acked:
            self.learned_max_packet = min(size, self.learned_max_packet or size)
