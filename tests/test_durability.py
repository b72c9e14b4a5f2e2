"""What the agent fsyncs so that a power cut loses at most the segment being written.

The file system parts run on the power-cut file system (tests/powercutfs.py), which keeps only
what was fsynced; the end-to-end cuts of the running agent are in tests/test_e2e_powercut.py.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fakemp4 import finalise_spec
from parts import ffprobe_info
from powercutfs import PowerCutFS
from test_finalise import _record_segments
from test_unit_journal import make_task

from edge_agent import durable
from edge_agent.finalise import finalise_segments
from edge_agent.journal import Journal
from edge_agent.recorder import Recorder
from edge_agent.recording import RecordingFinished


@pytest.fixture
def fs(tmp_path: Path, track: Callable[[PowerCutFS], PowerCutFS]) -> PowerCutFS:
    return track(PowerCutFS(tmp_path / "pcfs")).start()


def files_on_disk(fs: PowerCutFS) -> list[str]:
    return sorted(str(p.relative_to(fs.backing)) for p in fs.backing.rglob("*"))


def test_make_dirs_survives_a_cut_where_mkdir_p_does_not(fs: PowerCutFS) -> None:
    durable.make_dirs(fs.mountpoint / "rec" / "cam1" / ".t.segments")
    durable.make_dirs(fs.mountpoint / "rec" / "cam1")  # already there: nothing to do
    (fs.mountpoint / "plain" / "cam1").mkdir(parents=True)
    fs.cut()
    fs.stop()
    assert files_on_disk(fs) == ["rec", "rec/cam1", "rec/cam1/.t.segments"]


def test_make_dirs_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        durable.make_dirs(tmp_path / "f")


def test_a_journal_made_on_a_fresh_disk_survives_a_cut(fs: PowerCutFS) -> None:
    """The agent's start-up order (cli.run_agent): make the output directory, open the journal, save."""
    output_dir = fs.mountpoint / "recordings"
    durable.make_dirs(output_dir)
    journal = Journal(output_dir / ".edge-agent.sqlite3")
    task = make_task("first", 0, status="recording")
    journal.save(task)
    fs.cut()
    journal.close()
    fs.stop()
    fs.start()
    again = Journal(output_dir / ".edge-agent.sqlite3")
    try:
        found = again.find("cam1", "first")
        assert found is not None and found.status == "recording"
    finally:
        again.close()


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_fsync_of_a_directory_tolerates_file_systems_that_refuse_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    durable.fsync_dir(tmp_path)  # no error: nothing more can be done there


def test_fsync_failures_of_a_failing_disk_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    (tmp_path / "f").write_bytes(b"x")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        durable.fsync_dir(tmp_path)
    with pytest.raises(OSError, match="I/O error"):
        durable.fsync_file(tmp_path / "f")


def test_make_dirs_on_a_failing_disk_makes_the_directory_and_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with caplog.at_level(logging.WARNING, logger="edge_agent.durable"):
        durable.make_dirs(tmp_path / "a" / "b")
        assert durable.try_fsync_dir(tmp_path) is False
    assert (tmp_path / "a" / "b").is_dir()
    assert caplog.text.count("could not make the entries of") == 3


def _recorder(tmp_path: Path) -> Recorder:
    return Recorder(finalise_spec(tmp_path), lambda event: None)


def test_segments_left_behind_are_made_durable_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an FFmpeg run (a killed one never reports its last segment) and before recovery joins."""
    calls: list[str] = []
    monkeypatch.setattr(durable, "fsync_file", lambda path: calls.append(path.name))
    monkeypatch.setattr(durable, "fsync_dir", lambda path: calls.append(f"dir {path.name}"))
    rec = _recorder(tmp_path)
    rec.spec.segment_dir.mkdir()
    for n in (0, 1, 10):
        (rec.spec.segment_dir / f"seg_{n:06d}.ts").write_bytes(b"x")
    rec._make_durable(["seg_000000.ts"])  # reported by FFmpeg as closed
    assert calls == ["seg_000000.ts", "dir .t.segments"]
    rec._sync_left_behind()
    assert calls[2:] == ["seg_000001.ts", "seg_000010.ts", "dir .t.segments"]
    rec._sync_left_behind()  # nothing new: no fsync at all
    assert len(calls) == 5
    assert rec.sync_seconds >= 0.0


def test_a_failing_segment_fsync_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(durable, "fsync_file", fail)
    rec = _recorder(tmp_path)
    rec.spec.segment_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="edge_agent.recorder"):
        rec._make_durable(["seg_000000.ts"])  # the recording goes on
    assert "could not make segments" in caplog.text


@pytest.mark.integration
def test_a_cut_while_segments_are_removed_never_shortens_the_mp4(tmp_path: Path) -> None:
    """The segments of a finished MP4 are retired (renamed, durably) before they are deleted.

    A journaling file system may commit some deletions of a plain delete loop and not others; the
    task, still `stopping` in the journal, would then be recovered from the survivors into a
    shorter MP4 over the good one. Here the state such a cut leaves is made by hand: the MP4
    plus a retired directory with only some segments in it.
    """
    spec = finalise_spec(tmp_path)
    known = _record_segments(spec, seconds=8)
    first = finalise_segments(spec, known)
    assert isinstance(first, RecordingFinished)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.mp4"]  # no segments, nothing retired left
    retired = tmp_path / ".t.segments.done"
    retired.mkdir()
    for name in ("seg_000002.ts", "seg_000003.ts"):  # the deletions that did not reach the disk
        (retired / name).write_bytes(b"\x47" * 188 * 100)
    (retired / "concat.txt").write_text("file 'x'\n")
    again = finalise_segments(spec, None)  # crash recovery of the same task
    assert isinstance(again, RecordingFinished)
    assert again.sha256 == first.sha256 and again.duration_seconds == pytest.approx(first.duration_seconds)
    assert 7.5 <= ffprobe_info(again.path)["duration"] <= 8.5
    assert not retired.exists()
