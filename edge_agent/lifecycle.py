"""A task's way through its statuses: recorded, stopped, finalised, uploaded, and recovered after a crash.

    starting -> recording -> stopping -> uploading <-> upload_pending -> uploaded
                                     \\-> completed (local storage)      any -> failed

Every change goes the same way (`update`): redact what came from FFmpeg, S3 or an exception, apply,
let the camera go if the task no longer keeps it busy, then journal and publish (the reporter), then
the flow events. Runs on the agent thread, which owns every task: recorders and upload workers only
post events, which the agent hands to the methods here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from edge_agent import names
from edge_agent.buffer import BufferedRecorder, CameraBuffer
from edge_agent.config import CAMERA_ID_RE, AgentConfig
from edge_agent.events import UploadAttempt, UploadEvent, UploadFailed, UploadFinished, UploadProgress, UploadRetrying
from edge_agent.journal import Journal
from edge_agent.recorder import Recorder
from edge_agent.recording import RecorderEvent, RecordingFinished, RecordingSpec
from edge_agent.redact import redact
from edge_agent.reporter import Reporter
from edge_agent.ringcut import RingReactor
from edge_agent.taskbook import Stoppable, TaskBook
from edge_agent.tasks import ACTIVE_STATUSES, UPLOAD_STATUSES, Status, Task, iso_epoch, new_task, utc_now

log = logging.getLogger(__name__)

BUFFER_SEGMENT_SECONDS = 2  # a pre-roll starts within this of the time asked for

Mode = Literal["auto", "copy", "transcode"]
RecorderFactory = Callable[[RecordingSpec, Callable[[RecorderEvent], None], bool], Recorder]


class UploadSubmitter(Protocol):
    def submit(self, task_id: str, path: Path, object_name: str, sha256: str, size: int,
               created: float, attempts_before: int = 0, upload_id: str | None = None) -> None: ...  # fmt: skip
    def stop(self, timeout: float) -> None: ...
    def presign(self, object_name: str) -> str: ...
    def put_bytes(self, object_name: str, data: bytes, content_type: str) -> None: ...
    def sweep(self, prefix: str, keep: set[str]) -> None: ...
    def set_paused(self, paused: bool) -> None: ...


class Lifecycle:
    """Starts and stops recordings, hands finished ones to uploads, applies every status change."""

    def __init__(self, cfg: AgentConfig, journal: Journal, book: TaskBook, report: Reporter,
                 uploads: UploadSubmitter | None, post: Callable[[RecorderEvent], None],
                 new_recorder: RecorderFactory, secrets: tuple[str, ...]) -> None:  # fmt: skip
        self.cfg = cfg
        self._journal = journal
        self.book = book
        self.report = report
        self.uploads = uploads
        self._post = post
        self._new_recorder = new_recorder
        self._secrets = secrets
        self.tools: tuple[str, str] | None = None  # (ffmpeg, ffprobe) once found
        self.buffers: dict[str, CameraBuffer] = {}  # camera -> its ring buffer (cameras with buffer_seconds)
        self._reactor: RingReactor | None = None  # cuts the rings (`_ring_reactor`)
        self.stopping = False  # the agent is shutting down: a finished recording lets go at once

    # ---- recordings ------------------------------------------------------------------------------

    def start(self, camera: str, name: str, limit: int, request_id: str | None, mode: Mode,
              pre_roll: float | None = None) -> Task:  # fmt: skip
        """A new task holding `camera`, its recorder started and its deadline set.

        On a buffered camera (`pre_roll` not None) the task is a range of the camera's ring from
        `pre_roll` seconds before now; it is `recording` at once while the ring is receiving media.
        """
        storage = self.cfg.storage
        task = new_task(camera, name, self.cfg.device_id, self.cfg.recording.output_dir, storage.type,
                        storage.bucket, limit)  # fmt: skip
        task.request_id = request_id
        buffer = self.buffers.get(camera)
        rec: Stoppable
        if buffer is not None and pre_roll is not None:
            task.pre_roll_seconds = pre_roll
            rec = BufferedRecorder(self.spec(task, "copy"), self._post, buffer, time.time() - pre_roll)
            if buffer.live.is_set():
                task.status = Status.RECORDING
        else:
            rec = self._new_recorder(self.spec(task, mode), self._post, False)
        self.book.hold(task, rec, time.monotonic() + limit)
        self.remember(task)
        self.report.task(task)
        if task.status == Status.RECORDING:  # a buffered camera: `started` now, as a `recording` task has
            self.report.transition(task, Status.STARTING)
        rec.start()
        return task

    def export(self, camera: str, name: str, since: float, until: float,
               request_id: str | None) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """A task cut from the camera's ring, [since, until], finalised and shipped like any other; the
        reply. A range outside the ring is refused with the range that is there.

        It never holds the camera (a live recording can run beside it) and goes straight to `stopping`.
        """
        buffer = self.buffers.get(camera)
        if buffer is None:
            error = f"export needs a buffer: set cameras.{camera}.buffer_seconds"
            return {"status": "rejected", "camera_id": camera, "error": error}, False
        busy = self.book.kept(camera, name)
        if busy is not None and busy.status in ACTIVE_STATUSES | UPLOAD_STATUSES:
            return busy.status_doc(), False
        held = buffer.holds()
        # the ring closes a segment every BUFFER_SEGMENT_SECONDS: an end that recent is about to be there
        if held is None or since < held[0] or until > max(held[1], time.time()) + BUFFER_SEGMENT_SECONDS:
            doc: dict[str, Any] = {"status": "rejected", "camera_id": camera,
                                   "error": "the range is not in the camera's buffer"}  # fmt: skip
            if held is not None:
                doc["available_from"], doc["available_to"] = iso_epoch(held[0]), iso_epoch(held[1])
            return doc, False
        storage = self.cfg.storage
        task = new_task(camera, name, self.cfg.device_id, self.cfg.recording.output_dir, storage.type,
                        storage.bucket, max(1, int(until - since) + 1))  # fmt: skip
        task.request_id = request_id
        task.status, task.stop_reason = Status.STOPPING, "export of the camera's buffer"
        rec = BufferedRecorder(self.spec(task, "copy"), self._post, buffer, since, until)
        self.book.hold(task, rec, camera=False)
        self.remember(task)
        self.report.task(task)
        rec.start()
        return task.status_doc(), True

    def spec(self, task: Task, mode: Mode) -> RecordingSpec:
        rc = self.cfg.recording
        assert self.tools is not None
        ffmpeg_bin, ffprobe = self.tools
        return RecordingSpec(
            task_id=task.task_id, camera_id=task.camera_id, stream=self.cfg.stream_input(task.camera_id),
            mode=mode, segment_dir=task.segment_dir, output_file=Path(task.local_file), ffmpeg=ffmpeg_bin,
            ffprobe=ffprobe, segment_seconds=rc.segment_seconds, first_frame_timeout=rc.first_frame_timeout_seconds,
            stall_timeout=rc.stall_timeout_seconds, stop_timeout=rc.stop_timeout_seconds,
            restart_backoff_max=rc.restart_backoff_max_seconds, max_restarts=rc.max_restarts,
            probe_timeout=rc.probe_timeout_seconds, preset=rc.transcode_preset, stats_period=rc.stats_period_seconds,
            secrets=self._secrets,
        )  # fmt: skip

    def start_buffers(self) -> None:
        """One ring buffer per camera with `buffer_seconds` (FFmpeg found): pre-roll for its tasks."""
        rc = self.cfg.recording
        if self.tools is None:
            return
        for camera, cam in self.cfg.cameras.items():
            if cam.buffer_seconds <= 0 or camera in self.buffers:
                continue
            ring = self.cfg.buffer_dir(camera)
            # A ring's FFmpeg reports progress only for the stall watchdog (its segments and `live` come
            # from the cutter): every stall_timeout / 3, 5 s by default, not every 2 s (fewer wake-ups).
            spec = RecordingSpec(
                task_id=f"{camera}/buffer", camera_id=camera, stream=self.cfg.stream_input(camera),
                mode=self.cfg.camera_video_mode(camera),
                segment_dir=ring, output_file=ring / "unused.mp4", ffmpeg=self.tools[0], ffprobe=self.tools[1],
                segment_seconds=BUFFER_SEGMENT_SECONDS, first_frame_timeout=rc.first_frame_timeout_seconds,
                stall_timeout=rc.stall_timeout_seconds, stop_timeout=rc.stop_timeout_seconds,
                restart_backoff_max=rc.restart_backoff_max_seconds, max_restarts=10**9,
                probe_timeout=rc.probe_timeout_seconds, preset=rc.transcode_preset,
                stats_period=max(rc.stats_period_seconds, rc.stall_timeout_seconds / 3), secrets=self._secrets,
            )  # fmt: skip
            buffer = CameraBuffer(spec, cam.buffer_seconds, cam.buffer_max_bytes, self._ring_reactor())
            self.buffers[camera] = buffer
            buffer.start()
            log.info("camera %s: ring buffer of %d s in %s", camera, cam.buffer_seconds, ring)

    def _url_retained(self) -> bool:
        return self.cfg.storage.download_url == "retained"

    def set_secrets(self, secrets: tuple[str, ...]) -> None:
        self._secrets = secrets

    def stop_buffer(self, camera: str) -> None:
        """Stop one camera's ring buffer (removed or changed): bounded, like at shutdown."""
        buffer = self.buffers.pop(camera, None)
        if buffer is not None:
            buffer.request_stop()
            buffer.join(timeout=self.cfg.recording.stop_timeout_seconds + 5)

    def stop_buffers(self) -> None:
        for buffer in self.buffers.values():
            buffer.request_stop()
        for buffer in self.buffers.values():
            buffer.join(timeout=self.cfg.recording.stop_timeout_seconds + 5)
        if self._reactor is not None:
            self._reactor.stop()
            self._reactor = None

    def _ring_reactor(self) -> RingReactor | None:
        """The one thread that cuts every ring (started with the first), or None without inotify:
        each ring then watches its own file."""
        if self._reactor is None:
            try:
                self._reactor = RingReactor()
            except OSError as exc:
                log.info("rings cut on their own threads: %s", exc)
                return None
            self._reactor.start()
        return self._reactor

    def request_stop(self, task: Task, reason: str) -> None:
        self.book.cancel_deadline(task.task_id)
        rec = self.book.recorder(task.task_id)
        self.update(task, status=Status.STOPPING, stop_reason=task.stop_reason or reason)
        if rec is not None:
            rec.request_stop()

    def media_range(self, task_id: str, media_start: float) -> None:
        task = self.book.get(task_id)
        if task is not None:
            self.update(task, media_start=iso_epoch(media_start))

    def media_started(self, task_id: str) -> None:
        task = self.book.get(task_id)
        if task is not None and task.status == Status.STARTING:
            self.update(task, status=Status.RECORDING)

    def interrupted(self, task_id: str, count: int, reason: str) -> None:
        task = self.book.get(task_id)
        if task is not None:
            log.warning("%s interrupted (%d): %s", task_id, count, reason)
            self.report.ffmpeg_restarts += max(0, count - (task.interruptions or 0))
            self.update(task, interruptions=count)

    def finished(self, ev: RecordingFinished) -> None:
        """The MP4 is final: completed (local storage), or journaled `uploading` and queued."""
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
        if self.cfg.storage.type == "local" or self.uploads is None:
            self.book.land(task.task_id)
            self.update(task, status=Status.COMPLETED, **changes)
            self.book.release(task)
            return
        # Journal first (status `uploading`), then hand the job to a worker: a crash in between
        # leaves the task in the journal's upload queue, resumed at the next start.
        self.update(task, status=Status.UPLOADING, upload_attempts=task.upload_attempts or 0, **changes)
        self.queue_upload(task)
        if self.stopping:
            self.book.release(task)

    def failed(self, task_id: str, error: str) -> None:
        task = self.book.land(task_id)
        if task is not None:
            self.update(task, status=Status.FAILED, error=error)
            self.book.release(task)

    # ---- uploads ----------------------------------------------------------------------------------

    def queue_upload(self, task: Task, resuming: bool = False) -> None:
        assert self.uploads is not None
        path = Path(task.local_file)
        # When resuming after a restart a missing file is still submitted: a crash between the upload
        # (which deletes the local copy) and the journal saying `uploaded` leaves exactly that, and
        # the store then finds the object stored with this size and sha256 (else: failed, with why).
        missing = not path.exists() and not resuming
        if missing or task.sha256 is None or task.size_bytes is None or task.object_name is None:
            self.book.land(task.task_id)
            self.update(task, status=Status.FAILED, error=f"local file {path.name} is missing; nothing to upload")
            self.book.release(task)
            return
        self.uploads.submit(task.task_id, path, task.object_name, task.sha256, task.size_bytes,
                            task.started.timestamp(), task.upload_attempts or 0, task.upload_id)  # fmt: skip

    def requeue_uploads(self) -> int:
        """The object store changed (`storage` reconfigured): every task waiting to upload goes to the new
        one from the start (a multipart upload id of the old store means nothing there); with no store
        any more, the local file is the recording (`completed`)."""
        waiting = [t for t in self.book.in_flight() if t.status in UPLOAD_STATUSES]
        for task in waiting:
            if self.uploads is None:
                self.book.land(task.task_id)
                self.update(task, status=Status.COMPLETED, next_retry_at=None, upload_id=None)
                self.book.release(task)
            else:
                self.update(task, upload_id=None, bytes_uploaded=None, next_retry_at=None)
                self.queue_upload(task, resuming=True)
        return len(waiting)

    def upload_event(self, event: UploadEvent) -> None:
        match event:
            case UploadAttempt(task_id=tid, attempt=n):
                task = self.book.get(tid)
                if task is not None:
                    self.update(task, status=Status.UPLOADING, upload_attempts=n)
            case UploadProgress(task_id=tid, upload_id=upload_id, bytes_uploaded=done):
                task = self.book.get(tid)
                if task is not None:  # journaled at once: a restart resumes this multipart upload
                    self.update(task, upload_id=upload_id, bytes_uploaded=done)
            case UploadRetrying(task_id=tid, attempts=n, next_retry_at=when, error=err):
                task = self.book.get(tid)
                self.report.last_upload_error = err
                if task is not None:
                    self.update(task, status=Status.UPLOAD_PENDING, upload_attempts=n, next_retry_at=when,
                                last_upload_error=err)  # fmt: skip
            case UploadFinished():
                task = self.book.land(event.task_id)
                if task is not None:
                    self.update(
                        task, status=Status.UPLOADED, bucket=event.bucket, object_name=event.object_name,
                        download_url=(event.download_url or None) if self._url_retained() else None,
                        local_file_deleted=event.local_file_deleted,
                        upload_attempts=event.attempts, next_retry_at=None, error=None,
                    )  # fmt: skip
            case UploadFailed(task_id=tid, error=error, attempts=n):
                task = self.book.land(tid)
                self.report.last_upload_error = error
                if task is not None:
                    self.update(task, status=Status.FAILED, error=f"upload failed: {error}", upload_attempts=n,
                                next_retry_at=None)  # fmt: skip

    # ---- every change -------------------------------------------------------------------------------

    def update(self, task: Task, **changes: Any) -> None:
        """Change a task, then journal and publish it (the reporter), then its flow events."""
        old_status = task.status
        for key in ("error", "last_upload_error", "stop_reason"):  # text from FFmpeg, S3 and exceptions
            if isinstance(changes.get(key), str):
                changes[key] = redact(changes[key], self._secrets)
        for key, value in changes.items():
            setattr(task, key, value)
        task.updated = utc_now()
        self.book.free_if_idle(task)
        self.report.task(task)
        self.report.transition(task, old_status)

    def remember(self, task: Task) -> None:
        """Make `task` its camera's newest; clear the retained topics of tasks the set dropped."""
        dropped = self.book.remember(task)
        if task.camera_id in self.cfg.cameras:
            self.report.forget(task.camera_id, dropped)
            self._journal.prune(task.camera_id, max(self.cfg.mqtt.retained_tasks_per_camera, 100))

    # ---- after a crash or power cut -------------------------------------------------------------------

    def recover(self, ffmpeg_error: str | None) -> None:
        """Rebuild state from the journal: finalise interrupted recordings, resume pending uploads."""
        for task_id, reason in self._journal.quarantine(journal_name_problem):
            log.error("journal: task %r quarantined (%s); it will not be recovered or republished", task_id, reason)
        for camera in self.cfg.cameras:
            for task in reversed(self._journal.latest(camera, self.cfg.mqtt.retained_tasks_per_camera)):
                self.remember(task)
        for task in self._journal.with_status(ACTIVE_STATUSES):
            if task.camera_id not in self.cfg.cameras or ffmpeg_error:
                task.status = Status.FAILED
                task.error = ffmpeg_error or f"camera {task.camera_id!r} is no longer configured"
                self.remember(task)
                self._journal.save(task)
                continue
            task.recovered = True
            task.stop_reason = f"agent restarted while the task was {task.status}; recovered from segments"
            task.status = Status.STOPPING
            task.updated = utc_now()
            self._journal.save(task)
            self.remember(task)
            log.warning("recovering %s from its segments", task.task_id)
            rec = self._new_recorder(self.spec(task, "copy"), self._post, True)
            self.book.hold(task, rec)  # the camera is held until finalised, like any stopping task
            rec.start()
        for task in self._journal.with_status(UPLOAD_STATUSES):
            self.remember(task)
            if self.uploads is None:  # storage switched to local since: the file stays where it is
                self.update(task, status=Status.COMPLETED, next_retry_at=None,
                            error="upload abandoned: storage.type is now local; the file is kept on disk")
                continue
            self.book.track(task)
            self.queue_upload(task, resuming=True)
        if self.uploads is not None:
            if self._journal.setting("uploads_paused") == "1":
                log.warning("uploads are paused (pause_uploads); send resume_uploads to continue")
                self.report.uploads_paused = True
                self.uploads.set_paused(True)
            # Multipart uploads of recordings no longer pending (deleted, failed) hold storage forever.
            keep = {t.object_name for t in self.book.in_flight() if t.object_name}
            self.uploads.sweep(f"{self.cfg.device_id}/", keep)


def journal_name_problem(camera_id: str, task_name: str) -> str | None:
    """Why a journaled task's names break the naming rule (see `names`), or None."""
    if not CAMERA_ID_RE.match(camera_id):
        return f"camera id {camera_id!r} is not 1-64 of letters, digits, '_' or '-'"
    try:
        names.check_name(task_name)
    except names.InvalidName as exc:
        return str(exc)
    return None
