"""Unit tests of the pure FFmpeg helpers: command lines as lists, probe/progress parsing, redaction."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edge_agent import ffmpeg
from edge_agent.errors import FFmpegNotFound

SEG_DIR = Path("/rec/cam1/.t.segments")
RTSP = "rtsp://admin:pw@192.0.2.10:554/s"
CAM = ffmpeg.StreamInput(RTSP)


def opt(argv: list[str], name: str) -> str:
    """The value following option `name` (fails the test when absent)."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


# ---- record_argv ------------------------------------------------------------------------------


def test_copy_mode_argv() -> None:
    argv = ffmpeg.record_argv("/usr/bin/ffmpeg", CAM, SEG_DIR, mode="copy", segment_seconds=6, start_number=7)
    assert argv[0] == "/usr/bin/ffmpeg"
    assert opt(argv, "-c:v") == "copy"
    assert "libx264" not in argv
    assert "-force_key_frames" not in argv
    assert opt(argv, "-i") == RTSP
    assert opt(argv, "-segment_time") == "6"
    assert opt(argv, "-segment_start_number") == "7"
    assert opt(argv, "-f") == "segment"
    assert opt(argv, "-segment_format") == "mp4"
    # Fragmented, self-contained fragments (movable by the copying join), flushed as written.
    fmt_options = dict(kv.split("=", 1) for kv in opt(argv, "-segment_format_options").split(":"))
    assert set(fmt_options["movflags"].split("+")) >= {"", "frag_keyframe", "empty_moov", "default_base_moof"}
    assert fmt_options["flush_packets"] == "1" and int(fmt_options["frag_duration"]) <= 1_000_000
    assert opt(argv, "-progress") == "pipe:1"
    assert argv[-1] == str(SEG_DIR / ffmpeg.SEGMENT_PATTERN) and argv[-1].endswith(".mp4")
    assert "-an" in argv


def test_segment_names() -> None:
    assert ffmpeg.is_segment(Path("seg_000012.mp4")) and ffmpeg.segment_number(Path("seg_000012.mp4")) == 12
    assert ffmpeg.is_segment(Path("seg_000003.ts"))  # left by an older agent: still recovered
    for name in ("seg_x.mp4", "seg_000001.mp4.part", "concat.txt", "seg_.mp4", "other_000001.mp4"):
        assert not ffmpeg.is_segment(Path(name)), name


def test_transcode_mode_argv() -> None:
    argv = ffmpeg.record_argv("ffmpeg", CAM, SEG_DIR, mode="transcode", segment_seconds=4, preset="fast")
    assert opt(argv, "-c:v") == "libx264"
    assert "copy" not in argv
    assert opt(argv, "-pix_fmt") == "yuv420p"
    assert opt(argv, "-preset") == "fast"
    scale = opt(argv, "-vf")
    assert "trunc(iw/2)*2" in scale
    assert "trunc(ih/2)*2" in scale
    assert opt(argv, "-force_key_frames") == "expr:gte(t,n_forced*4)"


def test_rtsp_input_options_precede_input() -> None:
    argv = ffmpeg.record_argv("ffmpeg", ffmpeg.StreamInput(RTSP, transport="udp", timeout_s=2.5), SEG_DIR, mode="copy")
    assert opt(argv, "-rtsp_transport") == "udp"
    assert opt(argv, "-timeout") == "2500000"  # microseconds
    assert argv.index("-rtsp_transport") < argv.index("-i")
    assert argv.index("-timeout") < argv.index("-i")


def test_rtsps_input_gets_rtsp_options() -> None:
    argv = ffmpeg.record_argv("ffmpeg", ffmpeg.StreamInput("rtsps://cam/s", timeout_s=10), SEG_DIR, mode="copy")
    assert opt(argv, "-timeout") == "10000000"


@pytest.mark.parametrize("url", ["/videos/sample.mp4", "http://cam/stream.m3u8", "udp://239.0.0.1:1234"])
def test_non_rtsp_inputs_have_no_rtsp_options(url: str) -> None:
    argv = ffmpeg.record_argv("ffmpeg", ffmpeg.StreamInput(url), SEG_DIR, mode="copy")
    assert "-rtsp_transport" not in argv
    assert "-timeout" not in argv
    assert opt(argv, "-i") == url


