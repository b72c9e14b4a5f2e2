"""Snapshots: one JPEG of a recent frame of a camera, for dashboards (Home Assistant's MQTT camera).

From the camera's ring buffer when it has one (the first frame, a keyframe, of the newest closed
segment: no new connection to the camera), else a one-shot grab from the camera. Either is one short
FFmpeg run under a timeout, on a thread of its own; the result is posted as a `SnapshotTaken` event.

With `"upload": true` the JPEG is also kept, next to the camera's recordings, named after its
frame's time: in the object store at `<device>/<camera>/YYYY/MM/DD/snapshot_<stamp>.jpg` (one PUT on
the snapshot's thread, a transient failure retried twice with tenacity backoff, 0.5 s then 1 s: the
reply waits seconds, not an outage), or with `storage.type: local` on disk at
`<output_dir>/<camera>/snapshot_<stamp>.jpg` (written whole, then renamed, fsynced). The reply says
where (`object_name` and `bucket`, plus a presigned `download_url` unless `storage.download_url` is
`none`; or `local_file`). A JPEG the store would not take (down, paused, refused) is kept on disk
there instead, and the reply is an error naming why and where the file is: nothing asked to be kept
is lost. Snapshots kept on disk are the operator's, like recordings kept by local storage: the agent
never deletes them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from edge_agent import durable, ffmpeg
from edge_agent.config import AgentConfig
from edge_agent.errors import TransientUploadError, UploadError
from edge_agent.events import CommandReceived
from edge_agent.intake import CommandIntake
from edge_agent.lifecycle import Lifecycle
from edge_agent.messages import Command
from edge_agent.recording import SnapshotTaken
from edge_agent.redact import redact
from edge_agent.reporter import Publisher
from edge_agent.tasks import iso_epoch, stamp
from edge_agent.topics import Topics

MAX_JPEG_BYTES = 8 * 1024 * 1024
PUT_ATTEMPTS = 3  # a transient store failure is tried again after 0.5 s and 1 s

Keeper = Callable[[bytes, float], dict[str, str]]  # (jpeg, frame time) -> reply fields saying where it is


def snapshot_name(frame_time: float) -> str:
    return f"snapshot_{stamp(datetime.fromtimestamp(frame_time, UTC))}.jpg"


def object_key(device_id: str, camera: str, frame_time: float) -> str:
    """Next to the camera's recordings (`tasks.new_task`): `<device>/<camera>/YYYY/MM/DD/<name>`."""
    return f"{device_id}/{camera}/{datetime.fromtimestamp(frame_time, UTC):%Y/%m/%d}/{snapshot_name(frame_time)}"


def write_local(output_dir: Path, camera: str, jpeg: bytes, frame_time: float) -> Path:
    """`<output_dir>/<camera>/snapshot_<stamp>.jpg`, whole or not at all, durable (OSError if not)."""
    folder = output_dir.resolve() / camera
    durable.make_dirs(folder)
    path = folder / snapshot_name(frame_time)
    tmp = folder / f".{path.name}.part"
    try:
        with tmp.open("wb") as f:
            f.write(jpeg)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    durable.fsync_dir(folder)
    return path


def put_retrying(put: Callable[[], None], sleep: Callable[[float], None] = time.sleep) -> None:
    """`put()`, retried on a TransientUploadError (`PUT_ATTEMPTS` in all, exponential backoff from
    0.5 s); the last error, or a permanent one at once, is raised."""
    retrying = Retrying(stop=stop_after_attempt(PUT_ATTEMPTS), wait=wait_exponential(multiplier=0.5, max=2.0),
                        retry=retry_if_exception_type(TransientUploadError), sleep=sleep, reraise=True)  # fmt: skip
    retrying(put)


class SnapshotStore(Protocol):
    """What a kept snapshot needs of the uploads (`UploadPool`); a fake in unit tests."""

    def put_bytes(self, object_name: str, data: bytes, content_type: str) -> None: ...
    def presign(self, object_name: str) -> str: ...


def store_keeper(store: SnapshotStore, device_id: str, camera: str, bucket: str, presign: bool, output_dir: Path,
                 sleep: Callable[[float], None] = time.sleep) -> Keeper:  # fmt: skip
    """A Keeper that puts the JPEG in the object store next to the camera's recordings, or, if the
    store does not take it (after `put_retrying`), keeps it on disk and says why in `upload_error`."""

    def to_store(jpeg: bytes, frame_time: float) -> dict[str, str]:
        key = object_key(device_id, camera, frame_time)
        try:
            put_retrying(lambda: store.put_bytes(key, jpeg, "image/jpeg"), sleep)
        except UploadError as exc:
            return {"local_file": str(write_local(output_dir, camera, jpeg, frame_time)), "upload_error": str(exc)}
        out = {"bucket": bucket, "object_name": key}
        if presign:  # a reply is never retained
            url = store.presign(key)
            if url:
                out["download_url"] = url
        return out

    return to_store


