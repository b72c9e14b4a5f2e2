"""`edge-agent ctl` for fleets on a real Mosquitto: a `--device` glob over real agents (one online
device has no agent: `no reply`), `--group` and `config get|set|diff` against a fake member that
answers per docs/remote-management.md (every case, rejections and timeouts included), then the same
on real agents and a real camera, with `snapshot --output`.

ctl runs in-process (`cli.main`) on its own MQTT connection, as from the shell but cheaper.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from parts import Mosquitto, MqttProbe, write_config

from edge_agent.cli import main
from edge_agent.configctl import redact_config

pytestmark = pytest.mark.integration

CAM_PASSWORD = "cam-pw-fleet-93k"
UNREACHABLE = "rtsp://127.0.0.1:9/cam1"  # status commands never touch the camera


def agent_config(tmp_path: Path, broker: Mosquitto, prefix: str, device: str,
                 cameras: dict[str, dict[str, Any]] | None = None, **mqtt_extra: Any) -> Path:  # fmt: skip
    return write_config(
        tmp_path / device / "agent.yaml", device_id=device, mqtt_port=broker.port, topic_prefix=prefix,
        cameras=cameras if cameras is not None else {"cam1": {"url": UNREACHABLE}},
        output_dir=tmp_path / device / "rec", storage={"type": "local", "min_free_bytes": 0}, mqtt=mqtt_extra,
    )  # fmt: skip


def run_ctl(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str, float]:
    began = time.monotonic()
    code = main(["ctl", "--config", str(config), *argv])
    out, err = capsys.readouterr()
    return code, out, err, time.monotonic() - began


def table(out: str) -> dict[tuple[str, str], list[str]]:
    """(device, camera) -> the row's cells, from the text table (header first, summary last)."""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["DEVICE", "CAMERA", "OK", "STATUS", "TASK", "ERROR"], out
    return {(cells[0], cells[1]): cells[2:] for cells in (line.split() for line in lines[1:-1])}


# ---------------------------------------------------------------------------------- --device GLOB


def test_device_glob_fans_out_to_online_agents(tmp_path: Path, broker: Mosquitto, probe: MqttProbe, prefix: str,
                                               make_agent: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for device in ("site-a-1", "site-a-2"):
        make_agent(agent_config(tmp_path, broker, prefix, device))
    probe.publish(f"{prefix}/site-a-3/status", "online", retain=True)  # online, but no agent answers
    probe.publish(f"{prefix}/site-a-4/status", "offline", retain=True)  # offline: not targeted
    probe.publish(f"{prefix}/site-b-1/status", "online", retain=True)  # does not match
    probe.subscribe(f"{prefix}/+/status")
    for device in ("site-a-1", "site-a-2"):
        probe.wait_for_raw(f"{prefix}/{device}/status", lambda p: p == b"online", timeout=30)
    ctl_cfg = agent_config(tmp_path, broker, prefix, "ctl-home")

    code, out, err, took = run_ctl(capsys, ctl_cfg, "--device", "site-a-*", "--timeout", "2", "status", "cam1")
    assert code == 1, (out, err)
    rows = table(out)
    assert set(rows) == {("site-a-1", "cam1"), ("site-a-2", "cam1"), ("site-a-3", "cam1")}, out
    assert rows[("site-a-1", "cam1")][:2] == ["yes", "idle"] and rows[("site-a-2", "cam1")][:2] == ["yes", "idle"]
    assert rows[("site-a-3", "cam1")][:3] == ["no", "no", "reply"]
    assert out.strip().splitlines()[-1] == "2 of 3 ok on 3 devices, 1 without reply"
    assert 2 <= took < 2 + 3  # the silent device is waited for until --timeout, no longer

    # Every matched device answers: exit 0, at once. MQTT 3.1.1 (no inbox: the reply topics) and JSON lines.
    v311 = agent_config(tmp_path, broker, prefix, "ctl-v311", protocol="3.1.1")
    code, out, err, took = run_ctl(capsys, v311, "--device", "site-a-[12]", "--json", "--timeout", "10",
                                   "status", "cam1")  # fmt: skip
    assert code == 0, (out, err)
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["device_id"], d["camera_id"], d["status"], d["ok"]) for d in docs] == [
        ("site-a-1", "cam1", "idle", True), ("site-a-2", "cam1", "idle", True)]  # fmt: skip
    assert took < 5

    # An unknown camera is answered ok:false by each device: exit 1, the error in the table.
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "site-a-[!3]", "status", "nocam")
    rows = table(out)
    assert code == 1 and set(rows) == {("site-a-1", "nocam"), ("site-a-2", "nocam")}, (out, err)
    assert rows[("site-a-1", "nocam")][:2] == ["no", "error"] and "not configured" in out, out

    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "site-z-*", "--timeout", "3", "status", "cam1")
    assert code == 1 and out == "", (out, err)
    assert "no online device matches 'site-z-*'" in err and "site-a-1" in err and "site-a-4" not in err


