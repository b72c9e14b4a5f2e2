"""A power-cut file system for the tests: a FUSE mount that forgets every write that was not fsynced.

In the spirit of Jepsen's LazyFS. ``kill -9`` is not a power cut: the page cache survives it, so
a test that only kills processes never sees what a real outage does to writes that were still in
memory. This file system keeps the whole live state of the mount in memory and, next to it, the
*durable image*: what the disk would hold after a power cut. ``cut`` writes the durable image to
the backing directory, and from then on nothing the mount does reaches the backing directory
again; the next mount starts from what survived.

The durability model (POSIX's minimum, stricter than ext4, XFS or btrfs):

- ``fsync``/``fdatasync`` of a regular file (or a write through an ``O_SYNC``/``O_DSYNC`` handle)
  makes the file's *contents and size* durable, nothing else. Everything written since its last
  fsync is lost in a cut.
- A directory's *entries* (create, mkdir, rename, unlink, rmdir: the name -> inode table) become
  durable only when that directory itself is fsynced. A new file whose directory was never
  fsynced is gone after a cut even if the file was fsynced; an fsynced directory whose new file
  was never fsynced keeps the name with the file's last durable contents (empty if none). A
  rename is durable in the target directory when it is fsynced and leaves the source directory
  when that one is; until both are, the file may be in both places or neither.
- A cut drops *everything* not made durable this way, at one instant.

Why this is at least as strict as a real disk: each rule is the weakest guarantee POSIX and the
Linux file systems document (fsync(2): "calling fsync() does not necessarily ensure that the entry
in the directory containing the file has also reached disk. For that an explicit fsync() on a file
descriptor for the directory is also needed"). ext4 (data=ordered, no fast_commit) usually gives
more: an fsync commits the whole running journal transaction, so earlier creates, renames and
unlinks become durable with it, and a new file's entry with its first fsync. Code that keeps its
data here therefore keeps it on those file systems too, as far as *lost* writes go.

What it does not explore: a disk that keeps some unsynced writes and drops others (reordering,
torn writes, a journal commit in the middle of a run of unlinks). The agent's code is reasoned
about for those (`edge_agent.finalise._retire_segments`); LazyFS's torn-write faults are not
reproduced here. SQLite's ``-shm`` file (memory-mapped) is lost like any unsynced file, which
SQLite expects.

Hard links, symlinks and device nodes are not supported (the agent, FFmpeg and SQLite need none).

Run as a separate process (the tests use :class:`PowerCutFS`)::

    python tests/powercutfs.py BACKING_DIR MOUNTPOINT --control NAME

Control: a Unix socket in the abstract namespace ``NAME``; one request line, one JSON reply line:
``stats``, ``sync`` (make everything durable, like sync(1)), ``cut`` (the power cut: write the
durable image to BACKING_DIR and report what was lost), ``arm OP GLOB`` (cut just before the
first OP, e.g. ``rename``, on a path matching GLOB: a cut at an exact point of a program; every
later change then waits, as if the machine were off, until ``release`` fails it with EIO). A
clean unmount (``fusermount3 -u``) is a clean shutdown: everything is made durable and written
back, unless the power was cut before.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import itertools
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parts import ManagedProcess, PartError

BLOCK = 32 * 1024  # unit of copy-on-write: a durable image shares every block not written since
SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
# Operations a cut can be armed on (`arm OP GLOB`), each gated before it changes anything.
GATED = frozenset({"create", "write", "truncate", "fsync", "fsyncdir", "mkdir", "unlink", "rmdir", "rename"})

log = logging.getLogger("powercutfs")


# ------------------------------------------------------------------------------------ the model


@dataclass(eq=False)
class Node:
    """An inode of the live tree (compared by identity: the same node may have several names)."""

    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = field(default_factory=time.time_ns)
    ctime_ns: int = field(default_factory=time.time_ns)
    links: int = 0  # live directory entries naming this node
    dirty: bool = False  # changed since the last fsync


@dataclass(eq=False)
class FileNode(Node):
    blocks: list[bytes] = field(default_factory=list)  # BLOCK bytes each; shorter (or b"") = zeros up to size
    size: int = 0


@dataclass(eq=False)
class DirNode(Node):
    entries: dict[str, Node] = field(default_factory=dict)


@dataclass(frozen=True)
class FileImage:
    """A file's durable contents: the blocks as they were at its last fsync."""

    blocks: tuple[bytes, ...]
    size: int
    mode: int
    mtime_ns: int


