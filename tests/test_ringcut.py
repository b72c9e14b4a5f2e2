"""The ring's own cutter (edge_agent.ringcut) on fragmented MP4 that real FFmpeg wrote as the ring does.

The source is FFmpeg's output in the ring's form (`ffmpeg.RING_MOVFLAGS`: one fragment per keyframe),
from a synthetic source with a keyframe every second. It is fed to the cutter as the growing file
the ring's FFmpeg writes: in one piece, and in uneven pieces (boxes cut anywhere). What is checked:
keyframe-aligned segments of the asked length, each copied out as a fragmented MP4 the join takes;
every frame kept once, decoding without an error; the media times each cut reports; dropped
segments released from the run's file (its blocks, not its size) and never copied after; a damaged
stream named; the file removed after its run ended and its last segment was dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_unit_recorder import spec

from edge_agent import buffer, ffmpeg, fmp4, fmp4join
from edge_agent.buffer import CameraBuffer
from edge_agent.fmp4 import Mp4Error
from edge_agent.ringcut import PAGE, Cut, RingCutter, RingReactor, WriteWatch, punch_supported

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


def feed(cutter: RingCutter, data: bytes, pieces: list[int]) -> list[Cut]:
    """Append `data` to the cutter's source in pieces of the given sizes, polling after each."""
    cuts: list[Cut] = []
    with cutter.source.open("ab") as f:
        pos = 0
        for size in [*pieces, len(data)]:
            f.write(data[pos : pos + size])
            f.flush()
            pos += size
            cuts += cutter.poll()
            if pos >= len(data):
                break
    return cuts


def spans(cuts: list[Cut]) -> list[tuple[int, int, float, float]]:
    return [(c.offset, c.length, c.media_start, c.media_end) for c in cuts]


def write_out(cuts: list[Cut], directory: Path) -> list[Path]:
    """Each segment as a file of its own, as a task copies it."""
    paths = []
    for i, cut in enumerate(cuts):
        path = directory / f"seg_{i:06d}.mp4"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            assert cut.file.copy(fd, cut.offset, cut.length)
        finally:
            os.close(fd)
        paths.append(path)
    return paths


def frames(path: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_packets", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return int(out.stdout.strip())


def test_cuts_keyframe_aligned_segments_that_join_into_every_frame(tmp_path: Path, stream: bytes) -> None:
    cutter = RingCutter(tmp_path / "ring_000001.mp4", 2)
    cuts = feed(cutter, stream, [])
    # Cut as soon as 2 s of fragments are in: 0-2, 2-4, 4-6, 6-8; the last second waits for the end.
    assert [(c.media_start, c.media_end) for c in cuts] == [(2.0 * i, 2.0 * i + 2) for i in range(4)]
    cuts += cutter.finish()
    assert [(c.media_start, c.media_end) for c in cuts[4:]] == [(8.0, 9.0)]
    # Contiguous ranges covering every fragment, after the header.
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(cuts))
    end = cuts[-1].offset + cuts[-1].length
    assert stream[end + 4 : end + 8] == b"mfra"  # all but FFmpeg's index at the end

    out = tmp_path / "out"
    out.mkdir()
    paths = write_out(cuts, out)
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
    # The run has ended: dropping its last segment removes its file.
    assert cutter.source.exists()
    cuts[-1].file.release(len(stream))
    assert not cutter.source.exists()


def test_a_file_written_in_uneven_pieces_cuts_the_same(tmp_path: Path, stream: bytes) -> None:
    whole = RingCutter(tmp_path / "ring_000001.mp4", 2)
    expected = spans(feed(whole, stream, []) + whole.finish())
    # Pieces of 1 to 9000 bytes: box headers, moofs and mdats split everywhere, as a poll can see them.
    sizes = [1, 3, 4, 8, 13, 500, 7, 9000, 2, 4096, 6] * 200
    pieced = RingCutter(tmp_path / "ring_000002.mp4", 2)
    assert spans(feed(pieced, stream, sizes) + pieced.finish()) == expected


def test_dropped_segments_are_released_and_never_copied(tmp_path: Path, stream: bytes) -> None:
    assert punch_supported(tmp_path), "the test directory's file system cannot punch holes"
    cutter = RingCutter(tmp_path / "ring_000001.mp4", 2)
    cuts = feed(cutter, stream, [])
    assert len(cuts) == 4
    file = cuts[0].file
    before = cutter.source.stat()
    file.release(cuts[2].offset)  # the ring drops its two oldest segments
    after = cutter.source.stat()
    assert after.st_size == before.st_size == len(stream)  # offsets FFmpeg writes at do not move
    freed = before.st_blocks * 512 - after.st_blocks * 512
    assert cuts[2].offset - 2 * PAGE <= freed <= cuts[2].offset, (freed, cuts[2].offset)
    assert file.read(cuts[1].offset, cuts[1].length) is None
    with (tmp_path / "late.mp4").open("wb") as f:
        assert not file.copy(f.fileno(), cuts[0].offset, cuts[0].length)
        assert f.tell() == 0
    data = file.read(cuts[2].offset, cuts[2].length)
    assert data is not None and data.startswith(file.init) and data[len(file.init) + 4 : len(file.init) + 8] == b"moof"
    # Stopping: the file goes at once, and nothing is read from it after.
    file.close()
    assert not cutter.source.exists()
    assert file.read(cuts[3].offset, cuts[3].length) is None


