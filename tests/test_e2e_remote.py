"""Remote management end to end (issue 14): desired configuration and group commands.

Real Mosquitto, SeaweedFS, the GStreamer camera and FFmpeg. The operator's side is a plain MQTT
client publishing the documents of docs/remote-management.md; the agent never restarts unless a
test restarts it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from parts import CameraSim, MqttProbe
from parts.base import free_port
from rig import Rig, make_rig, minio_storage, record_for

pytestmark = pytest.mark.integration


def desired_topic(rig: Rig) -> str:
    return f"{rig.base}/config/desired"


def reported_topic(rig: Rig) -> str:
    return f"{rig.base}/config/reported"


def publish_desired(rig: Rig, version: int, config: dict[str, Any]) -> None:
    rig.probe.publish(desired_topic(rig), {"version": version, "config": config}, retain=True)


def wait_reported(rig: Rig, test: Any, timeout: float = 30) -> dict[str, Any]:
    return rig.probe.wait_for(reported_topic(rig), test, timeout)


SECRET = "remotePw-91x"  # in a camera URL sent remotely (the shared simulator ignores credentials)


def camera_cfg(camera: CameraSim, mount: str, password: str | None = None) -> dict[str, Any]:
    url = camera.url(mount, user="op", password=password) if password else camera.url(mount)
    return {"url": url, "rtsp_transport": "tcp", "max_seconds": 600}


def patch_config(rig: Rig, **keys: Any) -> None:
    doc = yaml.safe_load(rig.config_path.read_text())
    doc.update(keys)
    rig.config_path.write_text(yaml.safe_dump(doc))


def no_secret_anywhere(rig: Rig, secret: str) -> None:
    for msg in rig.probe.raw():
        assert secret.encode() not in msg.payload or msg.topic == desired_topic(rig), msg.topic
    assert rig.agent is not None
    assert secret not in rig.agent.log_path.read_text(errors="replace")


def test_desired_config_live_add_remove_reject_restart(tmp_path: Path, broker, probe, prefix, make_agent,
                                                       camera: CameraSim, s3, bucket) -> None:  # fmt: skip
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": camera_cfg(camera, "cam1")},
                   storage=minio_storage(s3, bucket))  # fmt: skip
    ha = f"{prefix}/ha"  # under the probe's subscription
    patch_config(rig, homeassistant={"enabled": True, "discovery_prefix": ha})
    rig.start_agent()
    first = wait_reported(rig, lambda p: p["version"] is None)
    assert first["state"] == "applied" and set(first["config"]["cameras"]) == {"cam1"}

    # 1. Add a camera remotely (its URL holds the camera's password) and record from it: no restart.
    pid = rig.agent.pid if rig.agent else None
    cams = {"cam1": camera_cfg(camera, "cam1"), "cam2": camera_cfg(camera, "cam2", SECRET)}
    publish_desired(rig, 1, {"cameras": cams, "recording": {"segment_seconds": 2, "max_seconds": 900}})
    rep = wait_reported(rig, lambda p: p["version"] == 1)
    assert rep["state"] == "applied" and rep["pending"] == [] and rep["rejected"] is None
    assert set(rep["config"]["cameras"]) == {"cam1", "cam2"} and rep["config"]["recording"]["max_seconds"] == 900
    assert SECRET not in json.dumps(rep) and rep["config"]["cameras"]["cam2"]["url"].startswith("rtsp://***@")
    # Home Assistant learns of the new camera at once.
    assert probe.wait_for(f"{ha}/device/{rig.device}_cam2/config", lambda p: "cmps" in p, timeout=10)
    assert rig.request("cam2", {"action": "start", "task_name": "added"})["ok"] is True
    rig.wait_status("cam2", "added", "recording", timeout=30)
    record_for(3)
    rig.request("cam2", {"action": "stop", "task_name": "added"})
    assert rig.wait_status("cam2", "added", {"uploaded", "failed"}, timeout=60)["status"] == "uploaded"

    # 2. Remove a camera while it records: the task finishes and uploads, then the camera goes.
    assert rig.request("cam1", {"action": "start", "task_name": "going"})["ok"] is True
    rig.wait_status("cam1", "going", "recording", timeout=30)
    publish_desired(rig, 2, {"cameras": {"cam2": cams["cam2"]}})
    rep = wait_reported(rig, lambda p: p["version"] == 2)
    assert rep["state"] == "pending", rep
    assert [p["path"] for p in rep["pending"]] == ["cameras.cam1"] and "going" in rep["pending"][0]["reason"]
    record_for(2)
    assert rig.request("cam1", {"action": "status"})["status"] == "recording"  # untouched
    rig.request("cam1", {"action": "stop", "task_name": "going"})
    assert rig.wait_status("cam1", "going", {"uploaded", "failed"}, timeout=60)["status"] == "uploaded"
    rep = wait_reported(rig, lambda p: p["version"] == 2 and p["state"] == "applied")
    assert set(rep["config"]["cameras"]) == {"cam2"}
    gone = rig.request("cam1", {"action": "status"})
    assert gone["ok"] is False and "not configured" in gone["error"]
    # ...and forgets the removed one (an empty retained config deletes the device); its status is cleared.
    probe.wait_for_raw(f"{ha}/device/{rig.device}_cam1/config", lambda p: p == b"", timeout=10)
    probe.wait_for_raw(rig.status_topic("cam1"), lambda p: p == b"", timeout=10)

    # 3. An invalid document is rejected whole, with its key paths; version 2 keeps running.
    publish_desired(rig, 3, {"cameras": {"cam2": {"rtsp_transport": "tcp"}, "cam3": camera_cfg(camera, "cam3")},
                             "recording": {"max_seconds": -5}, "mqtt": {"port": 1}})  # fmt: skip
    rep = wait_reported(rig, lambda p: (p.get("rejected") or {}).get("version") == 3)
    assert rep["version"] == 2 and rep["state"] == "applied"
    paths = {e["path"] for e in rep["rejected"]["errors"]}
    assert "mqtt" in paths, paths  # refused before validation: the broker connection stays local
    publish_desired(rig, 3, {"cameras": {"cam2": {"rtsp_transport": "tcp"}}, "recording": {"max_seconds": -5}})
    rep = wait_reported(rig, lambda p: {e["path"] for e in (p.get("rejected") or {}).get("errors", [])}
                        >= {"cameras.cam2.url", "recording.max_seconds"})  # fmt: skip
    assert rep["version"] == 2 and set(rep["config"]["cameras"]) == {"cam2"}
    assert rig.request("cam2", {"action": "status"})["ok"] is True
    assert rig.agent is not None and rig.agent.pid == pid  # never restarted

    # 4. A restart keeps the applied configuration (from the journal), before and after connecting.
    rig.agent.stop()
    probe.clear()
    rig.start_agent()
    rep = wait_reported(rig, lambda p: p["version"] == 2 and (p.get("rejected") or {}).get("version") == 3)
    assert set(rep["config"]["cameras"]) == {"cam2"}
    assert rig.request("cam1", {"action": "status"})["ok"] is False
    assert rig.request("cam2", {"action": "status"})["ok"] is True
    assert "running desired configuration version 2" in rig.agent.log_path.read_text()
    no_secret_anywhere(rig, SECRET)


def test_desired_while_offline_and_group_commands(tmp_path: Path, broker, probe, prefix, make_agent,
                                                  camera: CameraSim) -> None:  # fmt: skip
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": camera_cfg(camera, "cam1")},
                   storage={"type": "local"})  # fmt: skip
    patch_config(rig, groups=["site-a"])
    # Published while the agent is offline (never started yet): retained, applied when it connects.
    publish_desired(rig, 5, {"cameras": {"cam1": camera_cfg(camera, "cam1"), "cam3": camera_cfg(camera, "cam3")},
                             "groups": ["site-a", "all"]})  # fmt: skip
    rig.start_agent()
    rep = wait_reported(rig, lambda p: p["version"] == 5)
    assert rep["state"] == "applied" and rep["groups"] == ["site-a", "all"]

    group_cmd = f"{prefix}/groups/all/cmd"
    group_reply = f"{rig.base}/groups/all/reply"
    rid = uuid.uuid4().hex
    probe.publish(group_cmd, {"action": "start", "request_id": rid, "task_name": "fleet-1"})
    reply = probe.wait_for(group_reply, lambda p: p["request_id"] == rid, timeout=30)
    assert reply["ok"] is True and reply["device_id"] == rig.device and reply["group"] == "all"
    assert set(reply["results"]) == {"cam1", "cam3"} and all(r["ok"] for r in reply["results"].values())
    for cam in ("cam1", "cam3"):
        rig.wait_status(cam, "fleet-1", "recording", timeout=30)
    # The same request again (a QoS 1 redelivery, a retrying operator): not executed, not answered twice.
    probe.publish(group_cmd, {"action": "start", "request_id": rid, "task_name": "fleet-1"})
    # A group this device is not in: nothing happens.
    probe.publish(f"{prefix}/groups/site-b/cmd", {"action": "stop", "request_id": uuid.uuid4().hex})
    # Bad input gets a reply naming the problem.
    bad = uuid.uuid4().hex
    probe.publish(group_cmd, {"action": "explode", "request_id": bad})
    err = probe.wait_for(group_reply, lambda p: p["request_id"] == bad, timeout=30)
    assert err["ok"] is False and "action" in err["error"]
    record_for(2)
    stop_rid = uuid.uuid4().hex
    # No task name: each camera's running task is stopped, whatever its name.
    probe.publish(f"{prefix}/groups/site-a/cmd", {"action": "stop", "request_id": stop_rid})
    stopped = probe.wait_for(f"{rig.base}/groups/site-a/reply", lambda p: p["request_id"] == stop_rid, timeout=30)
    assert stopped["ok"] is True, stopped
    for cam in ("cam1", "cam3"):
        assert rig.wait_status(cam, "fleet-1", {"completed", "failed"}, timeout=60)["status"] == "completed"
    time.sleep(1.0)  # a duplicate reply would have arrived by now (the stop reply came after it)
    replies = [m for m in probe.messages(group_reply) if m["request_id"] == rid]
    assert len(replies) == 1, replies
    assert not probe.messages(f"{rig.base}/groups/site-b/reply")

    # Leaving a group remotely: its commands are no longer executed.
    publish_desired(rig, 6, {"groups": ["site-a"]})
    rep = wait_reported(rig, lambda p: p["version"] == 6)
    assert rep["groups"] == ["site-a"] and set(rep["config"]["cameras"]) == {"cam1"}  # back to the local cameras
    late = uuid.uuid4().hex
    probe.publish(group_cmd, {"action": "status", "request_id": late})
    site = uuid.uuid4().hex
    probe.publish(f"{prefix}/groups/site-a/cmd", {"action": "status", "request_id": site})
    probe.wait_for(f"{rig.base}/groups/site-a/reply", lambda p: p["request_id"] == site, timeout=30)
    assert not [m for m in probe.messages(group_reply) if m["request_id"] == late]


def test_reported_is_retained_for_a_late_reader(tmp_path: Path, broker, probe, prefix, make_agent,
                                                camera: CameraSim) -> None:  # fmt: skip
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": camera_cfg(camera, "cam1")},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    publish_desired(rig, 1, {"telemetry_seconds": 5, "log_level": "DEBUG"})
    wait_reported(rig, lambda p: p["version"] == 1)
    with MqttProbe(broker.host, broker.port) as late:
        late.subscribe(reported_topic(rig))
        msg = late.wait_for_message(reported_topic(rig), timeout=10)
        assert msg.retain and msg.json()["version"] == 1 and msg.json()["config"]["telemetry_seconds"] == 5


def test_new_store_credentials_apply_to_waiting_uploads(tmp_path: Path, broker, probe, prefix, make_agent,
                                                        camera: CameraSim, s3, bucket) -> None:  # fmt: skip
    """The store moved (the device's endpoint answers nothing): the upload waits, retrying; the
    operator sends the new endpoint and key remotely: the waiting upload goes there without a
    restart, and the key never shows in `reported`. (A store that refuses the key fails the upload
    at once, with the reason: AccessDenied is not retried.)"""
    wrong = minio_storage(s3, bucket, endpoint=f"127.0.0.1:{free_port()}", secret_key="old-secret-key-1")
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": camera_cfg(camera, "cam1")},
                   storage=wrong)  # fmt: skip
    rig.start_agent()
    assert rig.request("cam1", {"action": "start", "task_name": "stuck"})["ok"] is True
    rig.wait_status("cam1", "stuck", "recording", timeout=30)
    record_for(2)
    rig.request("cam1", {"action": "stop", "task_name": "stuck"})
    waiting = rig.wait_status("cam1", "stuck", "upload_pending", timeout=60)
    assert waiting["last_upload_error"]
    right = {**wrong, "endpoint": s3.endpoint, "secret_key": s3.secret_key, "min_free_bytes": 0}
    publish_desired(rig, 1, {"storage": right})
    rep = wait_reported(rig, lambda p: p["version"] == 1)
    assert s3.secret_key not in json.dumps(rep) and rep["state"] == "applied"
    final = rig.wait_status("cam1", "stuck", {"uploaded", "failed"}, timeout=60)
    assert final["status"] == "uploaded", final
    stat = s3.client().stat_object(bucket, final["object_name"])
    assert stat.size == final["size_bytes"]


def test_group_topic_flood_does_not_take_the_agent_down(tmp_path: Path, broker, probe, prefix, make_agent,
                                                         camera: CameraSim) -> None:  # fmt: skip
    """A hostile client on the shared broker floods a group topic the device is in: the agent stays
    connected, answers within its rate (mqtt.command_burst, then commands_per_second), and its
    own commands still get through."""
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": camera_cfg(camera, "cam1")},
                   storage={"type": "local"}, mqtt={"command_burst": 20, "commands_per_second": 5})  # fmt: skip
    patch_config(rig, groups=["site-a"])
    rig.start_agent()
    wait_reported(rig, lambda p: p["groups"] == ["site-a"])
    with MqttProbe(broker.host, broker.port) as hostile:
        began = time.monotonic()
        for i in range(3000):
            hostile.publish(f"{prefix}/groups/site-a/cmd", {"action": "status", "request_id": f"flood-{i}"}, qos=0)
        hostile.publish(f"{prefix}/groups/site-a/cmd", b"\xff\xfe not json", qos=1)
    reply = rig.request("cam1", {"action": "status"}, timeout=20)
    assert reply["ok"] is True
    elapsed = time.monotonic() - began
    time.sleep(1.0)
    answered = [m for m in probe.messages(f"{rig.base}/groups/site-a/reply")]
    assert 1 <= len(answered) <= 20 + 5 * (elapsed + 1.0) + 1, (len(answered), elapsed)
    assert rig.agent is not None and rig.agent.is_alive()
    assert rig.agent.log_text().count("connected to 127.0.0.1") == 1
