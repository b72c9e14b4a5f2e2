"""Finalising a task: its segments joined into one MP4, made durable, and the segments retired.

Idempotent, so recovery after a crash or a power cut runs the same code as a normal stop. Fragmented
MP4 segments are joined by copying their fragments (`edge_agent.fmp4`); MPEG-TS segments of older
agents, and segments whose stream changed, go through FFmpeg's concat, with each segment screened
by ffprobe when the join comes out short. Segments that cannot be read are moved to
`<segments>.rejected/` and reported, never deleted. The joined file is made durable before its
segments are removed, and those are removed in a way a cut cannot turn into a shorter MP4
(`_retire_segments`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
from pathlib import Path

from edge_agent import durable, ffmpeg, fmp4, fmp4join
from edge_agent.recording import RecordingFailed, RecordingFinished, RecordingSpec

log = logging.getLogger(__name__)

JOIN_MIN_BYTES_PER_SECOND = 5 * 1024 * 1024  # concat timeout: generous for slow SD cards
JOIN_TIMED_OUT = "joining the segments timed out"


def segment_files(segment_dir: Path) -> list[Path]:
    """The segment files in `segment_dir`, in recording order."""
    return sorted(
        (p for p in segment_dir.glob(ffmpeg.SEGMENT_GLOB) if ffmpeg.is_segment(p) and p.is_file()),
        key=ffmpeg.segment_number,
    )


def _probe_file(ffprobe: str, path: Path, timeout: float) -> ffmpeg.FileInfo | None:
    try:
        out = subprocess.run(
            ffmpeg.file_probe_argv(ffprobe, path), capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL, env=ffmpeg.child_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    return ffmpeg.parse_file_probe(out.stdout)


def _concat(spec: RecordingSpec, segments: list[Path], part: Path) -> str | None:
    """Run the concat; None on success, else FFmpeg's error tail."""
    list_file = spec.segment_dir / "concat.txt"
    list_file.write_text(ffmpeg.concat_list(segments), encoding="utf-8")
    total = sum(s.stat().st_size for s in segments)
    # Bounded by the data to move (written twice: the join, then the +faststart pass).
    timeout = 60.0 + 2 * total / JOIN_MIN_BYTES_PER_SECOND + 0.1 * len(segments)
    try:
        out = subprocess.run(
            ffmpeg.concat_argv(spec.ffmpeg, list_file, part), capture_output=True, text=True,
            timeout=timeout, check=False, stdin=subprocess.DEVNULL, env=ffmpeg.child_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"{JOIN_TIMED_OUT} after {timeout:.0f} s"
    if out.returncode != 0 or not part.exists() or part.stat().st_size == 0:
        return " | ".join(out.stderr.strip().splitlines()[-3:]) or f"exit code {out.returncode}"
    return None


def _join(spec: RecordingSpec, segments: list[Path], part: Path) -> tuple[str | None, ffmpeg.FileInfo | None]:
    """Concat `segments` into `part` and probe it: (error, info of the joined file)."""
    if not segments:
        return "no readable segments", None
    error = _concat(spec, segments, part)
    return error, None if error else _probe_file(spec.ffprobe, part, spec.probe_timeout)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _screen(spec: RecordingSpec, segments: list[Path]) -> tuple[list[Path], list[str], float]:
    """ffprobe each segment: (readable ones, names of unreadable ones, total readable seconds)."""
    good, bad, seconds = [], [], 0.0
    for seg in segments:
        info = _probe_file(spec.ffprobe, seg, spec.probe_timeout)
        if info is None:
            bad.append(seg.name)
        else:
            good.append(seg)
            seconds += info.duration
    return good, bad, seconds


def _set_aside(spec: RecordingSpec, names: list[str]) -> None:
    aside = spec.segment_dir.parent / (spec.segment_dir.name + ".rejected")
    durable.make_dirs(aside)
    for name in names:
        os.replace(spec.segment_dir / name, aside / name)
    durable.try_fsync_dir(aside)  # kept for inspection: not lost with the segment directory later
    log.warning("%s: set aside unreadable segments %s in %s", spec.task_id, names, aside)


def finalise_segments(
    spec: RecordingSpec, known_seconds: dict[str, float] | None = None
) -> RecordingFinished | RecordingFailed:
    """Join a task's segments into its final MP4. Idempotent: a finished output is reused.

    `known_seconds` (segment name -> seconds, as FFmpeg reported them while recording) lets the
    joined file be checked against what was recorded: segments are deleted only once the MP4 holds
    what they held. Fragmented-MP4 segments are joined by copying their fragments; MPEG-TS segments
    of older agents, and segments whose stream changed, go through FFmpeg's concat.
    """
    out = spec.output_file
    if out.exists() and not spec.segment_dir.exists():
        info = _probe_file(spec.ffprobe, out, spec.probe_timeout)
        if info is not None:
            _remove_retired(spec)  # left by a cut while the segments were being removed
            return RecordingFinished(spec.task_id, out, out.stat().st_size, info.duration, sha256_file(out))
    segments = [s for s in segment_files(spec.segment_dir) if s.stat().st_size > 0] if spec.segment_dir.exists() else []
    if not segments:
        return RecordingFailed(spec.task_id, "no media was recorded (no non-empty segments on disk)")
    durable.make_dirs(out.parent)
    part = out.with_name(out.name + ".part")
    if all(s.suffix == ".mp4" for s in segments):
        try:
            return _join_fragments(spec, segments, part, known_seconds)
        except fmp4.Incompatible as exc:
            log.warning("%s: %s; joining with FFmpeg instead", spec.task_id, exc)
    return _join_with_ffmpeg(spec, segments, part, known_seconds)


def _join_fragments(
    spec: RecordingSpec, segments: list[Path], part: Path, known_seconds: dict[str, float] | None
) -> RecordingFinished | RecordingFailed:
    """The copying join (`edge_agent.fmp4`): every complete fragment of every segment, in order."""
    try:
        joined = fmp4join.join(segments, part)
    except fmp4.Incompatible:
        raise
    except fmp4.Mp4Error as exc:
        _set_aside(spec, [s.name for s in segments])
        return RecordingFailed(spec.task_id, f"joining segments failed: {exc} ({len(segments)} set aside)")
    except OSError as exc:  # a full or failing disk: the segments stay for the next try
        return RecordingFailed(spec.task_id, f"joining segments failed: {exc.strerror or exc}; "
                                             f"segments kept in {spec.segment_dir}")  # fmt: skip
    for name, why in joined.damaged:
        log.warning("%s: %s: %s", spec.task_id, name, why)
    if joined.unusable:
        _set_aside(spec, list(joined.unusable))
    expected = None if known_seconds is None else sum(known_seconds.get(s.name, 0.0) for s in segments)
    return _commit(spec, part, joined.seconds, joined.sha256, joined.unusable, expected)


def _join_with_ffmpeg(
    spec: RecordingSpec, segments: list[Path], part: Path, known_seconds: dict[str, float] | None
) -> RecordingFinished | RecordingFailed:
    """FFmpeg's concat, probing each segment first in recovery or when the join comes out short.

    The concat demuxer stops quietly at a damaged segment, so a short join is screened segment by
    segment: unreadable ones are set aside and the rest joined again.
    """
    rejected: list[str] = []
    screened = known_seconds is None
    if known_seconds is None:
        segments, rejected, expected = _screen(spec, segments)
    else:
        expected = sum(known_seconds.get(s.name, 0.0) for s in segments)
    error, info = _join(spec, segments, part)
    if error is not None and error.startswith(JOIN_TIMED_OUT):
        # A stuck disk, not damaged media: probing every segment would only add load. The segments
        # stay on disk (they are deleted only after a good join).
        return RecordingFailed(spec.task_id, f"{error}; segments kept in {spec.segment_dir}")
    tolerance = max(1.0, 0.02 * expected)
    if not screened and (info is None or info.duration < expected - tolerance):
        log.warning("%s: joined file short or unreadable (%s); checking each segment", spec.task_id,
                    error or f"{info.duration if info else 0:.1f} s of {expected:.1f} s")  # fmt: skip
        segments, rejected, expected = _screen(spec, segments)
        error, info = _join(spec, segments, part)
    if rejected:
        _set_aside(spec, rejected)
    if error is not None or info is None or info.duration <= 0:
        detail = ffmpeg.redact(error or "the joined MP4 has no readable video stream", spec.secrets)
        return RecordingFailed(spec.task_id, f"joining segments failed: {detail} ({len(rejected)} set aside)")
    return _commit(spec, part, info.duration, sha256_file(part), tuple(rejected), expected)


def _commit(
    spec: RecordingSpec, part: Path, seconds: float, digest: str, rejected: tuple[str, ...] | list[str],
    expected: float | None,
) -> RecordingFinished:
    """Make the joined file durable under its final name, then retire the segments it holds.

    `expected`: seconds the segments were reported to hold (None in recovery); when the MP4 holds
    less, the segments are kept as evidence rather than deleted.
    """
    out = spec.output_file
    with part.open("rb") as f:
        os.fsync(f.fileno())  # nobody fsyncs it before us: make the file durable before the rename
    os.replace(part, out)
    if not durable.try_fsync_dir(out.parent):
        log.warning("%s: segments kept in %s: the MP4 may not be durable", spec.task_id, spec.segment_dir)
    elif expected is None or seconds >= expected - max(1.0, 0.02 * expected):
        _retire_segments(spec)
    else:  # keep the evidence rather than delete media the MP4 may not hold
        log.warning("%s: MP4 has %.1f s of %.1f s recorded; segments kept in %s",
                    spec.task_id, seconds, expected, spec.segment_dir)  # fmt: skip
    return RecordingFinished(spec.task_id, out, out.stat().st_size, round(seconds, 3), digest, tuple(rejected))


def _retired_dir(spec: RecordingSpec) -> Path:
    return spec.segment_dir.with_name(spec.segment_dir.name + ".done")


def _retire_segments(spec: RecordingSpec) -> None:
    """Remove the segments of a durable MP4: rename their directory (durably), then empty it.

    Deleting them in place is not safe against a power cut: a journaling file system may commit
    some of the deletions and not others, and recovery would then join the survivors into a
    shorter MP4 over the good one. Once renamed, the directory no longer counts as segments
    (`finalise_segments` reuses the MP4); a cut before the rename is durable leaves every segment.
    """
    _remove_retired(spec)
    try:
        os.replace(spec.segment_dir, _retired_dir(spec))
    except OSError as exc:  # e.g. a retired directory that could not be emptied: keep everything
        log.warning("%s: segments kept in %s: %s", spec.task_id, spec.segment_dir, exc)
        return
    if durable.try_fsync_dir(spec.segment_dir.parent):  # else a cut could still bring all of them back
        _remove_retired(spec)


def _remove_retired(spec: RecordingSpec) -> None:
    """Empty and remove the retired segment directory, if any (only the files the agent wrote there)."""
    retired = _retired_dir(spec)
    if not retired.is_dir():
        return
    for seg in segment_files(retired):
        seg.unlink()
    with contextlib.suppress(OSError):
        (retired / "concat.txt").unlink()
    with contextlib.suppress(OSError):
        retired.rmdir()
        durable.try_fsync_dir(retired.parent)  # or a cut brings the directory back, a leak nobody removes
