"""Making files and their names survive a power cut: fsync of files and of the directories holding them.

fsync(2) makes a file's data durable, not its name: "an explicit fsync() on a file descriptor for
the directory is also needed". ext4 usually gives more (an fsync commits every earlier create and
rename with it), other file systems and the tests' power-cut file system (`tests/powercutfs.py`)
do not, so the agent relies only on the POSIX rule. Every helper here is cheap on a file or
directory that is already clean, and tolerates file systems that refuse fsync on a directory.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Some file systems (old FUSE, some network ones) answer fsync of a directory with one of these:
# there is nothing more the agent could do, so the data fsync stays the only guarantee there.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF})


def fsync_file(path: Path) -> None:
    """Make `path`'s contents and size durable (OSError if the disk reports a failure)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir_fd(fd: int) -> None:
    """Make the entries of an open directory durable (names created, renamed or removed in it)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable (OSError if the disk reports a failure)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync_dir_fd(fd)
    finally:
        os.close(fd)


def try_fsync_dir(path: Path) -> bool:
    """`fsync_dir` that logs a failure instead of raising: False if the entries may not be durable.

    For callers whose work is done either way (the file is in place, only its power-cut safety is
    in doubt on a failing disk) and who must not turn that into a failed recording.
    """
    try:
        fsync_dir(path)
    except OSError as exc:
        log.warning("could not make the entries of %s durable: %s", path, exc)
        return False
    return True


def make_dirs(path: Path) -> None:
    """`mkdir -p` whose new directories survive a power cut: each one's parent is fsynced after it.

    A directory that already exists is left alone (its name was made durable when it was made).
    Errors of mkdir are raised as by `Path.mkdir`; a failing fsync is only logged (`try_fsync_dir`).
    """
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
        try_fsync_dir(directory.parent)
