"""Pure functions around FFmpeg: command lines, probe and progress parsing.

Nothing here starts a process, so every command line is tested as a list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from edge_agent.errors import FFmpegNotFound
from edge_agent.redact import redact

__all__ = ["redact"]  # kept here for callers that redact FFmpeg output

SEGMENT_PATTERN = "seg_%06d.mp4"
SEGMENT_GLOB = "seg_*"
# .mp4: fragmented MP4, joined by copying fragments (edge_agent.fmp4); .ts: MPEG-TS segments that
# agents before the fragmented form left on disk, still recovered (FFmpeg's concat).
SEGMENT_SUFFIXES = (".mp4", ".ts")
# Fragmented MP4: an empty moov first, then a fragment at every keyframe and at least every second,
# each flushed to the file as it is written, so a SIGKILL loses at most the fragment in progress.
# Fragments carry their sample offsets from their own moof (default_base_moof), so the join can move
# them between files unchanged.
FRAGMENTED_MP4_OPTIONS = "movflags=+frag_keyframe+empty_moov+default_base_moof:frag_duration=1000000:flush_packets=1"
# A ring buffer's segments are read only once FFmpeg has closed them (and the ring is dropped at the
# next start anyway): no flush per packet, which was a third of the ring FFmpeg's CPU over a bare copy.
RING_MP4_OPTIONS = FRAGMENTED_MP4_OPTIONS.removesuffix(":flush_packets=1")
# A ring's one growing file (`ring_argv`): a fragment at every keyframe only (fewer fragments, and
# the mov muxer keeps about 50 bytes per fragment for its index until the run ends).
RING_FILE_PATTERN = "ring_%06d.mp4"  # one per FFmpeg run
RING_FILE_GLOB = "ring_*.mp4"
RING_MOVFLAGS = "+frag_keyframe+empty_moov+default_base_moof"
# pix_fmts that every browser's H.264 decoder plays (yuvj420p is full-range yuv420p).
BROWSER_PIX_FMTS = frozenset({"yuv420p", "yuvj420p"})

CHILD_ENV_KEYS = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR")


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment FFmpeg and ffprobe run with: only what they need, so secrets given to the
    agent by environment (`EDGE_AGENT_*_PASSWORD`, cloud credentials) never reach a child process."""
    source = os.environ if environ is None else environ
    env = {key: source[key] for key in CHILD_ENV_KEYS if key in source}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def resolve_executable(configured: str, what: str = "ffmpeg") -> str:
    """Absolute path of an executable given as a path or a name on PATH; FFmpegNotFound otherwise."""
    name = configured.strip()
    if not name:
        raise FFmpegNotFound(f"recording.{what}_path is empty: install FFmpeg or set the path")
    if os.sep in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return os.path.abspath(name)
        raise FFmpegNotFound(f"{what} not found or not executable at {name!r}")
    found = shutil.which(name)
    if found:
        return found
    raise FFmpegNotFound(f"{what} {name!r} not found on PATH: install FFmpeg (apt install ffmpeg)")


_PARAMETERS_UNKNOWN = ("dimensions not set", "could not find codec parameters", "unspecified size")
MAX_ANALYZE_US = 5_000_000  # a widened -analyzeduration stops at 5 s
MAX_PROBESIZE = 5_000_000  # ... and -probesize at 5 MB


def parameters_unknown(stderr_lines: Iterable[str]) -> bool:
    """FFmpeg gave up before it knew the stream's parameters (its analysis window was too short)."""
    return any(p in line.lower() for line in stderr_lines for p in _PARAMETERS_UNKNOWN)


def widened(stream: StreamInput) -> StreamInput:
    """`stream` analysed four times longer (and further), at most 5 s / 5 MB."""
    return replace(stream, analyzeduration_us=min(MAX_ANALYZE_US, max(stream.analyzeduration_us * 4, 1_000_000)),
                   probesize=min(MAX_PROBESIZE, max(stream.probesize * 4, 1_000_000)))  # fmt: skip


def ffprobe_next_to(ffmpeg: str) -> str:
    """ffprobe from the same directory as the resolved ffmpeg binary."""
    return str(Path(ffmpeg).with_name("ffprobe"))


@dataclass(frozen=True)
class StreamInput:
    """How every FFmpeg and ffprobe of one camera reads it: one value, one name per setting.

    Built from the configuration once (`AgentConfig.stream_input`) and passed whole to probing and
    recording, so the two never read a camera differently. `url` may hold the camera's password:
    it is left out of `repr` and must go through `redact` before it is shown.
    """

    url: str = field(repr=False)
    transport: str = "tcp"  # RTSP lower transport: tcp or udp
    timeout_s: float = 10.0  # RTSP socket timeout
    analyzeduration_us: int = 500000  # FFmpeg -analyzeduration (a faster start)
    probesize: int = 500000  # FFmpeg -probesize

    def input_options(self) -> list[str]:
        """Everything before (and including) `-i URL`."""
        rtsp: list[str] = []
        if self.url.startswith(("rtsp://", "rtsps://")):
            # FFmpeg 5: -timeout is the RTSP socket timeout in microseconds (-stimeout is gone).
            rtsp = ["-rtsp_transport", self.transport, "-timeout", str(int(self.timeout_s * 1_000_000))]
        return [*rtsp, "-analyzeduration", str(self.analyzeduration_us), "-probesize", str(self.probesize),
                "-i", self.url]  # fmt: skip


