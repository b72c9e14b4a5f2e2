"""Unit tests of `edge_agent.agent.Agent` with fakes at its seams (publisher, uploads, recorders).

No broker, no S3, no FFmpeg process: commands and recorder/upload events are fed to `agent.handle`.
"""

from __future__ import annotations

import json
import queue
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent, Event
from edge_agent.config import AgentConfig
from edge_agent.configload import parse_config
from edge_agent.journal import Journal
from edge_agent.mqtt import CommandReceived, Connected
from edge_agent.recording import MediaStarted, RecorderEvent, RecordingFailed, RecordingFinished, RecordingSpec
from edge_agent.retention import apply_retention
from edge_agent.tasks import parse_iso, stamp
from edge_agent.uploads import UploadAttempt, UploadFailed, UploadFinished, UploadProgress, UploadRetrying

CAM_PASSWORD = "camPw-zq7-secret"
P_D = "edge/edge-01"


# ---- fakes ----------------------------------------------------------------------------------------


@dataclass
class FakePublisher:
    published: list[tuple[str, bytes, bool]] = field(default_factory=list)
    replies: list[tuple[str, bytes, str | None, bytes | None]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published.append((topic, payload, retain))

    def reply(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        self.replies.append((topic, payload, response_topic, correlation))

    def last_reply(self) -> dict[str, Any]:
        return json.loads(self.replies[-1][1])

    def retained(self, topic: str) -> dict[str, Any] | None:
        """The last retained payload on `topic` (None when cleared or never published)."""
        for t, payload, retain in reversed(self.published):
            if t == topic and retain:
                return json.loads(payload) if payload else None
        raise AssertionError(f"nothing retained on {topic}")

    def all_text(self) -> str:
        return "\n".join(p.decode() for _, p, _ in self.published) + "\n".join(r[1].decode() for r in self.replies)


@dataclass
class FakeUploads:
    submitted: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False

    swept: list[tuple[str, set[str]]] = field(default_factory=list)

    def submit(self, task_id: str, path: Path, object_name: str, sha256: str, size: int,
               created: float, attempts_before: int = 0, upload_id: str | None = None) -> None:  # fmt: skip
        self.submitted.append({"task_id": task_id, "path": path, "object_name": object_name, "sha256": sha256,
                               "size": size, "created": created, "attempts_before": attempts_before,
                               "upload_id": upload_id})  # fmt: skip

    def sweep(self, prefix: str, keep: set[str]) -> None:
        self.swept.append((prefix, keep))

    def set_paused(self, paused: bool) -> None:
        self.paused = paused

    def stop(self, timeout: float) -> None:
        self.stopped = True

    def presign(self, object_name: str) -> str:
        return f"https://s3.example/recordings/{object_name}?X-Amz-Signature=fresh"


class FakeRecorder:
    def __init__(self, spec: RecordingSpec, post: Callable[[RecorderEvent], None], finalise_only: bool) -> None:
        self.spec = spec
        self.post = post
        self.finalise_only = finalise_only
        self.started = False
        self.stop_requests = 0

    def start(self) -> None:
        self.started = True

    def request_stop(self) -> None:
        self.stop_requests += 1


@dataclass
class Harness:
    agent: Agent
    pub: FakePublisher
    uploads: FakeUploads
    recorders: list[FakeRecorder]
    journal: Journal
    tmp: Path

    def cmd(self, payload: dict[str, Any] | bytes, camera: str = "cam1") -> dict[str, Any]:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        before = len(self.pub.replies)
        self.agent.handle(CommandReceived(camera, raw, "nodered/responses", b"corr"))
        assert len(self.pub.replies) == before + 1, "every command gets exactly one reply"
        topic, _, response_topic, correlation = self.pub.replies[-1]
        assert topic == f"{P_D}/{camera}/reply"
        assert (response_topic, correlation) == ("nodered/responses", b"corr")
        return self.pub.last_reply()

    def start(self, name: str, camera: str = "cam1", **extra: Any) -> dict[str, Any]:
        return self.cmd({"action": "start", "task_name": name, **extra}, camera)

    def finish(self, rec: FakeRecorder, size: int = 4096, duration: float = 12.5) -> Path:
        path = rec.spec.output_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00" * size)
        self.agent.handle(RecordingFinished(rec.spec.task_id, path, size, duration, "ab" * 32))
        return path

    def task_topic(self, name: str, camera: str = "cam1") -> str:
        return f"{P_D}/{camera}/tasks/{name}"


def make_config(tmp: Path, storage: dict[str, Any] | None = None, **sections: Any) -> AgentConfig:
    doc: dict[str, Any] = {
        "device_id": "edge-01",
        "mqtt": {"topic_prefix": "edge"},
        "cameras": {
            "cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@192.0.2.10:554/stream1", "max_seconds": 60},
            "cam2": {"url": "rtsp://192.0.2.11/s"},
        },
        "recording": {"output_dir": str(tmp / "rec"), "max_seconds": 600},
        "storage": {"type": "local", "min_free_bytes": 0, **(storage or {})},
    }
    for key, value in sections.items():
        doc[key].update(value)
    return parse_config(doc, env={})


MINIO = {"type": "minio", "access_key": "ak", "secret_key": "sk-zq7-secret", "bucket": "recordings"}


def make_harness(
    tmp: Path, cfg: AgentConfig, pub: FakePublisher, journals: list[Journal], *, ffmpeg_ok: bool = True
) -> Harness:
    """An Agent on fakes (publisher, uploads, recorders) and a real journal in `tmp` (closed by the caller)."""
    uploads = FakeUploads()
    recorders: list[FakeRecorder] = []

    def new_recorder(spec: RecordingSpec, post: Callable[[RecorderEvent], None], finalise_only: bool) -> Any:
        rec = FakeRecorder(spec, post, finalise_only)
        recorders.append(rec)
        return rec

    journal = Journal(tmp / "rec" / ".edge-agent.sqlite3")
    journals.append(journal)
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    agent = Agent(cfg, pub, journal, uploads, events, recorder_factory=new_recorder)
    if ffmpeg_ok:
        assert agent.resolve_ffmpeg() is None  # ffmpeg and ffprobe are installed
    return Harness(agent, pub, uploads, recorders, journal, tmp)


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    journals: list[Journal] = []

    def factory(storage: dict[str, Any] | None = None, *, ffmpeg_ok: bool = True, **sections: Any) -> Harness:
        cfg = make_config(tmp_path, storage, **sections)
        return make_harness(tmp_path, cfg, FakePublisher(), journals, ffmpeg_ok=ffmpeg_ok)

    yield factory
    for j in journals:
        j.close()


# ---- replies ----------------------------------------------------------------------------------------


def test_reply_echoes_request_id_and_ok(build: Callable[..., Harness]) -> None:
    h = build()
    reply = h.cmd({"action": "status", "request_id": "r-42"})
    assert reply["ok"] is True
    assert reply["request_id"] == "r-42"
    assert reply["status"] == "idle"
    assert reply["camera_id"] == "cam1"
    assert reply["device_id"] == "edge-01"


def test_unknown_camera(build: Callable[..., Harness]) -> None:
    h = build()
    reply = h.cmd({"action": "status", "request_id": "r1"}, camera="cam9")
    assert reply["status"] == "error"
    assert reply["ok"] is False
    assert reply["request_id"] == "r1"
    assert "cam9" in reply["error"]
    assert h.recorders == []


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"action":"start","task_name":"t","max_seconds":"10","request_id":"rq"}', "max_seconds"),
        (b'{"action":"explode","request_id":"rq"}', "action"),
        (b'{"action":"start","task_name":"a/b","request_id":"rq"}', "'/'"),
    ],
)
def test_malformed_payload_rejected(build: Callable[..., Harness], payload: bytes, needle: str) -> None:
    h = build()
    reply = h.cmd(payload)
    assert reply["status"] == "rejected"
    assert reply["ok"] is False
    assert needle in reply["error"]
    if b"rq" in payload:
        assert reply["request_id"] == "rq"
    assert h.recorders == []


