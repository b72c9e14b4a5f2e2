"""Fault tolerance end to end: FFmpeg killed, power cut, camera outage, broker outage."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from parts import AgentProcess, CameraSim, MqttProbe, SeaweedS3, ffprobe_info, moov_before_mdat
from rig import download, make_rig, minio_storage, record_for

pytestmark = pytest.mark.integration

SEGMENT_S = 2  # the rig's segment length
RETAINED_BOUND_S = 15.0  # stated bound: retained statuses are correct this long after the broker is back
# A broker outage must cost no media. The agent's window (`recording` to `stopping`) starts at the
# first progress report after the first frame (-stats_period 0.5 s) and ends before FFmpeg reads its
# 'q', so the MP4 holds more than the window when nothing is lost: measured +0.59 to +0.72 s (this
# test and ~30 broker/S3 chaos rounds). The tolerance is for timing noise only; losing a second fails.
COVERAGE_TOLERANCE_S = 0.5


def at(doc: dict, key: str = "updated_at") -> float:
    """The agent's own wall-clock time in a status document (``updated_at`` or ``start_time``)."""
    return datetime.fromisoformat(doc[key].replace("Z", "+00:00")).timestamp()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def wait_ffmpeg(agent: AgentProcess, mount: str, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = agent.ffmpeg_pids(mount)
        if pids:
            return pids[0]
        time.sleep(0.1)
    raise AssertionError(f"no FFmpeg recording {mount} within {timeout} s")


def test_ffmpeg_killed_is_restarted_into_the_same_task(
    tmp_path, broker, probe, prefix, make_agent, camera
) -> None:
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage={"type": "local"})  # fmt: skip
    agent = rig.start_agent()
    rig.request("cam1", {"action": "start", "task_name": "wd"})
    rig.wait_status("cam1", "wd", "recording", timeout=30)
    began = time.monotonic()
    record_for(5)
    first = wait_ffmpeg(agent, "cam1")
    os.kill(first, signal.SIGKILL)
    interrupted = probe.wait_for(rig.task_topic("cam1", "wd"), lambda p: p.get("interruptions", 0) >= 1, timeout=20)
    assert interrupted["status"] == "recording"
    assert wait_ffmpeg(agent, "cam1") != first
    record_for(6)
    rig.request("cam1", {"action": "stop", "task_name": "wd"})
    final = rig.wait_status("cam1", "wd", {"completed", "failed"}, timeout=60)
    wall = time.monotonic() - began
    assert final["status"] == "completed", final
    assert final["interruptions"] == 1
    info = ffprobe_info(final["local_file"])
    assert info["codec"] == "h264" and moov_before_mdat(final["local_file"])
    # The MP4 covers the task minus at most the restart gap (detected at once; backoff + reconnect).
    assert info["duration"] >= wall - 5.0, (info["duration"], wall)


@pytest.mark.parametrize("victims", ["agent", "agent+ffmpeg"])
def test_kill9_recovers_task_from_segments(
    victims: str, tmp_path, broker, probe, prefix, make_agent, camera, s3, bucket
) -> None:
    """`agent`: kill -9 of the agent alone; `agent+ffmpeg`: a power cut (both die at once)."""
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam2": {"url": camera.url("cam2")}},
                   storage=minio_storage(s3, bucket))  # fmt: skip
    agent = rig.start_agent()
    rig.request("cam2", {"action": "start", "task_name": "cut"})
    rig.wait_status("cam2", "cut", "recording", timeout=30)
    began = time.monotonic()
    record_for(10)
    orphans = agent.ffmpeg_pids("cam2")
    assert len(orphans) == 1
    for pid in [agent.pid, *orphans] if victims == "agent+ffmpeg" else [agent.pid]:
        os.kill(pid, signal.SIGKILL)  # no 'q', no trailer, no journal update
    recorded = time.monotonic() - began
    agent.wait(10)

    rig.start_agent()
    final = rig.wait_status("cam2", "cut", {"uploaded", "failed"}, timeout=60)
    # An FFmpeg orphaned by the dead agent is stopped by recovery, not left recording forever.
    assert _state(orphans[0]) in ("gone", "Z")
    assert final["status"] == "uploaded", final
    assert final["recovered"] is True and "restarted" in final["stop_reason"]
    mp4 = download(final["download_url"], tmp_path / "cut.mp4")
    info = ffprobe_info(mp4)
    assert info["codec"] == "h264" and moov_before_mdat(mp4)
    # Packets are flushed as written (flush_packets=1), so a kill loses well under one segment.
    # `recorded` starts when the `recording` status arrived, a little after the first frame.
    assert info["duration"] >= recorded - 1.5, (info["duration"], recorded)
    print(f"kill -9 ({victims}): recorded {recorded:.2f} s, recovered {info['duration']:.2f} s")
    # The camera is free for a new task after recovery.
    assert rig.request("cam2", {"action": "start", "task_name": "after"})["status"] == "starting"
    rig.request("cam2", {"action": "stop", "task_name": "after"})