def test_a_stream_that_is_not_the_rings_is_named(tmp_path: Path, stream: bytes) -> None:
    cutter = RingCutter(tmp_path / "ring_000001.mp4", 2)
    cutter.source.write_bytes(b"\x00\x00\x00\x10junkjunkjunkjunk" + stream)
    with pytest.raises(Mp4Error, match="starts with b'junk'"):
        cutter.poll()
    cutter.close()

    cutter = RingCutter(tmp_path / "ring_000002.mp4", 2)
    boxes = fmp4.boxes(stream)
    next(boxes)
    _, _, moov_end = next(boxes)
    cutter.source.write_bytes(stream[:moov_end] + b"\x00\x00\x00\x03moof")  # smaller than its own header
    with pytest.raises(Mp4Error, match="impossible size"):
        cutter.poll()
    cutter.close()


def test_a_killed_ffmpeg_keeps_every_complete_fragment(tmp_path: Path, stream: bytes) -> None:
    cutter = RingCutter(tmp_path / "ring_000001.mp4", 3)
    cut_at = len(stream) - 3000  # the last fragment cut short, as SIGKILL leaves it
    cuts = feed(cutter, stream[:cut_at], [])
    assert [(c.media_start, c.media_end) for c in cuts] == [(0.0, 3.0), (3.0, 6.0)]
    last = cutter.finish()
    # Seconds 6 and 7 were complete: they are the last segment; the 9th second was cut short.
    assert [(c.media_start, c.media_end) for c in last] == [(6.0, 8.0)]
    (path,) = write_out(last, tmp_path)
    seg = fmp4.read_segment(path)
    assert seg.damage is None and len(seg.fragments) == 2


@pytest.mark.parametrize("shared", [False, True], ids=["own-thread", "reactor"])
def test_a_ring_on_a_real_camera_rotates_its_ffmpeg_and_keeps_its_files_bounded(tmp_path: Path, camera,
                                                                               shared: bool) -> None:  # fmt: skip
    """CameraBuffer with a real FFmpeg on the session's camera simulator: segments come from the run
    file, a run is ended after `run_seconds` and the next starts at once (a gap the tasks count), a
    finished run's file goes once its last segment is dropped, and the blocks on disk stay under the
    cap. `run_seconds` is 4 s here; in the field it bounds FFmpeg's memory once a day. Cut on the
    buffer's own thread, and by the agent's one RingReactor thread (how the agent runs rings)."""
    rec_spec = dataclasses.replace(
        spec(tmp_path, "ok"), ffmpeg="ffmpeg", ffprobe="ffprobe", stream=ffmpeg.StreamInput(camera.url("cam3")),
        segment_dir=tmp_path / "ring", stats_period=1.0, stall_timeout=10.0, first_frame_timeout=15.0,
        restart_backoff_max=1.0,
    )  # fmt: skip
    cap = 3 * 1024 * 1024
    reactor = RingReactor() if shared else None
    if reactor is not None:
        reactor.start()
    ring = CameraBuffer(rec_spec, seconds=8, max_bytes=cap, reactor=reactor)
    ring.run_seconds = 4.0
    woken: list[str] = []
    cut_on_write = ring._on_written
    ring._on_written = lambda: (woken.append(threading.current_thread().name), cut_on_write())[1]  # type: ignore[method-assign]
    ring.start()
    held: list[int] = []
    try:
        deadline = time.monotonic() + 40
        while ring._runs < 4:
            assert time.monotonic() < deadline, f"only {ring._runs} runs in 40 s"
            held.append(sum(p.stat().st_blocks * 512 for p in (tmp_path / "ring").glob(ffmpeg.RING_FILE_GLOB)))
            time.sleep(0.2)
        with ring._lock:
            segments = list(ring._ring)
        assert segments, "the ring holds nothing"
        assert len({s.run for s in segments}) >= 2, "no rotation seen in the ring's segments"
        # Contiguous stamps within a run; a rotation is a new run (a gap the tasks count), short.
        for a, b in itertools.pairwise(segments):
            if a.run == b.run:
                assert b.start == pytest.approx(a.end, abs=0.01)
            else:
                assert 0 <= b.start - a.end < 5.0, b.start - a.end
        # Old runs' files are gone once their segments are: at most the runs the ring still holds + 1.
        files = sorted((tmp_path / "ring").glob(ffmpeg.RING_FILE_GLOB))
        assert len(files) <= len({s.file.path for s in segments}) + 1, files
        newest = ring.newest()
        assert newest is not None and newest[0][4:8] == b"ftyp"
        if reactor is not None:  # the cutting happened on the reactor's thread, woken by the writes
            assert ring._watch is None and ring.poll_seconds == buffer.CUT_POLL_SECONDS
            assert len(woken) >= 4 and set(woken) == {"ring-cutter"}, woken[:5]  # writes of every run
    finally:
        ring.stop(timeout=20)
        if reactor is not None:
            reactor.stop()
            assert not reactor.is_alive()
    assert not ring.is_alive()
    assert max(held) <= cap, max(held)
    assert not list((tmp_path / "ring").glob(ffmpeg.RING_FILE_GLOB)), "run files left after the stop"


