"""Integrations end to end (real Mosquitto, GStreamer RTSP camera, FFmpeg, local storage): Home
Assistant device discovery, the HA start/stop buttons (plain ON/OFF payloads), flow events and
telemetry."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from parts import MqttProbe, ffprobe_info, moov_before_mdat
from rig import Rig, make_rig, mosquitto_pub, record_for

pytestmark = pytest.mark.integration

HA = "homeassistant"


def edit_config(rig: Rig, **changes: Any) -> None:
    doc = yaml.safe_load(rig.config_path.read_text())
    doc.update(changes)
    rig.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))


def node_topic(node: str) -> str:
    return f"{HA}/device/{node}/config"


def test_home_assistant_discovery_buttons_events_telemetry(
    tmp_path: Path, broker, probe, prefix, make_agent, camera
) -> None:
    cameras = {"cam1": {"url": camera.url("cam1"), "name": "Gate"}, "cam2": {"url": camera.url("cam2")}}
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras=cameras, storage={"type": "local"})
    edit_config(rig, homeassistant={"enabled": True, "discovery_prefix": HA}, telemetry_seconds=1)
    probe.subscribe(f"{HA}/#")
    rig.start_agent()
    cam1_node, cam2_node, agent_node = f"{rig.device}_cam1", f"{rig.device}_cam2", f"{rig.device}_agent"

    # Discovery: retained, valid JSON, what HA requires per platform.
    cfg1 = probe.wait_for(node_topic(cam1_node), timeout=20)
    probe.wait_for(node_topic(cam2_node), timeout=20)
    agent_cfg = probe.wait_for(node_topic(agent_node), timeout=20)
    assert cfg1["dev"]["identifiers"] == [cam1_node] and cfg1["dev"]["name"] == "Gate"
    assert cfg1["o"]["name"] == "edge-agent" and cfg1["avty_t"] == f"{rig.base}/status"
    required = {"button": "command_topic", "binary_sensor": "state_topic", "sensor": "state_topic", "camera": "topic"}
    for comp in [*cfg1["cmps"].values(), *agent_cfg["cmps"].values()]:
        assert comp["p"] in required and comp["unique_id"]
        assert required[comp["p"]] in comp
    assert cfg1["cmps"]["snapshot"]["topic"] == f"{rig.base}/cam1/snapshot"
    assert agent_cfg["cmps"]["upload_backlog"]["state_topic"] == f"{rig.base}/uploads"
    with MqttProbe(broker.host, broker.port) as late:
        late.subscribe(node_topic(cam1_node))
        msg = late.wait_for_message(node_topic(cam1_node), timeout=10)
        assert msg.retain and msg.json() == cfg1

    telemetry = probe.wait_for(f"{rig.base}/telemetry", lambda p: p["cameras_configured"] == 2, timeout=10)
    assert telemetry["cameras_recording"] == 0 and telemetry["disk_free_bytes"] > 0 and telemetry["version"]

    # HA's birth message makes the agent publish discovery again.
    probe.clear()
    probe.publish(f"{HA}/status", "online")
    assert probe.wait_for(node_topic(cam1_node), timeout=10) == cfg1

    # The start button, as HA presses it, then OFF: a playable recording and its events.
    start, stop = cfg1["cmps"]["start"], cfg1["cmps"]["stop"]
    mosquitto_pub(broker.port, start["command_topic"], start["payload_press"])
    reply = probe.wait_for(rig.reply_topic("cam1"), lambda p: p["status"] == "starting", timeout=20)
    assert reply["ok"] is True and reply["task_name"].startswith("switch_")
    task = reply["task_name"]
    rig.wait_status("cam1", task, "recording", timeout=30)
    probe.wait_for(f"{rig.base}/telemetry", lambda p: p["cameras_recording"] == 1, timeout=10)
    record_for(4)
    mosquitto_pub(broker.port, stop["command_topic"], stop["payload_press"])
    final = rig.wait_status("cam1", task, {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    path = Path(final["local_file"])
    info = ffprobe_info(path)
    assert info["codec"] == "h264" and 2.0 <= info["duration"] <= 8.0
    assert moov_before_mdat(path)

    events_topic = f"{rig.base}/cam1/events"
    probe.wait_for(events_topic, lambda p: p["event"] == "completed", timeout=10)
    events = probe.messages(events_topic)
    kinds = [e["event"] for e in events]
    # Each closed segment is announced between `started` and `stopped` (rig: 2 s segments).
    assert kinds[0] == "started" and kinds[-2:] == ["stopped", "completed"], kinds
    segments = [e for e in events if e["event"] == "segment"]
    assert kinds[1:-2] == ["segment"] * len(segments) and len(segments) >= 2
    assert all(e["path"].endswith(".mp4") and e["seconds"] > 0 for e in segments)
    assert abs(sum(e["seconds"] for e in segments) - info["duration"]) < 1.0
    events = [e for e in events if e["event"] != "segment"]
    assert all(m.retain is False for m in probe.raw(events_topic))
    assert all(e["task_name"] == task and e["camera_id"] == "cam1" and e["device_id"] == rig.device for e in events)
    stopped = events[1]
    assert stopped["local_file"] == str(path) and stopped["size_bytes"] == path.stat().st_size
    assert abs(stopped["duration_seconds"] - info["duration"]) < 0.5

    # The binary sensor's source: the camera's retained status reads as not recording now.
    assert probe.messages(rig.status_topic("cam1"))[-1]["status"] == "completed"

    # Restart without cam2: its device config is cleared (empty retained), the others stay.
    assert rig.agent is not None
    rig.agent.terminate()
    doc = yaml.safe_load(rig.config_path.read_text())
    del doc["cameras"]["cam2"]
    rig.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    rig.start_agent()
    probe.wait_for_raw(node_topic(cam2_node), lambda p: p == b"", timeout=20)
    probe.wait_for(node_topic(cam1_node), timeout=20)
    with MqttProbe(broker.host, broker.port) as late:
        late.subscribe(f"{HA}/device/+/config")
        late.wait_for_message(node_topic(cam1_node), timeout=10)
        late.wait_for_message(node_topic(agent_node), timeout=10)
        time.sleep(1.0)
        assert late.raw(node_topic(cam2_node)) == []
    state = json.loads((rig.output_dir / ".ha-discovery.json").read_text())
    assert state == {"discovery_prefix": HA, "nodes": sorted([agent_node, cam1_node])}


def test_prometheus_metrics_follow_the_agent(tmp_path: Path, broker, probe, prefix, make_agent, camera) -> None:
    from parts import free_port

    port = free_port()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage={"type": "local"})  # fmt: skip
    edit_config(rig, metrics={"enabled": True, "port": port})
    rig.start_agent()

    def scrape() -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}  # fmt: skip

    before = scrape()
    assert before["edge_agent_cameras_configured"] == 1 and before["edge_agent_cameras_recording"] == 0
    assert before['edge_agent_camera_recording{camera="cam1",status="idle"}'] == 0
    rig.request("cam1", {"action": "start", "task_name": "prom"})
    rig.wait_status("cam1", "prom", "recording", timeout=30)
    during = scrape()
    assert during["edge_agent_cameras_recording"] == 1
    assert during['edge_agent_camera_recording{camera="cam1",status="recording"}'] == 1
    rig.request("cam1", {"action": "stop", "task_name": "prom"})
    rig.wait_status("cam1", "prom", {"completed", "failed"}, timeout=60)
    after = scrape()
    assert after["edge_agent_cameras_recording"] == 0 and after["edge_agent_disk_free_bytes"] > 0
