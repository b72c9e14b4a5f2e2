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
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from edge_agent import __version__, discovery, ffmpeg, names
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
from edge_agent.journal import Journal
from edge_agent.limits import InboundGate, TokenBucket
from edge_agent.messages import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    UPLOAD_STATUSES,
    Command,
    decode_command,
    dumps,
    event_doc,
    transition_events,
)
from edge_agent.recorder import (
    Interrupted,
    MediaStarted,
    Probed,
    Recorder,
    RecorderEvent,
    RecordingFailed,
    RecordingFinished,
    RecordingSpec,
    SegmentClosed,
    probe_camera,
)
from edge_agent.redact import redact
from edge_agent.tasks import Status, Task, iso, stamp, utc_now
from edge_agent.topics import DiscoveryTopics, Topics

log = logging.getLogger(__name__)

# A camera is busy while recording and while its first upload attempt runs (as the HTTP service
# did); a task waiting out an object-store outage (`upload_pending`) does not block new recordings.
BUSY_STATUSES = ACTIVE_STATUSES | {Status.UPLOADING}
DEDUP_REQUESTS = 1000
HOUSEKEEPING_SECONDS = 60.0


@dataclass(frozen=True)
class Shutdown:
    reason: str


Event = MqttEvent | RecorderEvent | UploadEvent | Shutdown


