"""Snapshots: one JPEG of a recent frame of a camera, for dashboards (Home Assistant's MQTT camera).

From the camera's ring buffer when it has one (the first frame, a keyframe, of the newest closed
segment: no new connection to the camera), else a one-shot grab from the camera. Either is one short
FFmpeg run under a timeout, on a thread of its own; the result is posted as a `SnapshotTaken` event.

With `"upload": true` the JPEG is also kept, next to the camera's recordings, named after its
frame's time: in the object store at `<device>/<camera>/YYYY/MM/DD/snapshot_<stamp>.jpg` (one PUT on
the snapshot's thread: no queue, journal or retry; refused while uploads are paused), or with
`storage.type: local` on disk at `<output_dir>/<camera>/snapshot_<stamp>.jpg` (written whole, then
renamed, fsynced). The reply says where (`object_name` and `bucket`, plus a presigned `download_url`
unless `storage.download_url` is `none`; or `local_file`).
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

from edge_agent import durable, ffmpeg
from edge_agent.config import AgentConfig
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


def grab(ffmpeg_bin: str, source: ffmpeg.StreamInput | Path, timeout: float, secrets: tuple[str, ...]) -> bytes:
    """The JPEG bytes; ValueError naming the problem (FFmpeg's error, redacted) if there are none."""
    try:
        out = subprocess.run(
            ffmpeg.snapshot_argv(ffmpeg_bin, source), capture_output=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL, env=ffmpeg.child_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ValueError(f"no frame within {timeout:g} s") from None
    jpeg = out.stdout
    if out.returncode != 0 or not jpeg.startswith(b"\xff\xd8") or len(jpeg) > MAX_JPEG_BYTES:
        tail = " | ".join(out.stderr.decode("utf-8", "replace").strip().splitlines()[-2:])
        raise ValueError(ffmpeg.redact(tail or f"FFmpeg exited with code {out.returncode}", secrets))
    return jpeg


def take_async(camera_id: str, ffmpeg_bin: str, source: ffmpeg.StreamInput | Path, frame_time: float | None,
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
        source = newest.path if newest is not None else self.cfg.stream_input(camera)
        keep = self._keeper(camera) if cmd.upload else None
        take_async(camera, tools[0], source, newest.start if newest is not None else None,
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
        store = uploads

        def to_store(jpeg: bytes, frame_time: float) -> dict[str, str]:
            key = object_key(self.cfg.device_id, camera, frame_time)
            store.put_bytes(key, jpeg, "image/jpeg")
            out = {"bucket": storage.bucket, "object_name": key}
            if storage.download_url != "none":  # a reply is never retained
                url = store.presign(key)
                if url:
                    out["download_url"] = url
            return out

        return to_store

    def taken(self, ev: SnapshotTaken) -> None:
        """Publish the JPEG (retained, raw bytes) and answer the command that asked for it."""
        pending = self._pending.pop(ev.camera_id, None)
        ok = ev.error is None and ev.store_error is None
        if ev.error is None:
            topic = self._topics.snapshot(ev.camera_id)
            self._pub.publish(topic, ev.jpeg, retain=True)
            doc = {"status": "snapshot", "camera_id": ev.camera_id, "frame_time": iso_epoch(ev.frame_time),
                   "bytes": len(ev.jpeg), "topic": topic, **(ev.stored or {})}  # fmt: skip
            if ev.store_error is not None:  # published, but not kept as asked
                doc.update(status="error", error=f"snapshot published on {topic} but not kept: {ev.store_error}")
        else:
            doc = {"status": "error", "camera_id": ev.camera_id, "error": f"snapshot failed: {ev.error}"}
        if pending is not None:
            cmd, command = pending
            self._intake.reply(ev.camera_id, doc, ok, cmd.request_id, command)