def test_oversized_payload_rejected(build: Callable[..., Harness]) -> None:
    h = build(mqtt={"max_payload_bytes": 256})
    reply = h.cmd({"action": "start", "task_name": "t", "request_id": "x" * 190, "pad": "y" * 100})
    assert reply["status"] == "rejected"
    assert "exceeds" in reply["error"]


# ---- start ------------------------------------------------------------------------------------------


def test_start_publishes_starting_retained(build: Callable[..., Harness]) -> None:
    h = build()
    reply = h.start("夜间巡检", request_id="r1")
    assert reply["ok"] is True
    assert reply["status"] == "starting"
    assert reply["task_name"] == "夜间巡检"
    assert reply["request_id"] == "r1"
    status = h.pub.retained(f"{P_D}/cam1/status")
    task_doc = h.pub.retained(h.task_topic("夜间巡检"))
    assert status is not None and task_doc is not None
    assert status["status"] == task_doc["status"] == "starting"
    assert task_doc["camera_id"] == "cam1"
    assert task_doc["device_id"] == "edge-01"
    assert task_doc["storage_type"] == "local"
    assert len(h.recorders) == 1
    rec = h.recorders[0]
    assert rec.started is True
    assert rec.finalise_only is False
    assert rec.spec.camera_id == "cam1"
    assert rec.spec.output_file.parent == (h.tmp / "rec" / "cam1").resolve()
    assert CAM_PASSWORD in rec.spec.secrets  # so the recorder can redact FFmpeg's stderr
    # The journal has it before anyone could see it.
    found = h.journal.find("cam1", "夜间巡检")
    assert found is not None and found.status == "starting"