def test_camera_outage_is_one_task_with_an_interruption(
    tmp_path, broker, probe, prefix, make_agent, track
) -> None:
    sim = track(CameraSim(tmp_path / "cam", mounts=("cam1",), shared=False)).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": sim.url("cam1")}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    rig.request("cam1", {"action": "start", "task_name": "gap"})
    rig.wait_status("cam1", "gap", "recording", timeout=30)
    record_for(4)
    sim.kill()
    record_for(20)
    assert rig.request("cam1", {"action": "status"})["status"] == "recording"
    sim.restart()
    record_for(8)
    rig.request("cam1", {"action": "stop", "task_name": "gap"})
    final = rig.wait_status("cam1", "gap", {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    assert final["interruptions"] >= 1
    mp4s = list(Path(final["local_file"]).parent.glob("*.mp4"))
    assert mp4s == [Path(final["local_file"])]
    info = ffprobe_info(final["local_file"])
    # Before and after the outage are both in the one file (about 4 s + 8 s, minus reconnect time).
    assert 7.0 <= info["duration"] <= 16.0, info["duration"]


def test_broker_outage_keeps_recording_and_runs_queued_commands_once(
    tmp_path, broker, probe, prefix, make_agent, camera, track, bucket
) -> None:
    s3 = track(SeaweedS3(tmp_path / "s3")).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent,
                   cameras={"cam1": {"url": camera.url("cam1")}, "cam2": {"url": camera.url("cam2")}},
                   storage=minio_storage(s3, bucket),
                   mqtt={"reconnect_min_seconds": 6, "reconnect_max_seconds": 10})  # fmt: skip
    rig.start_agent()
    rig.request("cam1", {"action": "start", "task_name": "through"})
    recording = rig.wait_status("cam1", "through", "recording", timeout=30)
    broker.wait_saved()
    broker.kill()
    killed_wall = time.time()
    record_for(3)
    broker.restart()
    restored_wall = time.time()
    # The agent waits >= 6 s before reconnecting: these commands queue in its persistent session.
    rid_stop, rid_start = uuid.uuid4().hex, uuid.uuid4().hex
    with MqttProbe(broker.host, broker.port) as sender:
        sender.publish(rig.cmd_topic("cam1"), {"action": "stop", "task_name": "through", "request_id": rid_stop})
        start = {"action": "start", "task_name": "queued", "request_id": rid_start}
        sender.publish(rig.cmd_topic("cam2"), start)
        sender.publish(rig.cmd_topic("cam2"), start)  # a client retry: must not start twice
    back = time.monotonic()
    with MqttProbe(broker.host, broker.port) as watcher:
        watcher.subscribe(f"{rig.base}/#")
        watcher.wait_for_raw(f"{rig.base}/status", lambda p: p == b"online", timeout=30)
        replies = [watcher.wait_for(rig.reply_topic("cam2"), lambda p: p.get("request_id") == rid_start, 10)]
        # The agent is back only after the outage, so the watcher sees the stop's `stopping` live.
        stopping = watcher.wait_for(rig.task_topic("cam1", "through"), lambda p: p["status"] == "stopping",
                                    timeout=20)  # fmt: skip
        assert time.monotonic() - back < RETAINED_BOUND_S + 10
        assert stopping["stop_reason"] == "stop command"
        watcher.wait_for(rig.task_topic("cam2", "queued"), lambda p: p["status"] == "recording", timeout=30)
        # Both deliveries are answered alike; the task started once.
        time.sleep(1)
        replies = [m for m in watcher.messages(rig.reply_topic("cam2")) if m.get("request_id") == rid_start]
        assert len(replies) == 2 and replies[0] == replies[1]
        final = watcher.wait_for(rig.task_topic("cam1", "through"), lambda p: p["status"] == "uploaded", 60)
    assert rig.agent is not None
    assert rig.agent.log_text().count("command start on cam2") == 1
    info = ffprobe_info(download(final["download_url"], tmp_path / "through.mp4"))
    # Recording was unaffected by the broker outage: the file covers the whole task, measured on the
    # agent's own clock from its first frame (`recording`) to the stop it ran after reconnecting.
    recorded = at(stopping) - at(recording)
    assert at(recording) < killed_wall and restored_wall < at(stopping), (recording, killed_wall, stopping)
    assert recorded - COVERAGE_TOLERANCE_S <= info["duration"] <= at(stopping) - at(recording, "start_time") + 1.0, (
        info["duration"],
        recorded,
    )
    print(f"broker outage: MP4 {info['duration']:.2f} s of a {recorded:.2f} s recording window")
    rig.request("cam2", {"action": "stop", "task_name": "queued"})
    assert rig.wait_status("cam2", "queued", {"uploaded", "failed"}, timeout=60)["status"] == "uploaded"
