"""The object store: one recording put at its key in MinIO/S3, resumably, and verified.

A job's object key is fixed when the recording is made, so a retried or resumed upload writes the
same key and never creates a duplicate. Each object carries `x-amz-meta-sha256`, checked with a stat
after the PUT.

Resuming (weak uplinks, kill -9): a file larger than one part goes up as an S3 multipart upload whose
id the agent journals (`UploadProgress`) as soon as it exists; every attempt, in this process or
after a restart, first asks the server which parts it really has (ListParts), keeps each part whose
size and ETag (the MD5 of the part for unencrypted uploads) match the local bytes, and sends only the
rest. An upload id lost to a crash before it was journaled is found again with ListMultipartUploads on
the exact key. minio-py's managed `put_object` cannot resume (minio-py #1484), so this uses its
multipart calls (`_create_multipart_upload`, `_upload_part`, `_list_parts`, `_complete_multipart_upload`,
`_abort_multipart_upload`, `_list_multipart_uploads`): non-public, so minio is pinned to 7.2.x and
`tests/test_contract_s3.py` exercises each call against the real S3 server.

A slow link is not a dead link: urllib3 sends a request body with one `sendall` bounded by the
*connect* timeout, so a 16 MiB part had to leave within 5 s. `_PacedConnection` sends bodies in
64 KiB slices, each bounded by `storage.stall_timeout_seconds` (no progress for that long = dead),
paced by the bandwidth cap shared by all workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import urllib3
import urllib3.connection
import urllib3.connectionpool
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, S3Error, ServerError

from edge_agent.config import StorageConfig
from edge_agent.errors import PermanentUploadError, TransientUploadError, UploadError

log = logging.getLogger(__name__)

CHECKSUM_META = "sha256"
# S3 error codes that retrying cannot fix.
PERMANENT_S3_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName",
    "NoSuchBucket", "AllAccessDisabled", "AccountProblem", "InvalidArgument", "EntityTooLarge",
    "MethodNotAllowed", "NotImplemented", "InvalidObjectName", "KeyTooLongError",
})  # fmt: skip


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
    upload_id: str | None = field(default=None, compare=False)  # a multipart upload to resume


@dataclass
class UploadState:
    """What one job knows across its attempts: the multipart upload it writes to."""

    upload_id: str | None = None
    bytes_uploaded: int = 0
    parts_sent: int = 0  # parts this process has sent (progress, for the retry backoff)


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


SEND_SLICE = 64 * 1024
PART_CONCURRENCY = 3  # parts of one upload in flight at once at most (memory: this many parts per worker)
MAX_IN_FLIGHT_SHARE = 0.05  # ... and never more than this share of the file (what a cut or kill -9 costs)


def _part_length(number: int, size: int, part_size: int) -> int:
    return min(part_size, size - (number - 1) * part_size)


class Pacer:
    """The bandwidth cap shared by every upload worker (a token bucket in bytes), and the shutdown
    event that interrupts a paced wait. Thread-safe: all workers' connections call `take`."""

    def __init__(self, rate: int | None, stop: threading.Event) -> None:
        self.rate = rate
        self.stop = stop
        self.running = threading.Event()  # cleared by `pause_uploads`: no byte goes out
        self.running.set()
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the link is free again

    def wait_running(self) -> None:
        """Block while uploads are paused (a metered link); shutdown interrupts."""
        while not self.running.wait(1.0):
            if self.stop.is_set():
                raise TransientUploadError("interrupted by shutdown")

    def take(self, n: int) -> None:
        if self.stop.is_set():
            raise TransientUploadError("interrupted by shutdown")
        self.wait_running()
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + n / self.rate
            wait = start - now
        if wait > 0 and self.stop.wait(wait):
            raise TransientUploadError("interrupted by shutdown")


class _PacedConnection(urllib3.connection.HTTPConnection):
    """Sends a request body in slices: each must leave within `stall_timeout` (a dead link is found
    that fast), while a slow but moving transfer may take as long as it needs; paced by `pacer`."""

    pacer: Pacer | None = None
    stall_timeout: float = 30.0

    def send(self, data: Any) -> None:
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) <= SEND_SLICE:
            if self.pacer is not None and isinstance(data, bytes | bytearray | memoryview):
                self.pacer.take(len(data))
            super().send(data)
            return
        if self.sock is not None:
            self.sock.settimeout(self.stall_timeout)
        view = memoryview(data)
        for offset in range(0, len(view), SEND_SLICE):
            piece = view[offset : offset + SEND_SLICE]
            if self.pacer is not None:
                self.pacer.take(len(piece))
            super().send(piece)


class _PacedHTTPSConnection(_PacedConnection, urllib3.connection.HTTPSConnection):
    pass