def test_second_start_while_active(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("first")
    reply = h.start("second")
    assert reply["ok"] is False
    assert reply["task_name"] == "first"
    assert reply["status"] == "starting"
    assert len(h.recorders) == 1
    again = h.start("first")  # repeating the running task's start is idempotent
    assert again["ok"] is True
    assert again["task_name"] == "first"
    assert len(h.recorders) == 1


def test_cameras_are_independent(build: Callable[..., Harness]) -> None:
    h = build()
    assert h.start("a", camera="cam1")["ok"] is True
    assert h.start("b", camera="cam2")["ok"] is True
    assert len(h.recorders) == 2


@pytest.mark.parametrize(("asked", "expected"), [(None, 60), (3600, 60), (61, 60), (5, 5)])
def test_max_seconds_clamped_to_camera_max(build: Callable[..., Harness], asked: int | None, expected: int) -> None:
    h = build()
    extra = {} if asked is None else {"max_seconds": asked}
    reply = h.start("t", **extra)
    assert reply["max_seconds"] == expected
    assert h.agent.book.has_deadline(h.recorders[0].spec.task_id)


def test_max_seconds_uses_recording_default(build: Callable[..., Harness]) -> None:
    h = build()
    assert h.start("t", camera="cam2", max_seconds=100000)["max_seconds"] == 600


def test_disk_floor_rejects_start(build: Callable[..., Harness]) -> None:
    h = build(storage={"min_free_bytes": 10**18})
    reply = h.start("t", request_id="r1")
    assert reply["ok"] is False
    assert reply["status"] == "rejected"
    assert "disk" in reply["error"]
    assert h.recorders == []
    assert h.journal.find("cam1", "t") is None


def test_missing_ffmpeg_answers_with_reason(build: Callable[..., Harness]) -> None:
    h = build(ffmpeg_ok=False, recording={"ffmpeg_path": "/nonexistent/ffmpeg"})
    assert h.agent.resolve_ffmpeg() is not None
    reply = h.start("t")
    assert reply["ok"] is False
    assert reply["status"] == "error"
    assert "/nonexistent/ffmpeg" in reply["error"]
    assert h.recorders == []


# ---- stop / status / query ---------------------------------------------------------------------------


def test_stop_running_task(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("t")
    reply = h.cmd({"action": "stop", "task_name": "t"})
    assert reply["ok"] is True
    assert reply["status"] == "stopping"
    assert reply["stop_reason"] == "stop command"
    assert h.recorders[0].stop_requests == 1
    assert h.pub.retained(h.task_topic("t"))["status"] == "stopping"  # type: ignore[index]


def test_stop_mismatch(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("running")
    reply = h.cmd({"action": "stop", "task_name": "other"})
    assert reply["ok"] is False
    assert reply["status"] == "task_mismatch"
    assert reply["running_task"] == "running"
    assert h.recorders[0].stop_requests == 0


def test_stop_when_nothing_ran(build: Callable[..., Harness]) -> None:
    h = build()
    reply = h.cmd({"action": "stop", "task_name": "t"})
    assert reply["ok"] is False
    assert reply["status"] == "not_running"


def test_stop_after_finish_returns_final_status(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("t")
    h.finish(h.recorders[0])
    reply = h.cmd({"action": "stop", "task_name": "t"})
    assert reply["ok"] is True
    assert reply["status"] == "completed"


def test_status_and_query(build: Callable[..., Harness]) -> None:
    h = build()
    assert h.cmd({"action": "status"})["status"] == "idle"
    missing = h.cmd({"action": "query", "task_name": "nope"})
    assert missing["ok"] is False
    assert missing["status"] == "not_found"
    assert missing["task_name"] == "nope"
    h.start("t")
    assert h.cmd({"action": "status"})["task_name"] == "t"
    found = h.cmd({"action": "query", "task_name": "t"})
    assert found["ok"] is True
    assert found["status"] == "starting"


# ---- recorder events --------------------------------------------------------------------------------


def test_media_started_then_completed_local(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("t")
    rec = h.recorders[0]
    h.agent.handle(MediaStarted(rec.spec.task_id))
    assert h.pub.retained(h.task_topic("t"))["status"] == "recording"  # type: ignore[index]
    assert h.pub.retained(f"{P_D}/cam1/status")["status"] == "recording"  # type: ignore[index]
    path = h.finish(rec, size=4096, duration=12.5)
    doc = h.pub.retained(h.task_topic("t"))
    assert doc is not None
    assert doc["status"] == "completed"
    assert doc["size_bytes"] == 4096
    assert doc["duration_seconds"] == 12.5
    assert doc["local_file"] == str(path)
    assert doc["stop_reason"] == "recording ended"
    assert h.uploads.submitted == []
    assert h.start("next")["ok"] is True  # the camera is free again


def test_recording_failed(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("t")
    h.agent.handle(RecordingFailed(h.recorders[0].spec.task_id, "no media within 20 s"))
    doc = h.pub.retained(h.task_topic("t"))
    assert doc is not None
    assert doc["status"] == "failed"
    assert doc["error"] == "no media within 20 s"
    assert h.journal.find("cam1", "t").status == "failed"  # type: ignore[union-attr]
    assert h.start("again")["ok"] is True


def test_minio_upload_flow(build: Callable[..., Harness]) -> None:
    h = build(storage={**MINIO, "download_url": "retained"})
    reply = h.start("夜间巡检")
    rec = h.recorders[0]
    started = parse_iso(reply["start_time"])
    path = h.finish(rec, size=2048)
    doc = h.pub.retained(h.task_topic("夜间巡检"))
    assert doc is not None and doc["status"] == "uploading"
    assert len(h.uploads.submitted) == 1
    job = h.uploads.submitted[0]
    assert job["task_id"] == rec.spec.task_id
    assert job["path"] == path
    assert job["size"] == 2048
    assert job["sha256"] == "ab" * 32
    assert re.fullmatch(r"edge-01/cam1/\d{4}/\d{2}/\d{2}/夜间巡检_\d{8}T\d{9}Z\.mp4", job["object_name"])
    assert job["object_name"].startswith(f"edge-01/cam1/{started:%Y/%m/%d}/")
    assert job["object_name"].endswith(f"_{stamp(started)}.mp4")
    assert doc["object_name"] == job["object_name"]
    assert doc["bucket"] == "recordings"
    assert h.pub.retained(f"{P_D}/uploads")["queue_length"] == 1  # type: ignore[index]

    # The first attempt holds the camera.
    h.agent.handle(UploadAttempt(rec.spec.task_id, 1))
    assert h.start("other")["ok"] is False

    # Waiting out an outage does not.
    when = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    h.agent.handle(UploadRetrying(rec.spec.task_id, 1, when, "network error: refused"))
    doc = h.pub.retained(h.task_topic("夜间巡检"))
    assert doc is not None
    assert doc["status"] == "upload_pending"
    assert doc["next_retry_at"] == when
    assert doc["upload_attempts"] == 1
    assert doc["last_upload_error"] == "network error: refused"
    second = h.start("second")
    assert second["ok"] is True
    assert second["task_name"] == "second"
    assert len(h.recorders) == 2

    url = "https://s3.example/recordings/x?sig=1"
    h.agent.handle(UploadFinished(rec.spec.task_id, "recordings", job["object_name"], url, True, 2))
    doc = h.pub.retained(h.task_topic("夜间巡检"))
    assert doc is not None
    assert doc["status"] == "uploaded"
    assert doc["download_url"] == url
    assert doc["local_file_deleted"] is True
    assert doc["upload_attempts"] == 2
    assert "next_retry_at" not in doc
    # The camera's status topic follows the newest task, not the one that just uploaded.
    assert h.pub.retained(f"{P_D}/cam1/status")["task_name"] == "second"  # type: ignore[index]


def test_upload_failed(build: Callable[..., Harness]) -> None:
    h = build(storage=MINIO)
    h.start("t")
    rec = h.recorders[0]
    h.finish(rec)
    h.agent.handle(UploadFailed(rec.spec.task_id, "S3 AccessDenied: no", 1))
    doc = h.pub.retained(h.task_topic("t"))
    assert doc is not None
    assert doc["status"] == "failed"
    assert "AccessDenied" in doc["error"]


def test_finished_without_file_fails_instead_of_uploading(build: Callable[..., Harness]) -> None:
    h = build(storage=MINIO)
    h.start("t")
    rec = h.recorders[0]
    h.agent.handle(RecordingFinished(rec.spec.task_id, h.tmp / "gone.mp4", 10, 1.0, "ab" * 32))
    doc = h.pub.retained(h.task_topic("t"))
    assert doc is not None
    assert doc["status"] == "failed"
    assert "missing" in doc["error"]
    assert h.uploads.submitted == []


# ---- idempotence and bounds ---------------------------------------------------------------------------


def test_duplicate_request_id_not_re_executed(build: Callable[..., Harness]) -> None:
    h = build()
    first = len(h.pub.replies)
    h.start("t", request_id="dup-1")
    h.agent.handle(MediaStarted(h.recorders[0].spec.task_id))
    h.start("t", request_id="dup-1")
    assert len(h.pub.replies) == first + 2
    assert h.pub.replies[-1][1] == h.pub.replies[-2][1]  # byte-identical: the stored reply
    assert len(h.recorders) == 1
    # A redelivered stop must not be applied twice either.
    h.cmd({"action": "stop", "task_name": "t", "request_id": "dup-2"})
    h.cmd({"action": "stop", "task_name": "t", "request_id": "dup-2"})
    assert h.recorders[0].stop_requests == 1


def test_same_request_id_on_other_camera_is_separate(build: Callable[..., Harness]) -> None:
    h = build()
    h.start("a", camera="cam1", request_id="same")
    reply = h.start("b", camera="cam2", request_id="same")
    assert reply["task_name"] == "b"
    assert len(h.recorders) == 2


def test_retained_tasks_bounded(build: Callable[..., Harness]) -> None:
    h = build(mqtt={"retained_tasks_per_camera": 2})
    for i, name in enumerate(("a", "b", "c")):
        h.start(name)
        h.finish(h.recorders[i])
    cleared = [(t, p) for t, p, r in h.pub.published if r and p == b""]
    assert cleared == [(h.task_topic("a"), b"")]
    assert h.pub.retained(h.task_topic("a")) is None
    assert h.pub.retained(h.task_topic("b"))["status"] == "completed"  # type: ignore[index]
    assert h.pub.retained(h.task_topic("c"))["status"] == "completed"  # type: ignore[index]


def test_statuses_never_contain_camera_password(build: Callable[..., Harness]) -> None:
    h = build(storage=MINIO)
    h.cmd({"action": "status"})
    h.start("t", request_id="r1")
    rec = h.recorders[0]
    h.agent.handle(MediaStarted(rec.spec.task_id))
    h.cmd({"action": "query", "task_name": "t"})
    h.cmd({"action": "stop", "task_name": "t"})
    h.finish(rec)
    h.agent.handle(UploadFinished(rec.spec.task_id, "recordings", "o", "https://x/o", True, 1))
    h.start("u")
    h.agent.handle(RecordingFailed(h.recorders[1].spec.task_id, "ffmpeg exited 1: rtsp://***@192.0.2.10"))
    text = h.pub.all_text()
    assert "192.0.2.10" in text  # the failure detail itself is published ...
    assert CAM_PASSWORD not in text  # ... but never the password
    assert "sk-zq7-secret" not in text
    assert "rtsp://admin:" not in text


# ---- recovery at start-up ---------------------------------------------------------------------------


def _journal_task(h: Harness, name: str, status: str, **fields: Any) -> Any:
    """A task as an earlier run of the agent left it in the journal."""
    h.start(name)
    rec = h.recorders[-1]
    task = h.agent.book.get(rec.spec.task_id)
    assert task is not None
    for key, value in {"status": status, **fields}.items():
        setattr(task, key, value)
    h.journal.save(task)
    return task


def test_recover_finalises_unfinished_recordings(build: Callable[..., Harness]) -> None:
    first = build()
    old = _journal_task(first, "cut", "recording")
    h = build()  # a new agent process on the same journal
    h.agent.recover()
    assert len(h.recorders) == 1 and h.recorders[0].finalise_only and h.recorders[0].started
    assert h.recorders[0].spec.task_id == old.task_id
    h.agent.handle(Connected(session_present=True))  # statuses are published once connected
    doc = h.pub.retained(h.task_topic("cut"))
    assert doc is not None and doc["status"] == "stopping" and doc["recovered"] is True
    assert "restarted" in doc["stop_reason"]
    # The camera is held until the recovered task is finalised.
    assert h.start("new")["task_name"] == "cut"


def test_recover_resumes_pending_uploads_with_attempts(build: Callable[..., Harness], tmp_path: Path) -> None:
    first = build(MINIO)
    path = tmp_path / "kept.mp4"
    path.write_bytes(b"x" * 10)
    old = _journal_task(first, "up", "upload_pending", local_file=str(path), sha256="cd" * 32, size_bytes=10,
                        upload_attempts=7)  # fmt: skip
    h = build(MINIO)
    h.agent.recover()
    assert [j["task_id"] for j in h.uploads.submitted] == [old.task_id]
    job = h.uploads.submitted[0]
    assert job["attempts_before"] == 7 and job["object_name"] == old.object_name and job["path"] == path


def test_recover_submits_an_upload_whose_local_file_is_gone(build: Callable[..., Harness], tmp_path: Path) -> None:
    """Killed after the upload deleted the local copy but before `uploaded` was journaled: the store
    decides (the object is there with this size and sha256, or the upload fails saying why)."""
    first = build(MINIO)
    old = _journal_task(first, "up", "uploading", local_file=str(tmp_path / "deleted.mp4"), sha256="cd" * 32,
                        size_bytes=10)  # fmt: skip
    h = build(MINIO)
    h.agent.recover()
    assert [j["task_id"] for j in h.uploads.submitted] == [old.task_id]
    journaled = h.journal.find("cam1", "up")
    assert journaled is not None and journaled.status == "uploading"


def test_recover_with_storage_now_local_keeps_file_and_completes(build: Callable[..., Harness], tmp_path: Path) -> None:
    first = build(MINIO)
    path = tmp_path / "kept.mp4"
    path.write_bytes(b"x" * 10)
    _journal_task(first, "up", "uploading", local_file=str(path), sha256="cd" * 32, size_bytes=10)
    cfg = make_config(tmp_path)  # storage.type local now
    pub = FakePublisher()
    journal = Journal(tmp_path / "rec" / ".edge-agent.sqlite3")
    try:
        agent = Agent(cfg, pub, journal, None, queue.SimpleQueue())
        agent.resolve_ffmpeg()
        agent.recover()
        doc = pub.retained(f"{P_D}/cam1/tasks/up")
    finally:
        journal.close()
    assert doc is not None and doc["status"] == "completed" and "local" in doc["error"]
    assert path.exists()


def test_retention_deletes_only_old_uploaded_copies(build: Callable[..., Harness], tmp_path: Path) -> None:
    h = build({**MINIO, "delete_local_after_upload": False, "retention_days": 1})
    files = {}
    for name, status in (("old-up", "uploaded"), ("old-pending", "upload_pending"), ("new-up", "uploaded")):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(b"x")
        files[name] = path
        task = _journal_task(h, name, status, local_file=str(path), local_file_deleted=False)
        if name.startswith("old"):
            task.started = task.started - timedelta(days=2)
        h.journal.save(task)
        h.agent.handle(RecordingFailed(task.task_id, "test: free the camera"))
        task.status = status  # the failure above only released the camera; keep the journaled status
        h.journal.save(task)
    assert apply_retention(h.agent.cfg, h.journal) == 1
    assert not files["old-up"].exists()
    assert files["old-pending"].exists() and files["new-up"].exists()  # never deletes what is not uploaded
    kept = {t.task_name: t for t in h.journal.with_status(frozenset({"uploaded"}))}
    assert kept["old-up"].local_file_deleted is True and kept["new-up"].local_file_deleted is False


def test_every_reconnect_republishes_task_topics_too(build: Callable[..., Harness]) -> None:
    """A broker that crashed loses retained updates it had acknowledged, even when our session
    survived: every connect republishes the camera and task topics from live state."""
    h = build()
    h.start("a")
    for present in (True, True, False):
        h.pub.published.clear()
        h.agent.handle(Connected(session_present=present))
        topics = [t for t, _, _ in h.pub.published]
        assert f"{P_D}/cam1/status" in topics and f"{P_D}/cam2/status" in topics
        assert f"{P_D}/cam1/tasks/a" in topics


@pytest.mark.parametrize("where", ["replies", "none"])
def test_download_url_stays_off_retained_topics_unless_asked(build: Callable[..., Harness], where: str) -> None:
    """The presigned URL is a bearer credential: by default only replies carry one (freshly signed)."""
    h = build(storage={**MINIO, "download_url": where})
    h.start("t")
    rec = h.recorders[0]
    h.agent.handle(MediaStarted(rec.spec.task_id))
    h.cmd({"action": "stop", "task_name": "t"})
    h.finish(rec)
    obj = h.uploads.submitted[0]["object_name"]
    h.agent.handle(UploadFinished(rec.spec.task_id, "recordings", obj, "https://leak.example/x", True, 1))
    retained = [payload for (_topic, payload, retain) in h.pub.published if retain]
    assert retained and not [p for p in retained if b'"download_url":' in p]
    assert not any(b"leak.example" in p for (_t, p, _r) in h.pub.published)
    doc = h.cmd({"action": "query", "task_name": "t"})
    assert doc["status"] == "uploaded"
    if where == "replies":
        assert doc["download_url"] == f"https://s3.example/recordings/{obj}?X-Amz-Signature=fresh"
    else:
        assert "download_url" not in doc


def test_pause_and_resume_uploads_persist_and_show_in_the_uploads_summary(
    build: Callable[..., Harness], tmp_path: Path
) -> None:
    h = build(storage=MINIO)
    reply = h.cmd({"action": "pause_uploads", "request_id": "p1"})
    assert reply["ok"] is True and reply["status"] == "uploads_paused"
    assert h.uploads.paused is True  # type: ignore[attr-defined]
    assert h.pub.retained(f"{P_D}/uploads")["paused"] is True  # type: ignore[index]
    # A restart keeps the pause (a metered link stays metered).
    again = make_harness(tmp_path, h.agent.cfg, FakePublisher(), [])
    again.agent.recover()
    assert again.uploads.paused is True  # type: ignore[attr-defined]
    reply = h.cmd({"action": "resume_uploads"})
    assert reply["status"] == "uploads_running" and h.uploads.paused is False  # type: ignore[attr-defined]
    assert h.pub.retained(f"{P_D}/uploads")["paused"] is False  # type: ignore[index]


def test_upload_progress_is_journaled_and_resumed_with_its_upload_id(build: Callable[..., Harness]) -> None:
    h = build(storage=MINIO)
    h.start("big")
    rec = h.recorders[0]
    h.agent.handle(MediaStarted(rec.spec.task_id))
    h.cmd({"action": "stop", "task_name": "big"})
    h.finish(rec, size=40 * 2**20)
    h.agent.handle(UploadProgress(rec.spec.task_id, "upload-123", 16 * 2**20))
    doc = h.pub.retained(h.task_topic("big"))
    assert doc is not None and doc["bytes_uploaded"] == 16 * 2**20 and "upload_id" not in doc
    assert h.pub.retained(f"{P_D}/uploads")["bytes_uploaded"] == 16 * 2**20  # type: ignore[index]
    journaled = h.journal.find("cam1", "big")
    assert journaled is not None and journaled.upload_id == "upload-123"


def test_the_agent_module_loads_neither_paho_nor_minio() -> None:
    """The agent talks to a Publisher and an UploadSubmitter, never to paho or minio themselves."""
    import subprocess
    import sys

    code = ("import sys, edge_agent.agent; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'paho', 'minio', 'urllib3'}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
