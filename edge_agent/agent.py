"""The agent: one thread that owns every task, driven by events from MQTT, recorders and uploads.

Other threads never touch a `Task`: they post events to `events` (a SimpleQueue, safe to call from
a signal handler) and the loop here applies them, journals the change, then publishes it. Commands
go through a table of small handlers that each return the reply.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from edge_agent import ffmpeg, names
from edge_agent.config import CAMERA_ID_RE, AgentConfig, secret_values
from edge_agent.errors import FFmpegNotFound, RecordingError
from edge_agent.events import (
    CommandReceived,
    Connected,
    Disconnected,
    MessageReceived,
    MqttEvent,
    OutboxReady,
    UploadAttempt,
    UploadEvent,
    UploadFailed,
    UploadFinished,
    UploadProgress,
    UploadRetrying,
)
from edge_agent.intake import CommandIntake
from edge_agent.journal import Journal
from edge_agent.limits import InboundGate
from edge_agent.messages import Command
from edge_agent.recorder import Recorder, probe_camera
from edge_agent.recording import (
    Interrupted,
    MediaStarted,
    Probed,
    RecorderEvent,
    RecordingFailed,
    RecordingFinished,
    RecordingSpec,
    SegmentClosed,
)
from edge_agent.redact import redact
from edge_agent.reporter import Publisher, PublishStats, Reporter, Subscriber, free_bytes
from edge_agent.retention import apply_retention
from edge_agent.taskbook import BUSY_STATUSES, TaskBook
from edge_agent.tasks import ACTIVE_STATUSES, UPLOAD_STATUSES, Status, Task, new_task, utc_now
from edge_agent.topics import Topics

__all__ = ["Agent", "Event", "Publisher", "Shutdown", "UploadSubmitter"]

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 60.0


@dataclass(frozen=True)
class Shutdown:
    reason: str


Event = MqttEvent | RecorderEvent | UploadEvent | Shutdown


class UploadSubmitter(Protocol):
    def submit(self, task_id: str, path: Path, object_name: str, sha256: str, size: int,
               created: float, attempts_before: int = 0, upload_id: str | None = None) -> None: ...  # fmt: skip
    def stop(self, timeout: float) -> None: ...
    def presign(self, object_name: str) -> str: ...
    def sweep(self, prefix: str, keep: set[str]) -> None: ...
    def set_paused(self, paused: bool) -> None: ...


RecorderFactory = Callable[[RecordingSpec, Callable[[RecorderEvent], None], bool], Recorder]


def _default_recorder(spec: RecordingSpec, post: Callable[[RecorderEvent], None], finalise_only: bool) -> Recorder:
    return Recorder(spec, post, finalise_only=finalise_only)


class Agent:
    """The event loop and the command handlers; owns the recorders' lifecycle through the task book."""

    def __init__(
        self,
        cfg: AgentConfig,
        publisher: Publisher,
        journal: Journal,
        uploads: UploadSubmitter | None,
        events: queue.SimpleQueue[Event],
        recorder_factory: RecorderFactory = _default_recorder,
        gate: InboundGate | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics.of(cfg)
        self._pub = publisher
        self._journal = journal
        self._uploads = uploads
        self.events = events
        self._new_recorder = recorder_factory
        self.book = TaskBook(cfg.cameras, cfg.mqtt.retained_tasks_per_camera)
        self.report = Reporter(cfg, publisher, journal, self.book, self.topics, gate)
        self._intake = CommandIntake(cfg, publisher, self.topics, self.book, self.report.counters, gate)
        self._probe_cache: dict[str, Literal["copy", "transcode"]] = {}
        self._ffmpeg: str | None = None
        self._ffprobe: str | None = None
        self._ffmpeg_error: str | None = None
        self.secrets: tuple[str, ...] = secret_values(cfg)  # every secret value, for redaction
        self._url_retained = cfg.storage.download_url == "retained"
        self._handlers: dict[str, Callable[[str, Command], tuple[dict[str, Any], bool]]] = {
            "start": self._cmd_start,
            "stop": self._cmd_stop,
            "status": self._cmd_status,
            "query": self._cmd_query,
            "pause_uploads": lambda camera, _: self._set_uploads_paused(camera, True),
            "resume_uploads": lambda camera, _: self._set_uploads_paused(camera, False),
        }
        self._stopping = False
        if cfg.homeassistant.enabled and isinstance(publisher, Subscriber):
            publisher.add_subscription(self.report.ha_topics.ha_status)

    @property
    def metrics_snapshot(self) -> dict[str, Any]:
        """What the metrics endpoint serves (replaced whole by the agent thread: no lock)."""
        return self.report.metrics_snapshot

    def _redact(self, text: str) -> str:
        return redact(text, self.secrets)

    # ---- start-up --------------------------------------------------------------------------

    def resolve_ffmpeg(self) -> str | None:
        """Find FFmpeg/ffprobe; on failure keep running and answer starts with the reason."""
        try:
            self._ffmpeg = ffmpeg.resolve_executable(self.cfg.recording.ffmpeg_path, "ffmpeg")
            probe = self.cfg.recording.ffprobe_path or ffmpeg.ffprobe_next_to(self._ffmpeg)
            self._ffprobe = ffmpeg.resolve_executable(probe, "ffprobe")
            self._ffmpeg_error = None
        except FFmpegNotFound as exc:
            self._ffmpeg_error = str(exc)
        return self._ffmpeg_error

    def prewarm_probes(self) -> threading.Thread | None:
        """Probe `auto` cameras once in the background, so the first start does not pay for ffprobe.

        One thread, cameras in turn (no start-up burst); it only posts `Probed` events. A camera that
        is offline now is simply probed at its first start instead.
        """
        if self._ffmpeg_error or self._ffprobe is None:
            return None
        cams = [c for c in self.cfg.cameras if self.cfg.camera_video_mode(c) == "auto"]
        if not cams:
            return None
        ffprobe, timeout = self._ffprobe, self.cfg.recording.probe_timeout_seconds

        def run() -> None:
            for cam in cams:
                try:
                    self.events.put(probe_camera(ffprobe, cam, self.cfg.stream_input(cam), timeout))
                except RecordingError as exc:
                    log.info("camera %s not probed at start-up: %s", cam, self._redact(str(exc)))

        thread = threading.Thread(target=run, name="probe", daemon=True)
        thread.start()
        return thread

    def recover(self) -> None:
        """Rebuild state from the journal: finalise interrupted recordings, resume pending uploads."""
        for task_id, reason in self._journal.quarantine(_journal_name_problem):
            log.error("journal: task %r quarantined (%s); it will not be recovered or republished", task_id, reason)
        for camera in self.cfg.cameras:
            for task in reversed(self._journal.latest(camera, self.cfg.mqtt.retained_tasks_per_camera)):
                self._remember(task)
        for task in self._journal.with_status(ACTIVE_STATUSES):
            if task.camera_id not in self.cfg.cameras or self._ffmpeg_error:
                task.status, task.error = Status.FAILED, (
                    self._ffmpeg_error or f"camera {task.camera_id!r} is no longer configured"
                )
                self._remember(task)
                self._journal.save(task)
                continue
            task.recovered = True
            task.stop_reason = f"agent restarted while the task was {task.status}; recovered from segments"
            task.status = Status.STOPPING
            task.updated = utc_now()
            self._journal.save(task)
            self._remember(task)
            log.warning("recovering %s from its segments", task.task_id)
            rec = self._new_recorder(self._spec(task, "copy"), self.events.put, True)
            self.book.hold(task, rec)  # the camera is held until finalised, like any stopping task
            rec.start()
        for task in self._journal.with_status(UPLOAD_STATUSES):
            self._remember(task)
            if self._uploads is None:  # storage switched to local since: the file stays where it is
                self._update(task, status=Status.COMPLETED, next_retry_at=None,
                             error="upload abandoned: storage.type is now local; the file is kept on disk")
                continue
            self.book.track(task)
            self._queue_upload(task, resuming=True)
        if self._uploads is not None:
            if self._journal.setting("uploads_paused") == "1":
                log.warning("uploads are paused (pause_uploads); send resume_uploads to continue")
                self.report.uploads_paused = True
                self._uploads.set_paused(True)
            # Multipart uploads of recordings no longer pending (deleted, failed) hold storage forever.
            keep = {t.object_name for t in self.book.in_flight() if t.object_name}
            self._uploads.sweep(f"{self.cfg.device_id}/", keep)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Handle events until a Shutdown event, then stop recordings and return (bounded)."""
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        period = self.cfg.telemetry_seconds
        next_telemetry = time.monotonic() + period if period > 0 else math.inf
        while True:
            now = time.monotonic()
            for task in self.book.due(now):
                log.info("%s reached its maximum duration of %d s", task.task_id, task.max_seconds)
                self._request_stop(task, f"max_duration_reached: {task.max_seconds} s")
            if now >= next_housekeeping:
                if self.cfg.storage.type == "minio":
                    self.report.uploads(force=True)
                apply_retention(self.cfg, self._journal)
                next_housekeeping = now + HOUSEKEEPING_SECONDS
            if now >= next_telemetry:
                self.report.telemetry()
                next_telemetry = now + period
            wake = min(next_housekeeping, next_telemetry, self.book.next_deadline())
            try:
                event = self.events.get(timeout=max(0.01, wake - time.monotonic()))
            except queue.Empty:
                continue
            if isinstance(event, Shutdown):
                self._shutdown(event.reason)
                return
            self.handle(event)

    def handle(self, event: Event) -> None:
        """Apply one event; an exception is logged and never ends the loop."""
        try:
            self._dispatch(event)
        except Exception:
            log.exception("error handling %s", type(event).__name__)

    def _dispatch(self, event: Event) -> None:
        match event:
            case CommandReceived():
                self._on_command(event)
            case Connected():
                # Every retained topic from live state, task topics included, after every connect:
                # a broker that crashed loses the retained updates it acknowledged since its last
                # save (Mosquitto's autosave_interval, 1800 s by default) even when our session
                # survived, and paho re-sends nothing it already had acknowledged (found by the chaos
                # test: a task's topic stuck at `recording` after it had ended `uploaded`).
                self.report.republish_all(tasks=True)
                self.report.discovery()
                if self.cfg.telemetry_seconds > 0:
                    self.report.telemetry()
            case MessageReceived(topic=topic, payload=payload):
                if topic == self.report.ha_topics.ha_status and payload.strip().lower() == b"online":
                    log.info("Home Assistant came online: publishing discovery")
                    self.report.discovery()
            case OutboxReady():
                if isinstance(self._pub, PublishStats):
                    self._pub.flush_held()
            case Disconnected():
                log.info("broker connection lost; recordings continue, statuses are republished later")
            case Probed(camera_id=cam, mode=mode, detail=detail):
                log.info("camera %s sends %s: %s mode", cam, detail, mode)
                self._probe_cache[cam] = mode
            case MediaStarted(task_id=tid):
                task = self.book.get(tid)
                if task is not None and task.status == Status.STARTING:
                    self._update(task, status=Status.RECORDING)
            case SegmentClosed(task_id=tid, path=path, seconds=seconds):
                task = self.book.get(tid)
                if task is not None:
                    self.report.segment(task, path, seconds)
            case Interrupted(task_id=tid, count=count, reason=reason):
                task = self.book.get(tid)
                if task is not None:
                    log.warning("%s interrupted (%d): %s", tid, count, reason)
                    self.report.ffmpeg_restarts += max(0, count - (task.interruptions or 0))
                    self._update(task, interruptions=count)
            case RecordingFinished():
                self._on_recording_finished(event)
            case RecordingFailed(task_id=tid, error=error):
                task = self.book.land(tid)
                if task is not None:
                    self._update(task, status=Status.FAILED, error=error)
                    self.book.release(task)
            case UploadAttempt(task_id=tid, attempt=n):
                task = self.book.get(tid)
                if task is not None:
                    self._update(task, status=Status.UPLOADING, upload_attempts=n)
            case UploadProgress(task_id=tid, upload_id=upload_id, bytes_uploaded=done):
                task = self.book.get(tid)
                if task is not None:  # journaled at once: a restart resumes this multipart upload
                    self._update(task, upload_id=upload_id, bytes_uploaded=done)
            case UploadRetrying(task_id=tid, attempts=n, next_retry_at=when, error=err):
                task = self.book.get(tid)
                self.report.last_upload_error = err
                if task is not None:
                    self._update(task, status=Status.UPLOAD_PENDING, upload_attempts=n, next_retry_at=when,
                                 last_upload_error=err)  # fmt: skip
            case UploadFinished():
                task = self.book.land(event.task_id)
                if task is not None:
                    self._update(
                        task, status=Status.UPLOADED, bucket=event.bucket, object_name=event.object_name,
                        download_url=(event.download_url or None) if self._url_retained else None,
                        local_file_deleted=event.local_file_deleted,
                        upload_attempts=event.attempts, next_retry_at=None, error=None,
                    )  # fmt: skip
            case UploadFailed(task_id=tid, error=error, attempts=n):
                task = self.book.land(tid)
                self.report.last_upload_error = error
                if task is not None:
                    self._update(task, status=Status.FAILED, error=f"upload failed: {error}", upload_attempts=n,
                                 next_retry_at=None)  # fmt: skip

    # ---- commands --------------------------------------------------------------------------

    def _on_command(self, ev: CommandReceived) -> None:
        """Admitted by the intake (limits, one decode, checks), executed once, answered."""
        cmd = self._intake.admit(ev)
        if cmd is None:
            return
        camera = ev.camera_id
        log.info("command %s on %s (task %r, request %r)", cmd.action, camera, cmd.task_name, cmd.request_id)
        try:
            doc, ok = self._handlers[cmd.action](camera, cmd)
        except Exception as exc:
            log.exception("command %s on %s failed", cmd.action, camera)
            doc, ok = {"status": "error", "camera_id": camera,
                       "error": f"internal error: {self._redact(str(exc))}"}, False  # fmt: skip
        self._intake.reply(camera, doc, ok, cmd.request_id, ev)

    def _cmd_start(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        assert cmd.task_name is not None
        busy = self.book.holder(camera)
        if busy is not None:
            if busy.status in BUSY_STATUSES:
                # Idempotent: a repeated start of the running task, or a start while busy, answers
                # with the running task's status and starts nothing.
                return busy.status_doc(), busy.task_name == cmd.task_name
            self.book.unhold(camera)
        if self._stopping:
            return {"status": "rejected", "camera_id": camera, "error": "agent is shutting down"}, False
        if self._ffmpeg_error:
            return {"status": "error", "camera_id": camera, "error": self._ffmpeg_error}, False
        floor = self.cfg.storage.min_free_bytes
        free = free_bytes(self.cfg.recording.output_dir)
        if free < floor:
            return {
                "status": "rejected", "camera_id": camera,
                "error": f"disk almost full: {free // 2**20} MiB free in the output directory, "
                f"below the {floor // 2**20} MiB floor (storage.min_free_bytes)",
            }, False  # fmt: skip
        limit = self.cfg.camera_max_seconds(camera)
        if cmd.max_seconds is not None:
            limit = min(limit, cmd.max_seconds)
        storage = self.cfg.storage
        task = new_task(camera, cmd.task_name, self.cfg.device_id, self.cfg.recording.output_dir, storage.type,
                        storage.bucket, limit)  # fmt: skip
        task.request_id = cmd.request_id
        mode = self.cfg.camera_video_mode(camera)
        resolved = self._probe_cache.get(camera) if mode == "auto" else mode
        rec = self._new_recorder(self._spec(task, resolved or "auto"), self.events.put, False)
        self.book.hold(task, rec, time.monotonic() + limit)
        self._remember(task)
        self.report.task(task)
        rec.start()
        return task.status_doc(), True

    def _cmd_stop(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        task = self.book.holder(camera)
        if task is None or task.status not in ACTIVE_STATUSES:
            latest = self.book.latest(camera)
            if latest is not None and latest.task_name == cmd.task_name:
                return latest.status_doc(), True  # already finished: its final status
            return {"status": "not_running", "camera_id": camera}, False
        if task.task_name != cmd.task_name:
            return {"status": "task_mismatch", "camera_id": camera, "running_task": task.task_name}, False
        self._request_stop(task, "stop command")
        return task.status_doc(), True

    def _cmd_status(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        task = self.book.latest(camera)
        if task is None:
            return {"status": "idle", "camera_id": camera, "device_id": self.cfg.device_id}, True
        return self._reply_doc(task), True

    def _cmd_query(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        assert cmd.task_name is not None
        task = self.book.kept(camera, cmd.task_name) or self._journal.find(camera, cmd.task_name)
        if task is None:
            return {"status": "not_found", "camera_id": camera, "task_name": cmd.task_name}, False
        return self._reply_doc(task), True

    def _set_uploads_paused(self, camera: str, paused: bool) -> tuple[dict[str, Any], bool]:
        """Device-wide (sent on any camera's command topic): a metered link stops every upload at the
        next 64 KiB and starts no new one until resumed; recordings go on; survives restarts."""
        if self._uploads is None:
            return {"status": "error", "camera_id": camera, "error": "storage.type is local: nothing uploads"}, False
        self._journal.set_setting("uploads_paused", "1" if paused else "0")
        self.report.uploads_paused = paused
        self._uploads.set_paused(paused)
        log.warning("uploads %s by command", "paused" if paused else "resumed")
        self.report.uploads(force=True)
        doc = {"status": "uploads_paused" if paused else "uploads_running", "camera_id": camera,
               "device_id": self.cfg.device_id}  # fmt: skip
        return doc, True

    def _reply_doc(self, task: Task) -> dict[str, Any]:
        """A task's status for a reply: with `storage.download_url: replies`, plus a freshly presigned
        URL (valid `presign_seconds` from now), which then never sits on a retained topic."""
        doc = task.status_doc()
        if (self.cfg.storage.download_url == "replies" and task.status == Status.UPLOADED and task.object_name
                and self._uploads is not None):  # fmt: skip
            url = self._uploads.presign(task.object_name)
            if url:
                doc["download_url"] = url
        return doc

    # ---- recordings ------------------------------------------------------------------------

    def _spec(self, task: Task, mode: Literal["auto", "copy", "transcode"]) -> RecordingSpec:
        rc = self.cfg.recording
        assert self._ffmpeg is not None and self._ffprobe is not None
        return RecordingSpec(
            task_id=task.task_id, camera_id=task.camera_id, stream=self.cfg.stream_input(task.camera_id),
            mode=mode, segment_dir=task.segment_dir, output_file=Path(task.local_file), ffmpeg=self._ffmpeg,
            ffprobe=self._ffprobe, segment_seconds=rc.segment_seconds,
            first_frame_timeout=rc.first_frame_timeout_seconds, stall_timeout=rc.stall_timeout_seconds,
            stop_timeout=rc.stop_timeout_seconds, restart_backoff_max=rc.restart_backoff_max_seconds,
            max_restarts=rc.max_restarts, probe_timeout=rc.probe_timeout_seconds, preset=rc.transcode_preset,
            stats_period=rc.stats_period_seconds, secrets=self.secrets,
        )  # fmt: skip

    def _request_stop(self, task: Task, reason: str) -> None:
        self.book.cancel_deadline(task.task_id)
        rec = self.book.recorder(task.task_id)
        self._update(task, status=Status.STOPPING, stop_reason=task.stop_reason or reason)
        if rec is not None:
            rec.request_stop()

    def _on_recording_finished(self, ev: RecordingFinished) -> None:
        task = self.book.get(ev.task_id)
        if task is None:
            return
        self.book.recorder_done(task.task_id)
        changes: dict[str, Any] = {
            "local_file": str(ev.path), "size_bytes": ev.size_bytes, "duration_seconds": ev.duration_seconds,
            "sha256": ev.sha256, "rejected_segments": list(ev.rejected_segments) or None,
        }  # fmt: skip
        if not task.stop_reason:
            changes["stop_reason"] = "recording ended"
        if self.cfg.storage.type == "local" or self._uploads is None:
            self.book.land(task.task_id)
            self._update(task, status=Status.COMPLETED, **changes)
            self.book.release(task)
            return
        # Journal first (status `uploading`), then hand the job to a worker: a crash in between
        # leaves the task in the journal's upload queue, resumed at the next start.
        self._update(task, status=Status.UPLOADING, upload_attempts=task.upload_attempts or 0, **changes)
        self._queue_upload(task)
        if self._stopping:
            self.book.release(task)

    def _queue_upload(self, task: Task, resuming: bool = False) -> None:
        assert self._uploads is not None
        path = Path(task.local_file)
        # When resuming after a restart a missing file is still submitted: a crash between the upload
        # (which deletes the local copy) and the journal saying `uploaded` leaves exactly that, and
        # the store then finds the object stored with this size and sha256 (else: failed, with why).
        missing = not path.exists() and not resuming
        if missing or task.sha256 is None or task.size_bytes is None or task.object_name is None:
            self.book.land(task.task_id)
            self._update(task, status=Status.FAILED, error=f"local file {path.name} is missing; nothing to upload")
            self.book.release(task)
            return
        self._uploads.submit(task.task_id, path, task.object_name, task.sha256, task.size_bytes,
                             task.started.timestamp(), task.upload_attempts or 0, task.upload_id)  # fmt: skip

    # ---- state changes -----------------------------------------------------------------------

    def _update(self, task: Task, **changes: Any) -> None:
        """Change a task, then journal and publish it (the reporter), then its flow events."""
        old_status = task.status
        for key in ("error", "last_upload_error", "stop_reason"):  # text from FFmpeg, S3 and exceptions
            if isinstance(changes.get(key), str):
                changes[key] = self._redact(changes[key])
        for key, value in changes.items():
            setattr(task, key, value)
        task.updated = utc_now()
        self.book.free_if_idle(task)
        self.report.task(task)
        self.report.transition(task, old_status)

    def _remember(self, task: Task) -> None:
        """Make `task` its camera's newest; clear the retained topics of tasks the set dropped."""
        dropped = self.book.remember(task)
        if task.camera_id in self.cfg.cameras:
            self.report.forget(task.camera_id, dropped)
            self._journal.prune(task.camera_id, max(self.cfg.mqtt.retained_tasks_per_camera, 100))

    # ---- shutdown --------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        """Finalise running recordings (bounded), leave uploads journaled, stop workers."""
        self._stopping = True
        log.info("shutting down (%s): stopping %d recording(s)", reason, len(self.book.recording()))
        for task in self.book.holders():
            if task.status in ACTIVE_STATUSES:
                self._request_stop(task, f"agent shutdown ({reason})")
        rc = self.cfg.recording
        deadline = time.monotonic() + rc.stop_timeout_seconds + 30.0
        while self.book.recording() and time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(event, Shutdown):
                self.handle(event)  # commands still get a reply (starts are rejected)
        if self.book.recording():
            log.error("recordings still finalising at exit: %s (recovered at next start)", self.book.recording())
        if self._uploads is not None:
            self._uploads.stop(timeout=3.0)
        # Apply the last upload events that arrived while the workers stopped.
        with contextlib.suppress(queue.Empty):
            while True:
                event = self.events.get_nowait()
                if not isinstance(event, Shutdown):
                    self.handle(event)


def _journal_name_problem(camera_id: str, task_name: str) -> str | None:
    """Why a journaled task's names break the naming rule (see `names`), or None."""
    if not CAMERA_ID_RE.match(camera_id):
        return f"camera id {camera_id!r} is not 1-64 of letters, digits, '_' or '-'"
    try:
        names.check_name(task_name)
    except names.InvalidName as exc:
        return str(exc)
    return None
