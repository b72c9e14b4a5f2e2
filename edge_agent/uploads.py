"""Upload workers: jobs in priority order, tenacity backoff, events back to the agent.

The queue itself is durable in the journal (the agent owns it); this module only executes jobs and
posts `UploadAttempt` / `UploadProgress` / `UploadRetrying` / `UploadFinished` / `UploadFailed` events
back. Transient errors (network, timeouts, 5xx) are retried with exponential backoff and jitter
without limit, interruptibly by shutdown; permanent ones (access denied, a bad bucket, an unreadable
file) fail the job at once. What one attempt does is the object store's (`edge_agent.s3store`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    sleep_using_event,
    stop_when_event_set,
)

from edge_agent.config import StorageConfig
from edge_agent.errors import PermanentUploadError, TransientUploadError, UploadError
from edge_agent.events import (  # re-exported: the workers' events
    UploadAttempt,
    UploadEvent,
    UploadFailed,
    UploadFinished,
    UploadProgress,
    UploadRetrying,
)
from edge_agent.s3store import MinioStore, UploadJob, UploadState, classify
from edge_agent.tasks import iso, utc_now

__all__ = [
    "MinioStore", "ObjectStore", "UploadAttempt", "UploadEvent", "UploadFailed", "UploadFinished", "UploadJob",
    "UploadPool", "UploadProgress", "UploadRetrying", "UploadState", "backoff_seconds",
]  # fmt: skip

log = logging.getLogger(__name__)


class ObjectStore(Protocol):
    """What the workers need of S3; a fake implements it in unit tests."""

    def put(self, job: UploadJob, stop: threading.Event, state: UploadState,
            progress: Callable[[UploadState], None]) -> None: ...  # fmt: skip
    def presign(self, object_name: str) -> str: ...
    def put_bytes(self, object_name: str, data: bytes, content_type: str) -> None: ...
    def abort(self, object_name: str, upload_id: str) -> None: ...
    def set_paused(self, paused: bool) -> None: ...
    def sweep(self, prefix: str, keep: set[str]) -> int: ...


def backoff_seconds(
    streak: int, first: float, cap: float, rand: Callable[[float, float], float] = random.uniform
) -> float:
    """Exponential backoff with jitter after `streak` failed attempts in a row without progress."""
    return float(min(cap, first * 2.0 ** min(max(streak, 1) - 1, 30) + rand(0, first)))


# ---- the workers -------------------------------------------------------------------------------


class UploadPool:
    """N worker threads executing jobs in priority order, retrying transient errors until shutdown."""

    def __init__(
        self, store: ObjectStore, cfg: StorageConfig, post: Callable[[UploadEvent], None]
    ) -> None:
        self._store = store
        self._cfg = cfg
        self._post = post
        self._jobs: queue.PriorityQueue[UploadJob] = queue.PriorityQueue()
        self._stop = threading.Event()
        self.paused = False
        self._running = threading.Event()
        self._running.set()
        self._seq = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"uploads.{i}", daemon=True)
            for i in range(cfg.upload_workers)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, task_id: str, path: Path, object_name: str, sha256: str, size: int,
               created: float, attempts_before: int = 0, upload_id: str | None = None) -> None:  # fmt: skip
        priority = created if self._cfg.upload_order == "oldest" else -created
        self._jobs.put(UploadJob(priority, next(self._seq), task_id, path, object_name, sha256, size,
                                 attempts_before, upload_id))  # fmt: skip

    def set_paused(self, paused: bool) -> None:
        """`pause_uploads` / `resume_uploads`: in-flight transfers stop sending at the next 64 KiB."""
        self.paused = paused
        if paused:
            self._running.clear()
        else:
            self._running.set()
        self._store.set_paused(paused)

    def sweep(self, prefix: str, keep: set[str]) -> None:
        """In the background: abort stale multipart uploads under `prefix` not in `keep`."""

        def run() -> None:
            try:
                n = self._store.sweep(prefix, keep)
            except Exception as exc:
                log.warning("could not list unfinished multipart uploads (%s); will try at the next start", exc)
                return
            if n:
                log.info("aborted %d stale multipart upload(s) under %s", n, prefix)

        threading.Thread(target=run, name="uploads.sweep", daemon=True).start()

    def stop(self, timeout: float) -> None:
        """Stop retrying and wait up to `timeout` for in-flight attempts; pending jobs stay journaled."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def put_bytes(self, object_name: str, data: bytes, content_type: str) -> None:
        """Store a small object (a snapshot) now, on the caller's thread, in one attempt: no queue, no
        journal, no retry. UploadError naming the problem (also while uploads are paused)."""
        if self.paused:
            raise PermanentUploadError("uploads are paused (resume_uploads)")
        try:
            self._store.put_bytes(object_name, data, content_type)
        except UploadError:
            raise
        except Exception as exc:
            raise classify(exc) from exc

    def presign(self, object_name: str) -> str:
        """A fresh presigned GET URL (local computation: the region is configured), '' on failure."""
        try:
            return self._store.presign(object_name)
        except Exception as exc:
            log.warning("presigning %s failed: %s", object_name, exc)
            return ""

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                self._run(job)
            except Exception:  # never lose the worker thread
                log.exception("upload worker crashed on %s", job.task_id)
                self._post(UploadFailed(job.task_id, "internal error in the upload worker", job.attempts_before))

    def _run(self, job: UploadJob) -> None:
        attempts = job.attempts_before
        state = UploadState(upload_id=job.upload_id)

        def progress(st: UploadState) -> None:
            if st.upload_id is not None:
                self._post(UploadProgress(job.task_id, st.upload_id, st.bytes_uploaded))

        streak = 0  # failed attempts in a row that got no part to the server

        def attempt() -> None:
            nonlocal attempts, streak
            while not self._running.wait(1.0):  # paused (metered link): no new attempt either
                if self._stop.is_set():
                    break
            if self._stop.is_set():  # woken from backoff by shutdown: no new attempt
                raise TransientUploadError("shutting down")
            attempts += 1
            self._post(UploadAttempt(job.task_id, attempts))
            sent_before = state.parts_sent
            try:
                self._store.put(job, self._stop, state, progress)
            except Exception as exc:
                # A link that drops every few minutes but moves parts in between is not an outage:
                # the backoff starts again from its first step after an attempt that made progress.
                streak = 1 if state.parts_sent > sent_before else streak + 1
                raise classify(exc) from exc

        def wait(retry_state: RetryCallState) -> float:
            return backoff_seconds(streak, self._cfg.retry_initial_seconds, self._cfg.retry_max_seconds)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            when = iso(utc_now() + timedelta(seconds=delay))
            log.warning("upload of %s failed (attempt %d), retrying in %.1f s: %s",
                        job.task_id, attempts, delay, exc)  # fmt: skip
            self._post(UploadRetrying(job.task_id, attempts, when, str(exc)))

        retrying = Retrying(
            retry=retry_if_exception_type(TransientUploadError),
            wait=wait,
            stop=stop_when_event_set(self._stop),
            sleep=sleep_using_event(self._stop),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            retrying(attempt)
        except TransientUploadError as exc:
            log.info("upload of %s left queued at shutdown (%s)", job.task_id, exc)
            return
        except PermanentUploadError as exc:
            if state.upload_id is not None:  # its parts would cost storage forever
                with contextlib.suppress(Exception):
                    self._store.abort(job.object_name, state.upload_id)
            self._post(UploadFailed(job.task_id, str(exc), attempts))
            return
        # Only where it is published retained (storage.download_url); replies presign on demand.
        url = self.presign(job.object_name) if self._cfg.download_url == "retained" else ""
        deleted = False
        if self._cfg.delete_local_after_upload:
            with contextlib.suppress(FileNotFoundError):
                job.path.unlink()
            deleted = not job.path.exists()
        self._post(UploadFinished(job.task_id, self._cfg.bucket, job.object_name, url, deleted, attempts))
