"""A ring buffer's FFmpeg output cut into segments by the agent, not by FFmpeg's segment muxer.

FFmpeg's segment muxer costs about 10 % more CPU than the same copy into one file (it formats seven
timestamps per packet for a debug message nobody reads, and builds a muxer per segment:
`docs/results/perf_ring_vs_plain_20261206.txt`). For a ring, FFmpeg therefore writes ONE
fragmented MP4 per run (a fragment at every keyframe, written whole when the next keyframe
arrives) and `RingCutter`, run when the file is written (one `RingReactor` thread and one inotify
instance for all the agent's rings), reads the new complete fragments (box headers and `moof`s
only: a few hundred bytes a second) and, as soon as the fragments gathered make a segment long
enough, reports that segment: a byte range of the run's file.

Nothing is copied while the ring runs. A segment becomes a file only when something needs it: a
task copies its segments into its own directory (`RunFile.copy`: the run's `ftyp`+`moov`, then the
range, by the kernel), which is exactly the fragmented MP4 the segment muxer wrote, so the join and
everything after it are unchanged. A segment dropped from the ring is released by punching a hole
in the run's file (`fallocate(PUNCH_HOLE)`): the file's size grows, its blocks do not. The file is
closed and removed once its run has ended and its last segment is dropped. A file system that
cannot punch holes (FAT on an SD card) keeps the segment muxer (`punch_supported`); its segment
files are then `RunFile.whole`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import selectors
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.fmp4 import Fragment, Mp4Error, Track, header_len, parse_fragment, read_track

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
PAGE = 4096
log = logging.getLogger(__name__)
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
_inotify_rm_watch = _libc.inotify_rm_watch
_inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
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

    def watch(self, path: Path) -> int:
        """Wake on writes to `path` too (a watch goes by itself when its file is removed); its number."""
        wd = int(_inotify_add_watch(self.fd, os.fsencode(path), IN_MODIFY))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify on {path}: {os.strerror(code)}")
        return wd

    def unwatch(self, wd: int) -> None:
        _inotify_rm_watch(self.fd, wd)  # fails harmlessly if the file is gone (the watch went with it)

    def read_written(self) -> list[int]:
        """The watches written since the last read (each once), without blocking."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        wds: dict[int, None] = {}
        pos = 0
        while pos + 16 <= len(data):  # struct inotify_event: wd, mask, cookie, len, then the name
            wd, _, _, name_len = struct.unpack_from("iIII", data, pos)
            wds[wd] = None
            pos += 16 + name_len
        return list(wds)

    def drain(self) -> None:
        """Read the pending events (their content does not matter: the cutter looks at the file).
        One read takes them all: they are 16 bytes and the same one merged."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 65536)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class RingReactor(threading.Thread):
    """One thread that cuts every ring of the agent when FFmpeg writes its file.

    With a thread per ring doing its own cutting, cameras whose keyframes arrive together (several
    fed from one source, or in step) woke their threads at once, and they spent most of their CPU
    handing Python's GIL to each other at every system call. Here one inotify instance watches every
    ring's run file and one thread calls each written ring's `on_write` in turn. Each ring keeps
    its own timer as a backstop (`CameraBuffer.poll_seconds`) and its own lock around its cutter.
    """

    def __init__(self) -> None:
        super().__init__(name="ring-cutter", daemon=True)
        self._inotify = WriteWatch()  # OSError without inotify: the rings then watch for themselves
        self._lock = threading.Lock()
        self._targets: dict[int, Callable[[], None]] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()

    def watch(self, path: Path, on_write: Callable[[], None]) -> int:
        """Call `on_write` (on this thread) whenever `path` is written; the watch's number. OSError
        if it cannot be watched (out of watches)."""
        with self._lock:
            wd = self._inotify.watch(path)
            self._targets[wd] = on_write
        return wd

    def unwatch(self, wd: int) -> None:
        with self._lock:
            self._targets.pop(wd, None)
            self._inotify.unwatch(wd)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self.join(timeout)

    def run(self) -> None:
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._inotify.fd, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping.is_set():
                    if not sel.select(timeout=5.0):
                        continue
                    written = self._inotify.read_written()
                    with self._lock:
                        if -1 in written:  # the kernel's queue overflowed: events were lost, look at all
                            calls = list(self._targets.values())
                        else:  # (a watch removed meanwhile has no target)
                            calls = [self._targets[wd] for wd in written if wd in self._targets]
                    for on_write in calls:
                        try:
                            on_write()
                        except Exception:  # one ring's bug must not stop the others being cut
                            log.exception("cutting a ring failed")
        finally:
            self._inotify.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


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


class RunFile:
    """One FFmpeg run's file, read by the ring's segments (byte ranges of it) until the last is dropped.

    Shared by the buffer's thread (which cuts and drops segments) and task threads (which copy
    them): every change is under its lock, and bytes being copied are released only after the copy.
    A descriptor is held only while the run writes (one per camera): a ring holding many ended runs
    (a camera that keeps dropping, a day-long buffer) opens their files when it reads or frees them.
    """

    def __init__(self, path: Path, fd: int | None = None, end: int | None = None) -> None:
        self.path = path
        self.init = b""  # the run's ftyp + moov, written before a range to make it a file
        self.size = 0  # of a whole segment file (`whole`)
        self._fd = fd  # held while the run writes
        self._lock = threading.Lock()
        self._readers = 0
        self._released = 0  # bytes before this offset are no longer needed
        self._punched = 0  # ... and have been freed, to this page
        self._end = end  # no segment beyond this offset (set when the run has ended)
        self._closed = False

    @classmethod
    def whole(cls, path: Path) -> RunFile:
        """A segment file FFmpeg's segment muxer wrote, as a run file of one segment; OSError if gone."""
        size = path.stat().st_size
        file = cls(path, end=size)
        file.size = size
        return file

    def copy(self, dst: int, offset: int, length: int) -> bool:
        """Write the segment at [offset, offset + length) to `dst` as a file of its own; False if the
        segment has been dropped from the ring meanwhile (nothing written then)."""
        with self._lock:
            if self._closed or offset < self._released:
                return False
            self._readers += 1
            held = self._fd  # not closed while we read (`_readers`)
        try:
            with self._descriptor(held, os.O_RDONLY) as fd:
                if self.init:
                    os.write(dst, self.init)
                _copy_range(fd, dst, offset, length)
        finally:
            with self._lock:
                self._readers -= 1
                self._settle()
        return True

    def read(self, offset: int, length: int) -> bytes | None:
        """The segment at [offset, offset + length) as the bytes of a file of its own, or None if dropped."""
        with self._lock:
            if self._closed or offset < self._released:
                return None
            with self._descriptor(self._fd, os.O_RDONLY) as fd:
                return self.init + os.pread(fd, length, offset)

    def release(self, end: int) -> None:
        """Segments before `end` are dropped: free their bytes (and the file, after its last one)."""
        with self._lock:
            self._released = max(self._released, end)
            self._settle()

    def ended(self, end: int) -> None:
        """The run has ended; its last segment ends at `end` (0: it made none)."""
        with self._lock:
            self._end = end
            self._settle()

    def close(self) -> None:
        """Remove it now (the buffer is stopping); copies not begun yet then find it gone."""
        with self._lock:
            self._released = max(self._released, self._end or 0)
            self._end = self._released
            self._settle()

    def _settle(self) -> None:
        if self._closed or self._readers:
            return
        if self._end is not None and self._fd is not None:  # the run has ended: hold nothing
            os.close(self._fd)
            self._fd = None
        if self._end is not None and self._released >= self._end:
            self._closed = True
            with contextlib.suppress(OSError):
                self.path.unlink()
            return
        to = self._released // PAGE * PAGE
        if to > self._punched:
            # checked by punch_supported; a failure costs space only
            with contextlib.suppress(OSError), self._descriptor(self._fd, os.O_WRONLY) as fd:
                punch_hole(fd, self._punched, to - self._punched)
            self._punched = to

    @contextlib.contextmanager
    def _descriptor(self, held: int | None, flags: int) -> Iterator[int]:
        """`held` (the run's own descriptor, while it writes), or the file opened for this use."""
        if held is not None:
            yield held
            return
        fd = os.open(self.path, flags | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Cut:
    """One segment: a byte range of a run's file, and its span in the run's media time (seconds)."""

    file: RunFile
    offset: int
    length: int
    media_start: float
    media_end: float


class RingCutter:
    """Reads one FFmpeg run's growing fragmented MP4 and cuts it into segments (module docstring).

    Not thread-safe: owned by the thread that polls it. `poll()` after the file grew; `finish()` once
    FFmpeg has exited (the fragments written so far become the last segment).
    """

    def __init__(self, source: Path, segment_seconds: float, watch: Callable[[Path], object] | None = None) -> None:
        """`watch(source)` runs once FFmpeg has created the source (to be woken when it is written)."""
        self.source = source
        self.segment_seconds = segment_seconds
        self._watch = watch
        self._file: RunFile | None = None
        self._fd: int | None = None
        self._pos = 0  # the next box to read
        self._track: Track | None = None  # of this run, once its ftyp + moov are read
        self._pending: list[Fragment] = []  # complete fragments of the segment being gathered
        self._pending_from = 0  # file offset of the first pending fragment's moof
        self._cut_to = 0  # the end of the last segment cut
        self.mid_write = False  # the last poll found a box FFmpeg is still writing
        self.unwatched: str | None = None  # why `watch` could not watch the source
        self.started = time.monotonic()

    def poll(self) -> list[Cut]:
        """The segments completed by what FFmpeg wrote since the last poll (usually none or one)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.source, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                return []  # FFmpeg has not opened its output yet
            self._file = RunFile(self.source, os.dup(self._fd))
            if self._watch is not None:
                try:
                    self._watch(self.source)
                except OSError as exc:  # out of inotify watches: the caller polls on a timer instead
                    self.unwatched = str(exc)
        size = os.fstat(self._fd).st_size
        self.mid_write = False
        cuts: list[Cut] = []
        while True:
            header = self._header(size)
            if header is None:
                self.mid_write = self._pos < size
                return cuts
            kind, box_size = header
            if self._track is None:
                self._read_init(kind, box_size, size)
                continue
            if kind != b"moof":
                if kind in (b"mfra", b"free", b"skip"):  # FFmpeg's index at a clean end
                    self._pos += box_size
                    continue
                raise Mp4Error(f"unexpected {kind!r} box at byte {self._pos} of the ring's stream")
            fragment = self._next_fragment(box_size, size)
            if fragment is None:
                self.mid_write = True  # its mdat is not all written yet
                return cuts
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
        """FFmpeg has exited: what it wrote completely since the last segment is the last segment.
        The run's file stays while the ring holds segments of it."""
        cuts: list[Cut] = []
        try:
            with contextlib.suppress(Mp4Error):  # a killed FFmpeg leaves its last fragment cut short
                cuts = self.poll()
            if self._pending:
                cuts.append(self._cut())
        finally:
            self._ended()
        return cuts

    def close(self) -> None:
        """Give up on this run (its stream cannot be read): no more segments from it."""
        self._ended()

    def _ended(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.ended(self._cut_to)
            self._file = None
        else:  # never opened: FFmpeg may still have created it
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
        assert self._file is not None
        self._file.init = data
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

    # -- cutting ---------------------------------------------------------------------------------

    def _cut(self) -> Cut:
        """The pending fragments as the next segment."""
        assert self._file is not None and self._track is not None
        first, last = self._pending[0], self._pending[-1]
        end = last.mdat_offset + last.mdat_size
        scale = self._track.timescale
        cut = Cut(self._file, self._pending_from, end - self._pending_from, first.decode_time / scale,
                  (last.decode_time + last.duration) / scale)  # fmt: skip
        self._pending = []
        self._cut_to = end
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
