"""Upload workers: the MinIO client, error classification, and tenacity around the one idempotent PUT.

The queue itself is durable in the journal (the agent owns it); this module only executes jobs and
posts `UploadAttempt` / `UploadRetrying` / `UploadFinished` / `UploadFailed` events back. A job's
object key is fixed when the recording is made, so a retried or resumed upload overwrites the same
key and never creates a duplicate.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    sleep_using_event,
    stop_when_event_set,
    wait_exponential_jitter,
)

from edge_agent.config import StorageConfig
from edge_agent.errors import PermanentUploadError, TransientUploadError, UploadError
from edge_agent.tasks import iso, utc_now

log = logging.getLogger(__name__)

CHECKSUM_META = "sha256"
# S3 error codes that retrying cannot fix.
PERMANENT_S3_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName",
    "NoSuchBucket", "AllAccessDisabled", "AccountProblem", "InvalidArgument", "EntityTooLarge",
    "MethodNotAllowed", "NotImplemented", "InvalidObjectName", "KeyTooLongError",
})  # fmt: skip


# ---- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadAttempt:
    task_id: str
    attempt: int


@dataclass(frozen=True)
class UploadRetrying:
    task_id: str
    attempts: int
    next_retry_at: str
    error: str


@dataclass(frozen=True)
class UploadFinished:
    task_id: str
    bucket: str
    object_name: str
    download_url: str
    local_file_deleted: bool
    attempts: int


@dataclass(frozen=True)
class UploadFailed:
    task_id: str
    error: str
    attempts: int


UploadEvent = UploadAttempt | UploadRetrying | UploadFinished | UploadFailed


@dataclass(order=True, frozen=True)
class UploadJob:
    """One file to put at one key. Ordered by `priority` (then submission order)."""

    priority: float
    seq: int
    task_id: str = field(compare=False)
    path: Path = field(compare=False)
    object_name: str = field(compare=False)
    sha256: str = field(compare=False)
    size: int = field(compare=False)
    attempts_before: int = field(default=0, compare=False)


# ---- the object store --------------------------------------------------------------------------


class ObjectStore(Protocol):
    """What the workers need of S3; a fake implements it in unit tests."""

    def put(self, job: UploadJob, stop: threading.Event) -> None: ...
    def presign(self, object_name: str) -> str: ...


def classify(exc: BaseException) -> UploadError:
    """Map any exception from an upload attempt to transient (retry) or permanent (fail)."""
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, S3Error):
        if exc.code in PERMANENT_S3_CODES:
            return PermanentUploadError(f"S3 {exc.code}: {exc.message}")
        return TransientUploadError(f"S3 {exc.code}: {exc.message}")
    if isinstance(exc, ServerError):
        return TransientUploadError(f"S3 server error {exc.status_code}")
    if isinstance(exc, InvalidResponseError):
        return TransientUploadError(f"unexpected response from S3: {str(exc)[:200]}")
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return PermanentUploadError(f"local file unreadable: {exc}")
    if isinstance(exc, urllib3.exceptions.HTTPError | http.client.HTTPException | socket.timeout | OSError):
        return TransientUploadError(f"network error: {type(exc).__name__}: {str(exc)[:200]}")
    return PermanentUploadError(f"unexpected error: {exc!r}"[:300])


class _RateLimited:
    """File wrapper that holds reads to `rate` bytes/s on average (metered links)."""

    def __init__(self, f: BinaryIO, rate: int, stop: threading.Event) -> None:
        self._f, self._rate, self._stop = f, rate, stop
        self._start = time.monotonic()
        self._sent = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._sent += len(data)
        ahead = self._sent / self._rate - (time.monotonic() - self._start)
        if ahead > 0 and self._stop.wait(ahead):
            raise TransientUploadError("interrupted by shutdown")
        return data


class MinioStore:
    """MinIO/S3 through minio-py with short timeouts and few internal retries.

    minio-py's defaults (300 s timeouts, 5 urllib3 retries per request) would stack under our own
    backoff; with these, one attempt has a known upper bound.
    """

    def __init__(self, cfg: StorageConfig) -> None:
        assert cfg.access_key is not None and cfg.secret_key is not None
        self._cfg = cfg
        tls: dict[str, Any] = {}
        if cfg.secure:
            # Verify the S3 server; storage.ca_file for a private CA (urllib3 otherwise uses the system store).
            tls = {"cert_reqs": "CERT_REQUIRED", "ca_certs": str(cfg.ca_file) if cfg.ca_file else None}
        http_client = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.connect_timeout_seconds, read=cfg.read_timeout_seconds),
            retries=urllib3.Retry(total=1, connect=1, read=0, backoff_factor=0.2),
            maxsize=cfg.upload_workers + 1,
            **tls,
        )
        self._client = Minio(
            cfg.endpoint,
            access_key=cfg.access_key.get_secret_value(),
            secret_key=cfg.secret_key.get_secret_value(),
            secure=cfg.secure,
            region=cfg.region,  # known region: presigning needs no request
            http_client=http_client,
        )
        self._bucket_ready = False
        self._lock = threading.Lock()

    def _ensure_bucket(self) -> None:
        with self._lock:
            if self._bucket_ready:
                return
            bucket = self._cfg.bucket
            if not self._client.bucket_exists(bucket):
                try:
                    self._client.make_bucket(bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    def put(self, job: UploadJob, stop: threading.Event) -> None:
        self._ensure_bucket()
        with job.path.open("rb") as f:
            size = job.path.stat().st_size
            if size != job.size:
                raise PermanentUploadError(f"local file changed size ({size} != {job.size} bytes)")
            data: Any = f
            if self._cfg.bandwidth_limit_bytes_per_second:
                data = _RateLimited(f, self._cfg.bandwidth_limit_bytes_per_second, stop)
            self._client.put_object(
                self._cfg.bucket, job.object_name, data, size, content_type="video/mp4",
                metadata={CHECKSUM_META: job.sha256}, part_size=self._cfg.part_size_bytes,
            )  # fmt: skip
        stat = self._client.stat_object(self._cfg.bucket, job.object_name)
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        remote = meta.get(f"x-amz-meta-{CHECKSUM_META}")
        if stat.size != job.size or remote != job.sha256:
            raise TransientUploadError(
                f"verification failed: stored {stat.size} bytes sha256={remote}, expected {job.size} bytes"
            )

    def presign(self, object_name: str) -> str:
        return str(
            self._client.presigned_get_object(
                self._cfg.bucket, object_name, expires=timedelta(seconds=self._cfg.presign_seconds)
            )
        )


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
        self._seq = itertools.count()
        self._threads = [
            threading.Thread(target=self._work, name=f"uploads.{i}", daemon=True)
            for i in range(cfg.upload_workers)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, task_id: str, path: Path, object_name: str, sha256: str, size: int,
               created: float, attempts_before: int = 0) -> None:  # fmt: skip
        priority = created if self._cfg.upload_order == "oldest" else -created
        self._jobs.put(UploadJob(priority, next(self._seq), task_id, path, object_name, sha256, size,
                                 attempts_before))  # fmt: skip

    def stop(self, timeout: float) -> None:
        """Stop retrying and wait up to `timeout` for in-flight attempts; pending jobs stay journaled."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

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

        def attempt() -> None:
            nonlocal attempts
            if self._stop.is_set():  # woken from backoff by shutdown: no new attempt
                raise TransientUploadError("shutting down")
            attempts += 1
            self._post(UploadAttempt(job.task_id, attempts))
            try:
                self._store.put(job, self._stop)
            except Exception as exc:
                raise classify(exc) from exc

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            when = iso(utc_now() + timedelta(seconds=delay))
            log.warning("upload of %s failed (attempt %d), retrying in %.1f s: %s",
                        job.task_id, attempts, delay, exc)  # fmt: skip
            self._post(UploadRetrying(job.task_id, attempts, when, str(exc)))

        retrying = Retrying(
            retry=retry_if_exception_type(TransientUploadError),
            wait=wait_exponential_jitter(
                multiplier=self._cfg.retry_initial_seconds, max=self._cfg.retry_max_seconds,
                jitter=self._cfg.retry_initial_seconds,
            ),
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
