"""Minimal fragmented-MP4 segments built in Python, shaped as FFmpeg's segment muxer writes them
(and the recording spec the finalising tests share).

For unit tests that need joinable segments without FFmpeg (the recorder against a fake FFmpeg, the
join's edge cases): `ftyp`, a `moov` with one H.264 video track and `mvex/trex`, then one
`moof`+`mdat` fragment per call of `fragment`, decode times counted from 0 in each segment. The
samples are not decodable video, only the boxes are right: `edge_agent.fmp4` reads boxes, not frames.
"""

from __future__ import annotations

import struct
from pathlib import Path

from edge_agent.ffmpeg import StreamInput
from edge_agent.fmp4 import box
from edge_agent.recording import RecordingSpec

TIMESCALE = 12800  # FFmpeg's mov muxer for 25 fps sources
FRAME = TIMESCALE // 25
SAMPLE = b"\x00\x00\x00\x10" + b"\x65" * 16  # one fake NAL unit per sample


def full(kind: bytes, version: int, flags: int, body: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags) + body)


def init_segment(width: int = 320, height: int = 240, track_id: int = 1) -> bytes:
    """`ftyp` and an empty (fragmented) `moov` for one video track."""
    ftyp = box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso6iso2avc1mp41")
    mvhd = full(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0) + b"\x00" * 80)
    tkhd = full(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0) + b"\x00" * 52
                + struct.pack(">II", width << 16, height << 16))  # fmt: skip
    mdhd = full(b"mdhd", 0, 0, struct.pack(">IIII", 0, 0, TIMESCALE, 0) + b"\x55\xc4\x00\x00")
    hdlr = full(b"hdlr", 0, 0, b"\x00" * 4 + b"vide" + b"\x00" * 12 + b"VideoHandler\x00")
    avcc = box(b"avcC", b"\x01\x42\xc0\x1e\xff\xe1\x00\x04\x67\x42\xc0\x1e\x01\x00\x04\x68\xce\x3c\x80")
    avc1 = box(b"avc1", b"\x00" * 6 + struct.pack(">H", 1) + b"\x00" * 16 + struct.pack(">HH", width, height)
               + b"\x00\x48\x00\x00\x00\x48\x00\x00" + b"\x00" * 4 + struct.pack(">H", 1) + b"\x00" * 32
               + struct.pack(">Hh", 24, -1) + avcc)  # fmt: skip
    stsd = full(b"stsd", 0, 0, struct.pack(">I", 1) + avc1)
    empty_tables = b"".join(full(k, 0, 0, struct.pack(">I", 0)) for k in (b"stts", b"stsc", b"stco"))
    stsz = full(b"stsz", 0, 0, struct.pack(">II", 0, 0))
    stbl = box(b"stbl", stsd + empty_tables + stsz)
    minf = box(b"minf", full(b"vmhd", 0, 1, b"\x00" * 8) + stbl)
    trak = box(b"trak", tkhd + box(b"mdia", mdhd + hdlr + minf))
    trex = full(b"trex", 0, 0, struct.pack(">IIIII", track_id, 1, 0, 0, 0))
    moov = box(b"moov", mvhd + trak + box(b"mvex", trex))
    return ftyp + moov


def fragment(sequence: int, decode_time: int, frames: int, track_id: int = 1) -> bytes:
    """One `moof`+`mdat`: `frames` samples of FRAME ticks, the first a keyframe."""
    mfhd = full(b"mfhd", 0, 0, struct.pack(">I", sequence))
    # default-base-is-moof, default duration and size; first sample flags given in the trun
    tfhd = full(b"tfhd", 0, 0x020018, struct.pack(">III", track_id, FRAME, len(SAMPLE)))
    tfdt = full(b"tfdt", 1, 0, struct.pack(">Q", decode_time))
    trun_size = 8 + 4 + 4 + 4 + 4  # header, count, data offset, first sample flags
    traf_size = 8 + len(tfhd) + len(tfdt) + trun_size
    moof_size = 8 + len(mfhd) + traf_size
    trun = full(b"trun", 0, 0x000005, struct.pack(">IiI", frames, moof_size + 8, 0x02000000))
    moof = box(b"moof", mfhd + box(b"traf", tfhd + tfdt + trun))
    assert len(moof) == moof_size
    return moof + box(b"mdat", SAMPLE * frames)


def segment(fragments: int, frames_per_fragment: int = 25, width: int = 320, height: int = 240) -> bytes:
    """A whole segment file's bytes: init, then `fragments` fragments of a second each (at 25 fps)."""
    parts = [init_segment(width, height)]
    for i in range(fragments):
        parts.append(fragment(i + 1, i * frames_per_fragment * FRAME, frames_per_fragment))
    return b"".join(parts)


def finalise_spec(tmp: Path) -> RecordingSpec:
    """A recording spec for finalising tests: task `cam1/t`, segments in `tmp/.t.segments`, MP4 `tmp/t.mp4`."""
    return RecordingSpec(
        task_id="cam1/t", camera_id="cam1", stream=StreamInput("rtsp://u:p@h/s"), mode="copy",
        segment_dir=tmp / ".t.segments", output_file=tmp / "t.mp4", ffmpeg="ffmpeg", ffprobe="ffprobe",
        segment_seconds=2, first_frame_timeout=5, stall_timeout=5, stop_timeout=5, restart_backoff_max=1,
        max_restarts=1, probe_timeout=15, preset="ultrafast", stats_period=2.0,
    )  # fmt: skip
