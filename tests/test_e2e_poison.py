"""A publish the broker refuses never loops (issue 9), on a real Mosquitto with `max_packet_size`.

An MQTT 3.1.1 broker cannot tell a client its packet limit, and Mosquitto drops a client that sends a
bigger packet; paho re-sends every unacknowledged QoS 1 message after reconnecting, so before the
fix one oversized reply took the agent off the broker for good. Here the agent must identify the
message, drop it within `POISON_STRIKES` disconnects, count it, and keep serving. With MQTT 5 the
broker announces its limit in CONNACK and the agent refuses the oversized publish without any
disconnect at all.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from parts import Mosquitto, MqttProbe
from rig import make_rig

from edge_agent.outbox import POISON_STRIKES

pytestmark = pytest.mark.integration

LIMIT = 1024


class SmallPacketMosquitto(Mosquitto):
    def prepare(self) -> None:
        super().prepare()
        with self.config_path.open("a") as fh:
            fh.write(f"max_packet_size {LIMIT}\n")


def oversized_reply_command() -> bytes:
    """A small command whose rejection (one line per unknown key) is larger than LIMIT."""
    doc: dict[str, object] = {"action": "status", "request_id": "r-big"}
    doc.update({f"k{i:02d}": 0 for i in range(40)})
    payload = json.dumps(doc).encode()
    assert len(payload) < LIMIT
    return payload


def agent_disconnects(broker: Mosquitto, client_id: str) -> int:
    log = broker.log_since_start()
    return sum(1 for line in log.splitlines() if client_id in line and "disconnect" in line.lower())


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_oversized_publish_is_dropped_and_the_agent_stays_on_the_air(
    tmp_path: Path, make_agent, camera, protocol: str
) -> None:
    broker = SmallPacketMosquitto(tmp_path / "broker").start()
    probe = MqttProbe(broker.host, broker.port)
    try:
        prefix = "poison"
        rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                       storage={"type": "local"},
                       mqtt={"protocol": protocol, "reconnect_min_seconds": 0.2,
                             "reconnect_max_seconds": 1})  # fmt: skip
        doc = yaml.safe_load(rig.config_path.read_text())
        doc["telemetry_seconds"] = 1
        rig.config_path.write_text(yaml.safe_dump(doc))
        rig.start_agent()
        assert rig.request("cam1", {"action": "status"})["status"] == "idle"

        probe.publish(rig.cmd_topic("cam1"), oversized_reply_command())
        time.sleep(0.5)
        # Serving again: the next command is answered (the oversized reply was dropped).
        deadline = time.monotonic() + 30
        reply = None
        while reply is None and time.monotonic() < deadline:
            try:
                reply = rig.request("cam1", {"action": "status"}, timeout=3)
            except AssertionError:
                continue
        assert reply is not None and reply["status"] == "idle", rig.agent.log_tail() if rig.agent else ""
        tele = probe.wait_for(f"{rig.base}/telemetry",
                              lambda p: p.get("publishes_poisoned", 0) + p.get("publishes_refused", 0) >= 1,
                              timeout=15)  # fmt: skip
        disconnects = agent_disconnects(broker, "edge-agent-edge-t")
        if protocol == "5":
            # The broker's CONNACK said how big a packet may be: refused before sending, no disconnect.
            assert tele["publishes_refused"] == 1 and tele["publishes_poisoned"] == 0, tele
            assert disconnects == 0, broker.log_tail()
        else:
            assert tele["publishes_poisoned"] == 1, tele
            assert 1 <= disconnects <= POISON_STRIKES, broker.log_tail()
        assert probe.wait_for_raw(f"{rig.base}/status", lambda p: p == b"online", timeout=5).payload == b"online"
        assert rig.agent is not None and rig.agent.is_alive()
        assert "dropped the message" in rig.agent.log_text() or protocol == "5"
        # It stays connected from here on: a further command, no new disconnect.
        assert rig.request("cam1", {"action": "status"})["ok"] is True
        assert agent_disconnects(broker, "edge-agent-edge-t") == disconnects
    finally:
        probe.close()
        broker.stop()