@dataclass(frozen=True)
class DirImage:
    """A directory's durable entries (name -> inode number) as they were at its last fsync."""

    entries: dict[str, int]
    mode: int


class FSError(OSError):
    """An errno for the caller: mfusepy answers the kernel with -errno for any OSError."""

    def __init__(self, code: int) -> None:
        super().__init__(code, os.strerror(code))


def _file_read(node: FileNode, size: int, offset: int) -> bytes:
    end = min(node.size, offset + size)
    if offset >= end:
        return b""
    out = bytearray()
    for i in range(offset // BLOCK, (end - 1) // BLOCK + 1):
        start = i * BLOCK
        block = node.blocks[i] if i < len(node.blocks) else b""
        want = min(BLOCK, node.size - start)
        if len(block) < want:
            block = block + bytes(want - len(block))
        out += block[max(offset, start) - start : end - start]
    return bytes(out)


def _file_write(node: FileNode, data: bytes, offset: int) -> None:
    end = offset + len(data)
    if not data:
        return
    last = (end - 1) // BLOCK
    if len(node.blocks) <= last:
        node.blocks.extend([b""] * (last + 1 - len(node.blocks)))
    pos = 0
    for i in range(offset // BLOCK, last + 1):
        start = i * BLOCK
        lo, hi = max(offset, start) - start, min(end, start + BLOCK) - start
        old = node.blocks[i]
        if lo == 0 and hi >= len(old):
            new = data[pos : pos + hi - lo]
        else:
            buf = bytearray(old)
            if len(buf) < lo:
                buf.extend(bytes(lo - len(buf)))
            buf[lo:hi] = data[pos : pos + hi - lo]
            new = bytes(buf)
        node.blocks[i] = new
        pos += hi - lo
    node.size = max(node.size, end)


def _file_truncate(node: FileNode, length: int) -> None:
    if length < node.size:
        keep = (length + BLOCK - 1) // BLOCK
        del node.blocks[keep:]
        if keep and len(node.blocks) == keep:
            node.blocks[-1] = node.blocks[-1][: length - (keep - 1) * BLOCK]
    node.size = length


class Model:
    """The live tree, the durable image, and the operations on them (no FUSE in here: unit-testable)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._inos = itertools.count(1)
        self.root = DirNode(next(self._inos), stat.S_IFDIR | 0o755, links=1)
        self.nodes: dict[int, Node] = {self.root.ino: self.root}
        self.durable_files: dict[int, FileImage] = {}
        self.durable_dirs: dict[int, DirImage] = {self.root.ino: DirImage({}, self.root.mode)}
        self.handles: dict[int, tuple[Node, bool]] = {}  # fh -> (node, O_SYNC)
        self._fhs = itertools.count(1)
        self.cut_done = False
        self.last_cut: dict[str, Any] | None = None
        self.trigger: tuple[str, str] | None = None  # (operation, glob): cut just before that operation
        self.halted = threading.Event()  # set by a triggered cut: every later change waits...
        self.released = threading.Event()  # ...until `release`, then fails with EIO
        self.counters = {"file_fsyncs": 0, "dir_fsyncs": 0, "writes": 0, "bytes_written": 0}

    # -- loading and saving the durable image

    def load(self, backing: Path) -> None:
        """Make the live tree and the durable image what ``backing`` holds (all of it durable)."""

        def walk(directory: Path, node: DirNode) -> None:
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                child: Node
                if stat.S_ISDIR(st.st_mode):
                    child = DirNode(next(self._inos), st.st_mode, st.st_uid, st.st_gid,
                                    st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)  # fmt: skip
                    walk(Path(entry.path), child)
                elif stat.S_ISREG(st.st_mode):
                    data = Path(entry.path).read_bytes()
                    child = FileNode(next(self._inos), st.st_mode, st.st_uid, st.st_gid,
                                     st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)  # fmt: skip
                    _file_write(child, data, 0)
                else:
                    log.warning("skipping %s: only directories and regular files are supported", entry.path)
                    continue
                child.links = 1
                node.entries[entry.name] = child
                self.nodes[child.ino] = child
            for child in node.entries.values():
                self._make_durable(child)
            self._make_durable(node)

        with self.lock:
            walk(backing, self.root)

    def write_image(self, backing: Path) -> None:
        """Replace ``backing`` by the durable image (written beside it, then swapped in)."""
        new = backing.with_name(f".{backing.name}.pcfs-new")
        old = backing.with_name(f".{backing.name}.pcfs-old")
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        new.mkdir()
        placed: set[int] = set()

        def walk(ino: int, path: Path) -> None:
            placed.add(ino)
            image = self.durable_dirs.get(ino)
            for name, child_ino in sorted(image.entries.items()) if image else ():
                node = self.nodes[child_ino]
                target = path / name
                if isinstance(node, DirNode):
                    if child_ino in placed:  # durable under two names (an unsynced rename): keep one
                        continue
                    target.mkdir()
                    walk(child_ino, target)
                    dir_image = self.durable_dirs.get(child_ino)
                    os.chmod(target, stat.S_IMODE(dir_image.mode if dir_image else node.mode))
                else:
                    f_image = self.durable_files.get(child_ino)
                    with target.open("wb") as f:
                        if f_image is not None:
                            for i, block in enumerate(f_image.blocks):
                                if block:
                                    f.seek(i * BLOCK)
                                    f.write(block[: max(0, f_image.size - i * BLOCK)])
                            f.truncate(f_image.size)
                    os.chmod(target, stat.S_IMODE(f_image.mode if f_image else node.mode))
                    if f_image is not None:
                        os.utime(target, ns=(f_image.mtime_ns, f_image.mtime_ns))

        walk(self.root.ino, new)
        backing.rename(old)
        new.rename(backing)
        shutil.rmtree(old, ignore_errors=True)

    # -- durability

    def _make_durable(self, node: Node) -> None:
        if isinstance(node, FileNode):
            self.durable_files[node.ino] = FileImage(tuple(node.blocks), node.size, node.mode, node.mtime_ns)
        elif isinstance(node, DirNode):
            self.durable_dirs[node.ino] = DirImage({n: c.ino for n, c in node.entries.items()}, node.mode)
        node.dirty = False

    def fsync(self, node: Node) -> None:
        with self.lock:
            if self.cut_done:
                return  # after the cut nothing reaches the disk any more
            self.counters["dir_fsyncs" if isinstance(node, DirNode) else "file_fsyncs"] += 1
            self._make_durable(node)

    def sync_all(self) -> None:
        """sync(1): everything reachable becomes durable."""
        with self.lock:
            if self.cut_done:
                return
            stack: list[Node] = [self.root]
            while stack:
                node = stack.pop()
                self._make_durable(node)
                if isinstance(node, DirNode):
                    stack.extend(node.entries.values())
            for node, _sync in self.handles.values():  # open but unlinked files keep their data too
                self._make_durable(node)

    def unsynced(self) -> dict[str, Any]:
        """What a cut now would lose: reachable files and directories changed since their fsync."""
        files, dirs, lost_bytes = [], [], 0
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            if isinstance(node, DirNode):
                image = self.durable_dirs.get(node.ino)
                live = {n: c.ino for n, c in node.entries.items()}
                durable = image.entries if image else {}
                if live != durable:
                    dirs.append({
                        "path": path or "/",
                        "added": sorted(n for n in live if durable.get(n) != live[n]),
                        "removed": sorted(n for n in durable if live.get(n) != durable[n]),
                    })  # fmt: skip
                stack.extend((f"{path}/{n}", c) for n, c in node.entries.items())
            elif isinstance(node, FileNode) and node.dirty:
                f_image = self.durable_files.get(node.ino)
                kept = f_image.size if f_image else 0
                files.append({"path": path, "size": node.size, "durable_size": kept})
                lost_bytes += max(0, node.size - kept)
        return {"files": sorted(files, key=lambda f: f["path"]), "dirs": sorted(dirs, key=lambda d: d["path"]),
                "bytes_beyond_durable_size": lost_bytes}  # fmt: skip

    def cut(self, backing: Path) -> dict[str, Any]:
        """The power cut: the durable image goes to ``backing``; later changes stay in memory only."""
        with self.lock:
            if self.cut_done:
                return {"already_cut": True}
            at, started = time.time(), time.monotonic()
            lost = self.unsynced()
            self.cut_done = True
            self.write_image(backing)
            self.last_cut = {"at": at, "lost": lost, "counters": dict(self.counters),
                             "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
            return self.last_cut

    def gate(self, op: str, path: str | None, backing: Path, fh: int | None = None) -> None:
        """Called before every change: fires a cut armed for (`op`, `path`), and after a triggered
        cut holds the change (the machine is off) until `release`, then fails it with EIO."""
        with self.lock:
            trigger = self.trigger
            if trigger is not None and not self.cut_done and op == trigger[0]:
                if path is None and fh in self.handles:  # libfuse passes no path with a handle
                    path = self.path_of(self.handles[fh][0])
                fire = path is not None and fnmatch.fnmatchcase(path, trigger[1])
            else:
                fire = False
            if fire:
                self.trigger = None
                report = self.cut(backing)
                report["trigger"] = f"{op} {path}"
                self.halted.set()
                log.info("power cut before %s %s: %s", op, path, json.dumps(report))
        if self.halted.is_set():
            self.released.wait(60)
            raise FSError(errno.EIO)

    # -- name resolution

    def path_of(self, target: Node) -> str | None:
        """A live path of `target` (None if it has none): a walk of the tree, only for armed cuts."""
        stack: list[tuple[str, DirNode]] = [("", self.root)]
        while stack:
            path, node = stack.pop()
            for name, child in node.entries.items():
                if child is target:
                    return f"{path}/{name}"
                if isinstance(child, DirNode):
                    stack.append((f"{path}/{name}", child))
        return None

    def lookup(self, path: str) -> Node:
        node: Node = self.root
        for part in (p for p in path.split("/") if p):
            if not isinstance(node, DirNode):
                raise FSError(errno.ENOTDIR)
            child = node.entries.get(part)
            if child is None:
                raise FSError(errno.ENOENT)
            node = child
        return node

    def parent_of(self, path: str) -> tuple[DirNode, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.lookup(head or "/")
        if not isinstance(parent, DirNode):
            raise FSError(errno.ENOTDIR)
        if not name:
            raise FSError(errno.EINVAL)
        return parent, name

    def node_for(self, path: str | None, fh: int | None) -> Node:
        if fh is not None and fh in self.handles:
            return self.handles[fh][0]
        if path is None:
            raise FSError(errno.EBADF)
        return self.lookup(path)

    # -- operations (each under the lock, called by the FUSE layer)

    def _link(self, parent: DirNode, name: str, node: Node) -> None:
        parent.entries[name] = node
        node.links += 1
        parent.dirty = True
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def _unlink(self, parent: DirNode, name: str) -> Node:
        node = parent.entries.pop(name)
        node.links -= 1
        node.ctime_ns = time.time_ns()
        parent.dirty = True
        parent.mtime_ns = parent.ctime_ns = time.time_ns()
        return node

    def create(self, path: str, mode: int, flags: int, uid: int, gid: int) -> int:
        with self.lock:
            parent, name = self.parent_of(path)
            node = parent.entries.get(name)
            if node is None:
                node = FileNode(next(self._inos), stat.S_IFREG | stat.S_IMODE(mode), uid, gid, dirty=True)
                self.nodes[node.ino] = node
                self._link(parent, name, node)
            elif flags & os.O_EXCL:
                raise FSError(errno.EEXIST)
            elif isinstance(node, DirNode):
                raise FSError(errno.EISDIR)
            return self._open(node, flags)

    def _open(self, node: Node, flags: int) -> int:
        fh = next(self._fhs)
        self.handles[fh] = (node, bool(flags & SYNC_FLAGS))
        if flags & os.O_TRUNC and isinstance(node, FileNode) and node.size:
            _file_truncate(node, 0)
            node.dirty = True
        return fh

    def open(self, path: str, flags: int) -> int:
        with self.lock:
            return self._open(self.lookup(path), flags)

    def release(self, fh: int) -> None:
        with self.lock:
            self.handles.pop(fh, None)

    def read(self, path: str | None, size: int, offset: int, fh: int | None) -> bytes:
        with self.lock:
            node = self.node_for(path, fh)
            if not isinstance(node, FileNode):
                raise FSError(errno.EISDIR)
            return _file_read(node, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: int | None) -> int:
        with self.lock:
            node = self.node_for(path, fh)
            if not isinstance(node, FileNode):
                raise FSError(errno.EISDIR)
            _file_write(node, data, offset)
            node.dirty = True
            node.mtime_ns = node.ctime_ns = time.time_ns()
            self.counters["writes"] += 1
            self.counters["bytes_written"] += len(data)
            if fh is not None and self.handles.get(fh, (node, False))[1]:
                self.fsync(node)
            return len(data)

    def truncate(self, path: str | None, length: int, fh: int | None) -> None:
        with self.lock:
            node = self.node_for(path, fh)
            if not isinstance(node, FileNode):
                raise FSError(errno.EISDIR)
            _file_truncate(node, length)
            node.dirty = True
            node.mtime_ns = node.ctime_ns = time.time_ns()

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        with self.lock:
            parent, name = self.parent_of(path)
            if name in parent.entries:
                raise FSError(errno.EEXIST)
            node = DirNode(next(self._inos), stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, dirty=True)
            self.nodes[node.ino] = node
            self._link(parent, name, node)

    def unlink(self, path: str) -> None:
        with self.lock:
            parent, name = self.parent_of(path)
            node = parent.entries.get(name)
            if node is None:
                raise FSError(errno.ENOENT)
            if isinstance(node, DirNode):
                raise FSError(errno.EISDIR)
            self._unlink(parent, name)

    def rmdir(self, path: str) -> None:
        with self.lock:
            parent, name = self.parent_of(path)
            node = parent.entries.get(name)
            if node is None:
                raise FSError(errno.ENOENT)
            if not isinstance(node, DirNode):
                raise FSError(errno.ENOTDIR)
            if node.entries:
                raise FSError(errno.ENOTEMPTY)
            self._unlink(parent, name)

    def rename(self, old: str, new: str) -> None:
        with self.lock:
            src_parent, src_name = self.parent_of(old)
            dst_parent, dst_name = self.parent_of(new)
            node = src_parent.entries.get(src_name)
            if node is None:
                raise FSError(errno.ENOENT)
            target = dst_parent.entries.get(dst_name)
            if target is node:
                return
            if target is not None:
                if isinstance(node, DirNode) and not isinstance(target, DirNode):
                    raise FSError(errno.ENOTDIR)
                if not isinstance(node, DirNode) and isinstance(target, DirNode):
                    raise FSError(errno.EISDIR)
                if isinstance(target, DirNode) and target.entries:
                    raise FSError(errno.ENOTEMPTY)
                self._unlink(dst_parent, dst_name)
            self._unlink(src_parent, src_name)
            self._link(dst_parent, dst_name, node)

    def attrs(self, path: str | None, fh: int | None) -> dict[str, int]:
        with self.lock:
            node = self.node_for(path, fh)
            if isinstance(node, DirNode):
                nlink = 2 + sum(isinstance(c, DirNode) for c in node.entries.values())
                size = 4096
            else:
                assert isinstance(node, FileNode)
                nlink, size = node.links, node.size
            return {
                "st_ino": node.ino, "st_mode": node.mode, "st_nlink": nlink, "st_uid": node.uid,
                "st_gid": node.gid, "st_size": size, "st_blocks": (size + 511) // 512,
                "st_atime": node.atime_ns, "st_mtime": node.mtime_ns, "st_ctime": node.ctime_ns,
            }  # fmt: skip

    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        with self.lock:
            node = self.node_for(path, fh)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            node.dirty = True

    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> None:
        with self.lock:
            node = self.node_for(path, fh)
            unchanged = (-1, 0xFFFFFFFF)  # chown(2)'s "leave as is"
            if uid not in unchanged:
                node.uid = uid
            if gid not in unchanged:
                node.gid = gid

    def utimens(self, path: str | None, times: tuple[int, int] | None, fh: int | None = None) -> None:
        with self.lock:
            node = self.node_for(path, fh)
            now = time.time_ns()
            node.atime_ns, node.mtime_ns = times if times is not None else (now, now)

    def listdir(self, path: str | None, fh: int | None) -> list[tuple[str, dict[str, int], int]]:
        """Entries with their inode numbers (with use_ino, an entry with d_ino 0 would be skipped)."""
        with self.lock:
            node = self.node_for(path, fh)
            if not isinstance(node, DirNode):
                raise FSError(errno.ENOTDIR)
            entries = [(n, {"st_mode": c.mode, "st_ino": c.ino}, 0) for n, c in node.entries.items()]
            return [(".", {"st_mode": node.mode, "st_ino": node.ino}, 0),
                    ("..", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0), *entries]  # fmt: skip

    def opendir(self, path: str) -> int:
        with self.lock:
            node = self.lookup(path)
            if not isinstance(node, DirNode):
                raise FSError(errno.ENOTDIR)
            return self._open(node, 0)


# ------------------------------------------------------------------------------- the FUSE layer


def serve(backing: Path, mountpoint: Path, control: str, debug: bool = False) -> None:
    """Mount the model over ``mountpoint`` (blocks until unmounted)."""
    import mfusepy  # only the FUSE process needs libfuse

    class Fuse(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy drops the handle of ftruncate/fchmod/fchown/futimens and rename's flags: keep them."""

        def _path(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

        @staticmethod
        def _fh(fip: Any) -> int | None:
            return int(fip.contents.fh) if fip else None

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: not modelled, refuse rather than ignore
                return -errno.EINVAL
            return int(super().rename_fuse_3(old, new, flags))

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            model.gate("truncate", self._path(path), backing, self._fh(fip))
            model.truncate(self._path(path), length, self._fh(fip))
            return 0

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            model.chmod(self._path(path), mode, self._fh(fip))
            return 0

        def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
            model.chown(self._path(path), uid, gid, self._fh(fip))
            return 0

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                         mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))  # fmt: skip
            model.utimens(self._path(path), times, self._fh(fip))
            return 0

    model = Model()
    model.load(backing)
    log.info("loaded %s: %d inodes", backing, len(model.nodes))

    def ctx() -> tuple[int, int]:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return int(uid), int(gid)

    class Ops(mfusepy.Operations):  # type: ignore[misc]
        """Thin glue: mfusepy turns the model's FSError (an OSError) into -errno."""

        use_ns = True

        def init_with_config(self, conn_info: Any, config_3: Any) -> None:
            if config_3 is not None:
                config_3.hard_remove = 1  # an unlinked open file is not renamed to .fuse_hidden*
                config_3.nullpath_ok = 1  # ...so its operations come with the handle only
                config_3.use_ino = 1  # st_ino is ours: SQLite compares it between path and handle
            threading.Thread(target=control_loop, name="control", daemon=True).start()
            print("READY", flush=True)

        def destroy(self, path: str) -> None:
            with model.lock:
                if not model.cut_done:  # a clean unmount is a clean shutdown: everything reaches the disk
                    model.sync_all()
                    model.write_image(backing)
                    model.cut_done = True
            log.info("unmounted: %s", json.dumps(model.counters))

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
            return model.attrs(path, fh)

        def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
            return model.listdir(path, fh)

        def opendir(self, path: str) -> int:
            return model.opendir(path)

        def releasedir(self, path: str | None, fh: int) -> int:
            model.release(fh)
            return 0

        def open(self, path: str, flags: int) -> int:
            return model.open(path, flags)

        def create(self, path: str, mode: int, flags: int) -> int:
            model.gate("create", path, backing)
            return model.create(path, mode, flags, *ctx())

        def release(self, path: str | None, fh: int) -> int:
            model.release(fh)
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return model.read(path, size, offset, fh)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            model.gate("write", path, backing, fh)
            return model.write(path, data, offset, fh)

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            model.gate("truncate", path, backing, fh)
            model.truncate(path, length, fh)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            model.gate("fsync", path, backing, fh)
            model.fsync(model.node_for(path, fh))
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            model.gate("fsyncdir", path, backing, fh)
            model.fsync(model.node_for(path, fh))
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            model.gate("mkdir", path, backing)
            model.mkdir(path, mode, *ctx())
            return 0

        def unlink(self, path: str) -> int:
            model.gate("unlink", path, backing)
            model.unlink(path)
            return 0

        def rmdir(self, path: str) -> int:
            model.gate("rmdir", path, backing)
            model.rmdir(path)
            return 0

        def rename(self, old: str, new: str) -> int:
            model.gate("rename", old, backing)
            model.rename(old, new)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            model.chmod(path, mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            model.chown(path, uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            model.utimens(path, times)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(backing)
            keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_namemax")
            return {key: getattr(st, key) for key in keys}

    def answer(request: str) -> dict[str, Any]:
        verb, _, args = request.partition(" ")
        if verb == "stats":
            with model.lock:
                return {"ok": True, "cut": model.cut_done, "last_cut": model.last_cut, "trigger": model.trigger,
                        "counters": dict(model.counters), "unsynced": model.unsynced()}  # fmt: skip
        if verb == "sync":
            model.sync_all()
            return {"ok": True}
        if verb == "cut":
            report = model.cut(backing)
            log.info("power cut: %s", json.dumps(report))
            return {"ok": True, **report}
        if verb == "arm":  # arm OP GLOB: cut just before the first OP on a path matching GLOB
            op, _, pattern = args.partition(" ")
            if op not in GATED or not pattern:
                return {"ok": False, "error": f"arm needs one of {sorted(GATED)} and a glob"}
            with model.lock:
                model.trigger = (op, pattern)
            return {"ok": True}
        if verb == "release":
            model.released.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown request {request!r}"}

    def control_loop() -> None:
        for conn, _ in iter(server.accept, None):
            with conn, contextlib.suppress(OSError):
                conn.settimeout(30)
                request = conn.makefile("r").readline().strip()
                try:
                    reply = answer(request)
                except Exception as exc:  # a bug must answer, not hang the test
                    log.exception("control request %r failed", request)
                    reply = {"ok": False, "error": repr(exc)}
                conn.sendall((json.dumps(reply) + "\n").encode())

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + control)
    server.listen(4)
    options: dict[str, Any] = {"foreground": True, "nothreads": True, "fsname": "powercutfs", "debug": debug}
    try:
        Fuse(Ops(), str(mountpoint), **options)
    except RuntimeError as exc:
        # libfuse's loop reports an error when the mount was taken away by `fusermount3 -u`, the way
        # the tests unmount; after `destroy` ran that is a normal end.
        if not model.cut_done:
            raise
        log.info("FUSE loop ended: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", required=True, help="abstract Unix socket name for control requests")
    parser.add_argument("--debug", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("mfusepy").setLevel(logging.DEBUG if os.environ.get("PCFS_DEBUG") else logging.WARNING)
    serve(args.backing.resolve(), args.mountpoint.resolve(), args.control, args.debug)
    return 0


# ------------------------------------------------------------------------------- the test part


class PowerCutFS(ManagedProcess):
    """The power-cut file system as a part: ``start()`` mounts, ``cut()`` cuts the power, ``stop()`` unmounts.

    After ``cut()`` the backing directory holds only what was durable; ``stop()`` then unmounts
    (whatever the mount still does is lost) and ``start()`` mounts what survived.
    """

    name = "powercutfs"
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(self, workdir: Path, backing: Path | None = None, mountpoint: Path | None = None) -> None:
        super().__init__(workdir)
        self.backing = Path(backing) if backing is not None else self.workdir / "disk"
        self.mountpoint = Path(mountpoint) if mountpoint is not None else self.workdir / "mnt"
        self.control = f"powercutfs-{uuid.uuid4().hex}"
        self.cuts: list[dict[str, Any]] = []

    def prepare(self) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [sys.executable, "-u", str(Path(__file__).resolve()), str(self.backing), str(self.mountpoint),
                "--control", self.control]  # fmt: skip

    def is_ready(self) -> bool:
        if "READY" not in self.log_since_start() or not os.path.ismount(self.mountpoint):
            return False
        try:
            return bool(self.request("stats", timeout=2)["ok"])
        except OSError:
            return False

    def request(self, what: str, timeout: float = 60.0) -> dict[str, Any]:
        """One control request, answered within ``timeout``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect("\0" + self.control)
            sock.sendall(what.encode() + b"\n")
            reply: dict[str, Any] = json.loads(sock.makefile("r").readline())
        return reply

    def cut(self) -> dict[str, Any]:
        """Cut the power: the backing directory now holds only what was fsynced. Returns what was lost."""
        reply = self.request("cut")
        if not reply.get("ok"):
            raise PartError(f"power cut failed: {reply}\n{self.log_excerpt()}")
        self.cuts.append(reply)
        return reply

    def arm(self, op: str, pattern: str) -> None:
        """Cut the power just before the first ``op`` on a path (inside the mount) matching ``pattern``."""
        reply = self.request(f"arm {op} {pattern}")
        if not reply.get("ok"):
            raise PartError(f"arming a cut failed: {reply}")

    def wait_cut(self, timeout: float) -> dict[str, Any]:
        """Waits until an armed cut has happened; returns its report."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.request("stats")
            if stats["cut"]:
                report: dict[str, Any] = stats["last_cut"]
                self.cuts.append(report)
                return report
            if time.monotonic() > deadline:
                raise PartError(f"the cut armed on {stats['trigger']} did not happen within {timeout} s")
            time.sleep(0.01)

    def release(self) -> None:
        """Lets changes held since a triggered cut fail (EIO), so the mount can go away."""
        with contextlib.suppress(OSError, ValueError):
            self.request("release", timeout=5)

    def stop(self, timeout: float | None = None) -> int | None:
        """Unmount (bounded; lazily if still busy), then stop the process."""
        if self.is_alive():
            self.release()
        if os.path.ismount(self.mountpoint):
            for args in (["-u"], ["-u", "-z"]):
                done = subprocess.run(["fusermount3", *args, str(self.mountpoint)], capture_output=True,
                                      timeout=20, check=False)  # fmt: skip
                if done.returncode == 0:
                    break
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.stop_timeout if timeout is None else timeout)
        code = super().stop(5.0)
        if os.path.ismount(self.mountpoint):  # the process died with the mount up
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, timeout=20,
                           check=False)  # fmt: skip
        return code


if __name__ == "__main__":
    sys.exit(main())