def probe_argv(ffprobe: str, stream: StreamInput) -> list[str]:
    """ffprobe of the first video stream of a camera, as JSON."""
    return [
        ffprobe, "-v", "error", *stream.input_options(),
        "-select_streams", "v:0", "-show_entries", "stream=codec_name,pix_fmt,width,height", "-of", "json",
    ]  # fmt: skip


@dataclass(frozen=True)
class StreamInfo:
    """What matters of a camera's video stream to decide copy vs transcode."""

    codec: str
    pix_fmt: str
    width: int
    height: int

    @property
    def complete(self) -> bool:
        """Everything the copy/transcode decision needs was read (not a probe cut short)."""
        return bool(self.codec and self.pix_fmt and self.width > 0 and self.height > 0)

    @property
    def browser_compatible(self) -> bool:
        return (
            self.codec == "h264"
            and self.pix_fmt in BROWSER_PIX_FMTS
            and self.width % 2 == 0
            and self.height % 2 == 0
        )


def parse_probe(output: str) -> StreamInfo | None:
    """The first video stream in ffprobe's JSON, or None if there is none."""
    try:
        doc = json.loads(output or "{}")
    except json.JSONDecodeError:
        return None
    streams = doc.get("streams") or []
    if not streams:
        return None
    s = streams[0]
    return StreamInfo(
        codec=str(s.get("codec_name", "")),
        pix_fmt=str(s.get("pix_fmt", "")),
        width=int(s.get("width") or 0),
        height=int(s.get("height") or 0),
    )


def record_argv(
    ffmpeg: str,
    stream: StreamInput,
    segment_dir: Path,
    *,
    mode: Literal["copy", "transcode"],
    segment_seconds: int = 4,
    start_number: int = 0,
    preset: str = "veryfast",
    stats_period_s: float = 2.0,
    segment_list_fd: int | None = None,
    flush_packets: bool = True,
) -> list[str]:
    """Record a camera into fragmented-MP4 segments: a kill loses at most the fragment being written
    (with `flush_packets`; without, what FFmpeg has not written out yet: a ring buffer's choice).

    `-progress pipe:1` gives machine-readable `frame=` lines on stdout, the signal that media is
    really arriving. Every fragment is complete on disk once written, and the segments join into one
    MP4 by copying their fragments (`edge_agent.fmp4`): no second FFmpeg at stop. With
    `segment_list_fd`, FFmpeg writes one CSV line `name,start,end` to that fd as each segment closes.
    """
    seg_list = (
        ["-segment_list", f"pipe:{segment_list_fd}", "-segment_list_type", "csv"] if segment_list_fd is not None else []
    )
    return [
        *_input_argv(ffmpeg, stream, stats_period_s), *_video_argv(mode, preset, segment_seconds),
        "-f", "segment", "-segment_time", str(segment_seconds), "-segment_format", "mp4",
        "-segment_format_options", FRAGMENTED_MP4_OPTIONS if flush_packets else RING_MP4_OPTIONS,
        "-segment_start_number", str(start_number), "-reset_timestamps", "0", *seg_list,
        str(segment_dir / SEGMENT_PATTERN),
    ]  # fmt: skip


def ring_argv(
    ffmpeg: str,
    stream: StreamInput,
    output: Path,
    *,
    mode: Literal["copy", "transcode"],
    segment_seconds: int = 2,
    preset: str = "veryfast",
    stats_period_s: float = 2.0,
) -> list[str]:
    """Record a camera for a ring buffer: ONE fragmented MP4, a fragment at every keyframe, that the
    agent cuts into segments as it grows (`edge_agent.ringcut`); no segment muxer, whose per-packet
    work was most of the ring's CPU over a plain copy. Progress on stdout as in `record_argv`."""
    return [
        *_input_argv(ffmpeg, stream, stats_period_s), *_video_argv(mode, preset, segment_seconds),
        # -flush_packets: a fragment reaches the file when it is complete, not when 32 KB have gathered
        # (the mov muxer holds a fragment's samples itself, so the flush writes once per fragment).
        "-f", "mp4", "-movflags", RING_MOVFLAGS, "-flush_packets", "1", "-y", str(output),
    ]  # fmt: skip


def _input_argv(ffmpeg: str, stream: StreamInput, stats_period_s: float) -> list[str]:
    return [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-nostats",
        "-progress", "pipe:1", "-stats_period", f"{stats_period_s:g}", *stream.input_options(),
        "-map", "0:v:0", "-an", "-sn", "-dn",
    ]  # fmt: skip