def test_ended_runs_hold_no_descriptors_until_read(tmp_path: Path, stream: bytes) -> None:
    """A camera that keeps dropping leaves a run file per drop in a long ring: they must not each
    hold a file descriptor (a day-long ring would run out of them)."""
    before = len(os.listdir("/proc/self/fd"))
    kept: list[Cut] = []
    for run in range(40):
        cutter = RingCutter(tmp_path / (ffmpeg.RING_FILE_PATTERN % run), 2)
        kept += feed(cutter, stream, []) + cutter.finish()
    assert len(os.listdir("/proc/self/fd")) <= before + 1
    assert len(list(tmp_path.glob(ffmpeg.RING_FILE_GLOB))) == 40
    # Still readable (opened when asked), and each file goes with its last segment.
    paths = write_out(kept[-5:], tmp_path)
    assert fmp4.read_segment(paths[0]).damage is None
    for cut in kept:
        cut.file.release(cut.offset + cut.length)
    assert not list(tmp_path.glob(ffmpeg.RING_FILE_GLOB))
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_out_of_inotify_watches_the_cutter_still_cuts_and_says_why(tmp_path: Path, stream: bytes) -> None:
    class FullWatch(WriteWatch):
        def watch(self, path: Path) -> int:
            raise OSError(28, f"inotify on {path}: No space left on device")

    watch = FullWatch()
    try:
        cutter = RingCutter(tmp_path / "ring_000001.mp4", 2, watch=watch.watch)
        cuts = feed(cutter, stream, [])
        assert len(cuts) == 4  # cutting goes on: the buffer polls on a timer instead
        assert cutter.unwatched is not None and "No space left" in cutter.unwatched
        cutter.finish()
    finally:
        watch.close()


def test_without_holes_the_ring_falls_back_to_the_segment_muxer(tmp_path: Path, camera,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A file system that cannot punch holes (FAT): FFmpeg's segment muxer writes segment files, the
    ring holds them whole, drops them by deleting them, and a task copies them out the same way."""
    monkeypatch.setattr(buffer, "punch_supported", lambda directory: False)
    rec_spec = dataclasses.replace(
        spec(tmp_path, "ok"), ffmpeg="ffmpeg", ffprobe="ffprobe", stream=ffmpeg.StreamInput(camera.url("cam4")),
        segment_dir=tmp_path / "ring", stats_period=1.0, stall_timeout=10.0, first_frame_timeout=15.0,
        restart_backoff_max=1.0,
    )  # fmt: skip
    ring = CameraBuffer(rec_spec, seconds=4, max_bytes=64 * 1024 * 1024)
    ring.start()
    try:
        deadline = time.monotonic() + 30
        while len(ring._ring) < 4:
            assert time.monotonic() < deadline, f"{len(ring._ring)} segments in 30 s"
            time.sleep(0.2)
        assert not ring.cut_by_agent
        assert not list((tmp_path / "ring").glob(ffmpeg.RING_FILE_GLOB))
        with ring._lock:
            segments = list(ring._ring)
        assert all(s.file.path.name.startswith("seg_") and s.offset == 0 for s in segments)
        on_disk = sorted(p.name for p in (tmp_path / "ring").glob("seg_*"))
        # The ring's segments, and at most the one FFmpeg is writing; older ones deleted.
        assert {s.file.path.name for s in segments} <= set(on_disk)
        assert len(on_disk) <= len(segments) + 1, on_disk
        out = tmp_path / "task"
        out.mkdir()
        with (out / "seg_000000.mp4").open("wb") as f:
            assert segments[-1].file.copy(f.fileno(), segments[-1].offset, segments[-1].size)
        assert fmp4.read_segment(out / "seg_000000.mp4").damage is None
        newest = ring.newest()
        assert newest is not None and newest[0][4:8] == b"ftyp"
    finally:
        ring.stop(timeout=20)
