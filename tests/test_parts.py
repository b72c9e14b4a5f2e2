"""Fast checks that the test harness's real parts work (and can be broken and brought back)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from parts import (
    AgentProcess,
    CameraSim,
    Mosquitto,
    MqttProbe,
    SeaweedS3,
    ffprobe_info,
    moov_before_mdat,
    mp4_top_level_boxes,
    write_config,
)

pytestmark = pytest.mark.integration


def test_retained_message_round_trip(broker: Mosquitto, probe: MqttProbe, prefix: str) -> None:
    topic = f"{prefix}/edge-01/status"
    probe.publish(topic, {"state": "online", "n": 1}, retain=True)

    with MqttProbe(broker.host, broker.port) as late:
        late.subscribe(f"{prefix}/#")
        message = late.wait_for_message(topic, lambda p: p["state"] == "online", timeout=10)
        assert message.retain
        assert message.json() == {"state": "online", "n": 1}
        assert late.messages(topic) == [{"state": "online", "n": 1}]

    reply = f"{prefix}/reply"
    probe.subscribe(f"{prefix}/cmd")
    probe.publish(f"{prefix}/cmd", {"echo": True})
    assert probe.wait_for(f"{prefix}/cmd", lambda p: p["echo"] is True, timeout=10) == {"echo": True}
    with pytest.raises(AssertionError, match="no matching message"):
        probe.wait_for(reply, timeout=0.3)


def test_request_reply(broker: Mosquitto, probe: MqttProbe, prefix: str) -> None:
    with MqttProbe(broker.host, broker.port) as responder:
        responder.subscribe(f"{prefix}/cmd")
        request_seen: list[dict[str, object]] = []

        def answer() -> None:
            cmd = responder.wait_for(f"{prefix}/cmd", timeout=10)
            request_seen.append(cmd)
            responder.publish(f"{prefix}/reply", {"request_id": cmd["request_id"], "ok": True})

        thread = threading.Thread(target=answer)
        thread.start()
        reply = probe.request(f"{prefix}/cmd", {"action": "ping"}, f"{prefix}/reply", timeout=10)
        thread.join(10)
    assert reply["ok"] is True
    assert request_seen[0]["action"] == "ping"
    assert reply["request_id"] == request_seen[0]["request_id"]


def test_broker_kill_and_restart_keeps_retained(broker: Mosquitto, probe: MqttProbe, prefix: str) -> None:
    topic = f"{prefix}/edge-01/status"
    probe.publish(topic, {"state": "online"}, retain=True)
    broker.wait_saved()
    port = broker.port
    broker.kill()
    assert not broker.is_alive()
    broker.start()
    assert broker.port == port
    probe.wait_connected(timeout=10)  # the probe reconnects by itself

    with MqttProbe(broker.host, broker.port) as fresh:
        fresh.subscribe(topic)
        message = fresh.wait_for_message(topic, timeout=10)
    assert message.retain
    assert message.json() == {"state": "online"}


def test_s3_round_trip(s3: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    client = s3.client()
    assert not client.bucket_exists(bucket)
    client.make_bucket(bucket)
    source = tmp_path / "clip.bin"
    data = bytes(range(256)) * 4096
    source.write_bytes(data)
    client.fput_object(bucket, "cam1/clip.bin", str(source), metadata={"x-amz-meta-sha256": "abc"})
    stat = client.stat_object(bucket, "cam1/clip.bin")
    assert stat.size == len(data)
    response = client.get_object(bucket, "cam1/clip.bin")
    try:
        assert response.read() == data
    finally:
        response.close()
        response.release_conn()
    wrong = s3.client(secret_key="wrong")
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied"):
        wrong.stat_object(bucket, "cam1/clip.bin")


def test_camera_recording_is_h264_with_faststart(camera: CameraSim, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    cmd = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp",
        "-i", camera.url("cam2"), "-t", "3", "-c", "copy", "-movflags", "+faststart", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    info = ffprobe_info(out)
    assert info["codec"] == "h264"
    assert (info["width"], info["height"]) == (1280, 720)
    assert 2.5 <= info["duration"] <= 3.6, info["duration"]
    assert moov_before_mdat(out), mp4_top_level_boxes(out)


def test_mjpeg_camera_with_auth(tmp_path: Path, track: Callable[[CameraSim], CameraSim]) -> None:
    sim = track(CameraSim(tmp_path / "cam", width=640, height=360, codec="mjpeg", user="u", password="p", shared=False))
    sim.start()
    info = ffprobe_info(sim.url())
    assert info["codec"] == "mjpeg"
    assert (info["width"], info["height"]) == (640, 360)
    with pytest.raises(AssertionError, match=r"401|Unauthorized"):
        ffprobe_info(sim.url(user="u", password="wrong"), timeout=15)
    sim.stop()
    assert not sim.is_alive()


def test_write_config(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "agent.yaml",
        device_id="edge-01",
        mqtt_port=1883,
        topic_prefix="edge",
        cameras={"cam1": {"url": "rtsp://127.0.0.1:8554/cam1", "max_seconds": 60}},
        output_dir=tmp_path / "rec",
        storage={"endpoint": "127.0.0.1:9000", "access_key": "k", "secret_key": "s", "bucket": "b"},
        mqtt={"qos": 1},
    )
    config = yaml.safe_load(path.read_text())
    assert config["mqtt"] == {"host": "127.0.0.1", "port": 1883, "topic_prefix": "edge", "qos": 1,
                              "command_burst": 1000}  # fmt: skip
    assert config["cameras"]["cam1"] == {
        "url": "rtsp://127.0.0.1:8554/cam1",
        "rtsp_transport": "tcp",
        "max_seconds": 60,
    }
    assert config["recording"]["output_dir"] == str(tmp_path / "rec")
    assert config["storage"]["type"] == "minio"
    assert config["storage"]["delete_local_after_upload"] is True


class _FakeAgent(AgentProcess):
    """Runs a stand-in that forks a long-lived child, like the agent's FFmpeg recorders."""

    def command(self) -> list[str]:
        script = (
            "import signal, subprocess, sys, time\n"
            "child = subprocess.Popen(['sleep', '60'])\n"
            "signal.signal(signal.SIGTERM, lambda *_: (child.terminate(), child.wait(), sys.exit(0)))\n"
            "print('child', 'started', flush=True)\n"
            "time.sleep(60)\n"
        )
        return [sys.executable, "-c", script]


def test_agent_process_signals(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("{}\n")
    graceful = _FakeAgent(config, tmp_path / "a1").start()
    try:
        graceful.wait_until_log("child started", timeout=10)
        assert len(graceful.group_pids()) == 2
        code, elapsed = graceful.terminate(timeout=10)
        assert code == 0 and elapsed < 5
        assert graceful.group_pids() == []
    finally:
        graceful.stop()

    crashed = _FakeAgent(config, tmp_path / "a2").start()
    try:
        crashed.wait_until_log("child started", timeout=10)
        assert crashed.kill() == -signal.SIGKILL
        assert not crashed.is_alive()
        assert len(crashed.group_pids()) == 1  # the orphaned child survives a crash
        crashed.kill_group()
        deadline = time.monotonic() + 5
        while crashed.group_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert crashed.group_pids() == []
        assert "child started" in crashed.log_text()
    finally:
        crashed.stop()
