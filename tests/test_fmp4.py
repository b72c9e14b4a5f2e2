"""The copying join of fragmented-MP4 segments (edge_agent.fmp4), on segments real FFmpeg wrote.

The segments come from FFmpeg's segment muxer with the recorder's own fragmented-MP4 options
(`ffmpeg.FRAGMENTED_MP4_OPTIONS`), from a synthetic source, so no camera is needed. What is checked
is what a viewer and the agent rely on: every frame kept, decode times running on across the seams
with no gap or repeat, a file FFmpeg decodes without a single error, `moov` first, the hash and
duration the join reports, and damaged or foreign segments handled without losing the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from fakemp4 import finalise_spec
from parts import moov_before_mdat

from edge_agent import ffmpeg, fmp4, fmp4join
from edge_agent.finalise import finalise_segments
from edge_agent.recording import RecordingFinished

pytestmark = pytest.mark.integration

FPS = 25


def record(out: Path, seconds: int, size: str = "320x240", first: int = 0) -> list[Path]:
    """`seconds` of testsrc as 2 s fragmented-MP4 segments, exactly as the recorder has FFmpeg write them."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc=size={size}:rate={FPS}",
         "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-force_key_frames", "expr:gte(t,n_forced*2)", "-f", "segment", "-segment_time", "2",
         "-segment_format", "mp4", "-segment_format_options", ffmpeg.FRAGMENTED_MP4_OPTIONS,
         "-segment_start_number", str(first), "-reset_timestamps", "0", str(out / ffmpeg.SEGMENT_PATTERN)],
        check=True, timeout=60,
    )  # fmt: skip
    return sorted(out.glob("seg_*.mp4"))


