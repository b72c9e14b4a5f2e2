"""Snapshots: one JPEG of a recent frame of a camera, for dashboards (Home Assistant's MQTT camera).

From the camera's ring buffer when it has one (the first frame, a keyframe, of the newest closed
segment: no new connection to the camera), else a one-shot grab from the camera. Either is one short
FFmpeg run under a timeout, on a thread of its own; the result is posted as a `SnapshotTaken` event.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent import ffmpeg
from edge_agent.config import AgentConfig
from edge_agent.events import CommandReceived
from edge_agent.intake import CommandIntake
from edge_agent.lifecycle import Lifecycle
from edge_agent.messages import Command
from edge_agent.recording import SnapshotTaken
from edge_agent.reporter import Publisher
from edge_agent.tasks import iso_epoch
from edge_agent.topics import Topics

MAX_JPEG_BYTES = 8 * 1024 * 1024


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
               timeout: float, secrets: tuple[str, ...], post: Callable[[SnapshotTaken], None]) -> threading.Thread:
    """Grab on a thread of its own and post the result. `frame_time`: known (a ring segment's start),
    or None for a live grab (then the time the frame arrived)."""

    def run() -> None:
        try:
            jpeg = grab(ffmpeg_bin, source, timeout, secrets)
        except ValueError as exc:
            post(SnapshotTaken(camera_id, b"", time.time(), str(exc)))
            return
        post(SnapshotTaken(camera_id, jpeg, frame_time if frame_time is not None else time.time()))

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
        take_async(camera, tools[0], source, newest.start if newest is not None else None,
                   self.cfg.recording.probe_timeout_seconds, self._secrets, self._post)  # fmt: skip

    def taken(self, ev: SnapshotTaken) -> None:
        """Publish the JPEG (retained, raw bytes) and answer the command that asked for it."""
        pending = self._pending.pop(ev.camera_id, None)
        if ev.error is None:
            self._pub.publish(self._topics.snapshot(ev.camera_id), ev.jpeg, retain=True)
            doc = {"status": "snapshot", "camera_id": ev.camera_id, "frame_time": iso_epoch(ev.frame_time),
                   "bytes": len(ev.jpeg), "topic": self._topics.snapshot(ev.camera_id)}  # fmt: skip
        else:
            doc = {"status": "error", "camera_id": ev.camera_id, "error": f"snapshot failed: {ev.error}"}
        if pending is not None:
            cmd, command = pending
            self._intake.reply(ev.camera_id, doc, ev.error is None, cmd.request_id, command)
