"""A ring buffer's FFmpeg output cut into segments by the agent, not by FFmpeg's segment muxer.

FFmpeg's segment muxer costs about 10 % more CPU than the same copy into one file (it formats seven
timestamps per packet for a debug message nobody reads, and builds a muxer per segment:
`docs/results/perf_ring_vs_plain_20261206.txt`). For a ring, FFmpeg therefore writes ONE
fragmented MP4 (a fragment at every keyframe) and `RingCutter`, polled on the buffer's thread,
reads the new complete fragments from the growing file (box headers and `moof`s only: a few reads
of a few hundred bytes a second) and, as soon as the fragments gathered make a segment long enough
(every fragment starts at a keyframe), writes that segment as its own file: the run's
`ftyp`+`moov`, then its fragments, copied by the kernel (`copy_file_range`). The segment files are
what the segment muxer wrote (each a fragmented MP4 that `edge_agent.fmp4join` joins), so
everything downstream is unchanged.

The bytes cut out are then released from the growing file by punching a hole in it
(`fallocate(PUNCH_HOLE)`): its size grows, its blocks do not. A file system that cannot punch holes
(FAT on an SD card) keeps the segment muxer (`punch_supported`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.fmp4 import Fragment, Mp4Error, Track, header_len, parse_fragment, read_track

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE = 4096
MAX_MOOF_BYTES = 4 * 1024 * 1024  # a moof is a few KB: more is not FFmpeg's
MAX_MDAT_BYTES = 1 << 30  # one fragment is one GOP: a GB is not a camera's
SEGMENT_SLACK = 0.98  # a segment closes at a keyframe once it holds this share of its length

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


_inotify_init1 = _libc.inotify_init1
_inotify_init1.argtypes = [ctypes.c_int]
_inotify_add_watch = _libc.inotify_add_watch
_inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
IN_MODIFY = 0x00000002
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


class WriteWatch:
    """A file descriptor that becomes readable when a watched file is written (inotify).

    The ring's thread sleeps on it instead of polling the growing file on a timer: it wakes when
    FFmpeg writes a fragment (the kernel merges the events of one fragment's writes while they are
    unread), so a segment is cut the moment it is complete, at no cost in between. OSError where
    inotify is not available (the ring then polls on a timer).
    """

    def __init__(self) -> None:
        fd = _inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify: {os.strerror(code)}")
        self.fd = fd

    def watch(self, path: Path) -> None:
        """Wake on writes to `path` too (a watch goes by itself when its file is removed)."""
        if _inotify_add_watch(self.fd, os.fsencode(path), IN_MODIFY) < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify on {path}: {os.strerror(code)}")

    def drain(self) -> None:
        """Read the pending events (their content does not matter: the cutter looks at the file).
        One read takes them all: they are 16 bytes and the same one merged."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 65536)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset + length) of an open file, keeping its size; OSError if not."""
    if length > 0 and _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def punch_supported(directory: Path) -> bool:
    """Whether files in `directory` can have holes punched (tmpfs, ext4, XFS, Btrfs: yes; FAT: no)."""
    probe = directory / ".punch-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return False
    try:
        os.write(fd, b"\0" * (2 * PAGE))
        punch_hole(fd, 0, PAGE)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()


@dataclass(frozen=True)
class Cut:
    """One segment file written: its name, its span in the run's media time (seconds), its bytes."""

    name: str
    media_start: float
    media_end: float
    size: int


