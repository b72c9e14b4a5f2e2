"""Pre-roll: a camera recorded all the time into a ring of segments, and tasks cut from that ring.

A `CameraBuffer` is one FFmpeg per camera (the recorder's own supervision: restarts with backoff,
stall watchdog, reaped) writing one fragmented MP4 per run into a ring directory, RAM (`/dev/shm`)
by default so flash storage is not worn, cut by the agent into keyframe-aligned segments: byte
ranges of that file (`edge_agent.ringcut`; on a file system without holes, FFmpeg's segment muxer
writes segment files instead). It keeps the newest `buffer_seconds` (and never more than
`buffer_max_bytes`), each segment stamped with the wall-clock time of its first and last frame.
Those come from the segment's own media times (its fragments' decode times, or the segment muxer's
list: the stream time of its run) plus the run's offset to the wall clock, taken as the smallest
`arrival - media end` over the run's last `CLOCK_WINDOW` segments: a report that arrives late (a
busy host, a burst from the camera) then shifts no segment, and the segments of a run stay exactly
contiguous. When a report shows a smaller offset than any before in the run (the first ones of a run
arrive late: FFmpeg's probing, the camera starting up; measured up to 2.4 s), the run's segments
already in the ring are restamped with it. The camera's own latency (well under a second on a LAN)
is not corrected for; the window follows a camera clock that drifts from the host's.

A task on a buffered camera is a range of that ring (`BufferedRecorder`): the segments from the one
at or before `command time - pre_roll` on, each copied out as a segment file into the task's own
directory on disk and fsynced as it closes, so the task survives a kill -9 or a power cut exactly as a normal one (its
segment directory is finalised at the next start). No second RTSP connection, and no seam: the MP4
is the ring's own segments joined by copying fragments. A camera drop leaves a gap between two FFmpeg
runs; a task spanning it counts an interruption.

Threads: the buffer's FFmpeg runs on the buffer's thread, which owns the ring and cuts it; each
task's recorder subscribes and gets closed segments through its own queue. The ring's index is
shared under one lock, held only to read or change the index (never while copying); a run's file
guards its own bytes (`RunFile`: a segment being copied is freed only after the copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_agent import durable, ffmpeg
from edge_agent.errors import RecordingError
from edge_agent.finalise import finalise_segments
from edge_agent.fmp4 import Mp4Error
from edge_agent.recorder import Recorder, kill_orphans
from edge_agent.recording import (
    Interrupted,
    MediaRange,
    MediaStarted,
    RecorderEvent,
    RecordingFailed,
    RecordingSpec,
    SegmentClosed,
)
from edge_agent.ringcut import Cut, RingCutter, RingReactor, RunFile, WriteWatch, punch_supported

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0  # after a stop: the segment holding the stop time must close within its length + this
# How often the ring's growing file is looked at besides when it is written (WriteWatch): a backstop.
# Without inotify, the timer alone: a segment is then cut this late at most.
CUT_POLL_SECONDS = 2.0
CUT_POLL_SECONDS_UNWATCHED = 0.25
# How long one FFmpeg run of a ring lasts at most (its MP4 muxer's index grows ~50 bytes a fragment:
# 4 MB a day at a keyframe a second). The restart leaves a gap of about a second or two in the ring.
RING_RUN_SECONDS = 24 * 3600.0
MID_WRITE_RETRIES = 4  # looks at a fragment FFmpeg is still writing, MID_WRITE_PAUSE apart
MID_WRITE_PAUSE = 0.005
CLOCK_WINDOW = 30  # segments (a minute at 2 s) over which a run's media-to-wall-clock offset is taken


@dataclass(frozen=True)
class BufferedSegment:
    file: RunFile  # it is the bytes [offset, offset + size) of this file (a segment file: all of it)
    offset: int
    start: float  # wall clock (epoch seconds) of its first frame
    end: float  # ... and of its end
    size: int
    run: int  # FFmpeg run it came from: a new run after a camera drop means a gap before it
    clock: int = 0  # the run of media times it was stamped in (its stamps move together: `_add`)


class CameraBuffer(Recorder):
    """One camera recorded continuously into a bounded ring of segments (see the module docstring)."""

    # The ring is read only in closed segments and dropped at the next start: neither FFmpeg's flush
    # per packet nor an fsync per segment buys anything (a buffered task makes its own copies durable).
    flush_packets = False
    poll_seconds = CUT_POLL_SECONDS

    def __init__(self, spec: RecordingSpec, seconds: float, max_bytes: int, reactor: RingReactor | None = None) -> None:
        super().__init__(spec, self._on_event)
        self.name = f"buffer.{spec.camera_id}"
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._ring: deque[BufferedSegment] = deque()
        self._bytes = 0
        self._run = 0
        self._subscribers: list[queue.SimpleQueue[BufferedSegment]] = []
        self._offsets: deque[float] = deque(maxlen=CLOCK_WINDOW)  # this run's `arrival - media end`
        self._last_media_end = -1.0
        self._clock = 0  # bumped whenever media times start again (a new FFmpeg run)
        self.live = threading.Event()  # media arrived in the last run (cleared when FFmpeg ends)
        self.cut_by_agent = True  # see edge_agent.ringcut; False: FFmpeg's segment muxer cuts
        self._cutter: RingCutter | None = None  # of the FFmpeg run in progress
        self._watch: WriteWatch | None = None  # of the run's file, while the buffer runs (no reactor)
        self._reactor = reactor  # cuts the ring on its thread when the file is written (see RingReactor)
        self._wd: int | None = None  # the reactor's watch of the run's file
        # The cutter and the stamping state (`_offsets`, `_clock`...) are used by the buffer's thread
        # and the reactor's: under this lock.
        self._cut_lock = threading.RLock()
        self._cut_error: str | None = None  # the reactor's cutting failed: the buffer ends the run
        self._runs = 0  # FFmpeg runs so far: each writes its own file
        self.run_seconds = RING_RUN_SECONDS

    # -- the buffer's thread ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            private_dir(self.spec.segment_dir)
        except RecordingError as exc:
            log.error("buffer of %s disabled: %s", self.spec.camera_id, exc)
            return
        orphans = kill_orphans(self.spec.segment_dir)  # an FFmpeg of an agent killed with -9 records on
        if orphans:
            log.warning("buffer of %s: stopped orphaned FFmpeg %s", self.spec.camera_id, orphans)
        for old in self.spec.segment_dir.iterdir():  # a previous run's ring: its times are unknown
            with contextlib.suppress(OSError):
                old.unlink()
        self.cut_by_agent = punch_supported(self.spec.segment_dir)
        if not self.cut_by_agent:
            log.info("buffer of %s: %s cannot punch holes; FFmpeg's segment muxer cuts the ring (more CPU)",
                     self.spec.camera_id, self.spec.segment_dir)  # fmt: skip
        elif self._reactor is None:
            try:
                self._watch = WriteWatch()
            except OSError as exc:
                self._unwatched(str(exc), logging.INFO)
        try:
            while not self._stop_requested.is_set():
                try:
                    self._record()
                except RecordingError as exc:  # gave up for now: the camera may come back
                    log.warning("buffer of %s: %s", self.spec.camera_id, self._redact(str(exc)))
                    self.live.clear()
                    self._wait_wake(self.spec.restart_backoff_max)
                except Exception:
                    log.exception("buffer of %s crashed; restarting it", self.spec.camera_id)
                    self._wait_wake(self.spec.restart_backoff_max)
                self._media_seen = False
        finally:
            if self._watch is not None:
                self._watch.close()
            with self._lock:
                files = {id(seg.file): seg.file for seg in self._ring}
                self._ring.clear()
                self._bytes = 0
            for file in files.values():
                file.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _on_event(self, event: RecorderEvent) -> None:
        """The recorder machinery's events, on this thread."""
        with self._cut_lock:
            self._handle(event)

    def _handle(self, event: RecorderEvent) -> None:
        match event:
            case MediaStarted():
                self.live.set()
            case Interrupted():
                self.live.clear()
                self._offsets.clear()
                self._last_media_end = -1.0
                self._clock += 1
                with self._lock:
                    self._run += 1
            case SegmentClosed(path=path, seconds=seconds, media_end=media_end):  # the segment muxer's
                self._segment_seconds.pop(path.name, None)  # the recorder's per-segment note: not for a ring
                try:
                    file = RunFile.whole(path)
                except OSError:
                    return
                self._add(file, 0, file.size, seconds, *self._wall_end(time.time(), media_end))

    def _argv(self, mode: Literal["copy", "transcode"], segment_list_fd: int) -> list[str]:
        if not self.cut_by_agent:
            return super()._argv(mode, segment_list_fd)
        spec = self.spec
        self._runs += 1
        source = spec.segment_dir / (ffmpeg.RING_FILE_PATTERN % self._runs)
        if self._reactor is not None:
            watch: Callable[[Path], object] | None = self._watch_by_reactor
        else:
            watch = self._watch.watch if self._watch is not None else None
        with self._cut_lock:
            self._cutter = RingCutter(source, spec.segment_seconds, watch=watch)
            self._cut_error = None
        return ffmpeg.ring_argv(spec.ffmpeg, self._stream, source, mode=mode, segment_seconds=spec.segment_seconds,
                                preset=spec.preset, stats_period_s=spec.stats_period)  # fmt: skip

    def _watch_by_reactor(self, path: Path) -> None:
        assert self._reactor is not None
        self._wd = self._reactor.watch(path, self._on_written)

    def _output_fd(self) -> int | None:
        return self._watch.fd if self._watch is not None and self._cutter is not None else None

    def _on_written(self) -> None:
        """The run's file was written (on the reactor's thread): cut it; an error ends the run, from
        the buffer's own thread at its next look (`_poll_output`)."""
        with self._cut_lock:
            if self._cutter is None or self._cut_error is not None:
                return
            try:
                self._cut(self._cutter)
            except RecordingError as exc:
                self._cut_error = str(exc)

    def _poll_output(self) -> bool:
        """On the buffer's thread: every `poll_seconds` (a backstop when the reactor or inotify wakes
        the cutting), or when its own inotify fd is readable. True ends this FFmpeg run."""
        with self._cut_lock:
            cutter = self._cutter
            if self._cut_error is not None:
                raise RecordingError(self._cut_error)
            if cutter is None:
                return False
            self._cut(cutter)
            if cutter.unwatched is not None and self.poll_seconds != CUT_POLL_SECONDS_UNWATCHED:
                self._unwatched(cutter.unwatched, logging.WARNING)
            # FFmpeg's MP4 muxer keeps about 50 bytes per fragment until its run ends: a run is ended
            # after `run_seconds`, right after a segment was cut, and the next starts at once.
            return time.monotonic() - cutter.started > self.run_seconds and not cutter.mid_write

    def _unwatched(self, why: str, level: int) -> None:
        """No inotify for this ring: look at its file on a short timer instead."""
        log.log(level, "buffer of %s: %s; the ring is looked at every %g s", self.spec.camera_id, why,
                CUT_POLL_SECONDS_UNWATCHED)  # fmt: skip
        self.poll_seconds = CUT_POLL_SECONDS_UNWATCHED

    def _cut(self, cutter: RingCutter) -> None:
        """Cut what FFmpeg wrote (under `_cut_lock`); RecordingError if its stream cannot be read. A
        fragment is written in a burst of 32 KB writes, each an inotify event: one caught mid-burst is
        looked at again a few ms later rather than on every event, and the events of the ring's own
        hole punching are read here, not woken for."""
        for attempt in range(MID_WRITE_RETRIES + 1):
            if self._watch is not None:
                self._watch.drain()  # before looking: a write after it wakes us again
            try:
                cuts = cutter.poll()
            except (Mp4Error, OSError) as exc:
                raise RecordingError(f"cannot cut the ring's stream: {exc}") from None
            self._closed(cuts)  # may punch a hole: an event of our own, drained by the next round
            if not cuts and not cutter.mid_write:
                return
            if cutter.mid_write and attempt < MID_WRITE_RETRIES:
                time.sleep(MID_WRITE_PAUSE)

    def _output_ended(self) -> None:
        with self._cut_lock:
            cutter, self._cutter = self._cutter, None
            if self._wd is not None and self._reactor is not None:
                self._reactor.unwatch(self._wd)
            self._wd = None
            if cutter is not None:
                try:
                    self._closed(cutter.finish())
                except (Mp4Error, OSError) as exc:
                    log.warning("buffer of %s: the end of a run is lost: %s", self.spec.camera_id, exc)

    def _closed(self, cuts: list[Cut]) -> None:
        if cuts:
            self.live.set()  # media in the ring (FFmpeg's progress says so too, but only every few seconds)
        for cut in cuts:
            seconds = cut.media_end - cut.media_start
            self._add(cut.file, cut.offset, cut.length, seconds, *self._wall_end(time.time(), cut.media_end))

    def _make_durable(self, names: list[str]) -> None:
        """Nothing: see `flush_packets` (and a ring running for months keeps no per-segment state)."""

    def _wall_end(self, arrival: float, media_end: float | None) -> tuple[float, float]:
        """The wall-clock end of a segment FFmpeg reported closed at `arrival`, and how far the run's
        segments stamped before move (negative: earlier; see the module docstring)."""
        if media_end is None:
            return arrival, 0.0
        if media_end <= self._last_media_end:  # a new FFmpeg run: its stream time starts again
            self._offsets.clear()
            self._clock += 1
        self._last_media_end = media_end
        before = min(self._offsets, default=None)
        self._offsets.append(arrival - media_end)
        offset = min(self._offsets)
        return offset + media_end, (offset - before if before is not None and offset < before else 0.0)

    def _add(self, file: RunFile, offset: int, size: int, seconds: float, end: float, shift: float = 0.0) -> None:
        seg = BufferedSegment(file, offset, end - seconds, end, size, self._run, self._clock)
        with self._lock:
            if shift:
                for i, old in enumerate(self._ring):
                    if old.clock == self._clock:
                        self._ring[i] = dataclasses.replace(old, start=old.start + shift, end=old.end + shift)
            self._ring.append(seg)
            self._bytes += size
            for sub in self._subscribers:
                sub.put(seg)
            # Room is kept for the segment FFmpeg is writing now (about the size of the one just
            # closed), so the ring on disk stays under the cap, not just its closed part.
            expired = []
            while len(self._ring) > 1 and (
                self._ring[0].end < end - self.seconds - seconds or self._bytes + size > self.max_bytes
            ):
                old = self._ring.popleft()
                self._bytes -= old.size
                expired.append(old)
        for old in expired:
            old.file.release(old.offset + old.size)

    def stop(self, timeout: float = 15.0) -> None:
        self.request_stop()
        self.join(timeout)

    # -- called from task recorders (other threads) ----------------------------------------------------

    def subscribe(self, since: float) -> tuple[list[BufferedSegment], queue.SimpleQueue[BufferedSegment]]:
        """The ring's segments from the one holding `since` (or the oldest) on, and a queue of new ones."""
        sub: queue.SimpleQueue[BufferedSegment] = queue.SimpleQueue()
        with self._lock:
            past = [s for s in self._ring if s.end > since]
            self._subscribers.append(sub)
        return past, sub

    def unsubscribe(self, sub: queue.SimpleQueue[BufferedSegment]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._subscribers.remove(sub)

    def newest(self) -> tuple[bytes, float] | None:
        """The newest segment as the bytes of an MP4 file and the time of its first frame (a
        snapshot's source), or None when the ring is empty."""
        with self._lock:
            if not self._ring:
                return None
            seg = self._ring[-1]
        data = seg.file.read(seg.offset, seg.size)
        return (data, seg.start) if data is not None else None

    def holds(self) -> tuple[float, float] | None:
        """(first, last) wall-clock second the ring holds now, or None when it is empty."""
        with self._lock:
            return (self._ring[0].start, self._ring[-1].end) if self._ring else None


def private_dir(path: Path) -> None:
    """Make `path` (and its missing parents) ours alone: the default ring lives in the shared /dev/shm.

    Below a shared sticky directory (/dev/shm, /tmp) every directory of the path must be a real
    directory of ours: RecordingError otherwise (a symbolic link or another user's directory there
    would let someone else read the video or swap the files). A path with no shared directory above
    it was chosen by the administrator and is trusted.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    chain = []
    probe = path
    while probe != probe.parent:
        st = os.lstat(probe)
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            break  # the shared directory: everything below it was checked
        chain.append((probe, st))
        probe = probe.parent
    else:
        return
    for directory, st in chain:
        if stat.S_ISLNK(st.st_mode):
            raise RecordingError(f"{directory} is a symbolic link in a shared directory")
        if st.st_uid != os.getuid():
            raise RecordingError(f"{directory} belongs to another user (uid {st.st_uid})")
    path.chmod(0o700)


class BufferedRecorder(threading.Thread):
    """One task on a buffered camera: copies its range of the ring to disk, then finalises it.

    Looks like a `Recorder` to the agent: `start()`, `request_stop()`, and the same events posted
    (`MediaStarted`, `SegmentClosed`, `Interrupted`, then `RecordingFinished` or `RecordingFailed`),
    plus `MediaRange` with the time of its first frame. With `until` it is an export: the range
    [since, until] of what the ring already holds (or is about to close), then finalised.
    """

    def __init__(self, spec: RecordingSpec, post: Callable[[RecorderEvent], None],
                 buffer: CameraBuffer, since: float, until: float | None = None) -> None:  # fmt: skip
        super().__init__(name=f"recorder.{spec.camera_id}", daemon=True)
        self.spec = spec
        self._post = post
        self._buffer = buffer
        self._since = since
        self._stop_requested = threading.Event()
        self._stop_at: float | None = until  # an export knows its end from the start
        self._copied: dict[str, float] = {}  # task segment name -> seconds
        self._last_run: int | None = None
        self._last_end = 0.0  # wall clock end of the newest segment taken
        self.interruptions = 0

    def request_stop(self) -> None:
        if not self._stop_requested.is_set():
            self._stop_at = time.time()
            self._stop_requested.set()

    def run(self) -> None:
        try:
            self._record()
            if not self._copied:
                raise RecordingError("stopped before the camera delivered any media")
            self._post(finalise_segments(self.spec, dict(self._copied)))
        except RecordingError as exc:
            self._post(RecordingFailed(self.spec.task_id, ffmpeg.redact(str(exc), self.spec.secrets)))
        except Exception as exc:  # a bug must fail the task, not leave it hanging
            log.exception("buffered recorder for %s crashed", self.spec.task_id)
            self._post(RecordingFailed(self.spec.task_id, f"internal error: {exc!r}"))

    def _record(self) -> None:
        spec = self.spec
        durable.make_dirs(spec.segment_dir)
        past, sub = self._buffer.subscribe(self._since)
        started = time.monotonic()
        try:
            for seg in past:
                if self._stop_at is not None and seg.start >= self._stop_at:
                    break
                self._take(seg)
            while True:
                if self._stop_at is not None:
                    if self._copied and self._last_end >= self._stop_at:
                        return  # the segment holding the stop time is in
                    if time.time() > self._stop_at + spec.segment_seconds + STOP_GRACE_SECONDS:
                        return  # the camera is gone: finalise what there is
                elif not self._copied and time.monotonic() - started > spec.first_frame_timeout:
                    raise RecordingError(f"no media from the camera within {spec.first_frame_timeout:g} s "
                                         "(its buffer has none)")  # fmt: skip
                try:
                    seg = sub.get(timeout=0.2)
                except queue.Empty:
                    continue
                if self._stop_at is not None and seg.start >= self._stop_at:
                    return
                self._take(seg)
        finally:
            self._buffer.unsubscribe(sub)

    def _take(self, seg: BufferedSegment) -> None:
        """Copy one ring segment to the task's segment directory, durably, then report it."""
        name = ffmpeg.SEGMENT_PATTERN % len(self._copied)
        dest = self.spec.segment_dir / name
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            copied = seg.file.copy(fd, seg.offset, seg.size)
        except OSError as exc:
            raise RecordingError(f"cannot copy from the ring to {dest}: {exc}") from None
        finally:
            os.close(fd)
        if not copied:  # dropped from the ring before we got to it (a very slow disk): a gap
            dest.unlink()
            self.interruptions += 1
            return
        durable.fsync_file(dest)
        durable.fsync_dir(self.spec.segment_dir)
        seconds = seg.end - seg.start
        if not self._copied:
            self._post(MediaRange(self.spec.task_id, seg.start))
            self._post(MediaStarted(self.spec.task_id))
        elif self._last_run is not None and seg.run != self._last_run:
            self.interruptions += 1
            self._post(Interrupted(self.spec.task_id, self.interruptions, "camera dropped: a gap in the buffer"))
        self._copied[name] = seconds
        self._last_run = seg.run
        self._last_end = seg.end
        self._post(SegmentClosed(self.spec.task_id, dest, seconds))