def _paced_pools(pacer: Pacer, stall_timeout: float) -> dict[str, type[urllib3.connectionpool.HTTPConnectionPool]]:
    """Connection pool classes whose connections are paced by `pacer` (one set per store)."""

    class Conn(_PacedConnection):
        pass

    class SConn(_PacedHTTPSConnection):
        pass

    for cls in (Conn, SConn):
        cls.pacer, cls.stall_timeout = pacer, stall_timeout

    class Pool(urllib3.connectionpool.HTTPConnectionPool):
        ConnectionCls = Conn

    class SPool(urllib3.connectionpool.HTTPSConnectionPool):
        ConnectionCls = SConn

    return {"http": Pool, "https": SPool}


def _etag(value: str | None) -> str:
    return (value or "").strip().strip('"').lower()


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
        self.pacer = Pacer(cfg.bandwidth_limit_bytes_per_second, threading.Event())
        http_client = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=cfg.connect_timeout_seconds, read=cfg.read_timeout_seconds),
            retries=urllib3.Retry(total=1, connect=1, read=0, backoff_factor=0.2),
            maxsize=cfg.upload_workers + 1,
            **tls,
        )
        http_client.pool_classes_by_scheme = _paced_pools(self.pacer, cfg.stall_timeout_seconds)
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

    def put(self, job: UploadJob, stop: threading.Event, state: UploadState,
            progress: Callable[[UploadState], None]) -> None:  # fmt: skip
        """Put the file at its key, resuming `state.upload_id` if the server still has it, then verify."""
        self.pacer.stop = stop
        self._ensure_bucket()
        if not job.path.exists() and self._stored(job):
            # Uploaded and deleted locally, but a crash or power cut came before the journal said
            # `uploaded`: the stored object (size and sha256 checked) is the recording.
            log.info("upload of %s: the local file is gone but the object is stored and verified", job.task_id)
            state.bytes_uploaded = job.size
            return
        with job.path.open("rb") as f:
            size = job.path.stat().st_size
            if size != job.size:
                raise PermanentUploadError(f"local file changed size ({size} != {job.size} bytes)")
            headers = {"Content-Type": "video/mp4", f"x-amz-meta-{CHECKSUM_META}": job.sha256}
            if size <= self._cfg.part_size_bytes:
                self._client._put_object(self._cfg.bucket, job.object_name, f.read(), headers=dict(headers))
                state.bytes_uploaded = size
            else:
                self._put_multipart(job, f, size, headers, stop, state, progress)
        self._verify(job)

    def _put_multipart(self, job: UploadJob, f: BinaryIO, size: int, headers: dict[str, str],
                       stop: threading.Event, state: UploadState,
                       progress: Callable[[UploadState], None]) -> None:  # fmt: skip
        bucket, key, part_size = self._cfg.bucket, job.object_name, self._cfg.part_size_bytes
        journaled = state.upload_id is not None
        have = self._server_parts(key, state) if journaled else None
        if have is None and journaled and self._stored(job):
            # Gone because it was completed: only the answer to CompleteMultipartUpload was lost (a cut
            # link, or kill -9 before the end was journaled). A new upload would send the file twice.
            log.info("upload of %s was already completed on the server", job.task_id)
            state.bytes_uploaded = size
            return
        if have is None:
            state.upload_id = self._adopt(key)
            have = self._server_parts(key, state) if state.upload_id else None
        if have is None or state.upload_id is None:
            state.upload_id = self._client._create_multipart_upload(bucket, key, dict(headers))
            have = {}
        count = (size + part_size - 1) // part_size
        upload_id = state.upload_id
        etags: dict[int, str] = {}
        # Parts the server already has (size and MD5 match the local bytes) are kept; progress then
        # starts from them, in one report, instead of counting up from 0 again.
        to_send: list[int] = []
        state.bytes_uploaded = 0
        for number in range(1, count + 1):
            server = have.get(number)
            if server is not None and server.size == _part_length(number, size, part_size):
                with job.path.open("rb") as pf:
                    pf.seek((number - 1) * part_size)
                    if _etag(server.etag) == hashlib.md5(pf.read(part_size), usedforsecurity=False).hexdigest():
                        etags[number] = server.etag
                        state.bytes_uploaded += server.size
                        continue
            to_send.append(number)
        progress(state)  # journals the upload id before the first byte goes
        lock = threading.Lock()
        failed = threading.Event()

        def send(number: int) -> None:
            if stop.is_set() or failed.is_set():
                raise TransientUploadError("interrupted")
            with job.path.open("rb") as pf:  # one handle per thread
                pf.seek((number - 1) * part_size)
                data = pf.read(part_size)
            etag = self._client._upload_part(bucket, key, data, None, upload_id, number)
            with lock:  # progress posted under the lock too: parts ending together never report out of order
                etags[number] = etag
                state.bytes_uploaded += len(data)
                state.parts_sent += 1
                progress(state)

        # A few parts at once, as minio-py's own put_object does (one TCP stream rarely fills a link),
        # but never more than MAX_IN_FLIGHT_SHARE of the file: a cut or a kill loses what is in flight.
        workers = max(1, min(PART_CONCURRENCY, int(size * MAX_IN_FLIGHT_SHARE) // part_size, len(to_send)))
        name = f"{threading.current_thread().name}.part"
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as ex:
            futures = [ex.submit(send, n) for n in to_send]
            try:
                for fut in as_completed(futures):
                    fut.result()
            except BaseException:
                failed.set()  # the others stop before their next part; the first error is raised
                ex.shutdown(wait=True, cancel_futures=True)
                raise
        done = [Part(n, etags[n]) for n in range(1, count + 1)]
        if len(to_send) < count:
            log.info("upload of %s resumed: %d of %d parts were already on the server",
                     job.task_id, count - len(to_send), count)  # fmt: skip
        self._client._complete_multipart_upload(bucket, key, state.upload_id, done)

    def _server_parts(self, key: str, state: UploadState) -> dict[int, Part] | None:
        """The parts the server holds for `state.upload_id`, or None if it no longer knows the upload."""
        assert state.upload_id is not None
        parts: dict[int, Part] = {}
        marker: str | None = None
        try:
            while True:
                result = self._client._list_parts(self._cfg.bucket, key, state.upload_id, part_number_marker=marker)
                parts.update({p.part_number: p for p in result.parts})
                if not result.is_truncated or not result.next_part_number_marker:
                    return parts
                marker = result.next_part_number_marker
        except S3Error as exc:
            if exc.code == "NoSuchUpload":
                log.info("multipart upload of %s is gone from the server; starting a new one", key)
                state.upload_id = None
                return None
            raise

    def _adopt(self, key: str) -> str | None:
        """An unfinished multipart upload of exactly `key` (e.g. begun before a crash that came before
        its id was journaled): the newest is resumed, any others aborted."""
        uploads = [u for u in self._list_uploads(key) if u.object_name == key and u.upload_id]
        uploads.sort(key=lambda u: u.initiated_time.timestamp() if u.initiated_time else 0.0)
        for old in uploads[:-1]:
            assert old.upload_id is not None
            self.abort(key, old.upload_id)
        return uploads[-1].upload_id if uploads else None

    def _list_uploads(self, prefix: str) -> list[Any]:
        out: list[Any] = []
        key_marker: str | None = None
        id_marker: str | None = None
        while True:
            result = self._client._list_multipart_uploads(
                self._cfg.bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=id_marker
            )
            out.extend(result.uploads)
            if not result.is_truncated or not (result.next_key_marker or result.next_upload_id_marker):
                return out
            key_marker, id_marker = result.next_key_marker, result.next_upload_id_marker

    def set_paused(self, paused: bool) -> None:
        if paused:
            self.pacer.running.clear()
        else:
            self.pacer.running.set()

    def abort(self, object_name: str, upload_id: str) -> None:
        with contextlib.suppress(S3Error):
            self._client._abort_multipart_upload(self._cfg.bucket, object_name, upload_id)

    def sweep(self, prefix: str, keep: set[str]) -> int:
        """Abort unfinished multipart uploads under `prefix` whose key is not in `keep` (recordings
        deleted or failed while an upload was half done); their parts would cost storage forever."""
        self._ensure_bucket()
        aborted = 0
        for upload in self._list_uploads(prefix):
            if upload.object_name not in keep and upload.upload_id:
                self.abort(upload.object_name, upload.upload_id)
                aborted += 1
        return aborted

    def _stored(self, job: UploadJob) -> bool:
        """The object is at its key with this recording's size and sha256."""
        try:
            self._verify(job)
        except (S3Error, TransientUploadError):
            return False
        return True

    def _verify(self, job: UploadJob) -> None:
        stat = self._client.stat_object(self._cfg.bucket, job.object_name)
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        remote = meta.get(f"x-amz-meta-{CHECKSUM_META}")
        if stat.size != job.size or remote != job.sha256:
            raise TransientUploadError(
                f"verification failed: stored {stat.size} bytes sha256={remote}, expected {job.size} bytes"
            )

    def put_bytes(self, object_name: str, data: bytes, content_type: str) -> None:
        """One small object (a snapshot) in a single PUT, with its sha256 as for recordings; raises
        what the client raises (`classify` tells transient from permanent)."""
        self._ensure_bucket()
        headers = {"Content-Type": content_type, f"x-amz-meta-{CHECKSUM_META}": hashlib.sha256(data).hexdigest()}
        self._client._put_object(self._cfg.bucket, object_name, data, headers=dict(headers))

    def presign(self, object_name: str) -> str:
        return str(
            self._client.presigned_get_object(
                self._cfg.bucket, object_name, expires=timedelta(seconds=self._cfg.presign_seconds)
            )
        )