# ------------------------------------------------------------------------- a fake member (protocol)


class FakeMembers:
    """Devices without an agent that answer group commands and desired documents the way
    docs/remote-management.md says: one reply per member on P/D/groups/G/reply with a result per
    camera, and a retained P/D/config/reported (rejected when a camera is named `bad`)."""

    def __init__(self, broker: Mosquitto, prefix: str, devices: dict[str, list[str]],
                 groups: dict[str, list[str]]) -> None:  # fmt: skip
        self.prefix, self.devices, self.groups = prefix, devices, groups
        self.commands: list[dict[str, Any]] = []
        self.applied: dict[str, int] = {}
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-{prefix}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(f"{prefix}/groups/+/cmd", 1), (f"{prefix}/+/config/desired", 1)])
        assert self._subscribed.wait(10), "fake members: no SUBACK"
        for device in devices:
            self.report(device, {"version": 3, "state": "applied", "applied_at": "2026-12-06T18:00:00.000Z",
                                 "pending": [], "config": {},
                                 "rejected": {"version": 4, "at": "2026-12-06T18:01:00.000Z", "errors": [
                                     {"path": "recording.max_seconds", "message": "too small"}]}},
                        wait=True)  # fmt: skip

    def report(self, device: str, doc: dict[str, Any], wait: bool = False) -> None:
        """Publish a retained report (`wait` for the PUBACK: never on paho's own thread, in a callback)."""
        doc = {**doc, "groups": self.groups.get(device, [])}
        info = self.client.publish(f"{self.prefix}/{device}/config/reported", json.dumps(doc), qos=1, retain=True)
        if wait:
            info.wait_for_publish(10)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        levels = msg.topic.split("/")
        doc = json.loads(msg.payload) if msg.payload else None
        if doc is None:
            return
        if levels[1] == "groups":
            self.commands.append(doc)
            group = levels[2]
            for device, cameras in self.devices.items():
                if group not in self.groups.get(device, []):
                    continue
                wanted = doc.get("cameras") or cameras
                results = {c: {"ok": True, "status": "recording" if doc["action"] == "start" else "idle",
                               "camera_id": c, "task_name": doc.get("task_name")} if c in cameras
                           else {"ok": False, "status": "error", "camera_id": c, "error": "unknown camera"}
                           for c in wanted}  # fmt: skip
                reply = {"request_id": doc["request_id"], "device_id": device, "group": group,
                         "action": doc["action"], "ok": all(r["ok"] for r in results.values()), "results": results}
                client.publish(f"{self.prefix}/{device}/groups/{group}/reply", json.dumps(reply), qos=1)
            return
        device = levels[1]
        if device not in self.devices:
            return
        config = doc.get("config") or {}
        last = self.applied.get(device, 3)
        if "bad" in (config.get("cameras") or {}):
            rejected = {"version": doc["version"], "at": "2026-12-06T19:01:00.000Z",
                        "errors": [{"path": "cameras.bad.url", "message": "cannot be reached"}]}  # fmt: skip
            self.report(device, {"version": last, "state": "applied", "pending": [], "rejected": rejected,
                                 "config": {}})  # fmt: skip
            return
        self.applied[device] = doc["version"]
        self.report(device, {"version": doc["version"], "state": "applied", "pending": [],
                             "applied_at": datetime.now(UTC).isoformat(), "config": redact_config(config)})  # fmt: skip

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fake(broker: Mosquitto, prefix: str) -> Any:
    members = FakeMembers(broker, prefix, {"d1": ["cam1", "cam2"], "d2": ["cam1", "cam2"], "cfg-1": ["cam1"]},
                          {"d1": ["site-a", "all"], "d2": ["site-a"], "cfg-1": ["all"]})  # fmt: skip
    try:
        yield members
    finally:
        members.close()


# -------------------------------------------------------------------------------------- --group G


