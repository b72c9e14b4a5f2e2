"""MqttLink without a broker: reconnect backoff and cluster node rotation (paho's own state)."""

from __future__ import annotations

import random

from edge_agent.config import MqttConfig
from edge_agent.mqtt import MqttLink
from edge_agent.topics import Topics


def _link(**cfg: object) -> MqttLink:
    return MqttLink(MqttConfig.model_validate(cfg), Topics("edge", "d1"), "edge-agent-d1", lambda e: None)


def _next_delay(link: MqttLink) -> float:
    link._jitter_reconnect()
    return float(link._client._reconnect_min_delay)


def test_reconnect_backoff_is_jittered_and_capped() -> None:
    random.seed(7)
    # Set at construction (first connect) and again after every lost connection (attempts reset).
    firsts = [float(_link(reconnect_min_seconds=1, reconnect_max_seconds=60)._client._reconnect_min_delay)
              for _ in range(200)]  # fmt: skip
    # The first retry after an outage is spread over [1, 3] s (a fleet does not reconnect in lockstep).
    assert all(1.0 <= d <= 3.0 for d in firsts) and max(firsts) - min(firsts) > 1.5
    link = _link(reconnect_min_seconds=1, reconnect_max_seconds=60)
    delays = [_next_delay(link) for _ in range(12)]
    assert all(1.0 <= d <= 60.0 for d in delays)
    assert max(delays[6:]) > 12  # the window grows exponentially...
    assert len({round(d, 3) for d in delays[6:]}) == 6  # ...and every attempt is drawn anew


def test_cluster_nodes_are_tried_in_turn() -> None:
    link = _link(hosts=["10.0.0.1:1883", "10.0.0.2:1884", "10.0.0.3:1885"])
    seen = []
    for _ in range(4):
        link._next_endpoint()
        seen.append((link._client._host, link._client._port))
    assert seen == [("10.0.0.2", 1884), ("10.0.0.3", 1885), ("10.0.0.1", 1883), ("10.0.0.2", 1884)]


# ---- which publish to drop (edge_agent.outbox.PoisonGuard) ------------------------------------------


def test_poison_guard_drops_the_oldest_message_after_repeated_quick_disconnects() -> None:
    from edge_agent.outbox import POISON_STRIKES, QUICK_SECONDS, PoisonGuard

    guard = PoisonGuard()
    inflight = {7: ("edge/d1/cam1/reply", 10.0, 300), 9: ("edge/d1/cam1/status", 5.0, 200)}
    for _ in range(POISON_STRIKES - 1):
        assert guard.judge(inflight, lived=1.0, blamed=False) is None  # not yet
    assert guard.judge(inflight, lived=1.0, blamed=False) == (9, POISON_STRIKES)  # the oldest one
    assert 9 not in guard.strikes and guard.strikes[7] == POISON_STRIKES  # the other keeps its strikes
    # A connection that lived long is no evidence against anything in flight: strikes are forgotten.
    assert guard.judge({7: inflight[7]}, lived=QUICK_SECONDS + 1, blamed=False) is None
    assert guard.strikes == {}


def test_poison_guard_judges_at_once_when_the_broker_blames_us_and_learns_the_size() -> None:
    from edge_agent.outbox import QUICK_SECONDS, PoisonGuard

    guard = PoisonGuard()
    assert guard.judge({3: ("t", 1.0, 5000)}, lived=QUICK_SECONDS * 10, blamed=True) == (3, 1)
    guard.dropped(5000, max_acked=800)  # bigger than anything acknowledged: the likely limit
    assert guard.learned_max_packet == 5000
    guard.dropped(700, max_acked=800)  # the broker took bigger ones: size was not the reason
    assert guard.learned_max_packet == 5000
    assert guard.judge({}, lived=0.5, blamed=True) is None  # nothing in flight: nothing to blame
