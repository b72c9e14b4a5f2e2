"""Unit tests of the SQLite journal (a real file in tmp_path)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_agent.journal import Journal
from edge_agent.tasks import Task, stamp

T0 = datetime(2026, 11, 28, 14, 50, 0, tzinfo=UTC)


def make_task(name: str, minutes: int, status: str = "completed", camera: str = "cam1") -> Task:
    started = T0 + timedelta(minutes=minutes)
    return Task(
        task_id=f"{camera}/{name}_{stamp(started)}", camera_id=camera, task_name=name, device_id="edge-01",
        started=started, storage_type="local", local_file=f"/rec/{camera}/{name}.mp4", max_seconds=60,
        status=status,
    )  # fmt: skip


def test_save_and_find_round_trip(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    task = make_task("夜间巡检", 0, status="recording")
    task.sha256 = "ab" * 32
    task.rejected_segments = ["seg_000001.ts"]
    task.request_id = "r-1"
    task.updated = T0 + timedelta(seconds=1, milliseconds=250)  # records keep millisecond precision
    journal.save(task)
    found = journal.find("cam1", "夜间巡检")
    assert found is not None
    assert found == task  # every field, including datetimes and lists
    assert journal.find("cam1", "other") is None
    assert journal.find("cam2", "夜间巡检") is None
    journal.close()


def test_save_updates_in_place(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    task = make_task("a", 0, status="recording")
    journal.save(task)
    task.status = "completed"
    task.size_bytes = 1234
    journal.save(task)
    assert [t.status for t in journal.with_status(frozenset({"recording"}))] == []
    done = journal.with_status(frozenset({"completed"}))
    assert len(done) == 1
    assert done[0].size_bytes == 1234


def test_find_returns_newest_of_a_name(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    journal.save(make_task("a", 0, status="failed"))
    journal.save(make_task("a", 5, status="completed"))
    found = journal.find("cam1", "a")
    assert found is not None
    assert found.status == "completed"
    assert found.started == T0 + timedelta(minutes=5)


def test_latest_newest_first_one_per_name(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    journal.save(make_task("a", 0))
    journal.save(make_task("b", 1))
    journal.save(make_task("a", 2, status="failed"))
    journal.save(make_task("c", 3))
    journal.save(make_task("x", 4, camera="cam2"))
    latest = journal.latest("cam1", 10)
    assert [(t.task_name, t.status) for t in latest] == [("c", "completed"), ("a", "failed"), ("b", "completed")]
    assert [t.task_name for t in journal.latest("cam1", 2)] == ["c", "a"]


def test_with_status_ordered_by_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    journal.save(make_task("late", 9, status="uploading"))
    journal.save(make_task("early", 1, status="upload_pending"))
    journal.save(make_task("done", 2, status="uploaded"))
    pending = journal.with_status(frozenset({"uploading", "upload_pending"}))
    assert [t.task_name for t in pending] == ["early", "late"]


def test_prune_keeps_newest_and_unfinished(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    journal.save(make_task("active", 0, status="recording"))
    journal.save(make_task("pending", 1, status="upload_pending"))
    for i in range(2, 7):
        journal.save(make_task(f"t{i}", i, status="completed" if i % 2 else "uploaded"))
    journal.save(make_task("other-cam", 0, camera="cam2"))
    assert journal.prune("cam1", 2) == 3  # t2, t3, t4 go; t5, t6 are the newest two
    names = {t.task_name for t in journal.latest("cam1", 100)}
    assert names == {"active", "pending", "t5", "t6"}
    assert journal.find("cam2", "other-cam") is not None
    assert journal.prune("cam1", 2) == 0


def test_finished_uploaded_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    kept = make_task("kept", 0, status="uploaded")
    kept.local_file_deleted = False
    gone = make_task("gone", 1, status="uploaded")
    gone.local_file_deleted = True
    journal.save(kept)
    journal.save(gone)
    assert [t.task_name for t in journal.finished_uploaded_kept()] == ["kept"]


def test_reopen_keeps_tasks(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "j.sqlite3"  # parent directories are created
    journal = Journal(path)
    journal.save(make_task("a", 0, status="recording"))
    journal.save(make_task("b", 1, status="uploading"))
    journal.close()

    reopened = Journal(path)
    assert {t.task_name for t in reopened.with_status(frozenset({"recording", "uploading"}))} == {"a", "b"}
    found = reopened.find("cam1", "b")
    assert found is not None
    assert found.status == "uploading"
    reopened.close()


def test_damaged_row_is_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    journal.save(make_task("good", 0))
    journal._db.execute(
        "INSERT INTO tasks VALUES ('cam1/bad', 'cam1', 'bad', 'completed', '2026-11-28T15:00:00.000Z', '{broken')"
    )
    journal._db.execute(
        "INSERT INTO tasks VALUES ('cam1/bad2', 'cam1', 'bad2', 'completed', '2026-11-28T15:00:00.000Z', '{}')"
    )
    assert [t.task_name for t in journal.with_status(frozenset({"completed"}))] == ["good"]
