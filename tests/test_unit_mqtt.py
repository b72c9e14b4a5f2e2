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
