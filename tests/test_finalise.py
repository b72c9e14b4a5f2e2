"""Joining segments with real FFmpeg: damaged segments are set aside and reported, never lost silently."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fakemp4 import finalise_spec
from parts import ffprobe_info, moov_before_mdat

from edge_agent.finalise import finalise_segments
from edge_agent.recording import RecordingFailed, RecordingFinished, RecordingSpec

pytestmark = pytest.mark.integration


def _record_segments(spec: RecordingSpec, seconds: int = 8) -> dict[str, float]:
    spec.segment_dir.mkdir(parents=True)
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25",
         "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-force_key_frames", "expr:gte(t,n_forced*2)", "-f", "segment", "-segment_time", "2",
         "-segment_format", "mpegts", str(spec.segment_dir / "seg_%06d.ts")],
        check=True, timeout=60,
    )  # fmt: skip
    return {p.name: 2.0 for p in spec.segment_dir.glob("seg_*.ts")}


@pytest.mark.parametrize("recovery", [False, True], ids=["after-recording", "crash-recovery"])
def test_damaged_segment_is_set_aside_and_the_rest_joined(tmp_path: Path, recovery: bool) -> None:
    spec = finalise_spec(tmp_path)
    known = _record_segments(spec)
    assert len(known) == 4
    damaged = spec.segment_dir / "seg_000001.ts"
    damaged.write_bytes(bytes(range(256)) * 200)  # not MPEG-TS: the concat demuxer stops here quietly
    result = finalise_segments(spec, None if recovery else known)
    assert isinstance(result, RecordingFinished), result
    assert result.rejected_segments == ("seg_000001.ts",)
    aside = tmp_path / ".t.segments.rejected" / "seg_000001.ts"
    assert aside.read_bytes() == bytes(range(256)) * 200  # kept for inspection, not deleted
    info = ffprobe_info(result.path)
    assert 5.5 <= info["duration"] <= 6.5  # the three good segments, not just the one before the damage
    assert moov_before_mdat(result.path)
    assert not spec.segment_dir.exists()


def test_truncated_last_segment_still_joins(tmp_path: Path) -> None:
    spec = finalise_spec(tmp_path)
    known = _record_segments(spec, seconds=6)
    last = sorted(spec.segment_dir.glob("seg_*.ts"))[-1]
    del known[last.name]  # a killed FFmpeg never reports its last segment
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    result = finalise_segments(spec, known)
    assert isinstance(result, RecordingFinished) and result.rejected_segments == ()
    assert 4.5 <= ffprobe_info(result.path)["duration"] <= 6.0


def test_only_unreadable_segments_fail_with_a_reason(tmp_path: Path) -> None:
    spec = finalise_spec(tmp_path)
    spec.segment_dir.mkdir(parents=True)
    (spec.segment_dir / "seg_000000.ts").write_bytes(b"\x00garbage" * 1000)
    result = finalise_segments(spec, None)
    assert isinstance(result, RecordingFailed) and "1 set aside" in result.error
    assert (tmp_path / ".t.segments.rejected" / "seg_000000.ts").exists()