def test_probe_argv_rtsp_and_file() -> None:
    stream = ffmpeg.StreamInput(RTSP, timeout_s=1, analyzeduration_us=1, probesize=64)
    argv = ffmpeg.probe_argv("ffprobe", stream)
    assert opt(argv, "-timeout") == "1000000"
    assert opt(argv, "-i") == RTSP and opt(argv, "-probesize") == "64" and opt(argv, "-analyzeduration") == "1"
    assert opt(argv, "-of") == "json"
    argv = ffmpeg.probe_argv("ffprobe", ffmpeg.StreamInput("/x.mp4"))
    assert "-rtsp_transport" not in argv


def test_probe_and_record_read_a_camera_the_same_way() -> None:
    """One StreamInput: the probe and the recording get the same input options, in the same order."""
    stream = ffmpeg.StreamInput(RTSP, transport="udp", timeout_s=3, analyzeduration_us=7, probesize=99)
    probe = ffmpeg.probe_argv("ffprobe", stream)
    record = ffmpeg.record_argv("ffmpeg", stream, SEG_DIR, mode="copy")
    inputs = stream.input_options()
    assert inputs[-2:] == ["-i", RTSP]
    for argv in (probe, record):
        start = argv.index(inputs[0])
        assert argv[start : start + len(inputs)] == inputs
    assert RTSP not in repr(stream)  # the URL (and any password in it) stays out of logs


# ---- concat ------------------------------------------------------------------------------------


def test_concat_argv() -> None:
    argv = ffmpeg.concat_argv("ffmpeg", Path("/tmp/list.txt"), Path("/rec/out.mp4"))
    assert opt(argv, "-movflags") == "+faststart"
    assert opt(argv, "-c") == "copy"
    assert opt(argv, "-f") == "concat"
    assert opt(argv, "-i") == "/tmp/list.txt"
    assert argv[-1] == "/rec/out.mp4"
    assert "-nostdin" in argv


def test_concat_list_quotes_paths(tmp_path: Path) -> None:
    seg = tmp_path / "it's.ts"
    text = ffmpeg.concat_list([seg, tmp_path / "b.ts"])
    lines = text.splitlines()
    assert lines[0] == "file '" + str(seg.resolve()).replace("'", "'\\''") + "'"
    assert lines[1].endswith("b.ts'")
    assert lines[2:] == list(ffmpeg.UNPROBED_SEGMENT)  # only segments after the first skip probing
    assert text.endswith("\n")


# ---- redact --------------------------------------------------------------------------------------


def test_redact_url_credentials() -> None:
    text = "error opening rtsp://admin:hunter2@192.0.2.10:554/s and http://u:p@h/x"
    out = ffmpeg.redact(text)
    assert "hunter2" not in out
    assert "admin" not in out
    assert "rtsp://***@192.0.2.10:554/s" in out
    assert "http://***@h/x" in out


def test_redact_known_secrets() -> None:
    out = ffmpeg.redact("auth failed with hunter2 (key AKIAXYZ)", ("hunter2", "AKIAXYZ"))
    assert "hunter2" not in out
    assert "AKIAXYZ" not in out
    assert out.count("***") == 2


def test_redact_leaves_plain_urls() -> None:
    assert ffmpeg.redact("rtsp://192.0.2.10:554/s") == "rtsp://192.0.2.10:554/s"


# ---- probe parsing ---------------------------------------------------------------------------------


def probe_json(codec: str, pix_fmt: str, width: int, height: int, duration: str | None = None) -> str:
    doc: dict[str, object] = {"streams": [{"codec_name": codec, "pix_fmt": pix_fmt, "width": width, "height": height}]}
    if duration is not None:
        doc["format"] = {"duration": duration}
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("codec", "pix_fmt", "width", "height", "compatible"),
    [
        ("h264", "yuv420p", 1920, 1080, True),
        ("h264", "yuvj420p", 640, 480, True),
        ("hevc", "yuv420p", 1920, 1080, False),
        ("h264", "yuv422p", 1920, 1080, False),
        ("h264", "yuv420p", 641, 480, False),
        ("h264", "yuv420p", 640, 481, False),
    ],
)
def test_parse_probe_browser_compatible(codec: str, pix_fmt: str, width: int, height: int, compatible: bool) -> None:
    info = ffmpeg.parse_probe(probe_json(codec, pix_fmt, width, height))
    assert info == ffmpeg.StreamInfo(codec, pix_fmt, width, height)
    assert info.browser_compatible is compatible


