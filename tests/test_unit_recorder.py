"""The recorder's process handling, against a tiny fake FFmpeg (a Python script per behaviour).

The fake reads the recorder's real command line (`ffmpeg.record_argv`): it reports `frame=` lines on
`-progress pipe:1`, writes joinable fragmented-MP4 segments (tests/fakemp4.py) to the output
pattern from `-segment_start_number` on, names each closed one on the `-segment_list pipe:N` fd, and
quits on `q` like FFmpeg, or misbehaves as a test asks: ignores `q`, dies, stalls, never delivers a
frame, or prints the camera URL with its password. What is checked is what the agent relies on:
the events and their order, restarts with backoff, a kill when a stop is ignored, the stall and
first-frame watchdogs, no process left behind, and no secret in an error.
"""

from __future__ import annotations

import os
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fakemp4

from edge_agent.ffmpeg import StreamInput
from edge_agent.recorder import Recorder
from edge_agent.recording import (
    Interrupted,
    MediaStarted,
    RecorderEvent,
    RecordingFailed,
    RecordingFinished,
    RecordingSpec,
    SegmentClosed,
)

PASSWORD = "s3cret-Cam-pw"
URL = f"rtsp://admin:{PASSWORD}@192.0.2.1/stream"
SEGMENT = fakemp4.segment(2)  # 2 s of joinable fragments

FAKE = r'''#!{python}
import os, select, sys, time
argv = sys.argv[1:]
def opt(flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default
BEHAVIOUR = {behaviour!r}
SEGMENT = bytes.fromhex({segment!r})
pattern = argv[-1]
number = int(opt("-segment_start_number", "0"))
seg_list = opt("-segment_list")
listing = os.fdopen(int(seg_list.split(":")[1]), "w") if seg_list else None
with open(os.path.join(os.path.dirname(os.path.dirname(pattern)), "pids"), "a") as f:
    f.write(f"{{os.getpid()}}\n")
if BEHAVIOUR == "leak":
    sys.stderr.write("Connection to " + opt("-i") + " refused\n")
    sys.exit(1)
if BEHAVIOUR == "long_gop" and int(opt("-analyzeduration", "0")) < 2000000:  # a keyframe every 2 s
    sys.stderr.write("[segment @ 0x1] dimensions not set\nCould not write header for output file #0\n")
    sys.exit(1)
frames, t0, closed = 0, time.monotonic(), 0
while True:
    r, _, _ = select.select([sys.stdin], [], [], 0.1)
    if r:
        data = os.read(sys.stdin.fileno(), 1)
        if data == b"q" and BEHAVIOUR != "ignore_q":
            break
    if BEHAVIOUR == "no_frames":
        continue
    if BEHAVIOUR == "stall" and frames >= 3:
        continue
    frames += 1
    sys.stdout.write(f"frame={{frames}}\nprogress=continue\n")
    sys.stdout.flush()
    if frames % 3 == 0:  # a segment closes every 0.3 s
        name = pattern % number
        with open(name, "wb") as f:
            f.write(SEGMENT)
        if listing:
            listing.write(f"{{os.path.basename(name)}},{{closed * 2.0:f}},{{closed * 2.0 + 2.0:f}}\n")
            listing.flush()
        number += 1
        closed += 1
        if BEHAVIOUR == "die" and closed == 2:
            sys.exit(1)
sys.stdout.write(f"frame={{frames}}\nprogress=end\n")
sys.exit(0)
'''


def fake_ffmpeg(tmp: Path, behaviour: str) -> str:
    path = tmp / f"fake-ffmpeg-{behaviour}"
    path.write_text(FAKE.format(python=sys.executable, behaviour=behaviour, segment=SEGMENT.hex()))
    path.chmod(0o755)
    return str(path)


def spec(tmp: Path, behaviour: str, **overrides: float) -> RecordingSpec:
    values: dict[str, float] = {"first_frame_timeout": 5.0, "stall_timeout": 5.0, "stop_timeout": 5.0,
                                "restart_backoff_max": 0.2}  # fmt: skip
    values.update(overrides)
    return RecordingSpec(
        task_id="cam1/t", camera_id="cam1", stream=StreamInput(URL), mode="copy",
        segment_dir=tmp / "rec" / ".t.segments", output_file=tmp / "rec" / "t.mp4",
        ffmpeg=fake_ffmpeg(tmp, behaviour), ffprobe="/nonexistent/ffprobe", segment_seconds=2,
        first_frame_timeout=values["first_frame_timeout"], stall_timeout=values["stall_timeout"],
        stop_timeout=values["stop_timeout"], restart_backoff_max=values["restart_backoff_max"],
        max_restarts=3, probe_timeout=5, preset="ultrafast", stats_period=0.1, secrets=(PASSWORD,),
    )  # fmt: skip


