"""One recording: supervises FFmpeg for one task, then has its segments finalised into one MP4.

A `Recorder` is a thread that owns its FFmpeg process from spawn to reap. It knows no MQTT: it
reports through `post(event)`, which only enqueues. Lifecycle of each FFmpeg run:

    spawn (own session) -> read -progress / drain stderr -> [stop: 'q' on stdin, bounded wait,
    SIGKILL] -> reap -> restart with backoff while the task is active (watchdog) or finalise.

Power cuts: FFmpeg never fsyncs, so the recorder makes each segment durable (file and directory,
see `edge_agent.durable`) as FFmpeg reports it closed, and any segment a killed FFmpeg left
behind once it is reaped: a cut loses at most the segment being written. Finalising (the join,
its durability, retiring the segments) is `edge_agent.finalise`.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path
from typing import IO, Literal

from edge_agent import durable, ffmpeg
from edge_agent.errors import RecordingError
from edge_agent.finalise import finalise_segments, segment_files
from edge_agent.recording import (
    Interrupted,
    MediaStarted,
    Probed,
    RecorderEvent,
    RecordingFailed,
    RecordingSpec,
    SegmentClosed,
)

__all__ = ["Recorder", "kill_orphans", "probe_camera"]

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20
ROTATED = "planned restart"  # a run ended on purpose by `_poll_output` (CameraBuffer: FFmpeg's memory)
# Joining segments is disk-bound; when many cameras stop at once, join a few at a time rather than
# all together (64 simultaneous joins on 2 cores timed out in bench_capacity).
FINALISE_SLOTS = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


class Recorder(threading.Thread):
    """Records one task until asked to stop, then finalises it; or only finalises (recovery)."""

    flush_packets = True  # FFmpeg writes out every packet (a kill loses at most the fragment in progress)
    poll_seconds: float | None = None  # how often `_poll_output` runs while FFmpeg records (None: never)

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
        self._stream = spec.stream  # widened after a run that could not read the stream's parameters
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
        probed = probe_camera(spec.ffprobe, spec.camera_id, spec.stream, spec.probe_timeout)
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
            if outcome == ROTATED:  # a planned restart (CameraBuffer): at once, and not a failure
                self.interruptions += 1
                self._post(Interrupted(spec.task_id, self.interruptions, ROTATED))
                continue
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
            elif ffmpeg.parameters_unknown(self._stderr_tail):
                # The short default analysis (a fast start) saw no SPS/keyframe: a camera with a long
                # GOP and no parameters in its SDP. Look longer next time (x4, at most 5 s).
                self._stream = ffmpeg.widened(self._stream)
                log.info("%s: stream parameters not found in time; analysing %.1f s next", spec.task_id,
                         self._stream.analyzeduration_us / 1e6)  # fmt: skip
            delay = min(spec.restart_backoff_max, 0.5 * 2 ** min(restarts - 1, 6)) * random.uniform(0.8, 1.2)
            log.warning("%s: FFmpeg %s; restarting in %.1f s", spec.task_id, self._redact(outcome), delay)
            if self._wait_wake(delay):
                return

    def _wait_wake(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on a stop request; True if a stop was requested."""
        return self._stop_requested.wait(seconds)

    def _next_segment_number(self) -> int:
        segments = segment_files(self.spec.segment_dir)
        return ffmpeg.segment_number(segments[-1]) + 1 if segments else 0

    def _run_ffmpeg(self, mode: Literal["copy", "transcode"], task_started: float) -> str:
        """One FFmpeg run. Returns 'stopped' after a requested stop, else why it ended."""
        seg_r, seg_w = os.pipe()  # FFmpeg reports each closed segment here
        argv = self._argv(mode, seg_w)
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
                self._output_ended()
                self._sync_left_behind()
        finally:
            os.close(seg_r)

    def _argv(self, mode: Literal["copy", "transcode"], segment_list_fd: int) -> list[str]:
        """The FFmpeg command of one run: segments, each reported closed on `segment_list_fd`."""
        spec = self.spec
        return ffmpeg.record_argv(
            spec.ffmpeg, self._stream, spec.segment_dir, mode=mode, segment_seconds=spec.segment_seconds,
            start_number=self._next_segment_number(), preset=spec.preset, stats_period_s=spec.stats_period,
            segment_list_fd=segment_list_fd, flush_packets=self.flush_packets,
        )  # fmt: skip

    def _poll_output(self) -> bool:
        """Look at what FFmpeg wrote (every `poll_seconds`, and whenever `_output_fd` is readable);
        True ends this FFmpeg run gracefully and starts the next at once. Nothing here: CameraBuffer."""
        return False

    def _output_fd(self) -> int | None:
        """A file descriptor readable when FFmpeg wrote output (`_poll_output` then runs), or None."""
        return None

    def _output_ended(self) -> None:
        """FFmpeg of this run has been reaped: nothing here, see CameraBuffer."""

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
            self._make_durable([p.name for p in segment_files(self.spec.segment_dir) if p.name not in self._durable])

    def _supervise(self, proc: subprocess.Popen[bytes], task_started: float, seg_r: int) -> str:
        spec = self.spec
        assert proc.stdout is not None and proc.stderr is not None
        buffers: dict[int, bytes] = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b"", seg_r: b""}
        last_frames = -1
        run_started = time.monotonic()
        last_advance = run_started
        stop_sent_at: float | None = None
        rotating = False
        killed = False
        next_poll = run_started
        output_fd = self._output_fd()
        with selectors.DefaultSelector() as sel:
            if output_fd is not None:
                sel.register(output_fd, selectors.EVENT_READ, "output")
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(seg_r, selectors.EVENT_READ, "segments")
            open_pipes = 3
            while open_pipes:
                now = time.monotonic()
                if (self._stop_requested.is_set() or rotating) and stop_sent_at is None:
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
                timeout = max(0.05, deadline - now)
                if self.poll_seconds is not None:
                    if now >= next_poll:
                        rotating = self._poll_output() or rotating
                        next_poll = now + self.poll_seconds
                    timeout = min(timeout, max(0.0, next_poll - now))
                for key, _ in sel.select(timeout=timeout):
                    if key.data == "wake":
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                        continue
                    if key.data == "output":
                        rotating = self._poll_output() or rotating
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
                            seg = ffmpeg.parse_segment_times(line)
                            if seg is not None:
                                name, seconds = seg[0], max(0.0, seg[2] - seg[1])
                                self._segment_seconds[name] = seconds
                                self._make_durable([name])
                                self._post(SegmentClosed(spec.task_id, spec.segment_dir / name, seconds, seg[2]))
                        elif line.strip():
                            self._stderr_tail.append(self._redact(line.strip())[:300])
        try:
            code = proc.wait(timeout=spec.stop_timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            code = proc.wait(timeout=5)
        if stop_sent_at is not None:
            return "stopped" if self._stop_requested.is_set() or not rotating else ROTATED
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


def probe_camera(ffprobe: str, camera_id: str, stream: ffmpeg.StreamInput, probe_timeout: float) -> Probed:
    """ffprobe a camera (bounded) and decide copy vs transcode; RecordingError if it cannot be read."""
    argv = ffmpeg.probe_argv(ffprobe, stream)
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
    ring = str(segment_dir / ffmpeg.RING_FILE_GLOB).encode().partition(b"*")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv or any(a.startswith(ring[0]) and a.endswith(ring[2]) for a in argv):
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
