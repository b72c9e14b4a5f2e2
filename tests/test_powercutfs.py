"""The power-cut file system itself (tests/powercutfs.py): what a cut keeps and what it drops.

Each test mounts its own file system over a fresh backing directory (the "disk"), writes through
the mount with ordinary system calls, cuts the power, and then looks at the disk or remounts it.
The model kept in memory (blocks, images) is also checked on its own against a plain bytearray.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from powercutfs import BLOCK, FileNode, Model, PowerCutFS, _file_read, _file_truncate, _file_write


@pytest.fixture
def fs(tmp_path: Path, track: Callable[[PowerCutFS], PowerCutFS]) -> Iterator[PowerCutFS]:
    """A mounted power-cut file system over an empty disk (unmounted at teardown)."""
    yield track(PowerCutFS(tmp_path / "pcfs")).start()


def write(path: Path, data: bytes, *, sync: bool = False, flags: int = os.O_CREAT | os.O_WRONLY | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk(fs: PowerCutFS) -> dict[str, bytes | None]:
    """What the backing directory holds: relative path -> bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(fs.backing):
        rel = Path(root).relative_to(fs.backing)
        for name in dirs:
            out[str(rel / name)] = None
        for name in files:
            out[str(rel / name)] = (Path(root) / name).read_bytes()
    return out


def power_cut(fs: PowerCutFS) -> dict[str, object]:
    report = fs.cut()
    fs.stop()
    return report