class RingCutter:
    """Reads one FFmpeg run's growing fragmented MP4 and cuts it into segment files (module docstring).

    Not thread-safe: owned by the thread that polls it. `poll()` after the file grew; `finish()` once
    FFmpeg has exited (the fragments written so far become the last segment, the file is removed).
    """

    def __init__(
        self, source: Path, segment_dir: Path, segment_seconds: float, first_number: int,
        make_room: Callable[[int], None] | None = None, watch: WriteWatch | None = None,
    ) -> None:  # fmt: skip
        """`make_room(bytes)` runs before each segment file is written, so a ring can drop old segments
        first and never hold more than its cap, even for the moment the new one is written. `watch`
        is told to watch the source once FFmpeg has created it."""
        self.source = source
        self._make_room = make_room
        self._watch = watch
        self.segment_dir = segment_dir
        self.segment_seconds = segment_seconds
        self.number = first_number  # of the next segment written
        self._fd: int | None = None
        self._pos = 0  # the next box to read
        self._init: bytes | None = None  # ftyp + moov of this run
        self._track: Track | None = None
        self._pending: list[Fragment] = []  # complete fragments of the segment being gathered
        self._pending_from = 0  # file offset of the first pending fragment's moof
        self._punched = 0  # bytes before this offset have been released

    def poll(self) -> list[Cut]:
        """The segments completed by what FFmpeg wrote since the last poll (usually none or one)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.source, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return []  # FFmpeg has not opened its output yet
            if self._watch is not None:
                self._watch.watch(self.source)
        size = os.fstat(self._fd).st_size
        cuts: list[Cut] = []
        while True:
            header = self._header(size)
            if header is None:
                return cuts
            kind, box_size = header
            if self._init is None:
                self._read_init(kind, box_size, size)
                continue
            if kind != b"moof":
                if kind in (b"mfra", b"free", b"skip"):  # FFmpeg's index at a clean end
                    self._pos += box_size
                    continue
                raise Mp4Error(f"unexpected {kind!r} box at byte {self._pos} of the ring's stream")
            fragment = self._next_fragment(box_size, size)
            if fragment is None:
                return cuts  # its mdat is not all written yet
            if not self._pending:
                self._pending_from = self._pos
            self._pending.append(fragment)
            self._pos = fragment.mdat_offset + fragment.mdat_size
            # FFmpeg starts a fragment only at a keyframe (`frag_keyframe`) and writes it whole when
            # the next keyframe arrives: a segment long enough ends here, without waiting for the
            # next fragment to be written.
            assert self._track is not None
            if sum(f.duration for f in self._pending) >= self.segment_seconds * self._track.timescale * SEGMENT_SLACK:
                cuts.append(self._cut())

    def finish(self) -> list[Cut]:
        """FFmpeg has exited: what it wrote completely since the last segment is the last segment."""
        cuts: list[Cut] = []
        try:
            with contextlib.suppress(Mp4Error):  # a killed FFmpeg leaves its last fragment cut short
                cuts = self.poll()
            if self._pending:
                cuts.append(self._cut())
        finally:
            self.close()
        return cuts

    def close(self) -> None:
        """Release the growing file (removed: the ring keeps only the segments cut from it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            self.source.unlink()

    # -- reading ---------------------------------------------------------------------------------

    def _header(self, size: int) -> tuple[bytes, int] | None:
        """(type, size) of the box at the read position if it is all written, else None."""
        assert self._fd is not None
        if size - self._pos < 8:
            return None
        head = os.pread(self._fd, 16, self._pos)
        box_size, kind = struct.unpack_from(">I4s", head)
        if box_size == 1:
            if len(head) < 16:
                return None
            box_size = struct.unpack_from(">Q", head, 8)[0]
        limit = MAX_MDAT_BYTES if kind == b"mdat" else MAX_MOOF_BYTES
        if box_size < 8 or box_size > limit:
            raise Mp4Error(f"box {kind!r} at byte {self._pos} of the ring's stream has an impossible size ({box_size})")
        return (kind, box_size) if self._pos + box_size <= size else None

    def _read_init(self, kind: bytes, box_size: int, size: int) -> None:
        assert self._fd is not None
        if kind == b"ftyp" and self._pos == 0:
            self._pos = box_size
            return
        if kind != b"moov" or self._pos == 0:
            raise Mp4Error(f"the ring's stream starts with {kind!r}, not ftyp and moov")
        end = self._pos + box_size
        data = os.pread(self._fd, end, 0)
        moov = data[self._pos :]
        self._track = read_track(moov[header_len(moov) :])
        self._init = data
        self._pos = end

    def _next_fragment(self, moof_size: int, size: int) -> Fragment | None:
        """The complete fragment whose moof is at the read position, or None if its mdat is not written."""
        assert self._fd is not None and self._track is not None
        mdat_at = self._pos + moof_size
        if size - mdat_at < 8:
            return None
        data = os.pread(self._fd, moof_size + 16, self._pos)  # the moof and the mdat's header
        moof = data[:moof_size]
        mdat_size, kind = struct.unpack_from(">I4s", data, moof_size)
        if kind != b"mdat":
            raise Mp4Error(f"moof at byte {self._pos} of the ring's stream not followed by mdat")
        if mdat_size == 1:
            if len(data) < moof_size + 16:
                return None
            mdat_size = struct.unpack_from(">Q", data, moof_size + 8)[0]
        if mdat_size < 8 or mdat_size > MAX_MDAT_BYTES:
            raise Mp4Error(f"mdat at byte {mdat_at} of the ring's stream has an impossible size ({mdat_size})")
        if mdat_at + mdat_size > size:
            return None
        return parse_fragment(moof, self._pos, mdat_at, mdat_size, self._track)

    # -- writing ---------------------------------------------------------------------------------

    def _cut(self) -> Cut:
        """Write the pending fragments as the next segment file, then release their bytes."""
        assert self._fd is not None and self._init is not None and self._track is not None
        first, last = self._pending[0], self._pending[-1]
        end = last.mdat_offset + last.mdat_size
        if self._make_room is not None:
            self._make_room(len(self._init) + end - self._pending_from)
        name = f"seg_{self.number:06d}.mp4"
        self.number += 1
        path = self.segment_dir / name
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(out, self._init)
            _copy_range(self._fd, out, self._pending_from, end - self._pending_from)
        finally:
            os.close(out)
        scale = self._track.timescale
        size = len(self._init) + end - self._pending_from
        cut = Cut(name, first.decode_time / scale, (last.decode_time + last.duration) / scale, size)
        self._pending = []
        release_to = end // PAGE * PAGE
        if release_to > self._punched:
            with contextlib.suppress(OSError):  # checked by punch_supported; a failure only costs space
                punch_hole(self._fd, self._punched, release_to - self._punched)
            self._punched = release_to
        return cut


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy `length` bytes of `src` from `offset` to the end of `dst`, in the kernel where it can."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst, length - done, offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"the ring's stream ended at byte {offset + done}")
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while done < length:  # no copy_file_range between these file systems
        chunk = os.pread(src, min(1 << 20, length - done), offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"the ring's stream ended at byte {offset + done}")
        os.write(dst, chunk)
        done += len(chunk)
