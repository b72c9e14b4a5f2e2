"""The agent: one thread that owns every task, driven by events from MQTT, recorders and uploads.

Other threads never touch a `Task`: they post events to `events` (a SimpleQueue, safe to call from
a signal handler) and the loop here applies them through the lifecycle (`edge_agent.lifecycle`),
which journals each change, then publishes it (`edge_agent.reporter`). Commands come in through
the intake (`edge_agent.intake`) and go to a table of small handlers that each return the reply.
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
from typing import Any, Literal

from edge_agent import ffmpeg, snapshot
from edge_agent.config import AgentConfig
from edge_agent.configload import secret_values
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
from edge_agent.lifecycle import Lifecycle, RecorderFactory, UploadSubmitter
from edge_agent.limits import InboundGate
from edge_agent.management import Management
from edge_agent.messages import Command
from edge_agent.recorder import Recorder, probe_camera
from edge_agent.recording import (
    Interrupted,
    MediaRange,
    MediaStarted,
    Probed,
    RecorderEvent,
    RecordingFailed,
    RecordingFinished,
    RecordingSpec,
    SegmentClosed,
    SnapshotTaken,
)
from edge_agent.redact import redact
from edge_agent.remoteconfig import Desired, Rejected
from edge_agent.reporter import Publisher, PublishStats, Reporter, Subscriber, free_bytes
from edge_agent.retention import apply_retention
from edge_agent.taskbook import BUSY_STATUSES, TaskBook
from edge_agent.tasks import ACTIVE_STATUSES, Status, Task
from edge_agent.topics import Topics

__all__ = ["Agent", "Event", "Publisher", "RecorderFactory", "Shutdown", "UploadSubmitter"]

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 60.0


@dataclass(frozen=True)
class Shutdown:
    reason: str


@dataclass(frozen=True)
class RemoteSetup:
    """What remote management starts from (`edge_agent.management.load_desired`)."""

    local_raw: dict[str, Any]  # agent.yaml as read, before validation: the base of every desired document
    desired: Desired | None = None  # the stored document `cfg` was built with
    applied_at: str | None = None
    problem: Rejected | None = None  # a stored document that no longer builds on the local file
    new_uploads: Callable[[Any], UploadSubmitter | None] | None = None  # StorageConfig -> a started pool


Event = MqttEvent | RecorderEvent | SnapshotTaken | UploadEvent | Shutdown


def _default_recorder(spec: RecordingSpec, post: Callable[[RecorderEvent], None], finalise_only: bool) -> Recorder:
    return Recorder(spec, post, finalise_only=finalise_only)


class Agent:
    """The event loop and the command handlers; task state changes go through the lifecycle."""

    def __init__(
        self,
        cfg: AgentConfig,
        publisher: Publisher,
        journal: Journal,
        uploads: UploadSubmitter | None,
        events: queue.SimpleQueue[Event],
        recorder_factory: RecorderFactory = _default_recorder,
        gate: InboundGate | None = None,
        remote: RemoteSetup | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics.of(cfg)
        self._pub = publisher
        self._journal = journal
        self._uploads = uploads
        self.events = events
        self.secrets: tuple[str, ...] = secret_values(cfg)  # every secret value, for redaction
        self.book = TaskBook(cfg.cameras, cfg.mqtt.retained_tasks_per_camera)
        self.report = Reporter(cfg, publisher, journal, self.book, self.topics, gate)
        self.tasks = Lifecycle(cfg, journal, self.book, self.report, uploads, events.put, recorder_factory,
                               self.secrets)  # fmt: skip
        self._intake = CommandIntake(cfg, publisher, self.topics, self.book, self.report.counters, gate)
        self._gate = gate
        self._probe_cache: dict[str, Literal["copy", "transcode"]] = {}
        self._snapshots = snapshot.Snapshots(cfg, publisher, self.topics, self._intake, self.tasks, self.secrets,
                                             events.put)  # fmt: skip
        self._ffmpeg_error: str | None = None
        self._handlers: dict[str, Callable[[str, Command], tuple[dict[str, Any], bool]]] = {
            "start": self._cmd_start,
            "stop": self._cmd_stop,
            "status": self._cmd_status,
            "query": self._cmd_query,
            "export": self._cmd_export,
            "pause_uploads": lambda camera, _: self._set_uploads_paused(camera, True),
            "resume_uploads": lambda camera, _: self._set_uploads_paused(camera, False),
        }
        if cfg.homeassistant.enabled and isinstance(publisher, Subscriber):
            publisher.add_subscription(self.report.ha_topics.ha_status)
        self.on_secrets: Callable[[tuple[str, ...]], None] | None = None  # e.g. the log redactor
        self._new_uploads = remote.new_uploads if remote is not None else None
        self.manage: Management | None = None
        if remote is not None:
            self.manage = Management(self, publisher, self.topics, journal, remote.local_raw, remote.desired,
                                     remote.applied_at, remote.problem)  # fmt: skip
            self.manage.subscribe()

    @property
    def metrics_snapshot(self) -> dict[str, Any]:
        """What the metrics endpoint serves (replaced whole by the agent thread: no lock)."""
        return self.report.metrics_snapshot

    # ---- start-up --------------------------------------------------------------------------

    def resolve_ffmpeg(self) -> str | None:
        """Find FFmpeg/ffprobe; on failure keep running and answer starts with the reason."""
        try:
            found = ffmpeg.resolve_executable(self.cfg.recording.ffmpeg_path, "ffmpeg")
            probe = self.cfg.recording.ffprobe_path or ffmpeg.ffprobe_next_to(found)
            self.tasks.tools = (found, ffmpeg.resolve_executable(probe, "ffprobe"))
            self._ffmpeg_error = None
        except FFmpegNotFound as exc:
            self._ffmpeg_error = str(exc)
        return self._ffmpeg_error

    def prewarm_probes(self) -> threading.Thread | None:
        """Probe `auto` cameras once in the background, so the first start does not pay for ffprobe.

        One thread, cameras in turn (no start-up burst); it only posts `Probed` events. A camera that
        is offline now is simply probed at its first start instead.
        """
        if self._ffmpeg_error or self.tasks.tools is None:
            return None
        cams = [c for c in self.cfg.cameras if self.cfg.camera_video_mode(c) == "auto"]
        if not cams:
            return None
        ffprobe, timeout = self.tasks.tools[1], self.cfg.recording.probe_timeout_seconds

        def run() -> None:
            for cam in cams:
                try:
                    self.events.put(probe_camera(ffprobe, cam, self.cfg.stream_input(cam), timeout))
                except RecordingError as exc:
                    log.info("camera %s not probed at start-up: %s", cam, redact(str(exc), self.secrets))

        thread = threading.Thread(target=run, name="probe", daemon=True)
        thread.start()
        return thread

    def recover(self) -> None:
        """Rebuild state from the journal: finalise interrupted recordings, resume pending uploads."""
        self.tasks.recover(self._ffmpeg_error)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Handle events until a Shutdown event, then stop recordings and return (bounded)."""
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        period = self.cfg.telemetry_seconds
        next_telemetry = time.monotonic() + period if period > 0 else math.inf
        while True:
            now = time.monotonic()
            if self.cfg.telemetry_seconds != period:  # changed remotely
                period = self.cfg.telemetry_seconds
                next_telemetry = now + period if period > 0 else math.inf
            for task in self.book.due(now):
                log.info("%s reached its maximum duration of %d s", task.task_id, task.max_seconds)
                self.tasks.request_stop(task, f"max_duration_reached: {task.max_seconds} s")
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
            if self.manage is not None:
                self.manage.after_event()  # a change that waited for a task may apply now
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
                if self.manage is not None:
                    self.manage.publish_reported()
            case MessageReceived(topic=topic, payload=payload):
                if self._gate is not None:
                    self._gate.done(extra=True)
                if self.manage is not None and self.manage.on_message(topic, payload):
                    pass
                elif topic == self.report.ha_topics.ha_status and payload.strip().lower() == b"online":
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
                self.tasks.media_started(tid)
            case MediaRange(task_id=tid, media_start=media_start):
                self.tasks.media_range(tid, media_start)
            case SegmentClosed(task_id=tid, path=path, seconds=seconds):
                task = self.book.get(tid)
                if task is not None:
                    self.report.segment(task, path, seconds)
            case Interrupted(task_id=tid, count=count, reason=reason):
                self.tasks.interrupted(tid, count, reason)
            case RecordingFinished():
                self.tasks.finished(event)
            case RecordingFailed(task_id=tid, error=error):
                self.tasks.failed(tid, error)
            case SnapshotTaken():
                self._snapshots.taken(event)
            case UploadAttempt() | UploadProgress() | UploadRetrying() | UploadFinished() | UploadFailed():
                self.tasks.upload_event(event)

    # ---- commands --------------------------------------------------------------------------

    def _on_command(self, ev: CommandReceived) -> None:
        """Admitted by the intake (limits, one decode, checks), executed once, answered."""
        cmd = self._intake.admit(ev)
        if cmd is None:
            return
        camera = ev.camera_id
        if cmd.action == "snapshot":  # answered when the grab ends (SnapshotTaken)
            self._snapshots.request(camera, cmd, ev, self._ffmpeg_error)
            return
        log.info("command %s on %s (task %r, request %r)", cmd.action, camera, cmd.task_name, cmd.request_id)
        doc, ok = self.camera_command(camera, cmd)
        self._intake.reply(camera, doc, ok, cmd.request_id, ev)

    def camera_command(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        """Run one admitted command on a configured camera: (reply document, ok)."""
        try:
            return self._handlers[cmd.action](camera, cmd)
        except Exception as exc:
            log.exception("command %s on %s failed", cmd.action, camera)
            return {"status": "error", "camera_id": camera,
                    "error": f"internal error: {redact(str(exc), self.secrets)}"}, False  # fmt: skip

    def _cmd_start(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        assert cmd.task_name is not None
        busy = self.book.holder(camera)
        if busy is not None:
            if busy.status in BUSY_STATUSES:
                # Idempotent: a repeated start of the running task, or a start while busy, answers
                # with the running task's status and starts nothing.
                return busy.status_doc(), busy.task_name == cmd.task_name
            self.book.unhold(camera)
        if self.tasks.stopping:
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
        cam = self.cfg.cameras[camera]
        pre_roll: float | None = None
        if camera in self.tasks.buffers:  # a range of the camera's ring, from pre_roll seconds ago
            asked = cam.pre_roll_seconds if cmd.pre_roll_seconds is None else float(cmd.pre_roll_seconds)
            pre_roll = min(asked, float(cam.buffer_seconds))
        elif cmd.pre_roll_seconds:
            error = f"pre_roll_seconds needs a buffer: set cameras.{camera}.buffer_seconds"
            return {"status": "rejected", "camera_id": camera, "error": error}, False
        mode = self.cfg.camera_video_mode(camera)
        resolved = self._probe_cache.get(camera) if mode == "auto" else mode
        task = self.tasks.start(camera, cmd.task_name, limit, cmd.request_id, resolved or "auto", pre_roll)
        return task.status_doc(), True

    def _cmd_export(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        assert cmd.task_name is not None and cmd.range_from is not None and cmd.range_to is not None
        return self.tasks.export(camera, cmd.task_name, cmd.range_from.timestamp(), cmd.range_to.timestamp(),
                                 cmd.request_id)  # fmt: skip

    def _cmd_stop(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        task = self.book.holder(camera)
        if task is None or task.status not in ACTIVE_STATUSES:
            latest = self.book.latest(camera)
            if latest is not None and latest.task_name == cmd.task_name:
                return latest.status_doc(), True  # already finished: its final status
            return {"status": "not_running", "camera_id": camera}, False
        if task.task_name != cmd.task_name:
            return {"status": "task_mismatch", "camera_id": camera, "running_task": task.task_name}, False
        self.tasks.request_stop(task, "stop command")
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

    # ---- remote management (edge_agent.management) ---------------------------------------------

    def running_task(self, camera: str) -> str | None:
        task = self.book.holder(camera)
        return task.task_name if task is not None and task.status in ACTIVE_STATUSES else None

    def busy_cameras(self) -> dict[str, str]:
        """Cameras whose configuration must not change now: camera -> the task using it (recording,
        finishing or uploading, exports of its ring included)."""
        return {t.camera_id: t.task_name for t in self.book.in_flight() if t.status in BUSY_STATUSES}

    def reconfigure(self, new: AgentConfig) -> None:
        """Run `new` from now on (cameras, recording, storage, groups, telemetry, log level), live.

        Cameras that did not change are not touched; the caller (`Management`) never passes a change
        to a camera that is recording. A changed or removed camera's ring buffer is stopped (bounded)
        and a new one started; a changed store gets a new upload pool once the old one is idle.
        """
        old = self.cfg
        removed = old.cameras.keys() - new.cameras.keys()
        changed = {c for c in old.cameras.keys() & new.cameras.keys() if old.cameras[c] != new.cameras[c]}
        for camera in sorted(removed | changed):
            self.tasks.stop_buffer(camera)
            self._probe_cache.pop(camera, None)
        self.secrets = tuple(dict.fromkeys(self.secrets + secret_values(new)))  # old ones may still show up
        for part in (self.report, self.tasks, self._intake, self._snapshots):
            part.cfg = new
        self.cfg = new
        self.tasks.set_secrets(self.secrets)
        self._snapshots.set_secrets(self.secrets)
        if self.on_secrets is not None:
            self.on_secrets(self.secrets)
        self.book.set_cameras(new.cameras)
        if new.storage != old.storage:
            self._swap_uploads(new)
        if new.log_level != old.log_level:
            logging.getLogger().setLevel(new.log_level)
        for camera in sorted(removed):  # its retained topics would otherwise tell of a camera that is gone
            self._pub.publish(self.topics.status(camera), b"", retain=True)
            self._pub.publish(self.topics.snapshot(camera), b"", retain=True)
        self.tasks.start_buffers()
        log.info("configuration changed: cameras %s added, %s removed, %s changed",
                 sorted(new.cameras.keys() - old.cameras.keys()), sorted(removed), sorted(changed))  # fmt: skip
        self.report.discovery()
        self.report.uploads(force=True)
        if new.telemetry_seconds > 0:
            self.report.telemetry()

    def _swap_uploads(self, new: AgentConfig) -> None:
        if self._uploads is not None:
            self._uploads.stop(timeout=3.0)
        pool = self._new_uploads(new.storage) if self._new_uploads is not None else None
        if pool is not None:
            pool.set_paused(self.report.uploads_paused)
        self._uploads = self.tasks.uploads = pool
        moved = self.tasks.requeue_uploads()
        log.info("object store changed: storage %s; %d waiting upload(s) go to it", new.storage.type, moved)

    # ---- shutdown --------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        """Finalise running recordings (bounded), leave uploads journaled, stop workers."""
        self.tasks.stopping = True
        log.info("shutting down (%s): stopping %d recording(s)", reason, len(self.book.recording()))
        for task in self.book.holders():
            if task.status in ACTIVE_STATUSES:
                self.tasks.request_stop(task, f"agent shutdown ({reason})")
        deadline = time.monotonic() + self.cfg.recording.stop_timeout_seconds + 30.0
        while self.book.recording() and time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(event, Shutdown):
                self.handle(event)  # commands still get a reply (starts are rejected)
        if self.book.recording():
            log.error("recordings still finalising at exit: %s (recovered at next start)", self.book.recording())
        self.tasks.stop_buffers()  # after the recordings: a buffered task reads its camera's ring
        if self._uploads is not None:
            self._uploads.stop(timeout=3.0)
        # Apply the last upload events that arrived while the workers stopped.
        with contextlib.suppress(queue.Empty):
            while True:
                event = self.events.get_nowait()
                if not isinstance(event, Shutdown):
                    self.handle(event)
