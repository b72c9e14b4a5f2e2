"""The core agent end to end: real Mosquitto, SeaweedFS S3, GStreamer RTSP camera, FFmpeg."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from parts import CameraSim, MqttProbe, ffprobe_info, moov_before_mdat
from rig import download, make_rig, minio_storage, mosquitto_pub, record_for

pytestmark = pytest.mark.integration


def test_start_stop_uploads_browser_mp4(tmp_path: Path, broker, probe, prefix, make_agent, camera, s3, bucket) -> None:
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage=minio_storage(s3, bucket))  # fmt: skip
    rig.start_agent()
    idle = probe.wait_for(rig.status_topic("cam1"), lambda p: p["status"] == "idle")
    assert idle["camera_id"] == "cam1"

    # Commands from a client that is not this project.
    mosquitto_pub(broker.port, rig.cmd_topic("cam1"), json.dumps({"action": "start", "task_name": "patrol"}))
    recording = rig.wait_status("cam1", "patrol", "recording", timeout=30)
    began = time.monotonic()
    record_for(8)
    mosquitto_pub(broker.port, rig.cmd_topic("cam1"), json.dumps({"action": "stop", "task_name": "patrol"}))
    final = rig.wait_status("cam1", "patrol", {"uploaded", "failed"}, timeout=60)
    recorded = time.monotonic() - began
    assert final["status"] == "uploaded", final
    assert rig.statuses("cam1", "patrol")[:3] == ["starting", "recording", "stopping"]
    for key in ("camera_id", "task_name", "start_time", "storage_type", "bucket", "object_name", "download_url",
                "device_id", "updated_at", "duration_seconds", "size_bytes", "stop_reason"):  # fmt: skip
        assert key in final, key
    assert final["bucket"] == bucket and final["storage_type"] == "minio"
    assert final["start_time"] == recording["start_time"]
    assert final["object_name"].startswith(f"{rig.device}/cam1/") and final["object_name"].endswith(".mp4")
    assert "patrol_" in final["object_name"]
    assert final["local_file_deleted"] is True and not Path(final["local_file"]).exists()

    mp4 = download(final["download_url"], tmp_path / "dl.mp4")
    info = ffprobe_info(mp4)
    assert info["codec"] == "h264" and info["pix_fmt"] in ("yuv420p", "yuvj420p")
    assert info["width"] % 2 == 0 and info["height"] % 2 == 0
    assert abs(info["duration"] - recorded) <= 2.0, (info["duration"], recorded)
    assert abs(final["duration_seconds"] - info["duration"]) < 0.5
    assert moov_before_mdat(mp4)
    assert hashlib.sha256(mp4.read_bytes()).hexdigest() == final["sha256"]
    assert mp4.stat().st_size == final["size_bytes"]

    # A late subscriber sees the truth from retained messages alone.
    with MqttProbe(broker.host, broker.port) as late:
        late.subscribe(rig.status_topic("cam1"))
        late.subscribe(rig.task_topic("cam1", "patrol"))
        late.subscribe(f"{rig.base}/status")
        msg = late.wait_for_message(rig.status_topic("cam1"), timeout=10)
        assert msg.retain and msg.json()["status"] == "uploaded"
        assert late.wait_for_message(rig.task_topic("cam1", "patrol"), timeout=10).json()["status"] == "uploaded"
        assert late.wait_for_raw(f"{rig.base}/status", timeout=10).payload == b"online"
    uploads = probe.wait_for(f"{rig.base}/uploads", lambda p: p["queue_length"] == 0)
    assert uploads["bytes_pending"] == 0


def test_local_storage_completes_with_playable_file(tmp_path, broker, probe, prefix, make_agent, camera) -> None:
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam2": {"url": camera.url("cam2")}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    reply = rig.request("cam2", {"action": "start", "task_name": "夜间巡检"})
    assert reply["ok"] is True and reply["status"] == "starting" and reply["task_name"] == "夜间巡检"
    rig.wait_status("cam2", "夜间巡检", "recording", timeout=30)
    record_for(5)
    rig.request("cam2", {"action": "stop", "task_name": "夜间巡检"})
    final = rig.wait_status("cam2", "夜间巡检", {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    path = Path(final["local_file"])
    assert path.is_file() and path.resolve().is_relative_to(rig.output_dir.resolve())
    info = ffprobe_info(path)
    assert info["codec"] == "h264" and 3.0 <= info["duration"] <= 8.0
    assert moov_before_mdat(path)
    assert "bucket" not in final and "download_url" not in final
    # No segment directories are left behind after a clean finish.
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".segments")]


def test_command_contract(tmp_path, broker, probe, prefix, make_agent, camera) -> None:
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam3": {"url": camera.url("cam3")}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    assert rig.request("cam3", {"action": "status"})["status"] == "idle"
    nf = rig.request("cam3", {"action": "query", "task_name": "ghost"})
    assert nf["status"] == "not_found" and nf["ok"] is False and nf["task_name"] == "ghost"
    nr = rig.request("cam3", {"action": "stop", "task_name": "ghost"})
    assert nr["status"] == "not_running" and nr["ok"] is False

    started = rig.request("cam3", {"action": "start", "task_name": "a"})
    assert started["status"] == "starting"
    again = rig.request("cam3", {"action": "start", "task_name": "b"})
    assert again["task_name"] == "a" and again["status"] in ("starting", "recording") and again["ok"] is False
    mismatch = rig.request("cam3", {"action": "stop", "task_name": "b"})
    assert mismatch == {**mismatch, "status": "task_mismatch", "running_task": "a", "ok": False}
    assert rig.request("cam3", {"action": "query", "task_name": "a"})["task_name"] == "a"

    # Bad input: each gets a reply naming the problem, and the agent keeps serving.
    unknown = rig.request("nocam", {"action": "status"})
    assert unknown["status"] == "error" and "not configured" in unknown["error"] and unknown["ok"] is False
    cases: list[tuple[bytes, str, str | None]] = [
        (b"{not json", "not valid JSON", None),
        (b"[1,2]", "JSON object", None),
        (json.dumps({"action": "dance", "task_name": "x", "request_id": "r-dance"}).encode(), "action", "r-dance"),
        (json.dumps({"action": "start", "task_name": "a/b", "request_id": "r-slash"}).encode(), "task_name",
         "r-slash"),
        (json.dumps({"action": "start", "task_name": "x", "max_seconds": "ten", "request_id": "r-type"}).encode(),
         "max_seconds", "r-type"),
        (b'{"action":"start","task_name":"' + b"x" * 70000 + b'"}', "exceeds", None),
        (b"\xff\xfe", "UTF-8", None),
    ]  # fmt: skip
    for payload, needle, rid in cases:
        probe.clear()
        probe.publish(rig.cmd_topic("cam3"), payload)
        reply = probe.wait_for(rig.reply_topic("cam3"), timeout=10)
        assert reply["status"] == "rejected" and reply["ok"] is False, reply
        assert needle in reply["error"], (needle, reply)
        assert reply.get("request_id") == rid

    # MQTT v5 request/response: the reply also goes to the Response Topic with Correlation Data.
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"nodered/{prefix}/my-inbox"
    props.CorrelationData = b"corr-42"
    probe.subscribe(f"nodered/{prefix}/my-inbox")
    probe.publish(rig.cmd_topic("cam3"), {"action": "status"}, properties=props)
    msg = probe.wait_for_message(f"nodered/{prefix}/my-inbox", timeout=10)
    assert msg.properties is not None and msg.properties.CorrelationData == b"corr-42"
    assert msg.json()["task_name"] == "a"

    # A Response Topic onto another device's command topic is refused, answered on the reply topic.
    hostile = Properties(PacketTypes.PUBLISH)
    hostile.ResponseTopic = f"{prefix}/other-device/cam1/cmd"
    probe.publish(rig.cmd_topic("cam3"), {"action": "stop", "task_name": "a", "request_id": "r-hostile"},
                  properties=hostile)  # fmt: skip
    refused = probe.wait_for(rig.reply_topic("cam3"), lambda p: p.get("request_id") == "r-hostile", timeout=10)
    assert refused["ok"] is False and "response topic refused" in refused["error"], refused
    assert not probe.raw(f"{prefix}/other-device/cam1/cmd")

    rig.wait_status("cam3", "a", "recording", timeout=30)
    stop = rig.request("cam3", {"action": "stop", "task_name": "a"})
    assert stop["status"] in ("stopping", "completed") and stop["ok"] is True
    done = rig.wait_status("cam3", "a", {"completed", "failed"}, timeout=60)
    assert done["status"] == "completed", done
    assert rig.agent is not None and rig.agent.is_alive()


def test_max_seconds_stops_the_task(tmp_path, broker, probe, prefix, make_agent, camera) -> None:
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent,
                   cameras={"cam4": {"url": camera.url("cam4"), "max_seconds": 30}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    reply = rig.request("cam4", {"action": "start", "task_name": "short", "max_seconds": 4})
    assert reply["max_seconds"] == 4
    final = rig.wait_status("cam4", "short", {"completed", "failed"}, timeout=40)
    assert final["status"] == "completed"
    assert "max_duration" in final["stop_reason"]
    assert 2.0 <= final["duration_seconds"] <= 6.0
    # A per-command value can only lower the camera's limit.
    reply = rig.request("cam4", {"action": "start", "task_name": "long", "max_seconds": 99999})
    assert reply["max_seconds"] == 30
    rig.request("cam4", {"action": "stop", "task_name": "long"})
    rig.wait_status("cam4", "long", {"completed", "failed"}, timeout=40)


def test_unreachable_camera_fails_without_leaking_credentials(tmp_path, broker, probe, prefix, make_agent) -> None:
    url = "rtsp://admin:hunter2secret@127.0.0.1:9/nothing"
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": url}},
                   storage={"type": "local"},
                   recording={"first_frame_timeout_seconds": 4, "probe_timeout_seconds": 3})  # fmt: skip
    rig.start_agent()
    rig.request("cam1", {"action": "start", "task_name": "t"})
    final = rig.wait_status("cam1", "t", {"failed", "completed"}, timeout=30)
    assert final["status"] == "failed" and final["error"]
    everything = json.dumps([m.payload.decode("utf-8", "replace") for m in probe.raw()])
    assert "hunter2secret" not in everything
    assert rig.agent is not None
    assert "hunter2secret" not in rig.agent.log_text().split("\n", 1)[-1]
    # The camera is free again after the failure.
    assert rig.request("cam1", {"action": "status"})["status"] == "failed"


def test_missing_ffmpeg_is_a_clear_error(tmp_path, broker, probe, prefix, make_agent, camera) -> None:
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage={"type": "local"}, recording={"ffmpeg_path": "/nonexistent/ffmpeg"})  # fmt: skip
    rig.start_agent()
    reply = rig.request("cam1", {"action": "start", "task_name": "t"})
    assert reply["status"] == "error" and reply["ok"] is False
    assert "ffmpeg" in reply["error"] and "/nonexistent/ffmpeg" in reply["error"]
    assert rig.agent is not None and rig.agent.is_alive()
    assert "Traceback" not in rig.agent.log_text()


def test_non_h264_camera_is_transcoded(tmp_path, broker, probe, prefix, make_agent, track) -> None:
    sim = CameraSim(tmp_path / "mjpeg", codec="mjpeg", width=640, height=360, mounts=("cam1",), shared=False)
    track(sim).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": sim.url("cam1")}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    rig.request("cam1", {"action": "start", "task_name": "mj"})
    rig.wait_status("cam1", "mj", "recording", timeout=30)
    record_for(4)
    rig.request("cam1", {"action": "stop", "task_name": "mj"})
    final = rig.wait_status("cam1", "mj", {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    info = ffprobe_info(final["local_file"])
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert moov_before_mdat(final["local_file"])


def test_cameras_record_independently_and_sigterm_finalises(
    tmp_path, broker, probe, prefix, make_agent, camera
) -> None:
    cams: dict[str, dict[str, Any]] = {c: {"url": camera.url(c)} for c in ("cam1", "cam2")}
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras=cams, storage={"type": "local"})
    agent = rig.start_agent()
    for cam in cams:
        rig.request(cam, {"action": "start", "task_name": f"job-{cam}"})
    for cam in cams:
        rig.wait_status(cam, f"job-{cam}", "recording", timeout=30)
    record_for(4)
    rig.request("cam1", {"action": "stop", "task_name": "job-cam1"})
    first = rig.wait_status("cam1", "job-cam1", {"completed", "failed"}, timeout=40)
    assert first["status"] == "completed"
    assert rig.request("cam2", {"action": "status"})["status"] == "recording"

    recorders = agent.ffmpeg_pids()
    assert len(recorders) == 1  # cam2's
    code, elapsed = agent.terminate(timeout=45)
    assert code == 0 and elapsed < 30, (code, elapsed)
    second = rig.wait_status("cam2", "job-cam2", {"completed", "failed"}, timeout=5)
    assert second["status"] == "completed" and "shutdown" in second["stop_reason"]
    assert ffprobe_info(second["local_file"])["duration"] >= 4
    assert probe.wait_for_raw(f"{rig.base}/status", lambda p: p == b"offline", timeout=5)
    assert not agent.group_pids()
    for pid in recorders:  # every FFmpeg child stopped and reaped by the agent (no zombie, no orphan)
        assert not Path(f"/proc/{pid}").exists()
