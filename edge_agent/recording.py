"""What a recording is: the spec its recorder is given and the events the recorder posts.

Plain frozen dataclasses (no behaviour), shared by the recorder, the finaliser and the agent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_agent.ffmpeg import StreamInput


@dataclass(frozen=True)
class Probed:
    camera_id: str
    mode: Literal["copy", "transcode"]
    detail: str


@dataclass(frozen=True)
class MediaStarted:
    task_id: str


@dataclass(frozen=True)
class SegmentClosed:
    task_id: str
    path: Path
    seconds: float
    media_end: float | None = None  # its end in the stream time of its FFmpeg run, when FFmpeg said


@dataclass(frozen=True)
class Interrupted:
    task_id: str
    count: int
    reason: str


@dataclass(frozen=True)
class RecordingFinished:
    task_id: str
    path: Path
    size_bytes: int
    duration_seconds: float
    sha256: str
    rejected_segments: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordingFailed:
    task_id: str
    error: str


@dataclass(frozen=True)
class MediaRange:
    """A buffered task's first frame (UTC epoch seconds: pre-roll), posted once it is known."""

    task_id: str
    media_start: float


@dataclass(frozen=True)
class SnapshotTaken:
    """A snapshot grab ended: the JPEG and the time of its frame (epoch seconds), or why not; when
    it was to be kept (`upload`), where it is (reply fields) or why it is not."""

    camera_id: str
    jpeg: bytes = field(repr=False)
    frame_time: float
    error: str | None = None
    stored: dict[str, str] | None = None
    store_error: str | None = None


RecorderEvent = MediaRange | Probed | MediaStarted | SegmentClosed | Interrupted | RecordingFinished | RecordingFailed


@dataclass(frozen=True)
class RecordingSpec:
    """Everything a recorder needs; built by the agent from config and the command."""

    task_id: str
    camera_id: str
    stream: StreamInput
    mode: Literal["auto", "copy", "transcode"]
    segment_dir: Path
    output_file: Path
    ffmpeg: str
    ffprobe: str
    segment_seconds: int
    first_frame_timeout: float
    stall_timeout: float
    stop_timeout: float
    restart_backoff_max: float
    max_restarts: int
    probe_timeout: float
    preset: str
    stats_period: float
    secrets: tuple[str, ...] = field(default=(), repr=False)