def test_group_command_one_publish_a_row_per_member_and_camera(tmp_path: Path, broker: Mosquitto, probe: MqttProbe,
                                                               prefix: str, fake: FakeMembers,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    # d3 lists site-a in its report but nothing answers for it; d4 is in another group.
    probe.publish(f"{prefix}/d3/config/reported", {"version": 1, "groups": ["site-a"]}, retain=True)
    probe.publish(f"{prefix}/d4/config/reported", {"version": 1, "groups": ["site-b"]}, retain=True)
    ctl_cfg = agent_config(tmp_path, broker, prefix, "ctl-home")

    code, out, err, took = run_ctl(capsys, ctl_cfg, "--group", "site-a", "--timeout", "2", "start",
                                   "--cameras", "cam1")  # fmt: skip
    assert code == 1, (out, err)
    rows = table(out)
    assert set(rows) == {("d1", "cam1"), ("d2", "cam1"), ("d3", "cam1")}, out
    # One publish for the whole group, sent again (same request id) at 1/3 and 2/3 of --timeout
    # while d3 is silent: a broker may acknowledge and not deliver (NATS 2.9); members run it once.
    assert len(fake.commands) == 3 and len({c["request_id"] for c in fake.commands}) == 1
    cmd = fake.commands[0]
    assert cmd["action"] == "start" and cmd["cameras"] == ["cam1"] and cmd["request_id"].startswith("ctl-")
    assert rows[("d1", "cam1")] == ["yes", "recording", cmd["task_name"]]
    assert rows[("d2", "cam1")] == ["yes", "recording", cmd["task_name"]]
    assert rows[("d3", "cam1")][:3] == ["no", "no", "reply"]
    assert 2 <= took < 5

    # d3 leaves (its report is cleared): every member answers, exit 0 without waiting for --timeout.
    probe.publish(f"{prefix}/d3/config/reported", b"", retain=True)
    code, out, err, took = run_ctl(capsys, ctl_cfg, "--group", "site-a", "--json", "status")
    assert code == 0, (out, err)
    docs = [json.loads(line) for line in out.splitlines()]
    assert [(d["device_id"], d["camera_id"], d["ok"]) for d in docs] == [
        ("d1", "cam1", True), ("d1", "cam2", True), ("d2", "cam1", True), ("d2", "cam2", True)]  # fmt: skip
    assert took < 5 and "cameras" not in fake.commands[-1]

    # A camera one member lacks: that row fails, exit 1. CAMERA positional = --cameras.
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--group", "all", "stop", "cam2", "patrol")
    assert code == 1, (out, err)
    rows = table(out)
    assert rows[("d1", "cam2")][0] == "yes" and rows[("cfg-1", "cam2")][:2] == ["no", "error"]
    assert fake.commands[-1]["task_name"] == "patrol" and fake.commands[-1]["cameras"] == ["cam2"]

    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--group", "nobody", "--timeout", "3", "status")
    assert code == 1 and "no device lists group 'nobody'" in err and len(fake.commands) == 5


# ------------------------------------------------------------------------------ config get|set|diff


def test_config_set_get_diff(tmp_path: Path, broker: Mosquitto, probe: MqttProbe, prefix: str, fake: FakeMembers,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    ctl_cfg = agent_config(tmp_path, broker, prefix, "cfg-1")  # its device_id is the default --device
    desired = {"cameras": {"cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@10.0.0.5/s", "max_seconds": 600}},
               "storage": {"type": "local"}}  # fmt: skip
    (tmp_path / "desired.yaml").write_text(yaml.safe_dump(desired))

    # Reported 3, rejected 4: the next version is 5; the device reports it applied.
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "set", str(tmp_path / "desired.yaml"))
    assert code == 0, (out, err)
    assert out.startswith("cfg-1: version 5 applied at "), out
    probe.subscribe(f"{prefix}/cfg-1/config/desired")
    retained = probe.wait_for_message(f"{prefix}/cfg-1/config/desired", timeout=10)
    assert retained.retain and retained.json() == {"version": 5, "config": desired}  # secrets as the operator sent
    assert CAM_PASSWORD not in out + err

    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "get")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["desired"]["version"] == 5 and doc["reported"]["version"] == 5 and doc["device_id"] == "cfg-1"
    assert doc["desired"]["config"]["cameras"]["cam1"]["url"] == "rtsp://***@10.0.0.5/s"
    assert CAM_PASSWORD not in out

    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "diff")
    assert (code, out) == (0, ""), (out, err)
    changed = {"config": {**desired, "cameras": {"cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@10.0.0.6/s"}}}}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "diff", str(tmp_path / "changed.json"))
    assert code == 1 and "+      \"url\": \"rtsp://***@10.0.0.6/s\"" in out and CAM_PASSWORD not in out, out

    # Invalid here already: exit 2, nothing published (the retained desired document is still 5).
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"mqtt": {"host": "x"}, "cameras": {"c": {"url": ""}}}))
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "set", str(tmp_path / "bad.yaml"))
    assert code == 2 and "mqtt: stays local" in err and "nothing sent" in err, err
    (tmp_path / "bad2.yaml").write_text(yaml.safe_dump({"cameras": {"c": {"url": ""}}}))
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "set", str(tmp_path / "bad2.yaml"))
    assert code == 2 and "cameras.c.url" in err, err

    # Rejected by the device: exit 1 with the key path; --version chosen by hand.
    (tmp_path / "rejected.yaml").write_text(yaml.safe_dump({"cameras": {"bad": {"url": "rtsp://h/s"}}}))
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "set", str(tmp_path / "rejected.yaml"), "--version", "9")
    assert code == 1, (out, err)
    assert out.splitlines() == ["cfg-1: version 9 rejected; version 5 keeps running",
                                "  cameras.bad.url: cannot be reached"]  # fmt: skip
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "config", "set", str(tmp_path / "desired.yaml"), "--version", "2")
    assert code == 2 and "stale" in err

    # Nobody reports: exit 3 at --timeout; the retained document stays for when the device connects.
    code, out, err, took = run_ctl(capsys, ctl_cfg, "--device", "ghost", "--timeout", "2", "config", "set",
                                   str(tmp_path / "desired.yaml"))  # fmt: skip
    assert code == 3 and "did not report version 1" in err and took < 2 + 3, (out, err)
    probe.subscribe(f"{prefix}/ghost/config/desired")
    assert probe.wait_for_message(f"{prefix}/ghost/config/desired", timeout=10).json()["version"] == 1


