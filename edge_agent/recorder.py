"""One recording: supervises FFmpeg for one task and finalises its segments into one MP4.

A `Recorder` is a thread that owns its FFmpeg process from spawn to reap. It knows no MQTT: it
reports through `post(event)`, which only enqueues. Lifecycle of each FFmpeg run:

    spawn (own session) -> read -progress / drain stderr -> [stop: 'q' on stdin, bounded wait,
    SIGKILL] -> reap -> restart with backoff while the task is active (watchdog) or finalise.

Finalising joins the fragmented-MP4 segments into one MP4 by copying their fragments
(`edge_agent.fmp4`; FFmpeg's concat only for segments it cannot take). Segments that cannot be
read are moved to `rejected/` beside them and reported, never deleted.

Power cuts: FFmpeg never fsyncs, so the recorder makes each segment durable (file and directory,
see `edge_agent.durable`) as FFmpeg reports it closed, and any segment a killed FFmpeg left
behind once it is reaped: a cut loses at most the segment being written. The joined MP4 is made
durable before its segments are removed, and those are removed in a way a cut cannot turn into
a shorter MP4 (`_retire_segments`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import selectors
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from edge_agent import durable, ffmpeg, fmp4
from edge_agent.errors import RecordingError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20
# Joining segments is disk-bound; when many cameras stop at once, join a few at a time rather than
# all together (64 simultaneous joins on 2 cores timed out in bench_capacity).
FINALISE_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))
JOIN_MIN_BYTES_PER_SECOND = 5 * 1024 * 1024  # concat timeout: generous for slow SD cards
JOIN_TIMED_OUT = "joining the segments timed out"


# ---- events posted to the agent --------------------------------------------------------------


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


RecorderEvent = Probed | MediaStarted | SegmentClosed | Interrupted | RecordingFinished | RecordingFailed


@dataclass(frozen=True)
class RecordingSpec:
    """Everything a recorder needs; built by the agent from config and the command."""

    task_id: str
    camera_id: str
    url: str
    rtsp_transport: str
    mode: Literal["auto", "copy", "transcode"]
    segment_dir: Path
    output_file: Path
    ffmpeg: str
    ffprobe: str
    segment_seconds: int
    first_frame_timeout: float
    stall_timeout: float
    stop_timeout: float
    rtsp_timeout: float
    restart_backoff_max: float
    max_restarts: int
    probe_timeout: float
    preset: str
    analyzeduration_us: int
    probesize: int
    stats_period: float
    secrets: tuple[str, ...] = field(default=(), repr=False)


class Recorder(threading.Thread):
    """Records one task until asked to stop, then finalises it; or only finalises (recovery)."""

    def __init__(
        self, spec: RecordingSpec, post: Callable[[RecorderEvent], None], *, finalise_only: bool = False
    ) -> None:
        super().__init__(name=f"recorder.{spec.camera_id}", daemon=True)
        self.spec = spec
        self._post = post
        self._finalise_only = finalise_only
        self._stop_requested = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._media_seen = False
        self._segment_seconds: dict[str, float] = {}  # as FFmpeg reported each closed segment
        self._durable: set[str] = set()  # segments fsynced (file and directory entry)
        self.sync_seconds = 0.0  # wall time spent in those fsyncs (on this thread, never the agent's)
        self.interruptions = 0

    # -- called from the agent thread --------------------------------------------------------

    def request_stop(self) -> None:
        """Ask for a graceful stop; returns at once (the thread stops FFmpeg with a bounded wait)."""
        if not self._stop_requested.is_set():
            self._stop_requested.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            if self._finalise_only:
                orphans = kill_orphans(self.spec.segment_dir)
                if orphans:
                    log.warning("%s: stopped orphaned FFmpeg %s still recording", self.spec.task_id, orphans)
                    time.sleep(0.5)  # let the kernel close its files before the segments are read
                # What the dead agent's FFmpeg wrote may still be only in the page cache (a kill -9
                # is not a power cut): make it durable before a cut during this recovery loses it.
                self._sync_left_behind()
            else:
                self._record()
                if not self._media_seen:
                    raise RecordingError("stopped before the camera delivered any media")
            self._finalise()
        except RecordingError as exc:
            self._post(RecordingFailed(self.spec.task_id, self._redact(str(exc))))
        except Exception as exc:  # a bug must fail the task, not leave it hanging
            log.exception("recorder for %s crashed", self.spec.task_id)
            self._post(RecordingFailed(self.spec.task_id, self._redact(f"internal error: {exc!r}")))
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _redact(self, text: str) -> str:
        return ffmpeg.redact(text, self.spec.secrets)

    def _resolve_mode(self) -> Literal["copy", "transcode"]:
        spec = self.spec
        if spec.mode != "auto":
            return spec.mode
        probed = probe_camera(
            spec.ffprobe, spec.camera_id, spec.url, rtsp_transport=spec.rtsp_transport,
            rtsp_timeout=spec.rtsp_timeout, analyzeduration_us=spec.analyzeduration_us, probesize=spec.probesize,
            probe_timeout=spec.probe_timeout,
        )  # fmt: skip
        self._post(probed)
        return probed.mode

    def _record(self) -> None:
        spec = self.spec
        durable.make_dirs(spec.segment_dir)
        mode = self._resolve_mode()
        started = time.monotonic()
        restarts = 0
        while not self._stop_requested.is_set():
            outcome = self._run_ffmpeg(mode, started)
            if outcome == "stopped" or self._stop_requested.is_set():
                return
            if not self._media_seen and time.monotonic() - started >= spec.first_frame_timeout:
                raise RecordingError(
                    f"no media from the camera within {spec.first_frame_timeout:g} s: "
                    + (" | ".join(self._stderr_tail) or outcome)
                )
            restarts += 1
            if restarts > spec.max_restarts:
                raise RecordingError(f"FFmpeg failed {restarts} times: " + " | ".join(self._stderr_tail))
            if self._media_seen:
                self.interruptions += 1
                self._post(Interrupted(spec.task_id, self.interruptions, self._redact(outcome)))
            delay = min(spec.restart_backoff_max, 0.5 * 2 ** min(restarts - 1, 6)) * random.uniform(0.8, 1.2)
            log.warning("%s: FFmpeg %s; restarting in %.1f s", spec.task_id, self._redact(outcome), delay)
            if self._wait_wake(delay):
                return

    def _wait_wake(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on a stop request; True if a stop was requested."""
        return self._stop_requested.wait(seconds)

    def _next_segment_number(self) -> int:
        segments = _segments(self.spec.segment_dir)
        return ffmpeg.segment_number(segments[-1]) + 1 if segments else 0

    def _run_ffmpeg(self, mode: Literal["copy", "transcode"], task_started: float) -> str:
        """One FFmpeg run. Returns 'stopped' after a requested stop, else why it ended."""
        spec = self.spec
        seg_r, seg_w = os.pipe()  # FFmpeg reports each closed segment here
        argv = ffmpeg.record_argv(
            spec.ffmpeg, spec.url, spec.segment_dir, mode=mode, rtsp_transport=spec.rtsp_transport,
            rtsp_timeout_s=spec.rtsp_timeout, segment_seconds=spec.segment_seconds,
            start_number=self._next_segment_number(), preset=spec.preset,
            analyzeduration_us=spec.analyzeduration_us, probesize=spec.probesize,
            stats_period_s=spec.stats_period, segment_list_fd=seg_w,
        )  # fmt: skip
        try:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    start_new_session=True, close_fds=True, pass_fds=(seg_w,), env=ffmpeg.child_env(),
                )  # fmt: skip
            except OSError as exc:
                raise RecordingError(f"cannot start FFmpeg: {exc.strerror}") from None
            finally:
                os.close(seg_w)
            assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
            try:
                return self._supervise(proc, task_started, seg_r)
            finally:
                self._reap(proc)
                self._sync_left_behind()
        finally:
            os.close(seg_r)

    def _make_durable(self, names: list[str]) -> None:
        """fsync closed segments, then their directory (new names are durable only with it).

        A failing fsync is logged, not raised: the recording goes on, only its power-cut safety is
        reduced (the disk is failing anyway). Called on this thread, so it never blocks the agent.
        """
        if not names:
            return
        started = time.perf_counter()
        try:
            for name in names:
                durable.fsync_file(self.spec.segment_dir / name)
                self._durable.add(name)
            durable.fsync_dir(self.spec.segment_dir)
        except OSError as exc:
            log.warning("%s: could not make segments %s durable: %s", self.spec.task_id, names, exc)
        finally:
            self.sync_seconds += time.perf_counter() - started

    def _sync_left_behind(self) -> None:
        """Make durable every segment on disk not yet made so (a killed FFmpeg never reports its last)."""
        if self.spec.segment_dir.is_dir():
            self._make_durable([p.name for p in _segments(self.spec.segment_dir) if p.name not in self._durable])

    def _supervise(self, proc: subprocess.Popen[bytes], task_started: float, seg_r: int) -> str:
        spec = self.spec
        assert proc.stdout is not None and proc.stderr is not None
        buffers: dict[int, bytes] = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b"", seg_r: b""}
        last_frames = -1
        run_started = time.monotonic()
        last_advance = run_started
        stop_sent_at: float | None = None
        killed = False
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(seg_r, selectors.EVENT_READ, "segments")
            open_pipes = 3
            while open_pipes:
                now = time.monotonic()
                if self._stop_requested.is_set() and stop_sent_at is None:
                    stop_sent_at = now
                    self._send_quit(proc)
                if stop_sent_at is not None:
                    deadline = stop_sent_at + spec.stop_timeout
                    if killed:
                        deadline = now + 1.0  # the pipes close once the kill lands
                    elif now >= deadline:
                        log.warning("%s: FFmpeg ignored 'q' for %.0f s, killing", spec.task_id, spec.stop_timeout)
                        self._kill(proc)
                        killed = True
                        continue
                elif self._media_seen or last_frames > 0:
                    deadline = last_advance + spec.stall_timeout
                    if now >= deadline:
                        self._kill(proc)
                        return f"stalled: no new frames for {spec.stall_timeout:g} s"
                else:
                    deadline = task_started + spec.first_frame_timeout
                    deadline = max(deadline, run_started + min(spec.first_frame_timeout, spec.stall_timeout))
                    if now >= deadline:
                        self._kill(proc)
                        return "no media from the camera"
                for key, _ in sel.select(timeout=max(0.05, deadline - now)):
                    if key.data == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                        continue
                    fd = key.fd
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_pipes -= 1
                        continue
                    data = buffers[fd] + chunk
                    complete, _, buffers[fd] = data.rpartition(b"\n")
                    if key.data == "stdout":
                        # The hot path (every stats period, every camera): one C-level scan for the
                        # newest `frame=` of the complete progress lines, no per-line Python.
                        frames = ffmpeg.last_frame_count(complete)
                        if frames is not None and frames > last_frames:
                            last_frames = frames
                            last_advance = time.monotonic()
                            if frames > 0 and not self._media_seen:
                                self._media_seen = True
                                self._post(MediaStarted(spec.task_id))
                        continue
                    for raw in complete.split(b"\n") if complete else ():
                        line = raw.decode("utf-8", "replace")
                        if key.data == "segments":
                            seg = ffmpeg.parse_segment_line(line)
                            if seg is not None:
                                self._segment_seconds[seg[0]] = seg[1]
                                self._make_durable([seg[0]])
                                self._post(SegmentClosed(spec.task_id, spec.segment_dir / seg[0], seg[1]))
                        elif line.strip():
                            self._stderr_tail.append(self._redact(line.strip())[:300])
        try:
            code = proc.wait(timeout=spec.stop_timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            code = proc.wait(timeout=5)
        if stop_sent_at is not None:
            return "stopped"
        return f"exited with code {code}"

    def _send_quit(self, proc: subprocess.Popen[bytes]) -> None:
        stdin: IO[bytes] | None = proc.stdin
        try:
            if stdin is not None:
                stdin.write(b"q")
                stdin.flush()
                stdin.close()
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            self._kill(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    # -- finalising -----------------------------------------------------------------------------

    def _finalise(self) -> None:
        known = None if self._finalise_only else self._segment_seconds
        log.debug("%s: %d segments made durable in %.1f ms", self.spec.task_id, len(self._durable),
                  1000 * self.sync_seconds)  # fmt: skip
        with FINALISE_SLOTS:
            self._post(finalise_segments(self.spec, known))


def probe_camera(
    ffprobe: str, camera_id: str, url: str, *, rtsp_transport: str, rtsp_timeout: float, analyzeduration_us: int,
    probesize: int, probe_timeout: float,
) -> Probed:
    """ffprobe a camera (bounded) and decide copy vs transcode; RecordingError if it cannot be read."""
    argv = ffmpeg.probe_argv(
        ffprobe, url, rtsp_transport=rtsp_transport, rtsp_timeout_s=rtsp_timeout,
        analyzeduration_us=analyzeduration_us, probesize=probesize,
    )  # fmt: skip
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=probe_timeout, check=False, stdin=subprocess.DEVNULL,
            env=ffmpeg.child_env(),
        )
    except subprocess.TimeoutExpired:
        raise RecordingError(f"camera did not answer a probe within {probe_timeout:g} s") from None
    info = ffmpeg.parse_probe(out.stdout) if out.returncode == 0 else None
    if info is None:
        tail = out.stderr.strip().splitlines()[-3:]
        raise RecordingError("camera probe failed: " + (" | ".join(tail) or "no video stream"))
    if not info.complete:
        # A probe cut short (camera going down) reports the codec without pixel format or size;
        # deciding on that would transcode an H.264 camera for good (the result is cached).
        raise RecordingError(f"camera probe incomplete: {info.codec or '?'} {info.pix_fmt or '?'} "
                             f"{info.width}x{info.height}")  # fmt: skip
    mode: Literal["copy", "transcode"] = "copy" if info.browser_compatible else "transcode"
    return Probed(camera_id, mode, f"{info.codec} {info.pix_fmt} {info.width}x{info.height}")


def kill_orphans(segment_dir: Path, grace: float = 3.0) -> list[int]:
    """Stop FFmpeg processes left writing into `segment_dir` by an agent that died (Linux /proc).

    FFmpeg ignores SIGPIPE and EOF on stdin, so an orphan would record forever while recovery joins
    its segments. SIGTERM first: FFmpeg then writes its last fragment and closes the segment, so the
    agent's death costs no media; SIGKILL after `grace` seconds. Matching on the segment path in
    argv is safe against PID reuse.
    """
    needle = str(segment_dir / ffmpeg.SEGMENT_PATTERN).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGTERM)
                found.append(int(entry.name))
    deadline = time.monotonic() + grace
    alive = list(found)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in alive if _running(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return found


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped by its new parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _segments(segment_dir: Path) -> list[Path]:
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
    segments = [s for s in _segments(spec.segment_dir) if s.stat().st_size > 0] if spec.segment_dir.exists() else []
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
        joined = fmp4.join(segments, part)
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
    for seg in _segments(retired):
        seg.unlink()
    with contextlib.suppress(OSError):
        (retired / "concat.txt").unlink()
    with contextlib.suppress(OSError):
        retired.rmdir()
        durable.try_fsync_dir(retired.parent)  # or a cut brings the directory back, a leak nobody removes