def grab(ffmpeg_bin: str, source: ffmpeg.StreamInput | Path | bytes, timeout: float,
         secrets: tuple[str, ...]) -> bytes:  # fmt: skip
    """The JPEG bytes; ValueError naming the problem (FFmpeg's error, redacted) if there are none.
    `source`: a camera, a file, or the bytes of an MP4 file (a ring segment, given on stdin)."""
    try:
        out = subprocess.run(
            ffmpeg.snapshot_argv(ffmpeg_bin, source), capture_output=True, timeout=timeout, check=False,
            input=source if isinstance(source, bytes) else b"", env=ffmpeg.child_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ValueError(f"no frame within {timeout:g} s") from None
    jpeg = out.stdout
    if out.returncode != 0 or not jpeg.startswith(b"\xff\xd8") or len(jpeg) > MAX_JPEG_BYTES:
        tail = " | ".join(out.stderr.decode("utf-8", "replace").strip().splitlines()[-2:])
        raise ValueError(ffmpeg.redact(tail or f"FFmpeg exited with code {out.returncode}", secrets))
    return jpeg


def take_async(camera_id: str, ffmpeg_bin: str, source: ffmpeg.StreamInput | Path | bytes, frame_time: float | None,
               timeout: float, secrets: tuple[str, ...], post: Callable[[SnapshotTaken], None],
               keep: Keeper | None = None) -> threading.Thread:  # fmt: skip
    """Grab on a thread of its own, keep the JPEG if asked (`keep`), and post the result. `frame_time`:
    known (a ring segment's start), or None for a live grab (then the time the frame arrived)."""

    def run() -> None:
        try:
            jpeg = grab(ffmpeg_bin, source, timeout, secrets)
        except ValueError as exc:
            post(SnapshotTaken(camera_id, b"", time.time(), str(exc)))
            return
        at = frame_time if frame_time is not None else time.time()
        stored, store_error = None, None
        if keep is not None:
            try:
                stored = keep(jpeg, at)
            except Exception as exc:  # the store's or the disk's error, named in the reply
                store_error = redact(f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc), secrets)
        post(SnapshotTaken(camera_id, jpeg, at, stored=stored, store_error=store_error))

    thread = threading.Thread(target=run, name=f"snapshot.{camera_id}", daemon=True)
    thread.start()
    return thread


class Snapshots:
    """Snapshot commands: one grab at a time per camera, answered and published when it ends.

    Runs on the agent thread; the grab itself runs on a thread of its own (`take_async`).
    """

    def __init__(
        self, cfg: AgentConfig, publisher: Publisher, topics: Topics, intake: CommandIntake, tasks: Lifecycle,
        secrets: tuple[str, ...], post: Callable[[SnapshotTaken], None],
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self._pub = publisher
        self._topics = topics
        self._intake = intake
        self._tasks = tasks
        self._secrets = secrets
        self._post = post
        self._pending: dict[str, tuple[Command, CommandReceived]] = {}  # camera -> the command waiting

    def set_secrets(self, secrets: tuple[str, ...]) -> None:
        self._secrets = secrets

    def request(self, camera: str, cmd: Command, ev: CommandReceived, ffmpeg_error: str | None) -> None:
        """Start a grab (from the ring if the camera has one), or answer why not."""
        tools = self._tasks.tools
        if camera in self._pending or tools is None:
            error = ("a snapshot of this camera is already being taken" if camera in self._pending
                     else ffmpeg_error or "FFmpeg not found")  # fmt: skip
            self._intake.reply(camera, {"status": "error", "camera_id": camera, "error": error}, False,
                               cmd.request_id, ev)  # fmt: skip
            return
        self._pending[camera] = (cmd, ev)
        buffer = self._tasks.buffers.get(camera)
        newest = buffer.newest() if buffer is not None else None
        source = newest[0] if newest is not None else self.cfg.stream_input(camera)
        keep = self._keeper(camera) if cmd.upload else None
        take_async(camera, tools[0], source, newest[1] if newest is not None else None,
                   self.cfg.recording.probe_timeout_seconds, self._secrets, self._post, keep)  # fmt: skip

    def _keeper(self, camera: str) -> Keeper:
        """Where `"upload": true` keeps the JPEG: the object store, or the disk (`storage.type: local`).
        Runs on the snapshot's thread."""
        storage, uploads = self.cfg.storage, self._tasks.uploads
        if storage.type == "local" or uploads is None:
            output_dir = self.cfg.recording.output_dir

            def to_disk(jpeg: bytes, frame_time: float) -> dict[str, str]:
                return {"local_file": str(write_local(output_dir, camera, jpeg, frame_time))}

            return to_disk
        return store_keeper(uploads, self.cfg.device_id, camera, storage.bucket, storage.download_url != "none",
                            self.cfg.recording.output_dir)  # fmt: skip

    def taken(self, ev: SnapshotTaken) -> None:
        """Publish the JPEG (retained, raw bytes) and answer the command that asked for it."""
        pending = self._pending.pop(ev.camera_id, None)
        stored = dict(ev.stored or {})
        upload_error = stored.pop("upload_error", None)  # kept on disk instead: see `store_keeper`
        ok = ev.error is None and ev.store_error is None and upload_error is None
        if ev.error is None:
            topic = self._topics.snapshot(ev.camera_id)
            self._pub.publish(topic, ev.jpeg, retain=True)
            doc = {"status": "snapshot", "camera_id": ev.camera_id, "frame_time": iso_epoch(ev.frame_time),
                   "bytes": len(ev.jpeg), "topic": topic, **stored}  # fmt: skip
            if ev.store_error is not None:  # published, but not kept as asked
                doc.update(status="error", error=f"snapshot published on {topic} but not kept: {ev.store_error}")
            elif upload_error is not None:  # published and kept, but on disk
                doc.update(status="error", error=redact(f"snapshot published on {topic} but not uploaded "
                                                        f"({upload_error}); kept at {stored['local_file']}",
                                                        self._secrets))  # fmt: skip
        else:
            doc = {"status": "error", "camera_id": ev.camera_id, "error": f"snapshot failed: {ev.error}"}
        if pending is not None:
            cmd, command = pending
            self._intake.reply(ev.camera_id, doc, ok, cmd.request_id, command)
