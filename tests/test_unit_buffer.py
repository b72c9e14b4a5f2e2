"""The ring buffer's wall-clock stamps (edge_agent.buffer.CameraBuffer): from media times, not arrivals.

No FFmpeg: the buffer's event handler is fed SegmentClosed events as its recorder posts them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_unit_recorder import spec

from edge_agent import buffer, durable, ffmpeg
from edge_agent.buffer import CameraBuffer
from edge_agent.ffmpeg import StreamInput
from edge_agent.recording import Interrupted, SegmentClosed


@pytest.fixture
def ring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CameraBuffer, list[float]]:
    """A buffer (not started) and the list of arrival times its clock returns, one per segment."""
    buf = CameraBuffer(spec(tmp_path, "ok"), seconds=60, max_bytes=10**9)
    buf.spec.segment_dir.mkdir(parents=True)
    arrivals: list[float] = []
    monkeypatch.setattr(buffer.time, "time", lambda: arrivals.pop(0))
    return buf, arrivals


def close(buf: CameraBuffer, n: int, start: float, end: float) -> None:
    path = buf.spec.segment_dir / f"seg_{n:06d}.mp4"
    path.write_bytes(b"x" * 100)
    buf._on_event(SegmentClosed(buf.spec.task_id, path, end - start, end))


def test_late_reports_shift_no_segment_and_a_run_stays_contiguous(ring: tuple[CameraBuffer, list[float]]) -> None:
    buf, arrivals = ring
    t0 = 1_000_000.0  # wall clock at media time 0
    # Reports 0.3 s after the media end, but the third 2.9 s late (a busy host), the fourth 1 s.
    arrivals += [t0 + 2.3, t0 + 4.3, t0 + 8.9, t0 + 9.0, t0 + 10.3]
    for n in range(5):
        close(buf, n, 2.0 * n, 2.0 * n + 2.0)
    segs = list(buf._ring)
    assert [s.start - t0 for s in segs] == pytest.approx([0.3, 2.3, 4.3, 6.3, 8.3])
    assert [s.end - t0 for s in segs] == pytest.approx([2.3, 4.3, 6.3, 8.3, 10.3])


def test_an_earlier_report_lowers_the_offset_and_a_new_run_starts_anew(
    ring: tuple[CameraBuffer, list[float]],
) -> None:
    buf, arrivals = ring
    t0 = 1_000_000.0
    arrivals += [t0 + 2.8, t0 + 4.3, t0 + 30.5, t0 + 40.5]
    close(buf, 0, 0.0, 2.0)  # the first report of a run: FFmpeg's probe held it 0.8 s
    assert buf._ring[0].end - t0 == pytest.approx(2.8)
    close(buf, 1, 2.0, 4.0)
    # The second shows the smaller offset: the run's first segment is restamped with it.
    assert [(s.start - t0, s.end - t0) for s in buf._ring] == [pytest.approx((0.3, 2.3)), pytest.approx((2.3, 4.3))]
    buf._on_event(Interrupted(buf.spec.task_id, 1, "camera lost"))
    close(buf, 2, 0.0, 2.0)  # a new run: media time from 0 again, its own offset
    close(buf, 3, 2.0, 4.0)  # a later report: no restamp, and the older run's segments never move
    assert [s.end - t0 for s in buf._ring] == pytest.approx([2.3, 4.3, 30.5, 32.5])
    assert buf._ring[-1].run == 1


def test_a_ring_keeps_no_state_per_segment_and_skips_flushes_and_fsyncs(
    ring: tuple[CameraBuffer, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    buf, arrivals = ring
    synced: list[Path] = []
    monkeypatch.setattr(durable, "fsync_file", synced.append)
    arrivals += [1_000_000.0 + 2 * n for n in range(1, 101)]
    for n in range(100):  # as the recorder does: note the segment, make it durable, post it
        name = f"seg_{n:06d}.mp4"
        buf._segment_seconds[name] = 2.0
        buf._make_durable([name])
        close(buf, n, 2.0 * n, 2.0 * n + 2.0)
    assert buf._segment_seconds == {} and buf._durable == set() and synced == []
    assert len(buf._ring) < 100  # the 60 s ring pruned the rest
    argv = ffmpeg.record_argv("ffmpeg", StreamInput("rtsp://cam/x"), Path("/ring"), mode="copy",
                              flush_packets=buf.flush_packets)  # fmt: skip
    assert ffmpeg.RING_MP4_OPTIONS in argv and "flush_packets" not in " ".join(argv)
    task = ffmpeg.record_argv("ffmpeg", StreamInput("rtsp://cam/x"), Path("/rec"), mode="copy")
    assert ffmpeg.FRAGMENTED_MP4_OPTIONS in task and "flush_packets=1" in ffmpeg.FRAGMENTED_MP4_OPTIONS
