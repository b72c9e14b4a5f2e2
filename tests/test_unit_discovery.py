"""Unit tests of the integrations: Home Assistant discovery payloads, flow events, ON/OFF commands,
telemetry. Fakes at the agent's seams (from test_unit_agent); no broker, no FFmpeg process.

HA requirements checked here (MQTT discovery docs, device-based discovery on
`<discovery_prefix>/device/<node_id>/config`): the payload needs `dev` with `identifiers` and `o`
(origin) with `name`; `cmps` maps object ids to components that each carry `p` (platform) and
`unique_id`; a `button` needs `command_topic`; `binary_sensor` and `sensor` need `state_topic`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_unit_agent import FakePublisher, Harness, make_harness

from edge_agent import __version__, discovery
from edge_agent.config import AgentConfig
from edge_agent.configload import parse_config
from edge_agent.errors import ConfigError
from edge_agent.journal import Journal
from edge_agent.messages import decode_command, parse_switch, transition_events
from edge_agent.mqtt import Connected, MessageReceived
from edge_agent.recording import Interrupted, MediaStarted, RecordingFailed
from edge_agent.uploads import UploadFinished

P_D = "edge/edge-01"
REQUIRED_BY_PLATFORM = {"button": {"command_topic"}, "binary_sensor": {"state_topic"}, "sensor": {"state_topic"},
                        "camera": {"topic"}}  # fmt: skip


def config(tmp: Path, **extra: Any) -> AgentConfig:
    doc: dict[str, Any] = {
        "device_id": "edge-01",
        "mqtt": {"topic_prefix": "edge"},
        "cameras": {"cam1": {"url": "rtsp://192.0.2.10/s", "name": "Front door"}, "cam2": {"url": "rtsp://192.0.2.11/s"}},
        "recording": {"output_dir": str(tmp / "rec"), "max_seconds": 600},
        "storage": {"type": "local", "min_free_bytes": 0},
        **extra,
    }  # fmt: skip
    return parse_config(doc, env={})


class SubscribingPublisher(FakePublisher):
    def __init__(self) -> None:
        super().__init__()
        self.subscriptions: list[str] = []

    def add_subscription(self, topic: str) -> None:
        self.subscriptions.append(topic)

    def remove_subscription(self, topic: str) -> None:
        self.subscriptions.remove(topic)


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    journals: list[Journal] = []

    def factory(storage: dict[str, Any] | None = None, **extra: Any) -> Harness:
        cfg = config(tmp_path, **extra)
        if storage:
            cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update=storage)})
        return make_harness(tmp_path, cfg, SubscribingPublisher(), journals)

    yield factory
    for j in journals:
        j.close()


def events_of(h: Harness, camera: str = "cam1") -> list[dict[str, Any]]:
    topic = f"{P_D}/{camera}/events"
    out = []
    for t, payload, retain in h.pub.published:
        if t == topic:
            assert retain is False, "events are not retained"
            out.append(json.loads(payload))
    return out


def render(template: str, value_json: dict[str, Any]) -> str:
    """The two Jinja forms the payloads use, evaluated the way HA would (no jinja2 in this venv)."""
    plain = re.fullmatch(r"\{\{ value_json\.(\w+) \}\}", template)
    if plain:
        return str(value_json[plain.group(1)])
    cond = re.fullmatch(r"\{\{ '(\w+)' if value_json\.(\w+) in \[([^\]]*)\] else '(\w+)' \}\}", template)
    assert cond, template
    members = [m.strip().strip("'") for m in cond.group(3).split(",")]
    return cond.group(1) if value_json[cond.group(2)] in members else cond.group(4)


# ---- discovery payloads ---------------------------------------------------------------------------


def test_camera_discovery_has_what_ha_requires(tmp_path: Path) -> None:
    cfg = config(tmp_path, homeassistant={"enabled": True})
    doc = discovery.camera_config(cfg, "cam1", "9.9")
    assert doc["dev"]["identifiers"] == ["edge-01_cam1"]
    assert doc["dev"]["name"] == "Front door" and doc["dev"]["manufacturer"] == "edge-agent"
    assert doc["dev"]["sw_version"] == "9.9" and doc["dev"]["model"]
    assert doc["o"]["name"] == "edge-agent" and doc["o"]["sw_version"] == "9.9"
    assert (doc["avty_t"], doc["pl_avail"], doc["pl_not_avail"]) == (f"{P_D}/status", "online", "offline")
    cmps = doc["cmps"]
    assert {c["p"] for c in cmps.values()} == {"button", "binary_sensor", "sensor", "camera"}
    for obj_id, comp in cmps.items():
        assert re.fullmatch(r"[A-Za-z0-9_-]+", obj_id)
        assert comp["unique_id"].startswith("edge-01_cam1_")
        assert REQUIRED_BY_PLATFORM[comp["p"]] <= comp.keys(), (obj_id, comp)
    uids = [c["unique_id"] for c in cmps.values()]
    assert len(set(uids)) == len(uids)
    assert cmps["start"]["command_topic"] == cmps["stop"]["command_topic"] == f"{P_D}/cam1/cmd"
    assert parse_switch(cmps["start"]["payload_press"].encode()) == "start"
    assert parse_switch(cmps["stop"]["payload_press"].encode()) == "stop"
    assert cmps["status"]["state_topic"] == cmps["status"]["json_attributes_topic"] == f"{P_D}/cam1/status"
    assert cmps["recording"]["state_topic"] == f"{P_D}/cam1/status"
    # The snapshot: an MQTT camera on the raw-JPEG topic, and a button that asks for a new one.
    assert cmps["snapshot"]["topic"] == f"{P_D}/cam1/snapshot"
    taken = decode_command(cmps["take_snapshot"]["payload_press"].encode(), 4096).command
    assert taken is not None and taken.action == "snapshot"
    assert cmps["take_snapshot"]["command_topic"] == f"{P_D}/cam1/cmd"


@pytest.mark.parametrize(
    ("status", "state"),
    [("idle", "OFF"), ("starting", "ON"), ("recording", "ON"), ("stopping", "ON"), ("uploading", "OFF"),
     ("completed", "OFF"), ("failed", "OFF")],
)  # fmt: skip
def test_templates_render_like_ha(tmp_path: Path, status: str, state: str) -> None:
    cmps = discovery.camera_config(config(tmp_path), "cam2", "1")["cmps"]
    assert render(cmps["recording"]["value_template"], {"status": status}) == state
    assert cmps["recording"]["payload_on"] == "ON" and cmps["recording"]["payload_off"] == "OFF"
    assert render(cmps["status"]["value_template"], {"status": status}) == status


def test_agent_device_and_node_ids(tmp_path: Path) -> None:
    cfg = config(tmp_path, telemetry_seconds=30)
    configs = discovery.discovery_configs(cfg, "1")
    assert set(configs) == {"edge-01_cam1", "edge-01_cam2", "edge-01_agent"}
    agent = configs["edge-01_agent"]
    assert agent["dev"]["identifiers"] == ["edge-01_agent"] and agent["o"]["name"]
    backlog = agent["cmps"]["upload_backlog"]
    assert backlog["p"] == "sensor" and backlog["state_topic"] == backlog["json_attributes_topic"] == f"{P_D}/uploads"
    assert render(backlog["value_template"], {"queue_length": 3}) == "3"
    assert agent["cmps"]["disk_free"]["state_topic"] == f"{P_D}/telemetry"
    for comp in agent["cmps"].values():
        assert comp["unique_id"].startswith("edge-01_agent_") and REQUIRED_BY_PLATFORM[comp["p"]] <= comp.keys()
    no_telemetry = discovery.agent_config(config(tmp_path, telemetry_seconds=0), "1")
    assert set(no_telemetry["cmps"]) == {"upload_backlog"}


def test_stale_topics() -> None:
    prev = discovery.state_doc("homeassistant", {"d_cam1", "d_cam2", "d_agent"})
    assert discovery.stale_topics(prev, "homeassistant", {"d_cam1", "d_agent"}) == [
        "homeassistant/device/d_cam2/config"
    ]
    # A changed discovery prefix clears everything under the old one.
    assert len(discovery.stale_topics(prev, "ha2", {"d_cam1", "d_cam2", "d_agent"})) == 3
    assert discovery.stale_topics({}, "homeassistant", set()) == []
    assert discovery.stale_topics({"discovery_prefix": 1, "nodes": "x"}, "homeassistant", set()) == []


def test_state_file_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "x" / discovery.STATE_FILE
    assert discovery.read_state(path) == {}
    discovery.write_state(path, discovery.state_doc("homeassistant", {"b", "a"}))
    assert discovery.read_state(path) == {"discovery_prefix": "homeassistant", "nodes": ["a", "b"]}
    path.write_text("{half")
    assert discovery.read_state(path) == {}


def test_config_defaults_and_validation(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert cfg.homeassistant.enabled is False and cfg.homeassistant.discovery_prefix == "homeassistant"
    assert cfg.telemetry_seconds == 60
    with pytest.raises(ConfigError, match="discovery_prefix"):
        config(tmp_path, homeassistant={"discovery_prefix": "ha/#"})
    with pytest.raises(ConfigError, match="telemetry_seconds"):
        config(tmp_path, telemetry_seconds=-1)
    with pytest.raises(ConfigError, match=r"homeassistant\.bogus"):
        config(tmp_path, homeassistant={"bogus": 1})


# ---- the agent publishing discovery -----------------------------------------------------------------


def test_agent_publishes_discovery_on_connect_and_ha_birth(build: Callable[..., Harness]) -> None:
    h = build(homeassistant={"enabled": True})
    pub = h.pub
    assert isinstance(pub, SubscribingPublisher) and pub.subscriptions == ["homeassistant/status"]
    h.agent.handle(Connected(False))
    topic = "homeassistant/device/edge-01_cam1/config"
    cfg1 = pub.retained(topic)
    assert cfg1 is not None and cfg1["dev"]["sw_version"] == __version__
    assert pub.retained("homeassistant/device/edge-01_agent/config") is not None
    n = len(pub.published)
    h.agent.handle(MessageReceived("homeassistant/status", b"offline"))
    assert len(pub.published) == n
    h.agent.handle(MessageReceived("homeassistant/status", b"online"))
    assert [t for t, _, _ in pub.published[n:] if t == topic] == [topic]


def test_disabled_discovery_publishes_nothing(build: Callable[..., Harness]) -> None:
    h = build()
    h.agent.handle(Connected(False))
    assert not [t for t, _, _ in h.pub.published if t.startswith("homeassistant/")]
    assert isinstance(h.pub, SubscribingPublisher) and h.pub.subscriptions == []


def test_removed_camera_gets_empty_retained_config(tmp_path: Path, build: Callable[..., Harness]) -> None:
    out = tmp_path / "rec"
    nodes = {"edge-01_cam1", "edge-01_gone", "edge-01_agent"}
    discovery.write_state(out / discovery.STATE_FILE, discovery.state_doc("homeassistant", nodes))
    h = build(homeassistant={"enabled": True})
    h.agent.handle(Connected(False))
    assert h.pub.retained("homeassistant/device/edge-01_gone/config") is None
    assert h.pub.retained("homeassistant/device/edge-01_cam1/config") is not None
    state = discovery.read_state(out / discovery.STATE_FILE)
    assert state["nodes"] == ["edge-01_agent", "edge-01_cam1", "edge-01_cam2"]


# ---- flow events --------------------------------------------------------------------------------------


def test_transition_events_pure() -> None:
    doc = {"status": "completed", "camera_id": "c", "task_name": "t", "device_id": "d", "local_file": "/x.mp4",
           "duration_seconds": 3.5, "size_bytes": 10}  # fmt: skip
    evs = transition_events("stopping", doc, "2026-01-01T00:00:00.000Z")
    assert [e["event"] for e in evs] == ["stopped", "completed"]
    assert evs[0] == {"event": "stopped", "camera_id": "c", "task_name": "t", "device_id": "d",
                      "at": "2026-01-01T00:00:00.000Z", "duration_seconds": 3.5, "size_bytes": 10,
                      "local_file": "/x.mp4"}  # fmt: skip
    assert transition_events("completed", doc, "x") == []
    assert transition_events("uploading", {**doc, "status": "upload_pending"}, "x") == []
    assert [e["event"] for e in transition_events("starting", {**doc, "status": "recording"}, "x")] == ["started"]
    assert [e["event"] for e in transition_events("starting", {**doc, "status": "failed"}, "x")] == ["failed"]


def test_local_flow_emits_started_stopped_completed(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("t1")
    assert events_of(h) == []  # `starting` is not an event
    rec = h.recorders[0]
    h.agent.handle(MediaStarted(rec.spec.task_id))
    h.agent.handle(Interrupted(rec.spec.task_id, 1, "stall"))  # not a status change: no event
    h.cmd({"action": "stop", "task_name": "t1"})
    h.finish(rec, size=2048, duration=4.0)
    evs = events_of(h)
    assert [e["event"] for e in evs] == ["started", "stopped", "completed"]
    for e in evs:
        assert (e["camera_id"], e["task_name"], e["device_id"]) == ("cam1", "t1", "edge-01")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["at"])
    assert evs[1]["duration_seconds"] == 4.0 and evs[1]["size_bytes"] == 2048
    assert evs[1]["local_file"] == str(rec.spec.output_file)
    assert events_of(h, "cam2") == []


def test_minio_flow_emits_uploaded(build: Callable[..., Harness]) -> None:
    h = build(storage={"type": "minio", "download_url": "retained"})
    h.start("t2")
    rec = h.recorders[0]
    h.agent.handle(MediaStarted(rec.spec.task_id))
    h.cmd({"action": "stop", "task_name": "t2"})
    h.finish(rec)
    obj = h.uploads.submitted[0]["object_name"]
    h.agent.handle(UploadFinished(rec.spec.task_id, "recordings", obj, "http://dl", True, 1))  # retained mode
    evs = events_of(h)
    assert [e["event"] for e in evs] == ["started", "stopped", "uploaded"]
    up = evs[2]
    assert up["object_name"] == obj and up["download_url"] == "http://dl"
    assert up["sha256"] == "ab" * 32 and up["size_bytes"] == 4096


def test_failure_emits_failed(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("t3")
    h.agent.handle(RecordingFailed(h.recorders[0].spec.task_id, "camera unreachable"))
    assert events_of(h) == [{**events_of(h)[0], "event": "failed", "error": "camera unreachable"}]


# ---- ON / OFF -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "action"),
    [(b"ON", "start"), (b"on", "start"), (b" On\n", "start"), (b"start", "start"), (b"START", "start"),
     (b"OFF", "stop"), (b"off", "stop"), (b"Stop", "stop"), (b"", None), (b"onn", None), (b'"ON"', None),
     (b'{"action":"start"}', None), (b"\xff", None), (b"ON" + b" " * 100, None)],
)  # fmt: skip
def test_parse_switch(payload: bytes, action: str | None) -> None:
    assert parse_switch(payload) == action


def test_on_off_switch(build: Callable[..., Harness]) -> None:
    h = build()
    off = h.cmd(b"OFF")
    assert off["status"] == "not_running" and off["ok"] is False
    on = h.cmd(b"ON")
    assert on["ok"] is True and on["status"] == "starting"
    assert re.fullmatch(r"switch_\d{8}T\d{9}Z", on["task_name"])
    again = h.cmd(b"on")  # idempotent while busy
    assert again["ok"] is True and again["task_name"] == on["task_name"] and len(h.recorders) == 1
    stop = h.cmd(b"off")
    assert stop["ok"] is True and stop["status"] == "stopping" and stop["task_name"] == on["task_name"]
    assert h.recorders[0].stop_requests == 1


def test_off_stops_a_named_task(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("patrol-7")
    reply = h.cmd(b"stop")
    assert reply["ok"] is True and reply["task_name"] == "patrol-7" and reply["status"] == "stopping"


# ---- telemetry ------------------------------------------------------------------------------------------


def test_telemetry_document(build: Callable[..., Harness]) -> None:
    h = build(telemetry_seconds=5)
    h.agent.handle(Connected(False))
    t0 = h.pub.retained(f"{P_D}/telemetry")
    assert t0 is not None
    assert t0["cameras_configured"] == 2 and t0["cameras_recording"] == 0 and t0["ffmpeg_restarts"] == 0
    assert t0["version"] == __version__ and t0["disk_free_bytes"] > 0 and t0["uptime_seconds"] >= 0
    assert t0["disk_below_floor"] is False  # min_free_bytes is 0 in these tests
    assert t0["queue_length"] == 0 and t0["bytes_pending"] == 0
    h.start("t")
    tid = h.recorders[0].spec.task_id
    h.agent.handle(MediaStarted(tid))
    h.agent.handle(Interrupted(tid, 1, "stall"))
    h.agent.handle(Interrupted(tid, 2, "exit"))
    h.agent.report.telemetry()
    t1 = h.pub.retained(f"{P_D}/telemetry")
    assert t1 is not None and t1["cameras_recording"] == 1 and t1["ffmpeg_restarts"] == 2


def test_telemetry_disabled(build: Callable[..., Harness]) -> None:
    h = build(telemetry_seconds=0)
    h.agent.handle(Connected(False))
    assert not [t for t, _, _ in h.pub.published if t.endswith("/telemetry")]


def test_run_loop_publishes_telemetry_on_its_timer(build: Callable[..., Harness]) -> None:
    import threading
    import time

    from edge_agent.agent import Shutdown

    h = build(telemetry_seconds=0.2)
    th = threading.Thread(target=h.agent.run)
    th.start()
    time.sleep(0.75)
    h.agent.events.put(Shutdown("test"))
    th.join(10)
    n = sum(1 for t, _, _ in h.pub.published if t == f"{P_D}/telemetry")
    assert 2 <= n <= 5, n


def test_metrics_render_is_prometheus_text() -> None:
    from edge_agent.metrics import render

    text = render({"device_id": "edge-01", "version": "0.1.0", "cameras_recording": 1, "queue_length": 2,
                   "disk_below_floor": False, "ffmpeg_restarts": 3, "disk_free_bytes": None,
                   "camera_status": {"cam1": "recording", "cam2": "uploaded"}})  # fmt: skip
    lines = text.splitlines()
    assert 'edge_agent_info{device="edge-01",version="0.1.0"} 1' in lines
    assert "edge_agent_cameras_recording 1" in lines and "edge_agent_upload_queue_length 2" in lines
    assert "edge_agent_disk_below_floor 0" in lines and "# TYPE edge_agent_ffmpeg_restarts_total counter" in lines
    assert not any(line.startswith("edge_agent_disk_free_bytes") for line in lines)  # unknown: left out
    assert 'edge_agent_camera_recording{camera="cam1",status="recording"} 1' in lines
    assert 'edge_agent_camera_recording{camera="cam2",status="uploaded"} 0' in lines
    assert text.endswith("\n")


def test_segment_events_can_be_turned_off(build: Callable[..., Harness], tmp_path: Path) -> None:
    from edge_agent.recording import SegmentClosed

    for enabled in (True, False):
        h = build(recording={"output_dir": str(tmp_path / "rec"), "segment_events": enabled})
        h.start("seg")
        rec = h.recorders[-1]
        h.pub.published.clear()
        h.agent.handle(SegmentClosed(rec.spec.task_id, rec.spec.segment_dir / "seg_000000.ts", 4.0))
        events = [json.loads(p) for t, p, _ in h.pub.published if t.endswith("/events")]
        assert [e["event"] for e in events] == (["segment"] if enabled else [])
        if enabled:
            assert events[0]["seconds"] == 4.0 and events[0]["path"].endswith("seg_000000.ts")