def probe(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
         "stream=codec_name,width,height,nb_read_packets:format=duration", "-of", "json", str(path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    doc = json.loads(out.stdout)
    stream = doc["streams"][0]
    return {"codec": stream["codec_name"], "width": stream["width"], "height": stream["height"],
            "packets": int(stream["nb_read_packets"]), "duration": float(doc["format"]["duration"])}  # fmt: skip


def decode_errors(path: Path) -> str:
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "null", "-"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    return out.stderr.strip() if out.returncode == 0 else f"exit {out.returncode}: {out.stderr.strip()}"


def dts_steps(path: Path) -> Counter[int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=dts", "-of", "csv=p=0",
         str(path)], capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    dts = [int(x.strip().rstrip(",")) for x in out.stdout.splitlines() if x.strip()]
    return Counter(b - a for a, b in itertools.pairwise(dts))


def test_join_keeps_every_frame_with_continuous_timestamps(tmp_path: Path) -> None:
    segments = record(tmp_path / "segs", 10)
    assert len(segments) == 5
    joined = fmp4join.join(segments, tmp_path / "out.mp4")
    info = probe(joined.path)
    assert info["packets"] == 10 * FPS  # every frame of every segment
    assert (info["codec"], info["width"], info["height"]) == ("h264", 320, 240)
    assert (joined.codec, joined.width, joined.height) == ("h264", 320, 240)
    assert joined.seconds == pytest.approx(10.0, abs=0.05)
    assert float(str(info["duration"])) == pytest.approx(10.0, abs=0.05)  # from the moov's mehd
    # The decode times run on across the seams: one constant step, no gap, no repeat.
    steps = dts_steps(joined.path)
    assert len(steps) == 1 and next(iter(steps)) > 0, steps
    assert decode_errors(joined.path) == ""
    assert moov_before_mdat(joined.path)
    data = joined.path.read_bytes()
    assert joined.size == len(data) and joined.sha256 == hashlib.sha256(data).hexdigest()
    assert joined.unusable == () and joined.damaged == ()
    # Every fragment is numbered on from the last (mfhd), and the mfra indexes the keyframe ones.
    kinds = [kind for kind, _, _ in fmp4.boxes(data)]
    assert kinds[:2] == [b"ftyp", b"moov"] and kinds[-1] == b"mfra"
    assert kinds.count(b"moof") == joined.fragments >= 10  # a fragment at least every second


def test_a_segment_cut_short_keeps_its_complete_fragments(tmp_path: Path) -> None:
    segments = record(tmp_path / "segs", 6)
    last = segments[-1]
    whole = fmp4.read_segment(last)
    assert len(whole.fragments) >= 2 and whole.damage is None
    # Cut in the middle of the second fragment's mdat, as a SIGKILL or a power cut leaves a file.
    second = whole.fragments[1]
    last.write_bytes(last.read_bytes()[: second.mdat_offset + second.mdat_size // 2])
    cut = fmp4.read_segment(last)
    assert len(cut.fragments) == 1 and cut.damage is not None and "cut short" in cut.damage
    joined = fmp4join.join(segments, tmp_path / "out.mp4")
    assert joined.damaged and joined.damaged[0][0] == last.name
    kept = 4 * FPS + whole.fragments[0].samples
    assert probe(joined.path)["packets"] == kept
    assert joined.seconds == pytest.approx(kept / FPS, abs=0.05)
    assert decode_errors(joined.path) == ""


def test_unreadable_segments_are_left_out_and_named(tmp_path: Path) -> None:
    segments = record(tmp_path / "segs", 8)
    segments[1].write_bytes(bytes(range(256)) * 100)  # not an MP4 at all
    segments[2].write_bytes(segments[2].read_bytes()[:700])  # header only: no complete fragment
    joined = fmp4join.join(segments, tmp_path / "out.mp4")
    assert set(joined.unusable) == {segments[1].name, segments[2].name}
    assert probe(joined.path)["packets"] == 4 * FPS
    steps = dts_steps(joined.path)
    assert len(steps) == 1, steps  # the gap the missing segments leave is closed, as a concat would
    assert decode_errors(joined.path) == ""
    with pytest.raises(fmp4.Mp4Error, match="no segment holds a complete fragment"):
        fmp4join.join(segments[1:3], tmp_path / "none.mp4")


def test_segments_of_another_stream_are_incompatible(tmp_path: Path) -> None:
    a = record(tmp_path / "segs", 4)
    b = record(tmp_path / "other", 2, size="352x288", first=2)  # the camera came back at another size
    with pytest.raises(fmp4.Incompatible, match="352x288"):
        fmp4join.join([*a, *b], tmp_path / "out.mp4")


@pytest.mark.parametrize("recovery", [False, True], ids=["after-recording", "crash-recovery"])
def test_finalise_joins_by_copying_and_retires_the_segments(tmp_path: Path, recovery: bool) -> None:
    spec = finalise_spec(tmp_path)
    segments = record(spec.segment_dir, 8)
    known = {p.name: 2.0 for p in segments}
    result = finalise_segments(spec, None if recovery else known)
    assert isinstance(result, RecordingFinished), result
    assert result.duration_seconds == pytest.approx(8.0, abs=0.05)
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert probe(result.path)["packets"] == 8 * FPS and decode_errors(result.path) == ""
    assert not spec.segment_dir.exists() and not spec.output_file.with_name("t.mp4.part").exists()


def test_finalise_keeps_the_segments_when_the_mp4_holds_less_than_reported(tmp_path: Path) -> None:
    spec = finalise_spec(tmp_path)
    segments = record(spec.segment_dir, 6)
    known = {p.name: 2.0 for p in segments}
    segments[-1].write_bytes(segments[-1].read_bytes()[:900])  # its media is gone from the disk
    result = finalise_segments(spec, known)
    assert isinstance(result, RecordingFinished)
    assert result.duration_seconds == pytest.approx(4.0, abs=0.05)
    assert spec.segment_dir.is_dir()  # 4 s of 6 s reported: the evidence stays


def test_finalise_falls_back_to_ffmpeg_for_a_changed_stream(tmp_path: Path) -> None:
    spec = finalise_spec(tmp_path)
    record(spec.segment_dir, 4)
    record(spec.segment_dir, 2, size="352x288", first=2)
    result = finalise_segments(spec, None)
    assert isinstance(result, RecordingFinished), result
    assert 5.5 <= result.duration_seconds <= 6.5  # FFmpeg's concat took all three
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()


def test_header_errors_name_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "seg_000000.mp4"
    empty.write_bytes(b"")
    with pytest.raises(fmp4.Mp4Error, match="no ftyp"):
        fmp4.read_segment(empty)
    wrong = tmp_path / "seg_000001.mp4"
    wrong.write_bytes(fmp4.box(b"ftyp", b"isom\0\0\2\0") + fmp4.box(b"mdat", b"x" * 10))
    with pytest.raises(fmp4.Mp4Error, match="expected moov"):
        fmp4.read_segment(wrong)
    huge = tmp_path / "seg_000002.mp4"
    huge.write_bytes(fmp4.box(b"ftyp", b"isom") + b"\x7f\xff\xff\xffmoov")
    with pytest.raises(fmp4.Mp4Error, match="cut short"):
        fmp4.read_segment(huge)