class Publisher(Protocol):
    """What the agent needs of MQTT (a fake records calls in unit tests)."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...
    def reply(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None: ...


@runtime_checkable
class Subscriber(Protocol):
    """Optional: a publisher that can also subscribe to extra topics (the MQTT link can)."""

    def add_subscription(self, topic: str) -> None: ...


@runtime_checkable
class PublishStats(Protocol):
    """Optional: a publisher that counts what it could not deliver and holds retained values that
    did not fit its queue until there is room (the MQTT link does)."""

    def publish_stats(self) -> dict[str, int]: ...
    def flush_held(self) -> int: ...


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
    """Owns tasks, recorders and the journal; the only writer of retained status."""

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
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self._pub = publisher
        self._journal = journal
        self._uploads = uploads
        self.events = events
        self._new_recorder = recorder_factory
        self._tasks: dict[str, Task] = {}  # in flight: recording or uploading
        self._active: dict[str, Task] = {}  # camera -> task holding the camera
        self._recorders: dict[str, Recorder] = {}  # task id -> its recorder
        self._deadlines: dict[str, float] = {}  # task id -> monotonic max-duration deadline
        self._latest: dict[str, Task] = {}  # camera -> newest task (the camera's status topic)
        self._retained: dict[str, OrderedDict[str, Task]] = {c: OrderedDict() for c in cfg.cameras}
        self._probe_cache: dict[str, Literal["copy", "transcode"]] = {}
        self._replies: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()
        self._last_uploads_doc: bytes | None = None
        self._last_upload_error: str | None = None
        self._ffmpeg: str | None = None
        self._ffprobe: str | None = None
        self._ffmpeg_error: str | None = None
        self._secrets = self._collect_secrets()
        self._gate = gate
        self._url_retained = cfg.storage.download_url == "retained"
        self._uploads_paused = False  # pause_uploads (persisted in the journal's settings)
        self._buckets: dict[str, TokenBucket] = {}  # camera ("" for unknown ones) -> command rate
        self._limited_replies: dict[str, TokenBucket] = {}  # camera -> budget of rate_limited replies
        self._counters = {"commands_received": 0, "commands_rate_limited": 0, "commands_unanswered": 0}
        self._handlers: dict[str, Callable[[str, Command], tuple[dict[str, Any], bool]]] = {
            "start": self._cmd_start,
            "stop": self._cmd_stop,
            "status": self._cmd_status,
            "query": self._cmd_query,
            "pause_uploads": self._cmd_pause_uploads,
            "resume_uploads": self._cmd_resume_uploads,
        }
        self._stopping = False
        self._connected_once = False
        self.metrics_snapshot: dict[str, Any] = {}  # read by the metrics HTTP thread
        self._born = time.monotonic()
        self._ffmpeg_restarts = 0  # watchdog restarts of FFmpeg since the agent started
        self.ha_topics = DiscoveryTopics(cfg.homeassistant.discovery_prefix)
        if cfg.homeassistant.enabled and isinstance(publisher, Subscriber):
            publisher.add_subscription(self.ha_topics.ha_status)

    # ---- start-up --------------------------------------------------------------------------

    def _collect_secrets(self) -> tuple[str, ...]:
        return secret_values(self.cfg)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value of the configuration, for redaction (logs, replies, statuses)."""
        return self._secrets

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

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
        rc, ffprobe = self.cfg.recording, self._ffprobe

        def run() -> None:
            for cam in cams:
                conf = self.cfg.cameras[cam]
                try:
                    self.events.put(probe_camera(
                        ffprobe, cam, conf.url.get_secret_value(), rtsp_transport=conf.rtsp_transport,
                        rtsp_timeout=rc.rtsp_timeout_seconds, analyzeduration_us=rc.analyzeduration_us,
                        probesize=rc.probesize, probe_timeout=rc.probe_timeout_seconds,
                    ))  # fmt: skip
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
            self._tasks[task.task_id] = task
            self._active[task.camera_id] = task  # held until finalised, like any stopping task
            log.warning("recovering %s from its segments", task.task_id)
            rec = self._new_recorder(self._spec(task, "copy"), self.events.put, True)
            self._recorders[task.task_id] = rec
            rec.start()
        for task in self._journal.with_status(UPLOAD_STATUSES):
            self._remember(task)
            if self._uploads is None:  # storage switched to local since: the file stays where it is
                self._update(task, status=Status.COMPLETED, next_retry_at=None,
                             error="upload abandoned: storage.type is now local; the file is kept on disk")
                continue
            self._tasks[task.task_id] = task
            self._queue_upload(task, resuming=True)
        if self._uploads is not None:
            if self._journal.setting("uploads_paused") == "1":
                log.warning("uploads are paused (pause_uploads); send resume_uploads to continue")
                self._uploads_paused = True
                self._uploads.set_paused(True)
            # Multipart uploads of recordings no longer pending (deleted, failed) hold storage forever.
            keep = {t.object_name for t in self._tasks.values() if t.object_name}
            self._uploads.sweep(f"{self.cfg.device_id}/", keep)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Handle events until a Shutdown event, then stop recordings and return (bounded)."""
        next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
        period = self.cfg.telemetry_seconds
        next_telemetry = time.monotonic() + period if period > 0 else math.inf
        while True:
            now = time.monotonic()
            self._enforce_deadlines(now)
            if now >= next_housekeeping:
                self._housekeeping()
                next_housekeeping = now + HOUSEKEEPING_SECONDS
            if now >= next_telemetry:
                self._publish_telemetry()
                next_telemetry = now + period
            wake = min([next_housekeeping, next_telemetry, *self._deadlines.values()])
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
                self._connected_once = True
                self._republish_all(tasks=True)
                self._publish_discovery()
                if self.cfg.telemetry_seconds > 0:
                    self._publish_telemetry()
            case MessageReceived(topic=topic, payload=payload):
                if topic == self.ha_topics.ha_status and payload.strip().lower() == b"online":
                    log.info("Home Assistant came online: publishing discovery")
                    self._publish_discovery()
            case OutboxReady():
                if isinstance(self._pub, PublishStats):
                    self._pub.flush_held()
            case Disconnected():
                log.info("broker connection lost; recordings continue, statuses are republished later")
            case Probed(camera_id=cam, mode=mode, detail=detail):
                log.info("camera %s sends %s: %s mode", cam, detail, mode)
                self._probe_cache[cam] = mode
            case MediaStarted(task_id=tid):
                task = self._tasks.get(tid)
                if task is not None and task.status == Status.STARTING:
                    self._update(task, status=Status.RECORDING)
            case SegmentClosed(task_id=tid, path=path, seconds=seconds):
                task = self._tasks.get(tid)
                if task is not None and self.cfg.recording.segment_events:
                    self._publish_event(event_doc(
                        "segment", task.camera_id, task.task_name, task.device_id, iso(utc_now()),
                        path=str(path), seconds=round(seconds, 3),
                    ))  # fmt: skip
            case Interrupted(task_id=tid, count=count, reason=reason):
                task = self._tasks.get(tid)
                if task is not None:
                    log.warning("%s interrupted (%d): %s", tid, count, reason)
                    self._ffmpeg_restarts += max(0, count - (task.interruptions or 0))
                    self._update(task, interruptions=count)
            case RecordingFinished():
                self._on_recording_finished(event)
            case RecordingFailed(task_id=tid, error=error):
                self._on_recording_failed(tid, error)
            case UploadAttempt(task_id=tid, attempt=n):
                task = self._tasks.get(tid)
                if task is not None:
                    self._update(task, status=Status.UPLOADING, upload_attempts=n)
            case UploadProgress(task_id=tid, upload_id=upload_id, bytes_uploaded=done):
                task = self._tasks.get(tid)
                if task is not None:  # journaled at once: a restart resumes this multipart upload
                    self._update(task, upload_id=upload_id, bytes_uploaded=done)
            case UploadRetrying(task_id=tid, attempts=n, next_retry_at=when, error=err):
                task = self._tasks.get(tid)
                self._last_upload_error = err
                if task is not None:
                    self._update(task, status=Status.UPLOAD_PENDING, upload_attempts=n, next_retry_at=when,
                                 last_upload_error=err)  # fmt: skip
            case UploadFinished():
                task = self._tasks.pop(event.task_id, None)
                if task is not None:
                    self._update(
                        task, status=Status.UPLOADED, bucket=event.bucket, object_name=event.object_name,
                        download_url=(event.download_url or None) if self._url_retained else None,
                        local_file_deleted=event.local_file_deleted,
                        upload_attempts=event.attempts, next_retry_at=None, error=None,
                    )  # fmt: skip
            case UploadFailed(task_id=tid, error=error, attempts=n):
                task = self._tasks.pop(tid, None)
                self._last_upload_error = error
                if task is not None:
                    self._update(task, status=Status.FAILED, error=f"upload failed: {error}", upload_attempts=n,
                                 next_retry_at=None)  # fmt: skip

    # ---- commands --------------------------------------------------------------------------

    def _on_command(self, ev: CommandReceived) -> None:
        """Limits first (rate, size), then one decode, then the response topic, then the handler."""
        if self._gate is not None:
            self._gate.done()
        camera = ev.camera_id
        self._counters["commands_received"] += 1
        bucket = self._buckets.get(camera if camera in self.cfg.cameras else "")
        if bucket is None:  # unknown cameras share one bucket: random camera ids buy no extra rate
            bucket = self._buckets[camera if camera in self.cfg.cameras else ""] = self._new_bucket()
        limited = not bucket.take()
        if names.topic_problem(self.topics.reply(camera)):  # e.g. a camera level too long to answer on
            self._counters["commands_unanswered"] += 1
            return
        if limited:
            self._on_rate_limited(camera, bucket, ev)
            return
        decoded = decode_command(ev.payload, self.cfg.mqtt.max_payload_bytes)
        rid = decoded.request_id  # set whenever one could be read, valid command or not
        if ev.response_topic is not None:
            problem = self._response_topic_problem(ev)
            if problem:
                log.warning("command on %s refused: response topic %r: %s", camera, ev.response_topic, problem)
                doc = {"status": "rejected", "camera_id": camera,
                       "error": f"response topic refused ({problem}); the command was not executed"}  # fmt: skip
                self._send_reply(camera, doc, False, rid, ev, respond=False)
                return
        if camera not in self.cfg.cameras:
            doc = {"status": "error", "camera_id": camera, "error": f"camera {camera!r} is not configured"}
            self._send_reply(camera, doc, False, rid, ev)
            return
        if decoded.switch is not None:
            cmd = self._switch_command(camera, decoded.switch)
        elif decoded.command is None:
            doc = {"status": "rejected", "camera_id": camera, "error": decoded.error or "invalid command"}
            self._send_reply(camera, doc, False, rid, ev)
            return
        else:
            cmd = decoded.command
        if cmd.request_id is not None:
            seen = self._replies.get((camera, cmd.request_id))
            if seen is not None:
                # Redelivered (QoS 1 / persistent session): answer again, execute once.
                log.info("duplicate request %r on %s: replying without re-executing", cmd.request_id, camera)
                self._pub.reply(seen[1], seen[0], ev.response_topic, ev.correlation_data)
                return
        log.info("command %s on %s (task %r, request %r)", cmd.action, camera, cmd.task_name, cmd.request_id)
        try:
            doc, ok = self._handlers[cmd.action](camera, cmd)
        except Exception as exc:
            log.exception("command %s on %s failed", cmd.action, camera)
            doc, ok = {"status": "error", "camera_id": camera,
                       "error": f"internal error: {self._redact(str(exc))}"}, False  # fmt: skip
        self._send_reply(camera, doc, ok, cmd.request_id, ev)

    def _new_bucket(self) -> TokenBucket:
        return TokenBucket(self.cfg.mqtt.commands_per_second, self.cfg.mqtt.command_burst)

    def _on_rate_limited(self, camera: str, bucket: TokenBucket, ev: CommandReceived) -> None:
        """Over the camera's command rate: answer `rate_limited` while the reply budget (a second
        bucket of the same size) lasts, then only count, so a flood cannot become a reply flood."""
        key = camera if camera in self.cfg.cameras else ""
        replies = self._limited_replies.get(key)
        if replies is None:
            replies = self._limited_replies[key] = self._new_bucket()
        if not replies.take():
            self._counters["commands_unanswered"] += 1
            return
        self._counters["commands_rate_limited"] += 1
        doc = {"status": "rate_limited", "camera_id": camera,
               "error": f"more than {self.cfg.mqtt.commands_per_second:g} commands per second for this camera "
               f"(burst {self.cfg.mqtt.command_burst}); the command was not executed",
               "retry_after_seconds": round(max(bucket.seconds_to_next(), 0.001), 3)}  # fmt: skip
        # Decoded only for its request_id (size-capped), so the sender can match the refusal.
        decoded = decode_command(ev.payload, self.cfg.mqtt.max_payload_bytes)
        rid = decoded.request_id  # set whenever one could be read, valid command or not
        self._send_reply(camera, doc, False, rid, ev, respond=self._response_topic_problem(ev) is None)

    def _response_topic_problem(self, ev: CommandReceived) -> str | None:
        if ev.response_topic is None:
            return None
        return self.topics.response_topic_problem(
            ev.response_topic, self.cfg.mqtt.response_topics, self.cfg.homeassistant.discovery_prefix
        )

    def _switch_command(self, camera: str, action: Literal["start", "stop"]) -> Command:
        """A plain ON/OFF (start/stop) acts on whatever the camera runs: ON while busy is the
        running task's idempotent start; ON when free starts `switch_<UTC stamp>`; OFF stops the
        running task whatever its name (or answers `not_running`)."""
        busy = self._active.get(camera)
        if action == "start":
            if busy is not None and busy.status in BUSY_STATUSES:
                return Command(action="start", task_name=busy.task_name)
            return Command(action="start", task_name=f"switch_{stamp(utc_now())}")
        running = busy.task_name if busy is not None and busy.status in ACTIVE_STATUSES else ""
        return Command(action="stop", task_name=running)

    def _send_reply(
        self, camera: str, doc: dict[str, Any], ok: bool, request_id: str | None, ev: CommandReceived,
        respond: bool = True,
    ) -> None:  # fmt: skip
        body = dict(doc)
        body["ok"] = ok
        if request_id is not None:
            body["request_id"] = request_id
        payload = dumps(body)
        topic = self.topics.reply(camera)
        if request_id is not None:
            self._replies[(camera, request_id)] = (payload, topic)
            while len(self._replies) > DEDUP_REQUESTS:
                self._replies.popitem(last=False)
        self._pub.reply(topic, payload, ev.response_topic if respond else None, ev.correlation_data)

    def _cmd_start(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        assert cmd.task_name is not None
        busy = self._active.get(camera)
        if busy is not None:
            if busy.status in BUSY_STATUSES:
                # Idempotent: a repeated start of the running task, or a start while busy, answers
                # with the running task's status and starts nothing.
                return busy.status_doc(), busy.task_name == cmd.task_name
            del self._active[camera]
        if self._stopping:
            return {"status": "rejected", "camera_id": camera, "error": "agent is shutting down"}, False
        if self._ffmpeg_error:
            return {"status": "error", "camera_id": camera, "error": self._ffmpeg_error}, False
        floor = self.cfg.storage.min_free_bytes
        free = _free_bytes(self.cfg.recording.output_dir)
        if free < floor:
            return {
                "status": "rejected", "camera_id": camera,
                "error": f"disk almost full: {free // 2**20} MiB free in the output directory, "
                f"below the {floor // 2**20} MiB floor (storage.min_free_bytes)",
            }, False  # fmt: skip
        limit = self.cfg.camera_max_seconds(camera)
        if cmd.max_seconds is not None:
            limit = min(limit, cmd.max_seconds)
        task = self._new_task(camera, cmd.task_name, limit)
        task.request_id = cmd.request_id
        self._tasks[task.task_id] = task
        self._active[camera] = task
        self._remember(task)
        self._publish(task)
        mode = self.cfg.camera_video_mode(camera)
        resolved = self._probe_cache.get(camera) if mode == "auto" else mode
        rec = self._new_recorder(self._spec(task, resolved or "auto"), self.events.put, False)
        self._recorders[task.task_id] = rec
        self._deadlines[task.task_id] = time.monotonic() + limit
        rec.start()
        return task.status_doc(), True

    def _cmd_stop(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        task = self._active.get(camera)
        if task is None or task.status not in ACTIVE_STATUSES:
            latest = self._latest.get(camera)
            if latest is not None and latest.task_name == cmd.task_name:
                return latest.status_doc(), True  # already finished: its final status
            return {"status": "not_running", "camera_id": camera}, False
        if task.task_name != cmd.task_name:
            return {"status": "task_mismatch", "camera_id": camera, "running_task": task.task_name}, False
        self._request_stop(task, "stop command")
        return task.status_doc(), True

    def _cmd_status(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        task = self._latest.get(camera)
        if task is None:
            return {"status": "idle", "camera_id": camera, "device_id": self.cfg.device_id}, True
        return self._reply_doc(task), True

    def _cmd_query(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        assert cmd.task_name is not None
        task = self._find(camera, cmd.task_name)
        if task is None:
            return {"status": "not_found", "camera_id": camera, "task_name": cmd.task_name}, False
        return self._reply_doc(task), True

    def _cmd_pause_uploads(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        return self._set_uploads_paused(camera, True)

    def _cmd_resume_uploads(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]:
        return self._set_uploads_paused(camera, False)

    def _set_uploads_paused(self, camera: str, paused: bool) -> tuple[dict[str, Any], bool]:
        """Device-wide (sent on any camera's command topic): a metered link stops every upload at the
        next 64 KiB and starts no new one until resumed; recordings go on; survives restarts."""
        if self._uploads is None:
            return {"status": "error", "camera_id": camera, "error": "storage.type is local: nothing uploads"}, False
        self._journal.set_setting("uploads_paused", "1" if paused else "0")
        self._uploads_paused = paused
        self._uploads.set_paused(paused)
        log.warning("uploads %s by command", "paused" if paused else "resumed")
        self._publish_uploads(force=True)
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

    def _new_task(self, camera: str, name: str, limit: int) -> Task:
        started = utc_now()
        ts = stamp(started)
        file_name = f"{name}_{ts}.mp4"
        local = self.cfg.recording.output_dir.resolve() / camera / file_name
        storage = self.cfg.storage
        task = Task(
            task_id=f"{camera}/{name}_{ts}", camera_id=camera, task_name=name, device_id=self.cfg.device_id,
            started=started, storage_type=storage.type, local_file=str(local), max_seconds=limit,
        )  # fmt: skip
        if storage.type == "minio":
            task.bucket = storage.bucket
            task.object_name = f"{self.cfg.device_id}/{camera}/{started:%Y/%m/%d}/{file_name}"
            task.local_file_deleted = False
        return task

    def _spec(self, task: Task, mode: Literal["auto", "copy", "transcode"]) -> RecordingSpec:
        rc = self.cfg.recording
        cam = self.cfg.cameras[task.camera_id]
        assert self._ffmpeg is not None and self._ffprobe is not None
        return RecordingSpec(
            task_id=task.task_id, camera_id=task.camera_id, url=cam.url.get_secret_value(),
            rtsp_transport=cam.rtsp_transport, mode=mode, segment_dir=task.segment_dir,
            output_file=Path(task.local_file), ffmpeg=self._ffmpeg, ffprobe=self._ffprobe,
            segment_seconds=rc.segment_seconds, first_frame_timeout=rc.first_frame_timeout_seconds,
            stall_timeout=rc.stall_timeout_seconds, stop_timeout=rc.stop_timeout_seconds,
            rtsp_timeout=rc.rtsp_timeout_seconds, restart_backoff_max=rc.restart_backoff_max_seconds,
            max_restarts=rc.max_restarts, probe_timeout=rc.probe_timeout_seconds, preset=rc.transcode_preset,
            analyzeduration_us=rc.analyzeduration_us, probesize=rc.probesize,
            stats_period=rc.stats_period_seconds, secrets=self._secrets,
        )  # fmt: skip

    def _request_stop(self, task: Task, reason: str) -> None:
        self._deadlines.pop(task.task_id, None)
        rec = self._recorders.get(task.task_id)
        self._update(task, status=Status.STOPPING, stop_reason=task.stop_reason or reason)
        if rec is not None:
            rec.request_stop()

    def _enforce_deadlines(self, now: float) -> None:
        for tid, deadline in list(self._deadlines.items()):
            if now >= deadline:
                task = self._tasks.get(tid)
                self._deadlines.pop(tid, None)
                if task is not None and task.status in ACTIVE_STATUSES:
                    log.info("%s reached its maximum duration of %d s", tid, task.max_seconds)
                    self._request_stop(task, f"max_duration_reached: {task.max_seconds} s")

    def _release(self, task: Task) -> None:
        self._recorders.pop(task.task_id, None)
        self._deadlines.pop(task.task_id, None)
        if self._active.get(task.camera_id) is task:
            del self._active[task.camera_id]

    def _on_recording_finished(self, ev: RecordingFinished) -> None:
        task = self._tasks.get(ev.task_id)
        if task is None:
            return
        self._recorders.pop(task.task_id, None)
        self._deadlines.pop(task.task_id, None)
        changes: dict[str, Any] = {
            "local_file": str(ev.path), "size_bytes": ev.size_bytes, "duration_seconds": ev.duration_seconds,
            "sha256": ev.sha256, "rejected_segments": list(ev.rejected_segments) or None,
        }  # fmt: skip
        if not task.stop_reason:
            changes["stop_reason"] = "recording ended"
        if self.cfg.storage.type == "local" or self._uploads is None:
            self._tasks.pop(task.task_id, None)
            self._update(task, status=Status.COMPLETED, **changes)
            self._release(task)
            return
        # Journal first (status `uploading`), then hand the job to a worker: a crash in between
        # leaves the task in the journal's upload queue, resumed at the next start.
        self._update(task, status=Status.UPLOADING, upload_attempts=task.upload_attempts or 0, **changes)
        self._queue_upload(task)
        if self._stopping:
            self._release(task)

    def _queue_upload(self, task: Task, resuming: bool = False) -> None:
        assert self._uploads is not None
        path = Path(task.local_file)
        # When resuming after a restart a missing file is still submitted: a crash between the upload
        # (which deletes the local copy) and the journal saying `uploaded` leaves exactly that, and
        # the store then finds the object stored with this size and sha256 (else: failed, with why).
        missing = not path.exists() and not resuming
        if missing or task.sha256 is None or task.size_bytes is None or task.object_name is None:
            self._tasks.pop(task.task_id, None)
            self._update(task, status=Status.FAILED, error=f"local file {path.name} is missing; nothing to upload")
            self._release(task)
            return
        self._uploads.submit(task.task_id, path, task.object_name, task.sha256, task.size_bytes,
                             task.started.timestamp(), task.upload_attempts or 0, task.upload_id)  # fmt: skip

    def _on_recording_failed(self, task_id: str, error: str) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            return
        self._update(task, status=Status.FAILED, error=error)
        self._release(task)

    # ---- state and publishing -----------------------------------------------------------------

    def _update(self, task: Task, **changes: Any) -> None:
        old_status = task.status
        for key in ("error", "last_upload_error", "stop_reason"):  # text from FFmpeg, S3 and exceptions
            if isinstance(changes.get(key), str):
                changes[key] = self._redact(changes[key])
        for key, value in changes.items():
            setattr(task, key, value)
        task.updated = utc_now()
        if task.status not in BUSY_STATUSES and self._active.get(task.camera_id) is task:
            del self._active[task.camera_id]
        self._publish(task)
        if self.cfg.metrics.enabled and task.status != old_status:
            self._refresh_metrics()
        # Flow events follow the status they announce (journaled and published just above).
        for event in transition_events(old_status, task.status_doc(), iso(task.updated)):
            self._publish_event(event)

    def _publish_event(self, event: dict[str, Any]) -> None:
        """A flow event on `P/D/C/events` (not retained: the retained status is the state)."""
        self._pub.publish(self.topics.events(event["camera_id"]), dumps(event), retain=False)

    def _publish(self, task: Task) -> None:
        """Journal, then publish the task topic and (if newest) the camera's status topic."""
        self._journal.save(task)
        payload = dumps(task.status_doc())
        self._pub.publish(self.topics.task(task.camera_id, task.task_name), payload, retain=True)
        if self._latest.get(task.camera_id) is task:
            self._pub.publish(self.topics.status(task.camera_id), payload, retain=True)
        if task.storage_type == "minio":
            self._publish_uploads()
        if task.status in TERMINAL_STATUSES:
            log.info("%s ended %s%s", task.task_id, task.status, f": {task.error}" if task.error else "")

    def _remember(self, task: Task) -> None:
        """Make `task` the camera's newest; keep the retained task topics bounded."""
        if task.camera_id not in self._retained:
            return
        latest = self._latest.get(task.camera_id)
        if latest is None or task.started >= latest.started:
            self._latest[task.camera_id] = task
        kept = self._retained[task.camera_id]
        kept.pop(task.task_name, None)
        kept[task.task_name] = task
        limit = self.cfg.mqtt.retained_tasks_per_camera
        for name in list(kept):
            if len(kept) <= limit:
                break
            old = kept[name]
            if old.status in TERMINAL_STATUSES:
                del kept[name]
                self._pub.publish(self.topics.task(task.camera_id, name), b"", retain=True)
        self._journal.prune(task.camera_id, max(limit, 100))

    def _find(self, camera: str, name: str) -> Task | None:
        kept = self._retained.get(camera, OrderedDict())
        return kept.get(name) or self._journal.find(camera, name)

    def _uploads_doc(self) -> dict[str, Any]:
        pending = [t for t in self._tasks.values() if t.status in UPLOAD_STATUSES]
        now = utc_now()
        doc: dict[str, Any] = {
            "device_id": self.cfg.device_id,
            "queue_length": len(pending),
            "bytes_pending": sum(t.size_bytes or 0 for t in pending),
            "bytes_uploaded": sum(t.bytes_uploaded or 0 for t in pending),  # of those, already on the server
            "paused": self._uploads_paused,
        }
        if pending:
            oldest = min(t.started for t in pending)
            doc["oldest_pending_age_seconds"] = round((now - oldest).total_seconds(), 1)
        if self._last_upload_error:
            doc["last_error"] = self._last_upload_error
        return doc

    def _publish_uploads(self, force: bool = False) -> None:
        doc = self._uploads_doc()
        # Publish on change of the queue, not of the age (which changes every second).
        key = dumps({k: v for k, v in doc.items() if k != "oldest_pending_age_seconds"})
        if force or key != self._last_uploads_doc:
            self._last_uploads_doc = key
            doc["updated_at"] = iso(utc_now())
            self._pub.publish(self.topics.uploads, dumps(doc), retain=True)

    def _republish_all(self, tasks: bool = True) -> None:
        """After every (re)connect: retained state from live state, never from a stale copy."""
        for camera in self.cfg.cameras:
            latest = self._latest.get(camera)
            doc = latest.status_doc() if latest else {"status": "idle", "camera_id": camera,
                                                       "device_id": self.cfg.device_id}  # fmt: skip
            self._pub.publish(self.topics.status(camera), dumps(doc), retain=True)
            for name, task in self._retained[camera].items() if tasks else ():
                self._pub.publish(self.topics.task(camera, name), dumps(task.status_doc()), retain=True)
        if self.cfg.storage.type == "minio":
            self._publish_uploads(force=True)

    def _publish_discovery(self) -> None:
        """Home Assistant device configs (retained), and empty ones for cameras no longer configured."""
        ha = self.cfg.homeassistant
        if not ha.enabled:
            return
        configs = discovery.discovery_configs(self.cfg, __version__)
        state_path = self.cfg.recording.output_dir.resolve() / discovery.STATE_FILE
        for topic in discovery.stale_topics(discovery.read_state(state_path), ha.discovery_prefix, set(configs)):
            log.info("Home Assistant: removing %s (no longer configured)", topic)
            self._pub.publish(topic, b"", retain=True)
        for node, doc in configs.items():
            self._pub.publish(self.ha_topics.device_config(node), dumps(doc), retain=True)
        try:
            discovery.write_state(state_path, discovery.state_doc(ha.discovery_prefix, set(configs)))
        except OSError as exc:
            log.warning("cannot write %s: %s (removed cameras will not be cleared from HA)", state_path, exc)

    def _telemetry_doc(self) -> dict[str, Any]:
        backlog = self._uploads_doc()
        try:
            disk_free: int | None = _free_bytes(self.cfg.recording.output_dir)
        except OSError:
            disk_free = None
        return {
            "device_id": self.cfg.device_id,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._born, 1),
            "cameras_configured": len(self.cfg.cameras),
            "cameras_recording": sum(1 for t in self._active.values() if t.status in ACTIVE_STATUSES),
            "queue_length": backlog["queue_length"],
            "bytes_pending": backlog["bytes_pending"],
            "disk_free_bytes": disk_free,
            # Below the floor new starts are refused (`rejected`); operators see it here first.
            "disk_below_floor": disk_free is not None and disk_free < self.cfg.storage.min_free_bytes,
            "ffmpeg_restarts": self._ffmpeg_restarts,
            **self._command_counters(),
            "updated_at": iso(utc_now()),
        }

    def _command_counters(self) -> dict[str, int]:
        """What hostile or excessive traffic cost: commands received, rate-limited, left unanswered
        (over the reply budget or shed by the inbound gate), publishes the link had to drop."""
        out = dict(self._counters)
        if self._gate is not None:
            out["commands_unanswered"] += self._gate.shed
        if isinstance(self._pub, PublishStats):
            out.update(self._pub.publish_stats())
        return out

    def _publish_telemetry(self) -> None:
        doc = self._telemetry_doc()
        self._refresh_metrics(doc)
        self._pub.publish(self.topics.telemetry, dumps(doc), retain=True)

    def _refresh_metrics(self, doc: dict[str, Any] | None = None) -> None:
        """Replace the snapshot the metrics endpoint reads (one reference assignment: no lock)."""
        snap = dict(doc or self._telemetry_doc())
        snap["camera_status"] = {
            cam: (self._latest[cam].status if cam in self._latest else "idle") for cam in self.cfg.cameras
        }
        self.metrics_snapshot = snap

    def _housekeeping(self) -> None:
        if self.cfg.storage.type == "minio":
            self._publish_uploads(force=True)
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete kept local copies of *uploaded* recordings past `retention_days`. Nothing else."""
        days = self.cfg.storage.retention_days
        if days is None or self.cfg.storage.type != "minio":
            return
        cutoff = utc_now().timestamp() - days * 86400
        for task in self._journal.finished_uploaded_kept():
            if task.started.timestamp() < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    Path(task.local_file).unlink()
                task.local_file_deleted = True
                task.updated = utc_now()
                self._journal.save(task)
                log.info("retention: deleted local copy of uploaded %s", task.task_id)

    # ---- shutdown --------------------------------------------------------------------------

    def _shutdown(self, reason: str) -> None:
        """Finalise running recordings (bounded), leave uploads journaled, stop workers."""
        self._stopping = True
        log.info("shutting down (%s): stopping %d recording(s)", reason, len(self._recorders))
        for task in list(self._active.values()):
            if task.status in ACTIVE_STATUSES:
                self._request_stop(task, f"agent shutdown ({reason})")
        rc = self.cfg.recording
        deadline = time.monotonic() + rc.stop_timeout_seconds + 30.0
        while self._recorders and time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not isinstance(event, Shutdown):
                self.handle(event)  # commands still get a reply (starts are rejected)
        if self._recorders:
            log.error("recordings still finalising at exit: %s (recovered at next start)", list(self._recorders))
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


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
