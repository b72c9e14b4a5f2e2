"""Durable uploads end to end: object-store outages, agent crashes, bad credentials, disk floor."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from parts import SeaweedS3
from rig import Rig, download, make_rig, minio_storage, record_for

pytestmark = pytest.mark.integration

SIGTERM_BOUND_S = 15.0  # stated bound: SIGTERM with the store unreachable exits within this


def _record(rig: Rig, cam: str, task: str, seconds: float = 4) -> dict[str, Any]:
    reply = rig.request(cam, {"action": "start", "task_name": task})
    assert reply["ok"], reply
    rig.wait_status(cam, task, "recording", timeout=30)
    record_for(seconds)
    return rig.request(cam, {"action": "stop", "task_name": task})


def _check_object(s3: SeaweedS3, bucket: str, status: dict[str, Any], tmp_path: Path) -> None:
    assert status["status"] == "uploaded", status
    mp4 = download(status["download_url"], tmp_path / f"{status['task_name']}.mp4")
    assert hashlib.sha256(mp4.read_bytes()).hexdigest() == status["sha256"]
    stat = s3.client().stat_object(bucket, status["object_name"])
    assert stat.size == status["size_bytes"]
    meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
    assert meta.get("x-amz-meta-sha256") == status["sha256"]


def test_store_outage_then_recovery(tmp_path, broker, probe, prefix, make_agent, camera, track, bucket) -> None:
    s3 = track(SeaweedS3(tmp_path / "s3")).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage=minio_storage(s3, bucket))  # fmt: skip
    rig.start_agent()
    rig.request("cam1", {"action": "start", "task_name": "outage"})
    rig.wait_status("cam1", "outage", "recording", timeout=30)
    s3.kill()
    record_for(4)
    rig.request("cam1", {"action": "stop", "task_name": "outage"})
    pending = probe.wait_for(
        rig.task_topic("cam1", "outage"),
        lambda p: p["status"] == "upload_pending" and p["upload_attempts"] >= 3, timeout=60,
    )  # fmt: skip
    assert pending["next_retry_at"] and pending["last_upload_error"]
    attempts = [m["upload_attempts"] for m in probe.messages(rig.task_topic("cam1", "outage"))
                if m["status"] == "upload_pending"]  # fmt: skip
    assert attempts == sorted(attempts) and attempts[-1] > attempts[0]
    backlog = probe.wait_for(f"{rig.base}/uploads", lambda p: p["queue_length"] == 1 and "last_error" in p)
    assert backlog["bytes_pending"] == pending["size_bytes"]
    # The camera is not blocked by the outage: a new task can start.
    assert rig.request("cam1", {"action": "start", "task_name": "next"})["status"] == "starting"
    rig.request("cam1", {"action": "stop", "task_name": "next"})

    s3.restart()
    final = rig.wait_status("cam1", "outage", {"uploaded", "failed"}, timeout=60)
    _check_object(s3, bucket, final, tmp_path)
    assert final["upload_attempts"] > attempts[-1] - 1
    assert "next_retry_at" not in final


def test_kill9_mid_transfer_and_pending_resumes(
    tmp_path, broker, probe, prefix, make_agent, camera, s3, bucket
) -> None:
    cams = {"cam1": {"url": camera.url("cam1")}, "cam2": {"url": camera.url("cam2")}}
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras=cams,
                   storage=minio_storage(s3, bucket, upload_workers=1, bandwidth_limit_bytes_per_second=16384))
    agent = rig.start_agent()
    for cam in cams:
        rig.request(cam, {"action": "start", "task_name": f"k-{cam}"})
    for cam in cams:
        rig.wait_status(cam, f"k-{cam}", "recording", timeout=30)
    record_for(5)
    for cam in cams:
        rig.request(cam, {"action": "stop", "task_name": f"k-{cam}"})
    # One upload is mid-transfer (throttled), the other waits in the queue behind the single worker.
    first = probe.wait_for(
        rig.base + "/uploads", lambda p: p["queue_length"] == 2, timeout=60
    )
    assert first["bytes_pending"] > 0
    in_flight = [rig.wait_status(cam, f"k-{cam}", "uploading", timeout=30) for cam in cams]
    keys_before = {s["task_name"]: s["object_name"] for s in in_flight}
    agent.kill()  # SIGKILL, no chance to clean up

    rig.start_agent()
    finals = [rig.wait_status(cam, f"k-{cam}", {"uploaded", "failed"}, timeout=90) for cam in cams]
    for status in finals:
        _check_object(s3, bucket, status, tmp_path)
        assert status["object_name"] == keys_before[status["task_name"]]
    objects = [o.object_name for o in s3.client().list_objects(bucket, recursive=True)]
    assert sorted(objects) == sorted(keys_before.values())  # nothing twice, nothing missing


def test_wrong_credentials_fail_without_retry_loop(
    tmp_path, broker, probe, prefix, make_agent, camera, s3, bucket
) -> None:
    storage = {**minio_storage(s3, bucket), "secret_key": "definitely-wrong-secret"}
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage=storage)  # fmt: skip
    rig.start_agent()
    _record(rig, "cam1", "badkey", seconds=3)
    final = rig.wait_status("cam1", "badkey", {"uploaded", "failed"}, timeout=60)
    assert final["status"] == "failed"
    assert "upload failed" in final["error"] and ("Access" in final["error"] or "Signature" in final["error"])
    assert final["upload_attempts"] == 1
    assert "definitely-wrong-secret" not in final["error"]
    # The recording is kept on disk: a failed upload never deletes it.
    assert Path(final["local_file"]).is_file()


def test_sigterm_with_store_down_then_disk_floor(
    tmp_path, broker, probe, prefix, make_agent, camera, track, bucket
) -> None:
    s3 = track(SeaweedS3(tmp_path / "s3")).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage=minio_storage(s3, bucket, retry_max_seconds=30))  # fmt: skip
    agent = rig.start_agent()
    s3.kill()
    _record(rig, "cam1", "queued", seconds=3)
    pending = rig.wait_status("cam1", "queued", "upload_pending", timeout=60)
    local = Path(pending["local_file"])
    assert local.is_file()
    code, elapsed = agent.terminate(timeout=SIGTERM_BOUND_S + 15)
    assert code == 0 and elapsed < SIGTERM_BOUND_S, (code, elapsed)

    # Restart with a free-space floor no disk can meet: starts are refused, the backlog is untouched.
    cfg = yaml.safe_load(rig.config_path.read_text())
    cfg["storage"]["min_free_bytes"] = 10**18
    rig.config_path.write_text(yaml.safe_dump(cfg))
    rig.start_agent()
    refused = rig.request("cam1", {"action": "start", "task_name": "nope"})
    assert refused["status"] == "rejected" and "disk" in refused["error"] and refused["ok"] is False
    assert probe.wait_for(f"{rig.base}/telemetry", lambda p: p["disk_below_floor"] is True, timeout=10)
    assert local.is_file() and local.stat().st_size == pending["size_bytes"]

    s3.restart()
    final = rig.wait_status("cam1", "queued", {"uploaded", "failed"}, timeout=60)
    _check_object(s3, bucket, final, tmp_path)
    assert final["object_name"] == pending["object_name"]
