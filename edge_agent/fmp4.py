"""Fragmented-MP4 segments read box by box: what each holds, and where a cut-off file stops making sense.

The recorder has FFmpeg's segment muxer write every segment as a fragmented MP4 (`ftyp`, an empty
`moov`, then a `moof`+`mdat` pair about every second, then `mfra`). Each fragment is flushed to
the file as it is written, so a killed FFmpeg leaves every fragment but the one in progress.

The reader is strict about what it keeps and tolerant of where a file ends: a segment is read box
by box and the scan stops at the first box that is cut short or does not add up (a `trun` pointing
past its `mdat`), keeping every fragment before it. Joining the fragments of several segments into
one MP4 is `edge_agent.fmp4join`. Pure functions over files; nothing here starts a process.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CODECS = {b"avc1": "h264", b"avc3": "h264", b"hvc1": "hevc", b"hev1": "hevc", b"mp4v": "mpeg4"}
MAX_HEADER_BOX_BYTES = 16 * 1024 * 1024  # a moov or moof is a few KB; more is not ours
NON_SYNC_SAMPLE = 0x00010000  # sample_is_non_sync_sample in the sample flags

# tfhd flags
TFHD_BASE_DATA_OFFSET = 0x000001
TFHD_SAMPLE_DESCRIPTION_INDEX = 0x000002
TFHD_DEFAULT_DURATION = 0x000008
TFHD_DEFAULT_SIZE = 0x000010
TFHD_DEFAULT_FLAGS = 0x000020
# trun flags
TRUN_DATA_OFFSET = 0x000001
TRUN_FIRST_SAMPLE_FLAGS = 0x000004
TRUN_DURATION = 0x000100
TRUN_SIZE = 0x000200
TRUN_FLAGS = 0x000400
TRUN_CTO = 0x000800


class Mp4Error(ValueError):
    """The bytes are not a fragmented MP4 this module can join (the message says what is wrong)."""


class Incompatible(Mp4Error):
    """Segments whose tracks differ: they cannot be joined by copying fragments."""


@dataclass(frozen=True)
class Track:
    """The one video track of a segment, as its `moov` describes it."""

    track_id: int
    timescale: int  # of the media (mdhd): the unit of tfdt and sample durations
    movie_timescale: int  # of the movie (mvhd): the unit of mehd, mvhd and tkhd durations
    codec: str
    width: int
    height: int
    sample_entry: bytes  # the whole stsd: equal in segments that can be joined
    default_duration: int
    default_size: int
    default_flags: int


@dataclass(frozen=True)
class Fragment:
    """One complete moof+mdat of a segment file."""

    moof: bytes  # the whole box, header included
    mdat_offset: int  # where the mdat box (header included) starts in the segment file
    mdat_size: int
    decode_time: int  # tfdt as written
    duration: int  # sum of its sample durations (track timescale)
    samples: int
    keyframe: bool  # the first sample is a sync sample
    mfhd_at: int  # offset of the sequence number within `moof`
    tfdt_at: int  # offset of the decode time within `moof`
    tfdt_version: int


@dataclass(frozen=True)
class Segment:
    """What a segment file holds that can be joined, and where the reading stopped early, if it did."""

    path: Path
    ftyp: bytes
    moov: bytes
    track: Track
    fragments: tuple[Fragment, ...]
    damage: str | None  # None: the file ends cleanly after its last fragment (or its mfra)

    @property
    def duration(self) -> int:
        """Track-timescale span from the first fragment's start to the last one's end."""
        if not self.fragments:
            return 0
        first, last = self.fragments[0], self.fragments[-1]
        return last.decode_time - first.decode_time + last.duration

    @property
    def seconds(self) -> float:
        return self.duration / self.track.timescale


# ---- boxes -------------------------------------------------------------------------------------


def _box_header(data: bytes, pos: int, end: int) -> tuple[bytes, int, int]:
    """(type, body start, box end) of the box at data[pos:]; Mp4Error if it does not fit in `end`."""
    if end - pos < 8:
        raise Mp4Error(f"truncated box header at byte {pos}")
    size, kind = struct.unpack_from(">I4s", data, pos)
    header = 8
    if size == 1:
        if end - pos < 16:
            raise Mp4Error(f"truncated large box header at byte {pos}")
        (size,) = struct.unpack_from(">Q", data, pos + 8)
        header = 16
    elif size == 0:
        size = end - pos
    if size < header or pos + size > end:
        raise Mp4Error(f"box {kind!r} at byte {pos} runs past its parent")
    return kind, pos + header, pos + size


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, body start, body end) of each box in data[start:end]; Mp4Error if they do not tile it."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        kind, body, stop = _box_header(data, pos, end)
        yield kind, body, stop
        pos = stop


def child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int]:
    for k, body, stop in boxes(data, start, end):
        if k == kind:
            return body, stop
    raise Mp4Error(f"no {kind.decode('latin-1')} box")


def _path(data: bytes, start: int, end: int, *kinds: bytes) -> tuple[int, int]:
    for kind in kinds:
        start, end = child(data, start, end, kind)
    return start, end


def box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(body), kind) + body


def u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from(">I", data, pos)[0])


def u64(data: bytes, pos: int) -> int:
    return int(struct.unpack_from(">Q", data, pos)[0])


# ---- reading a segment -------------------------------------------------------------------------


def read_track(moov: bytes) -> Track:
    """The video track of a fragmented `moov` body; Mp4Error if there is none or it is not fragmented."""
    mvhd, _ = child(moov, 0, len(moov), b"mvhd")
    movie_timescale = u32(moov, mvhd + (20 if moov[mvhd] == 1 else 12))
    tracks = []
    for kind, body, stop in boxes(moov):
        if kind == b"trak":
            hdlr, _ = _path(moov, body, stop, b"mdia", b"hdlr")
            if moov[hdlr + 8 : hdlr + 12] == b"vide":
                tracks.append((body, stop))
    if len(tracks) != 1:
        raise Mp4Error(f"{len(tracks)} video tracks (one expected)")
    body, stop = tracks[0]
    tkhd, _ = child(moov, body, stop, b"tkhd")
    track_id = u32(moov, tkhd + (20 if moov[tkhd] == 1 else 12))
    mdhd, _ = _path(moov, body, stop, b"mdia", b"mdhd")
    timescale = u32(moov, mdhd + (20 if moov[mdhd] == 1 else 12))
    stsd, stsd_end = _path(moov, body, stop, b"mdia", b"minf", b"stbl", b"stsd")
    if stsd_end - stsd < 8 + 36 or u32(moov, stsd + 4) < 1:
        raise Mp4Error("video track without a sample description")
    entry = stsd + 8  # full box header (4) + entry count (4)
    fourcc = moov[entry + 4 : entry + 8]
    width, height = struct.unpack_from(">HH", moov, entry + 32)
    mvex, mvex_end = child(moov, 0, len(moov), b"mvex")
    defaults = (0, 0, 0)
    for kind, trex, _ in boxes(moov, mvex, mvex_end):
        if kind == b"trex" and u32(moov, trex + 4) == track_id:
            defaults = (u32(moov, trex + 12), u32(moov, trex + 16), u32(moov, trex + 20))
    if timescale == 0 or movie_timescale == 0:
        raise Mp4Error("a zero timescale")
    return Track(track_id, timescale, movie_timescale, CODECS.get(fourcc, fourcc.decode("latin-1").strip()),
                 width, height, moov[stsd:stsd_end], *defaults)  # fmt: skip


@dataclass(frozen=True)
class _Traf:
    decode_time: int
    tfdt_at: int
    tfdt_version: int
    duration: int
    samples: int
    keyframe: bool
    data_offset: int  # from the moof's first byte
    data_size: int


def _read_traf(moof: bytes, start: int, end: int, track: Track) -> _Traf:
    """The one track fragment of a moof: its timing, its first sample's sync flag and its data span."""
    tfhd, _ = child(moof, start, end, b"tfhd")
    flags = u32(moof, tfhd) & 0xFFFFFF
    if u32(moof, tfhd + 4) != track.track_id:
        raise Mp4Error("a fragment of another track")
    if flags & TFHD_BASE_DATA_OFFSET:
        raise Mp4Error("a fragment with an absolute base data offset (cannot be moved)")
    pos = tfhd + 8 + (4 if flags & TFHD_SAMPLE_DESCRIPTION_INDEX else 0)
    duration, size, sample_flags = track.default_duration, track.default_size, track.default_flags
    if flags & TFHD_DEFAULT_DURATION:
        duration, pos = u32(moof, pos), pos + 4
    if flags & TFHD_DEFAULT_SIZE:
        size, pos = u32(moof, pos), pos + 4
    if flags & TFHD_DEFAULT_FLAGS:
        sample_flags = u32(moof, pos)
    tfdt, _ = child(moof, start, end, b"tfdt")
    version = moof[tfdt]
    decode_time = u64(moof, tfdt + 4) if version == 1 else u32(moof, tfdt + 4)
    trun, trun_end = child(moof, start, end, b"trun")
    tflags = u32(moof, trun) & 0xFFFFFF
    count = u32(moof, trun + 4)
    pos = trun + 8
    data_offset = 0
    if tflags & TRUN_DATA_OFFSET:
        data_offset, pos = struct.unpack_from(">i", moof, pos)[0], pos + 4
    first_flags = None
    if tflags & TRUN_FIRST_SAMPLE_FLAGS:
        first_flags, pos = u32(moof, pos), pos + 4
    per_sample = 4 * sum(1 for bit in (TRUN_DURATION, TRUN_SIZE, TRUN_FLAGS, TRUN_CTO) if tflags & bit)
    if pos + count * per_sample > trun_end:
        raise Mp4Error("a trun shorter than its sample count")
    if count == 0:
        raise Mp4Error("a fragment without samples")
    total_duration = total_size = 0
    key = False
    for i in range(count):
        d, s, f = duration, size, sample_flags
        if tflags & TRUN_DURATION:
            d, pos = u32(moof, pos), pos + 4
        if tflags & TRUN_SIZE:
            s, pos = u32(moof, pos), pos + 4
        if tflags & TRUN_FLAGS:
            f, pos = u32(moof, pos), pos + 4
        if tflags & TRUN_CTO:
            pos += 4
        if i == 0:
            key = not ((first_flags if first_flags is not None else f) & NON_SYNC_SAMPLE)
        total_duration += d
        total_size += s
    return _Traf(decode_time, tfdt + 4, version, total_duration, count, key, data_offset, total_size)


