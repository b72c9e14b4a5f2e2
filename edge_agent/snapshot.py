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
from edge_agent.recording import SnapshotTaken

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