def _video_argv(mode: Literal["copy", "transcode"], preset: str, segment_seconds: int) -> list[str]:
    if mode == "copy":
        return ["-c:v", "copy"]
    return [
        "-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p",
        "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2",
        # A keyframe at every segment boundary, so segments cut where asked.
        "-force_key_frames", f"expr:gte(t,n_forced*{segment_seconds})",
    ]  # fmt: skip


# The concat demuxer probes every segment again as it opens it, which was most of the join's CPU.
# The first segment sets the stream's parameters; the others are the same stream from the same
# FFmpeg, so they are opened without probing (measured on 15 x 4 s of 1080p: 0.56 -> 0.35 CPU-s,
# packet-for-packet identical output).
UNPROBED_SEGMENT = ("option analyzeduration 0", "option probesize 32")


def concat_list(segments: list[Path]) -> str:
    """The concat demuxer's list file for `segments` (paths quoted for the demuxer)."""
    lines = []
    for index, seg in enumerate(segments):
        escaped = str(seg.resolve()).replace("'", "'\\''")
        lines.append(f"file '{escaped}'")
        if index:
            lines.extend(UNPROBED_SEGMENT)
    return "\n".join(lines) + "\n"


def snapshot_argv(ffmpeg: str, source: StreamInput | Path | bytes) -> list[str]:
    """One JPEG of the first frame of a camera (one-shot grab), of a file, or of an MP4 file given on
    stdin (`bytes`: a ring segment), on stdout."""
    if isinstance(source, StreamInput):
        inputs = source.input_options()
    else:
        inputs = ["-f", "mp4", "-i", "pipe:0"] if isinstance(source, bytes) else ["-i", str(source)]
    return [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", *inputs,
        "-map", "0:v:0", "-frames:v", "1", "-c:v", "mjpeg", "-q:v", "3", "-f", "image2", "pipe:1",
    ]  # fmt: skip


def is_segment(path: Path) -> bool:
    """A segment file the recorder wrote (`seg_<number>.mp4`, or `.ts` from older agents)."""
    stem, _, number = path.stem.partition("_")
    return stem == "seg" and number.isdigit() and path.suffix in SEGMENT_SUFFIXES


def segment_number(path: Path) -> int:
    return int(path.stem.partition("_")[2])


def concat_argv(ffmpeg: str, list_file: Path, output: Path) -> list[str]:
    """Join segments into one browser-ready MP4 with FFmpeg (stream copy, `moov` at the front).

    The fallback for segments the copying join cannot take (MPEG-TS from older agents, a stream
    whose parameters changed between segments).
    """
    return [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
        "-f", "concat", "-safe", "0", "-i", str(list_file),
        "-map", "0:v:0", "-c", "copy", "-movflags", "+faststart", "-f", "mp4", str(output),
    ]  # fmt: skip


def file_probe_argv(ffprobe: str, path: Path) -> list[str]:
    """ffprobe of a finished file: video codec and container duration."""
    return [
        ffprobe, "-v", "error", "-select_streams", "v:0",
        "-show_entries", "stream=codec_name,pix_fmt,width,height:format=duration",
        "-of", "json", str(path),
    ]  # fmt: skip


@dataclass(frozen=True)
class FileInfo:
    """A finished file's video codec and duration."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    duration: float


def parse_file_probe(output: str) -> FileInfo | None:
    """FileInfo from ffprobe JSON, or None when the file has no video stream."""
    stream = parse_probe(output)
    if stream is None:
        return None
    try:
        duration = float(json.loads(output).get("format", {}).get("duration") or 0.0)
    except (ValueError, json.JSONDecodeError):
        duration = 0.0
    return FileInfo(stream.codec, stream.pix_fmt, stream.width, stream.height, duration)


_FRAME_LINE = re.compile(rb"^frame=(\d+)\s*$", re.MULTILINE)


def last_frame_count(progress: bytes) -> int | None:
    """The newest `frame=N` in a chunk of `-progress` output, or None if it has none."""
    found = _FRAME_LINE.findall(progress)
    return int(found[-1]) if found else None


def parse_segment_line(line: str) -> tuple[str, float] | None:
    """`seg_000003.mp4,6.000000,8.000000` -> ("seg_000003.mp4", 2.0); None for anything else."""
    times = parse_segment_times(line)
    return None if times is None else (times[0], max(0.0, times[2] - times[1]))


def parse_segment_times(line: str) -> tuple[str, float, float] | None:
    """`seg_000003.mp4,6.000000,8.000000` -> ("seg_000003.mp4", 6.0, 8.0): the segment's start and end
    in the stream time of its FFmpeg run; None for anything else."""
    parts = line.strip().rsplit(",", 2)
    if len(parts) != 3:
        return None
    try:
        return parts[0], float(parts[1]), float(parts[2])
    except ValueError:
        return None