class Run:
    """A recorder on its own thread with its events collected."""

    def __init__(self, s: RecordingSpec) -> None:
        self.spec = s
        self.events: queue.Queue[RecorderEvent] = queue.Queue()
        self.seen: list[RecorderEvent] = []
        self.rec = Recorder(s, self.events.put)
        self.rec.start()

    def wait_for(self, kind: type, timeout: float = 15.0) -> RecorderEvent:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.seen:
                if isinstance(ev, kind):
                    return ev
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind.__name__} within {timeout} s; saw {self.seen}"
            try:
                self.seen.append(self.events.get(timeout=left))
            except queue.Empty:
                continue

    def wait_until(self, done: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"not within {timeout} s; saw {self.seen}"
            try:
                self.seen.append(self.events.get(timeout=min(left, 0.5)))
            except queue.Empty:
                continue

    def end(self, timeout: float = 20.0) -> RecordingFinished | RecordingFailed:
        ev = self.wait_for((RecordingFinished, RecordingFailed), timeout)  # type: ignore[arg-type]
        self.rec.join(timeout=5)
        assert not self.rec.is_alive()
        assert isinstance(ev, RecordingFinished | RecordingFailed)
        return ev

    def pids(self) -> list[int]:
        """Every fake FFmpeg this recorder started (each notes its pid beside the segment directory)."""
        path = self.spec.segment_dir.parent / "pids"
        return [int(x) for x in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_records_reports_segments_and_finalises_on_stop(tmp_path: Path) -> None:
    run = Run(spec(tmp_path, "record"))
    run.wait_for(MediaStarted)
    run.wait_for(SegmentClosed)
    run.rec.request_stop()
    result = run.end()
    assert isinstance(result, RecordingFinished), result
    closed = [e for e in run.seen if isinstance(e, SegmentClosed)]
    # Events in order: media first, then segments, the final event last; each segment reported once.
    assert isinstance(run.seen[0], MediaStarted) and run.seen[-1] is result
    assert len({e.path for e in closed}) == len(closed) >= 1 and all(e.seconds == 2.0 for e in closed)
    assert result.duration_seconds >= 2.0 * len(closed)  # every reported segment is in the MP4
    assert result.path == tmp_path / "rec" / "t.mp4" and result.path.stat().st_size == result.size_bytes
    assert not (tmp_path / "rec" / ".t.segments").exists()  # retired once the MP4 is durable
    assert run.rec.interruptions == 0


def test_a_stop_ffmpeg_ignores_ends_in_a_kill_within_the_timeout(tmp_path: Path) -> None:
    run = Run(spec(tmp_path, "ignore_q", stop_timeout=1.0))
    run.wait_for(SegmentClosed)
    pids = run.pids()
    asked = time.monotonic()
    run.rec.request_stop()
    result = run.end()
    assert time.monotonic() - asked < 1.0 + 5.0  # the stop timeout, then a kill, not a hang
    assert isinstance(result, RecordingFinished), result  # what was written before the kill is kept
    assert pids and not any(alive(p) for p in pids)


def test_ffmpeg_dying_after_media_is_restarted_and_counted(tmp_path: Path) -> None:
    run = Run(spec(tmp_path, "die"))
    first = run.wait_for(Interrupted)
    assert isinstance(first, Interrupted) and first.count == 1 and "exited with code 1" in first.reason
    # A second FFmpeg was started and closes segments of its own.
    run.wait_until(lambda: sum(isinstance(e, SegmentClosed) for e in run.seen) >= 3)
    assert len(run.pids()) == 2
    run.rec.request_stop()
    result = run.end()
    assert isinstance(result, RecordingFinished), result
    # The restarted FFmpeg numbered its segments on from the last one: none was overwritten.
    closed = [e.path.name for e in run.seen if isinstance(e, SegmentClosed)]
    assert len(closed) == len(set(closed)) >= 3
    assert not any(alive(p) for p in run.pids())


def test_a_stalled_ffmpeg_is_killed_and_restarted(tmp_path: Path) -> None:
    run = Run(spec(tmp_path, "stall", stall_timeout=1.0))
    ev = run.wait_for(Interrupted, timeout=10)
    assert isinstance(ev, Interrupted) and "stalled" in ev.reason
    run.rec.request_stop()
    run.end()
    assert not any(alive(p) for p in run.pids())


def test_no_frame_within_the_first_frame_timeout_fails_the_task(tmp_path: Path) -> None:
    run = Run(spec(tmp_path, "no_frames", first_frame_timeout=1.0, stall_timeout=1.0))
    result = run.end(timeout=15)
    assert isinstance(result, RecordingFailed)
    assert "no media from the camera within 1 s" in result.error
    assert not any(isinstance(e, MediaStarted) for e in run.seen)
    assert not any(alive(p) for p in run.pids())


def test_ffmpeg_errors_reach_the_task_without_the_camera_password(tmp_path: Path) -> None:
    run = Run(spec(tmp_path, "leak", first_frame_timeout=1.0))
    result = run.end(timeout=15)
    assert isinstance(result, RecordingFailed)
    assert "Connection to" in result.error and "refused" in result.error
    assert PASSWORD not in result.error


def test_a_stream_whose_parameters_come_late_is_analysed_longer(tmp_path: Path) -> None:
    """A camera with a long GOP and no parameters in its SDP: FFmpeg's short default analysis
    (0.5 s, a fast start) ends before the first SPS ("dimensions not set"); the recorder widens the
    window (x4 per failure, at most 5 s) and records."""
    run = Run(spec(tmp_path, "long_gop", first_frame_timeout=10.0))
    run.wait_for(SegmentClosed)
    run.rec.request_stop()
    assert isinstance(run.end(), RecordingFinished)
    assert len(run.pids()) == 2  # 0.5 s failed; 2 s (x4) records