# ------------------------------------------------------------------------------ real agents (issue 14)


def with_groups(config: Path, groups: list[str]) -> Path:
    doc = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**doc, "groups": groups}, sort_keys=False))
    return config


def test_group_start_stop_and_config_set_on_real_agents(tmp_path: Path, broker: Mosquitto, probe: MqttProbe,
                                                        prefix: str, make_agent: Any, camera: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cam1 = {"url": camera.url("cam1")}
    configs = {d: with_groups(agent_config(tmp_path, broker, prefix, d, cameras={"cam1": cam1}), ["site-r"])
               for d in ("r-1", "r-2")}  # fmt: skip
    probe.subscribe(f"{prefix}/+/config/reported")
    for config in configs.values():
        make_agent(config)
    for device in configs:
        probe.wait_for(f"{prefix}/{device}/config/reported", lambda p: p["groups"] == ["site-r"], timeout=30)
    ctl_cfg = agent_config(tmp_path, broker, prefix, "ctl-home")

    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--group", "site-r", "--timeout", "20", "start", "cam1", "g-1")
    assert code == 0, (out, err)
    rows = table(out)
    assert set(rows) == {("r-1", "cam1"), ("r-2", "cam1")}, out
    assert all(cells[0] == "yes" and cells[2] == "g-1" for cells in rows.values()), out
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--group", "site-r", "--timeout", "20", "--json", "stop")
    assert code == 0, (out, err)
    assert {(d["device_id"], d["camera_id"], d["task_name"]) for d in map(json.loads, out.splitlines())} == {
        ("r-1", "cam1", "g-1"), ("r-2", "cam1", "g-1")}  # fmt: skip

    # snapshot --output: the JPEG the agent publishes (not the older retained one) is saved.
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "--timeout", "30", "snapshot", "cam1",
                                "--output", str(tmp_path / "cam1.jpg"))  # fmt: skip
    assert code == 0 and out.startswith("cam1: snapshot (frame_time: "), (out, err)
    jpeg = (tmp_path / "cam1.jpg").read_bytes()
    assert jpeg.startswith(b"\xff\xd8") and f"bytes: {len(jpeg)})" in out and f"wrote {len(jpeg)} bytes" in err

    # A camera added remotely to r-1 answers at once; secrets never printed; diff agrees with the agent.
    desired = {"cameras": {"cam1": {**cam1, "rtsp_transport": "tcp", "max_seconds": 3600},
                           "cam2": {"url": f"rtsp://viewer:{CAM_PASSWORD}@127.0.0.1:9/cam2"}},
               "groups": ["site-r", "all"]}  # fmt: skip
    (tmp_path / "desired.yaml").write_text(yaml.safe_dump({"config": desired}))
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "--timeout", "20", "config", "set",
                                str(tmp_path / "desired.yaml"))  # fmt: skip
    assert code == 0 and out.startswith("r-1: version 1 "), (out, err)
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "status", "cam2")
    assert (code, out.strip()) == (0, "cam2: idle"), (out, err)
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "config", "diff")
    assert (code, out) == (0, ""), (out, err)
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "config", "get")
    doc = json.loads(out)
    assert doc["reported"]["version"] == 1 and doc["reported"]["groups"] == ["site-r", "all"]
    assert CAM_PASSWORD not in out + err and "rtsp://***@127.0.0.1:9/cam2" in out
    # The same document again (version 2) is applied; the stale --version 1 with new content is refused.
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "--timeout", "20", "config", "set",
                                str(tmp_path / "desired.yaml"))  # fmt: skip
    assert code == 0 and out.startswith("r-1: version 2 applied"), (out, err)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"telemetry_seconds": 5}))
    code, out, err, _ = run_ctl(capsys, ctl_cfg, "--device", "r-1", "--timeout", "20", "config", "set",
                                str(tmp_path / "other.yaml"), "--version", "2")  # fmt: skip
    assert code == 1 and "version 2 rejected" in out and "version:" in out, (out, err)
