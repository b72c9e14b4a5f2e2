"""The ring's own cutter (edge_agent.ringcut) on fragmented MP4 that real FFmpeg wrote as the ring does.

The source is FFmpeg's output in the ring's form (`ffmpeg.RING_MOVFLAGS`: one fragment per keyframe),
from a synthetic source with a keyframe every second. It is fed to the cutter as the growing file
the ring's FFmpeg writes: in one piece, and in uneven pieces (boxes cut anywhere). What is checked:
keyframe-aligned segments of the asked length, each a fragmented MP4 the join takes; every frame kept
once, decoding without an error; the media times each cut reports; the cut bytes released from the
growing file (its blocks, not its size); a damaged stream named; the file removed at the end.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edge_agent import ffmpeg, fmp4, fmp4join
from edge_agent.fmp4 import Mp4Error
from edge_agent.ringcut import PAGE, RingCutter, punch_supported

pytestmark = pytest.mark.integration

FPS = 25


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """9 s of testsrc at 25 fps, a keyframe every second, as the ring's FFmpeg writes it."""
    out = tmp_path_factory.mktemp("ringsrc") / "ring.mp4"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc=size=320x240:rate={FPS}",
         "-t", "9", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(FPS),
         "-f", "mp4", "-movflags", ffmpeg.RING_MOVFLAGS, "-flush_packets", "1", str(out)],
        check=True, timeout=60,
    )  # fmt: skip
    return out.read_bytes()


def feed(cutter: RingCutter, data: bytes, pieces: list[int]) -> list[tuple[str, float, float]]:
    """Append `data` to the cutter's source in pieces of the given sizes, polling after each."""
    cuts = []
    with cutter.source.open("ab") as f:
        pos = 0
        for size in [*pieces, len(data)]:
            f.write(data[pos : pos + size])
            f.flush()
            pos += size
            cuts += [(c.name, c.media_start, c.media_end) for c in cutter.poll()]
            if pos >= len(data):
                break
    return cuts


def frames(path: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_packets", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return int(out.stdout.strip())


def test_cuts_keyframe_aligned_segments_that_join_into_every_frame(tmp_path: Path, stream: bytes) -> None:
    cutter = RingCutter(tmp_path / ffmpeg.RING_FILE, tmp_path, 2, first_number=7)
    cuts = feed(cutter, stream, [])
    # Cut as soon as 2 s of fragments are in: 0-2, 2-4, 4-6, 6-8; the last second waits for the end.
    assert cuts == [(f"seg_{7 + i:06d}.mp4", 2.0 * i, 2.0 * i + 2) for i in range(4)], cuts
    last = cutter.finish()
    assert [(c.name, c.media_start, c.media_end) for c in last] == [("seg_000011.mp4", 8.0, 9.0)]
    assert not cutter.source.exists()  # the growing file goes with its run

    paths = [tmp_path / f"seg_{n:06d}.mp4" for n in range(7, 12)]
    for path in paths:
        seg = fmp4.read_segment(path)
        assert seg.damage is None, (path, seg.damage)
        assert seg.fragments[0].keyframe, path
    joined = fmp4join.join(paths, tmp_path / "joined.mp4")
    assert joined.seconds == pytest.approx(9.0, abs=0.05)
    assert frames(tmp_path / "joined.mp4") == 9 * FPS
    decode = subprocess.run(["ffmpeg", "-v", "error", "-i", str(tmp_path / "joined.mp4"), "-f", "null", "-"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert decode.returncode == 0 and decode.stderr == "", decode.stderr


def test_a_file_written_in_uneven_pieces_cuts_to_the_same_bytes(tmp_path: Path, stream: bytes) -> None:
    whole_dir, piece_dir = tmp_path / "whole", tmp_path / "pieces"
    whole_dir.mkdir()
    piece_dir.mkdir()
    whole = RingCutter(whole_dir / ffmpeg.RING_FILE, whole_dir, 2, 0)
    expected = feed(whole, stream, []) + [(c.name, c.media_start, c.media_end) for c in whole.finish()]
    # Pieces of 1 to 9000 bytes: box headers, moofs and mdats split everywhere, as a poll can see them.
    sizes = [1, 3, 4, 8, 13, 500, 7, 9000, 2, 4096, 6] * 200
    pieced = RingCutter(piece_dir / ffmpeg.RING_FILE, piece_dir, 2, 0)
    got = feed(pieced, stream, sizes) + [(c.name, c.media_start, c.media_end) for c in pieced.finish()]
    assert got == expected
    for name, _, _ in expected:
        assert (piece_dir / name).read_bytes() == (whole_dir / name).read_bytes(), name


def test_the_cut_bytes_are_released_from_the_growing_file(tmp_path: Path, stream: bytes) -> None:
    assert punch_supported(tmp_path), "the test directory's file system cannot punch holes"
    cutter = RingCutter(tmp_path / ffmpeg.RING_FILE, tmp_path, 2, 0)
    cuts = feed(cutter, stream[: len(stream) * 2 // 3], [])
    assert len(cuts) >= 2
    st = cutter.source.stat()
    cut_bytes = sum((tmp_path / name).stat().st_size for name, _, _ in cuts)
    assert st.st_size == len(stream) * 2 // 3  # the size stays: offsets FFmpeg writes at do not move
    # Blocks held: the fragments not cut yet (less than one segment) and the page each end shares.
    uncut = st.st_size - cut_bytes + len(cuts) * 1024  # each segment file repeats the ~1 KB header
    assert st.st_blocks * 512 <= uncut + 2 * PAGE + 64 * 1024, (st.st_blocks * 512, uncut)
    assert st.st_blocks * 512 < st.st_size // 2
    cutter.close()


def test_a_stream_that_is_not_the_rings_is_named(tmp_path: Path, stream: bytes) -> None:
    cutter = RingCutter(tmp_path / ffmpeg.RING_FILE, tmp_path, 2, 0)
    cutter.source.write_bytes(b"\x00\x00\x00\x10junkjunkjunkjunk" + stream)
    with pytest.raises(Mp4Error, match="starts with b'junk'"):
        cutter.poll()
    cutter.close()

    cutter = RingCutter(tmp_path / ffmpeg.RING_FILE, tmp_path, 2, 0)
    cutter.source.write_bytes(stream[:40] + b"\x00\x00\x00\x03moof")  # a box smaller than its header
    header = fmp4.boxes(stream)
    first_two = [next(header), next(header)]
    cutter.source.write_bytes(stream[: first_two[1][2]] + b"\x00\x00\x00\x03moof")
    with pytest.raises(Mp4Error, match="impossible size"):
        cutter.poll()
    cutter.close()


def test_a_killed_ffmpeg_keeps_every_complete_fragment(tmp_path: Path, stream: bytes) -> None:
    cutter = RingCutter(tmp_path / ffmpeg.RING_FILE, tmp_path, 3, 0)
    cut_at = len(stream) - 3000  # the last fragment cut short, as SIGKILL leaves it
    cuts = feed(cutter, stream[:cut_at], [])
    assert [(start, end) for _, start, end in cuts] == [(0.0, 3.0), (3.0, 6.0)]
    last = cutter.finish()
    # Seconds 6 and 7 were complete: they are the last segment; the 9th second was cut short.
    assert [(c.media_start, c.media_end) for c in last] == [(6.0, 8.0)]
    seg = fmp4.read_segment(tmp_path / last[0].name)
    assert seg.damage is None and len(seg.fragments) == 2
    assert not os.path.exists(cutter.source)
