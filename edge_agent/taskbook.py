"""The task book: which tasks are in flight, which one holds each camera, and which are remembered.

Owned by the agent thread alone (no locks): the agent decides what happens to a task, the book
keeps the answer to "where is it" in one place:

- in flight: recording, finalising or uploading (what upload and recorder events refer to);
- holding a camera: the task a new `start` on that camera runs into (`BUSY_STATUSES`), with its
  recorder and its max-duration deadline;
- remembered: per camera, the newest task (the camera's status topic) and a bounded set of recent
  ones (their retained task topics), oldest finished ones dropped first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from edge_agent.tasks import ACTIVE_STATUSES, TERMINAL_STATUSES, Status, Task

# A camera is busy while recording and while its first upload attempt runs (as the HTTP service
# did); a task waiting out an object-store outage (`upload_pending`) does not block new recordings.
BUSY_STATUSES = ACTIVE_STATUSES | {Status.UPLOADING}


class Stoppable(Protocol):
    """What the book keeps of a task's recorder: the agent asks it to stop."""

    def request_stop(self) -> None: ...


class TaskBook:
    """Tasks in flight, the task holding each camera (with its recorder and deadline), and the
    remembered tasks per camera (the newest one and the retained set)."""

    def __init__(self, cameras: Iterable[str], retained_per_camera: int) -> None:
        self._in_flight: dict[str, Task] = {}  # task id -> task
        self._holders: dict[str, Task] = {}  # camera -> the task holding it
        self._recorders: dict[str, Stoppable] = {}  # task id -> its recorder (recording or finalising)
        self._deadlines: dict[str, float] = {}  # task id -> monotonic max-duration deadline
        self._latest: dict[str, Task] = {}  # camera -> newest task
        self._retained: dict[str, OrderedDict[str, Task]] = {c: OrderedDict() for c in cameras}
        self._limit = retained_per_camera

    def set_cameras(self, cameras: Iterable[str]) -> None:
        """The configured cameras changed: new ones get a remembered set; removed ones keep theirs
        until their last task is forgotten (a running task still finishes and is remembered)."""
        for camera in cameras:
            self._retained.setdefault(camera, OrderedDict())

    # ---- in flight ------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        return self._in_flight.get(task_id)

    def in_flight(self) -> list[Task]:
        return list(self._in_flight.values())

    def track(self, task: Task) -> None:
        """In flight without holding its camera (an upload resumed at start)."""
        self._in_flight[task.task_id] = task

    def hold(self, task: Task, recorder: Stoppable, deadline: float | None = None, *, camera: bool = True) -> None:
        """In flight, holding its camera, with the recorder that records or finalises it.

        `camera=False`: a task that reads the camera's ring without keeping it busy (an export).
        """
        self._in_flight[task.task_id] = task
        if camera:
            self._holders[task.camera_id] = task
        self._recorders[task.task_id] = recorder
        if deadline is not None:
            self._deadlines[task.task_id] = deadline

    def land(self, task_id: str) -> Task | None:
        """No longer in flight (ended, or handed over for good); the task if it was."""
        return self._in_flight.pop(task_id, None)

    # ---- cameras and recorders --------------------------------------------------------------

    def holder(self, camera: str) -> Task | None:
        return self._holders.get(camera)

    def holders(self) -> list[Task]:
        return list(self._holders.values())

    def unhold(self, camera: str) -> None:
        """Forget a holder that no longer keeps its camera busy (a new start replaces it)."""
        self._holders.pop(camera, None)

    def free_if_idle(self, task: Task) -> None:
        """After a status change: a task no longer busy lets go of its camera."""
        if task.status not in BUSY_STATUSES and self._holders.get(task.camera_id) is task:
            del self._holders[task.camera_id]

    def recorder(self, task_id: str) -> Stoppable | None:
        return self._recorders.get(task_id)

    def recording(self) -> list[str]:
        """Task ids whose recorder has not reported its end yet."""
        return list(self._recorders)

    def recorder_done(self, task_id: str) -> None:
        """Its recorder reported the end (finished or failed): no recorder, no deadline."""
        self._recorders.pop(task_id, None)
        self._deadlines.pop(task_id, None)

    def release(self, task: Task) -> None:
        """The task is done with its recorder, its deadline and its camera."""
        self.recorder_done(task.task_id)
        if self._holders.get(task.camera_id) is task:
            del self._holders[task.camera_id]

    # ---- deadlines ------------------------------------------------------------------------------

    def cancel_deadline(self, task_id: str) -> None:
        self._deadlines.pop(task_id, None)

    def has_deadline(self, task_id: str) -> bool:
        return task_id in self._deadlines

    def next_deadline(self) -> float:
        return min(self._deadlines.values(), default=math.inf)

    def due(self, now: float) -> list[Task]:
        """Active tasks whose deadline has passed (each returned once: its deadline is removed)."""
        due = []
        for task_id, deadline in list(self._deadlines.items()):
            if now >= deadline:
                del self._deadlines[task_id]
                task = self._in_flight.get(task_id)
                if task is not None and task.status in ACTIVE_STATUSES:
                    due.append(task)
        return due

    # ---- remembered -----------------------------------------------------------------------------

    def remember(self, task: Task) -> list[str]:
        """Make `task` its camera's newest if it is; keep the retained set bounded.

        Returns the names of finished tasks dropped from the set (their retained topics to clear).
        """
        kept = self._retained.get(task.camera_id)
        if kept is None:  # a camera no longer configured
            return []
        latest = self._latest.get(task.camera_id)
        if latest is None or task.started >= latest.started:
            self._latest[task.camera_id] = task
        kept.pop(task.task_name, None)
        kept[task.task_name] = task
        dropped = []
        for name in list(kept):
            if len(kept) <= self._limit:
                break
            if kept[name].status in TERMINAL_STATUSES:
                del kept[name]
                dropped.append(name)
        return dropped

    def latest(self, camera: str) -> Task | None:
        return self._latest.get(camera)

    def is_latest(self, task: Task) -> bool:
        return self._latest.get(task.camera_id) is task

    def retained(self, camera: str) -> list[Task]:
        kept = self._retained.get(camera)
        return list(kept.values()) if kept is not None else []

    def kept(self, camera: str, name: str) -> Task | None:
        kept = self._retained.get(camera)
        return kept.get(name) if kept is not None else None
