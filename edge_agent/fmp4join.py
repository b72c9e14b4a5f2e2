"""Join fragmented-MP4 segments into one MP4 by copying their fragments: no FFmpeg, no remux.

A segment's fragments count their decode times from 0 and number themselves from 1, because every
segment is a muxer of its own (`edge_agent.fmp4` reads them). Joining them is a copy:

    ftyp + moov of the first segment (with the total duration: mvhd, tkhd, mvex/mehd)
    + every complete moof+mdat of every segment, in order, with its `mfhd` sequence number and
      `tfdt` decode time rewritten to run on from the fragment before (the bytes keep their size)
    + an `mfra` index of the fragments that start with a keyframe (for seeking)

`moov` comes first, so the file plays while it downloads, as `+faststart` does for a plain MP4. This
replaced an FFmpeg concat (a remux of every packet plus a `+faststart` second pass and an ffprobe):
0.24 CPU-s per minute of 1080p, most of what recording it costs, against 0.02 for the copy with its
sha256 (`bench/bench_forms.py`, docs/results/forms_20261206-160406.json). Segments whose tracks differ
(a camera that came back with another resolution) cannot be joined by copying: `Incompatible` tells
the caller to fall back to FFmpeg's concat.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge_agent.fmp4 import Incompatible, Mp4Error, Segment, Track, box, boxes, child, header_len, read_segment, u32

COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Joined:
    """The result of a join: what the MP4 holds and what was left out."""

    path: Path
    size: int
    sha256: str
    seconds: float
    codec: str
    width: int
    height: int
    fragments: int
    unusable: tuple[str, ...]  # segment names with no usable fragment (set aside by the caller)
    damaged: tuple[tuple[str, str], ...]  # (segment name, why its reading stopped early)


def _patched_moov(moov_box: bytes, track: Track, duration: int) -> bytes:
    """`moov` with the total duration in mvhd, the video tkhd and a fresh mvex/mehd (movie timescale)."""
    movie = duration * track.movie_timescale // track.timescale
    body = bytearray(moov_box[header_len(moov_box) :])
    out = bytearray()
    for kind, start, stop in boxes(bytes(body)):
        child = bytearray(body[start:stop])
        if kind == b"mvhd":
            _write_duration(child, 24 if child[0] == 1 else 16, child[0], movie)
        elif kind == b"trak":
            child = bytearray(_patched_trak(bytes(child), track.track_id, movie))
        elif kind == b"mvex":
            kept = b"".join(box(k, bytes(child[b:e])) for k, b, e in boxes(bytes(child)) if k != b"mehd")
            child = bytearray(box(b"mehd", struct.pack(">IQ", 1 << 24, movie)) + kept)
        out += box(kind, bytes(child))
    return box(b"moov", bytes(out))


def _write_duration(child: bytearray, at: int, version: int, value: int) -> None:
    """Write a header box's duration field (64-bit in version 1 boxes, 32-bit otherwise)."""
    if len(child) < at + (8 if version == 1 else 4):
        raise Mp4Error("a header box too short for its duration")
    if version == 1:
        struct.pack_into(">Q", child, at, value)
    else:
        struct.pack_into(">I", child, at, min(value, 0xFFFFFFFF))


def _patched_trak(trak: bytes, track_id: int, movie_duration: int) -> bytes:
    tkhd, _ = child(trak, 0, len(trak), b"tkhd")
    if u32(trak, tkhd + (20 if trak[tkhd] == 1 else 12)) != track_id:
        return trak
    patched = bytearray(trak)
    at = tkhd + (28 if trak[tkhd] == 1 else 20)
    _write_duration(patched, at, trak[tkhd], movie_duration)
    return bytes(patched)


def _mfra(track_id: int, index: list[tuple[int, int]]) -> bytes:
    """A movie fragment random access box: (decode time, moof offset) of each keyframe fragment."""
    entries = b"".join(struct.pack(">QQBBB", t, offset, 1, 1, 1) for t, offset in index)
    tfra = box(b"tfra", struct.pack(">IIII", 1 << 24, track_id, 0, len(index)) + entries)
    mfro_size = 8 + len(tfra) + 16
    return box(b"mfra", tfra + box(b"mfro", struct.pack(">II", 0, mfro_size)))


class _HashingWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)


def join(paths: list[Path], output: Path) -> Joined:
    """Join the segments at `paths` (in order) into `output`; Incompatible if their tracks differ.

    Segments with no usable fragment are left out and named in `unusable`; a segment whose reading
    stopped early (a cut-off tail) gives what it has and is named in `damaged`. Mp4Error when no
    segment has a fragment. `output` is written but not fsynced (the caller owns durability).
    """
    segments: list[Segment] = []
    unusable: list[str] = []
    damaged: list[tuple[str, str]] = []
    for path in paths:
        try:
            seg = read_segment(path)
        except (Mp4Error, struct.error) as exc:
            unusable.append(path.name)
            damaged.append((path.name, str(exc)))
            continue
        if seg.damage:
            damaged.append((path.name, seg.damage))
        if not seg.fragments:
            unusable.append(path.name)
            continue
        segments.append(seg)
    if not segments:
        raise Mp4Error("no segment holds a complete fragment")
    first = segments[0].track
    for seg in segments[1:]:
        if (seg.track.timescale, seg.track.sample_entry, seg.track.track_id) != (
            first.timescale, first.sample_entry, first.track_id,
        ):  # fmt: skip
            raise Incompatible(f"{seg.path.name} holds another stream ({seg.track.codec} "
                               f"{seg.track.width}x{seg.track.height}) than {segments[0].path.name}")  # fmt: skip
    total = sum(seg.duration for seg in segments)
    index: list[tuple[int, int]] = []
    sequence = 0
    base = 0
    with output.open("wb") as f:
        out = _HashingWriter(f)
        out.write(segments[0].ftyp)
        out.write(_patched_moov(segments[0].moov, first, total))
        for seg in segments:
            with seg.path.open("rb") as src:
                start = seg.fragments[0].decode_time
                for frag in seg.fragments:
                    sequence += 1
                    decode_time = base + frag.decode_time - start
                    moof = bytearray(frag.moof)
                    struct.pack_into(">I", moof, frag.mfhd_at, sequence)
                    if frag.tfdt_version == 1:
                        struct.pack_into(">Q", moof, frag.tfdt_at, decode_time)
                    elif decode_time <= 0xFFFFFFFF:
                        struct.pack_into(">I", moof, frag.tfdt_at, decode_time)
                    else:
                        raise Incompatible("a 32-bit fragment decode time overflows in the joined file")
                    if frag.keyframe:
                        index.append((decode_time, out.size))
                    out.write(bytes(moof))
                    _copy(src, frag.mdat_offset, frag.mdat_size, out)
            base += seg.duration
        out.write(_mfra(first.track_id, index))
        size, digest = out.size, out.sha.hexdigest()
    return Joined(output, size, digest, total / first.timescale, first.codec, first.width, first.height,
                  sequence, tuple(unusable), tuple(damaged))  # fmt: skip


def _copy(src: BinaryIO, offset: int, size: int, out: _HashingWriter) -> None:
    src.seek(offset)
    left = size
    while left:
        chunk = src.read(min(COPY_CHUNK, left))
        if not chunk:
            raise Mp4Error(f"{src.name} ended while copying its mdat")  # the file shrank under us
        out.write(chunk)
        left -= len(chunk)