def test_unsynced_writes_are_lost_and_fsynced_ones_survive(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write(m / "a", b"durable", sync=True)
    sync_dir(m)
    write(m / "a", b"+lost", sync=False, flags=os.O_WRONLY | os.O_APPEND)
    write(m / "b", b"never synced")
    assert (m / "a").read_bytes() == b"durable+lost"  # the live view has everything
    report = power_cut(fs)
    assert disk(fs) == {"a": b"durable"}
    lost = report["lost"]
    assert isinstance(lost, dict)
    assert {f["path"]: (f["size"], f["durable_size"]) for f in lost["files"]} == {"/a": (12, 7), "/b": (12, 0)}
    fs.start()  # the next boot sees what survived
    assert (fs.mountpoint / "a").read_bytes() == b"durable"
    assert not (fs.mountpoint / "b").exists()


def test_a_new_name_needs_its_directory_fsynced(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write(m / "synced-data-only", b"x" * 100, sync=True)  # data fsynced, directory not: the name is lost
    power_cut(fs)
    assert disk(fs) == {}
    fs.start()
    write(fs.mountpoint / "name-only", b"y" * 100)  # the name is durable, the data never was
    sync_dir(fs.mountpoint)
    power_cut(fs)
    assert disk(fs) == {"name-only": b""}


def test_a_new_directory_needs_its_parent_fsynced(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    (m / "d").mkdir()
    write(m / "d" / "f", b"data", sync=True)
    sync_dir(m / "d")
    power_cut(fs)
    assert disk(fs) == {}
    fs.start()
    (fs.mountpoint / "d").mkdir()
    sync_dir(fs.mountpoint)
    write(fs.mountpoint / "d" / "f", b"data", sync=True)
    sync_dir(fs.mountpoint / "d")
    power_cut(fs)
    assert disk(fs) == {"d": None, "d/f": b"data"}


@pytest.mark.parametrize("dir_synced", [False, True], ids=["rename-lost", "rename-durable"])
def test_a_rename_is_durable_only_with_a_directory_fsync(fs: PowerCutFS, dir_synced: bool) -> None:
    m = fs.mountpoint
    write(m / "state", b"old", sync=True)
    sync_dir(m)
    write(m / "state.tmp", b"new", sync=True)  # the write-fsync-rename pattern for atomic replacement
    os.replace(m / "state.tmp", m / "state")
    if dir_synced:
        sync_dir(m)
    power_cut(fs)
    assert disk(fs) == ({"state": b"new"} if dir_synced else {"state": b"old"})


def test_unlink_and_truncate_without_fsync_are_undone(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write(m / "kept", b"k" * 3 * BLOCK, sync=True)
    write(m / "gone", b"g", sync=True)
    sync_dir(m)
    os.truncate(m / "kept", 10)
    (m / "gone").unlink()
    assert not (m / "gone").exists()
    power_cut(fs)
    assert disk(fs) == {"kept": b"k" * 3 * BLOCK, "gone": b"g"}


def test_an_armed_cut_happens_just_before_the_operation_and_holds_later_ones(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    write(m / "state", b"old", sync=True)
    write(m / "state.tmp", b"new", sync=True)
    sync_dir(m)
    fs.arm("rename", "*/state.tmp")
    outcome: list[BaseException | None] = []

    def replace() -> None:
        try:
            os.replace(m / "state.tmp", m / "state")
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=replace)
    worker.start()
    report = fs.wait_cut(timeout=10)
    assert report["trigger"] == "rename /state.tmp"
    time.sleep(0.2)
    assert worker.is_alive()  # held: the machine is off
    fs.release()
    worker.join(10)
    assert isinstance(outcome[0], OSError) and outcome[0].errno == errno.EIO
    fs.stop()
    assert disk(fs) == {"state": b"old", "state.tmp": b"new"}


def test_a_cut_armed_on_fsync_finds_the_file_by_its_handle(fs: PowerCutFS) -> None:
    """libfuse passes no path with operations on open files: the file system finds the path itself."""
    m = fs.mountpoint
    write(m / "seg_000000.ts", b"durable", sync=True)
    sync_dir(m)
    fs.arm("fsync", "*/seg_*.ts")
    errors: list[int | None] = []

    def rewrite() -> None:
        try:
            write(m / "seg_000000.ts", b"closed, not yet durable", sync=True)
        except OSError as exc:
            errors.append(exc.errno)

    worker = threading.Thread(target=rewrite)
    worker.start()
    report = fs.wait_cut(timeout=10)
    assert report["trigger"] == "fsync /seg_000000.ts"
    fs.release()
    worker.join(10)
    assert errors == [errno.EIO]
    fs.stop()
    assert disk(fs) == {"seg_000000.ts": b"durable"}


def test_after_the_cut_nothing_reaches_the_disk(fs: PowerCutFS) -> None:
    m = fs.mountpoint
    fs.cut()
    write(m / "late", b"too late", sync=True)  # a process still running after the power went off
    sync_dir(m)
    fs.stop()
    assert disk(fs) == {}


def test_a_clean_unmount_keeps_everything(fs: PowerCutFS) -> None:
    write(fs.mountpoint / "a", b"unsynced but cleanly unmounted")
    fs.stop()
    assert disk(fs) == {"a": b"unsynced but cleanly unmounted"}


@pytest.mark.parametrize("synchronous", ["FULL", "OFF"])
def test_sqlite_wal_keeps_committed_rows_only_when_it_syncs(fs: PowerCutFS, synchronous: str) -> None:
    """WAL + synchronous=FULL (the agent's journal) keeps every committed row; OFF loses them here."""
    path = fs.mountpoint / "j.sqlite3"
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, payload TEXT)")
    db.execute("INSERT INTO t VALUES (0, 'baseline')")
    db.execute(f"PRAGMA synchronous={synchronous}")
    for n in range(1, 301):  # about 40 pages: all in the WAL, below the auto-checkpoint
        db.execute("INSERT INTO t VALUES (?, ?)", (n, "x" * 500))
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (1000, 'never committed')")
    fs.cut()
    db.close()  # after the cut: its checkpoint and WAL removal reach nothing
    fs.stop()
    fs.start()
    db = sqlite3.connect(str(fs.mountpoint / "j.sqlite3"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]
    finally:
        db.close()
    assert rows == (list(range(301)) if synchronous == "FULL" else [0])


def test_the_durable_image_survives_many_checkpoints(fs: PowerCutFS) -> None:
    """Past the auto-checkpoint the WAL restarts and the database file is rewritten: still consistent."""
    db = sqlite3.connect(str(fs.mountpoint / "j.sqlite3"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=50")
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, payload BLOB)")
    for n in range(400):
        db.execute("INSERT INTO t VALUES (?, ?)", (n, os.urandom(2000)))
    fs.cut()
    db.close()
    fs.stop()
    fs.start()
    db = sqlite3.connect(str(fs.mountpoint / "j.sqlite3"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*), max(n) FROM t").fetchone() == (400, 399)
    finally:
        db.close()


# ---------------------------------------------------------------------- the model, without FUSE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "truncate", "image"]), st.integers(0, 3 * BLOCK + 17),
                          st.binary(min_size=1, max_size=2 * BLOCK + 5)), max_size=30))  # fmt: skip
def test_file_blocks_behave_like_a_bytearray_and_images_are_snapshots(ops: list[tuple[str, int, bytes]]) -> None:
    model = Model()
    node = FileNode(99, 0o100644)
    reference = bytearray()
    images: list[tuple[object, bytes]] = []
    for op, offset, data in ops:
        if op == "write":
            _file_write(node, data, offset)
            if len(reference) < offset:
                reference.extend(bytes(offset - len(reference)))
            reference[offset : offset + len(data)] = data
        elif op == "truncate":
            _file_truncate(node, offset)
            del reference[offset:]
            reference.extend(bytes(offset - len(reference)))
        else:
            model._make_durable(node)
            images.append((model.durable_files[node.ino], bytes(reference)))
        assert node.size == len(reference)
        assert _file_read(node, len(reference) + 10, 0) == bytes(reference)
    for image, expected in images:  # later writes never change an earlier image
        replay = FileNode(1, 0o100644, blocks=list(image.blocks), size=image.size)  # type: ignore[attr-defined]
        assert _file_read(replay, image.size + 1, 0) == expected  # type: ignore[attr-defined]
