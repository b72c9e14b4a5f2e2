"""Task state on disk (SQLite, standard library): the durable upload queue and crash recovery.

Only the agent thread opens it. Every status change is committed before it is published, so a
status a client has seen survives `kill -9` and power cuts (WAL, synchronous=FULL; the directory
holding it is fsynced when it is made, see `edge_agent.durable`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from edge_agent import durable
from edge_agent.tasks import TERMINAL_STATUSES, Status, Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id    TEXT PRIMARY KEY,
    camera_id  TEXT NOT NULL,
    task_name  TEXT NOT NULL,
    status     TEXT NOT NULL,
    started_at TEXT NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_camera ON tasks (camera_id, started_at);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    task_id   TEXT NOT NULL,
    reason    TEXT NOT NULL,
    moved_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    record    TEXT NOT NULL
);
"""


class Journal:
    """Persistent table of tasks keyed by task id."""

    def __init__(self, path: Path) -> None:
        durable.make_dirs(path.parent)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # SQLite fsyncs the directory when it creates a journal or WAL file, not the database file
        # itself: make the database's own name durable too (once per start; cheap when clean).
        durable.try_fsync_dir(path.parent)

    def save(self, task: Task) -> None:
        self._db.execute(
            "INSERT INTO tasks (task_id, camera_id, task_name, status, started_at, record) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET "
            "status = excluded.status, record = excluded.record",
            (task.task_id, task.camera_id, task.task_name, task.status, task.start_time,
             json.dumps(task.to_record(), ensure_ascii=False)),
        )  # fmt: skip

    def _tasks(self, sql: str, args: tuple[object, ...] = ()) -> list[Task]:
        out = []
        for (record,) in self._db.execute(sql, args):
            try:
                out.append(Task.from_record(json.loads(record)))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged row must not stop the agent; it stays on disk for inspection
        return out

    def with_status(self, statuses: frozenset[str]) -> list[Task]:
        marks = ",".join("?" * len(statuses))
        return self._tasks(
            f"SELECT record FROM tasks WHERE status IN ({marks}) ORDER BY started_at", tuple(statuses)
        )

    def find(self, camera_id: str, task_name: str) -> Task | None:
        found = self._tasks(
            "SELECT record FROM tasks WHERE camera_id = ? AND task_name = ? ORDER BY started_at DESC LIMIT 1",
            (camera_id, task_name),
        )
        return found[0] if found else None

    def latest(self, camera_id: str, limit: int) -> list[Task]:
        """The camera's most recent tasks, newest first, one per task name."""
        return self._tasks(
            "SELECT record FROM tasks WHERE rowid IN (SELECT max(rowid) FROM tasks WHERE camera_id = ? "
            "GROUP BY task_name) ORDER BY started_at DESC LIMIT ?",
            (camera_id, limit),
        )

    def finished_uploaded_kept(self) -> list[Task]:
        return [t for t in self.with_status(frozenset({Status.UPLOADED})) if not t.local_file_deleted]

    def prune(self, camera_id: str, keep: int) -> int:
        """Forget finished tasks beyond the newest `keep` of a camera; unfinished ones are never pruned."""
        terminal = sorted(TERMINAL_STATUSES)
        cur = self._db.execute(
            f"DELETE FROM tasks WHERE camera_id = ? AND status IN ({','.join('?' * len(terminal))}) "
            "AND task_id NOT IN (SELECT task_id FROM tasks WHERE camera_id = ? "
            "ORDER BY started_at DESC LIMIT ?)",
            (camera_id, *terminal, camera_id, keep),
        )
        return cur.rowcount

    def setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def quarantine(self, problem: Callable[[str, str], str | None]) -> list[tuple[str, str]]:
        """Move every task whose camera id or task name `problem` objects to out of `tasks` (kept in
        the `quarantine` table for inspection), so it is never recovered or republished.

        A journal written by an older version, or edited by hand, may hold names that would now
        knock the agent off the broker (a noncharacter in a topic) or escape a directory.
        """
        moved = []
        for task_id, camera_id, task_name, record in list(
            self._db.execute("SELECT task_id, camera_id, task_name, record FROM tasks")
        ):
            reason = problem(str(camera_id), str(task_name))
            if reason is None:
                continue
            with self._db:
                self._db.execute("BEGIN")
                self._db.execute("INSERT INTO quarantine (task_id, reason, record) VALUES (?, ?, ?)",
                                 (task_id, reason, record))  # fmt: skip
                self._db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            moved.append((str(task_id), reason))
        return moved

    def close(self) -> None:
        self._db.close()