@pytest.mark.parametrize("output", ["", "not json", '{"streams": []}', "{}"])
def test_parse_probe_without_stream(output: str) -> None:
    assert ffmpeg.parse_probe(output) is None


def test_parse_file_probe_duration() -> None:
    info = ffmpeg.parse_file_probe(probe_json("h264", "yuv420p", 320, 240, duration="12.480000"))
    assert info is not None
    assert info.duration == pytest.approx(12.48)
    assert info.codec == "h264"
    assert ffmpeg.parse_file_probe('{"streams": []}') is None


# ---- progress -----------------------------------------------------------------------------------


def test_last_frame_count_takes_the_newest_block() -> None:
    chunk = b"frame=10\nfps=25.0\nout_time_us=400000\nprogress=continue\nframe=35\nstream_0_0_q=-1.0\nprogress=continue"
    assert ffmpeg.last_frame_count(chunk) == 35


def test_last_frame_count_unknown() -> None:
    assert ffmpeg.last_frame_count(b"") is None
    assert ffmpeg.last_frame_count(b"fps=25.0\nprogress=continue") is None
    assert ffmpeg.last_frame_count(b"frame=N/A\nprogress=continue") is None
    assert ffmpeg.last_frame_count(b"dup_frames=7\nframe=3\r") == 3  # only whole `frame=` lines count


# ---- resolve_executable ------------------------------------------------------------------------------


def test_resolve_executable_by_name() -> None:
    found = ffmpeg.resolve_executable("ffmpeg")
    assert os.path.isabs(found)
    assert found == shutil.which("ffmpeg")


def test_resolve_executable_by_path(tmp_path: Path) -> None:
    exe = tmp_path / "myffmpeg"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert ffmpeg.resolve_executable(str(exe)) == str(exe)


def test_resolve_missing_name() -> None:
    with pytest.raises(FFmpegNotFound, match=r"'ffmpeg-does-not-exist' not found on PATH"):
        ffmpeg.resolve_executable("ffmpeg-does-not-exist")


def test_resolve_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "bin" / "ffmpeg"
    with pytest.raises(FFmpegNotFound, match="not found or not executable") as info:
        ffmpeg.resolve_executable(str(missing), "ffprobe")
    assert str(missing) in str(info.value)
    assert "ffprobe" in str(info.value)


def test_resolve_non_executable_path(tmp_path: Path) -> None:
    plain = tmp_path / "ffmpeg"
    plain.write_text("")
    plain.chmod(0o644)
    with pytest.raises(FFmpegNotFound):
        ffmpeg.resolve_executable(str(plain))


def test_resolve_empty() -> None:
    with pytest.raises(FFmpegNotFound, match=r"recording\.ffmpeg_path is empty"):
        ffmpeg.resolve_executable("  ")


def test_ffprobe_next_to() -> None:
    assert ffmpeg.ffprobe_next_to("/opt/ff/bin/ffmpeg") == "/opt/ff/bin/ffprobe"


def test_segment_list_goes_to_the_given_fd_as_csv() -> None:
    argv = ffmpeg.record_argv("ffmpeg", CAM, Path("/tmp/seg"), mode="copy", segment_list_fd=7)
    i = argv.index("-segment_list")
    assert argv[i + 1] == "pipe:7" and argv[argv.index("-segment_list_type") + 1] == "csv"
    assert argv.index("-segment_list") < argv.index(str(Path("/tmp/seg") / ffmpeg.SEGMENT_PATTERN))
    assert "-segment_list" not in ffmpeg.record_argv("ffmpeg", CAM, Path("/tmp/seg"), mode="copy")


def test_parse_segment_line() -> None:
    assert ffmpeg.parse_segment_line("seg_000003.ts,6.000000,8.500000\n") == ("seg_000003.ts", 2.5)
    assert ffmpeg.parse_segment_line("garbage") is None
    assert ffmpeg.parse_segment_line("a.ts,x,y") is None


def test_a_probe_cut_short_is_not_complete() -> None:
    cut = ffmpeg.parse_probe('{"streams":[{"codec_name":"h264","width":0,"height":0}]}')
    assert cut is not None and not cut.complete
    full = ffmpeg.parse_probe('{"streams":[{"codec_name":"h264","pix_fmt":"yuv420p","width":1280,"height":720}]}')
    assert full is not None and full.complete and full.browser_compatible