def read_segment(path: Path) -> Segment:
    """Read the joinable part of one segment file; Mp4Error if it has no usable header (ftyp, moov)."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        ftyp, pos = _read_box(f, 0, size, b"ftyp")
        moov_box, pos = _read_box(f, pos, size, b"moov")
        moov = moov_box[header_len(moov_box) :]
        track = read_track(moov)
        fragments: list[Fragment] = []
        damage: str | None = None
        while pos < size:
            try:
                kind, box_size = _peek(f, pos, size)
                if kind in (b"mfra", b"free", b"skip"):  # FFmpeg's index at a clean end: rebuilt by the join
                    pos += box_size
                    continue
                if kind != b"moof":
                    raise Mp4Error(f"unexpected {kind!r} box at byte {pos}")
                moof, mdat_at = _read_box(f, pos, size, b"moof")
                mdat_kind, mdat_size = _peek(f, mdat_at, size)
                if mdat_kind != b"mdat":
                    raise Mp4Error(f"moof at byte {pos} not followed by mdat")
                fragments.append(parse_fragment(moof, pos, mdat_at, mdat_size, track))
                pos = mdat_at + mdat_size
            except Mp4Error as exc:
                damage = f"{exc} (kept {len(fragments)} fragments, {size - pos} bytes after them)"
                break
    return Segment(path, ftyp, moov_box, track, tuple(fragments), damage)


def parse_fragment(moof: bytes, moof_at: int, mdat_at: int, mdat_size: int, track: Track) -> Fragment:
    body = header_len(moof)
    mfhd, _ = child(moof, body, len(moof), b"mfhd")
    trafs = [(b, e) for k, b, e in boxes(moof, body, len(moof)) if k == b"traf"]
    if len(trafs) != 1:
        raise Mp4Error(f"a moof with {len(trafs)} track fragments (one expected)")
    traf = _read_traf(moof, *trafs[0], track)
    data_start = moof_at + traf.data_offset  # default-base-is-moof: offsets count from the moof's first byte
    if data_start < mdat_at + 8 or data_start + traf.data_size > mdat_at + mdat_size:
        raise Mp4Error(f"samples of the fragment at byte {moof_at} lie outside its mdat")
    return Fragment(moof, mdat_at, mdat_size, traf.decode_time, traf.duration, traf.samples, traf.keyframe,
                    mfhd + 4, traf.tfdt_at, traf.tfdt_version)  # fmt: skip


def header_len(data: bytes) -> int:
    return 16 if u32(data, 0) == 1 else 8


def _peek(f: BinaryIO, pos: int, file_size: int) -> tuple[bytes, int]:
    """(type, size) of the box at `pos`; Mp4Error if it is cut short by the end of the file."""
    f.seek(pos)
    header = f.read(16)
    if len(header) < 8:
        raise Mp4Error(f"truncated box header at byte {pos}")
    size, kind = struct.unpack_from(">I4s", header)
    smallest = 8
    if size == 1:
        if len(header) < 16:
            raise Mp4Error(f"truncated large box header at byte {pos}")
        size, smallest = u64(header, 8), 16
    elif size == 0:  # "to the end of the file"
        size = file_size - pos
    if size < smallest:
        raise Mp4Error(f"box {kind!r} at byte {pos} has an impossible size ({size})")
    if pos + size > file_size:
        raise Mp4Error(f"box {kind!r} at byte {pos} is cut short ({file_size - pos} of {size} bytes)")
    return kind, size


def _read_box(f: BinaryIO, pos: int, file_size: int, kind: bytes) -> tuple[bytes, int]:
    """The whole box of type `kind` at `pos` and the position after it."""
    if pos >= file_size:
        raise Mp4Error(f"no {kind.decode('latin-1')} box (the file ends at byte {pos})")
    found, size = _peek(f, pos, file_size)
    if found != kind:
        raise Mp4Error(f"expected {kind.decode('latin-1')} at byte {pos}, found {found!r}")
    if size > MAX_HEADER_BOX_BYTES:
        raise Mp4Error(f"a {kind.decode('latin-1')} of {size} bytes is implausibly large")
    f.seek(pos)
    return f.read(size), pos + size
