"""Unit tests of upload error classification and the UploadPool workers, with a fake object store."""

from __future__ import annotations

import http.client
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError

from edge_agent.config import StorageConfig
from edge_agent.errors import PermanentUploadError, TransientUploadError
from edge_agent.tasks import parse_iso
from edge_agent.uploads import (
    UploadAttempt,
    UploadEvent,
    UploadFailed,
    UploadFinished,
    UploadJob,
    UploadPool,
    UploadRetrying,
    UploadState,
    backoff_seconds,
    classify,
)


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} happened", "/recordings/x.mp4", "req", "host")  # type: ignore[arg-type]


# ---- classify ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_classify_permanent_s3_codes(code: str) -> None:
    err = classify(s3_error(code))
    assert isinstance(err, PermanentUploadError)
    assert code in str(err)


@pytest.mark.parametrize("code", ["InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"])
def test_classify_transient_s3_codes(code: str) -> None:
    err = classify(s3_error(code))
    assert isinstance(err, TransientUploadError)
    assert code in str(err)


@pytest.mark.parametrize(
    "exc",
    [
        urllib3.exceptions.MaxRetryError(None, "/x", reason=None),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("connection aborted"),
        urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"),  # type: ignore[arg-type]
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "reset"),
        OSError(113, "No route to host"),
        TimeoutError("timed out"),
        http.client.RemoteDisconnected("closed"),
        ServerError("bad gateway", 502),
        InvalidResponseError(502, "text/html", "<html>proxy</html>"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_classify_transient_network_errors(exc: BaseException) -> None:
    assert isinstance(classify(exc), TransientUploadError)


@pytest.mark.parametrize(
    "exc",
    [FileNotFoundError(2, "No such file", "/rec/x.mp4"), PermissionError(13, "denied"), IsADirectoryError(21, "dir")],
    ids=lambda e: type(e).__name__,
)
def test_classify_unreadable_file_permanent(exc: BaseException) -> None:
    err = classify(exc)
    assert isinstance(err, PermanentUploadError)
    assert "local file" in str(err)


def test_classify_passes_own_errors_through() -> None:
    own = TransientUploadError("verification failed")
    assert classify(own) is own


def test_classify_unknown_is_permanent() -> None:
    assert isinstance(classify(ValueError("weird")), PermanentUploadError)


# ---- UploadPool with a fake store --------------------------------------------------------------------


class FakeStore:
    """Scripted ObjectStore: each put pops the next outcome (an exception to raise, or None = success)."""

    def __init__(self, outcomes: list[BaseException | None] | None = None, default: BaseException | None = None):
        self.outcomes = list(outcomes or [])
        self.default = default
        self.puts: list[str] = []
        self.lock = threading.Lock()

    def put(self, job: UploadJob, stop: threading.Event, state: UploadState,
            progress: Callable[[UploadState], None]) -> None:  # fmt: skip
        with self.lock:
            self.puts.append(job.task_id)
            outcome = self.outcomes.pop(0) if self.outcomes else self.default
        if outcome is not None:
            raise outcome

    def presign(self, object_name: str) -> str:
        return f"https://s3.example/recordings/{object_name}?X-Amz-Signature=abc"

    def abort(self, object_name: str, upload_id: str) -> None:
        self.aborted = [*getattr(self, "aborted", []), (object_name, upload_id)]

    def sweep(self, prefix: str, keep: set[str]) -> int:
        return 0

    def set_paused(self, paused: bool) -> None:
        self.paused = paused


def storage(**over: Any) -> StorageConfig:
    fields: dict[str, Any] = {
        "type": "minio", "access_key": "k", "secret_key": "s", "retry_initial_seconds": 0.01,
        "retry_max_seconds": 0.05, "upload_workers": 1,
    }  # fmt: skip
    fields.update(over)
    return StorageConfig(**fields)


class Events:
    def __init__(self) -> None:
        self.q: queue.Queue[UploadEvent] = queue.Queue()
        self.seen: list[UploadEvent] = []

    def post(self, ev: UploadEvent) -> None:
        self.q.put(ev)

    def until(self, kinds: tuple[type, ...], timeout: float = 5.0) -> UploadEvent:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {kinds} within {timeout} s; saw {self.seen}"
            try:
                ev = self.q.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(ev)
            if isinstance(ev, kinds):
                return ev

    def drain(self) -> list[UploadEvent]:
        while True:
            try:
                self.seen.append(self.q.get_nowait())
            except queue.Empty:
                return self.seen


@pytest.fixture
def pools() -> Iterator[list[UploadPool]]:
    made: list[UploadPool] = []
    yield made
    for pool in made:
        pool.stop(timeout=0.0)  # idle daemon workers notice within their 1 s queue poll


def test_backoff_grows_without_progress_and_restarts_after_it() -> None:
    no_jitter: Callable[[float, float], float] = lambda a, b: 0.0  # noqa: E731
    assert [backoff_seconds(n, 1.0, 300.0, no_jitter) for n in (1, 2, 3, 4, 9, 40)] == [1, 2, 4, 8, 256, 300]


class ProgressThenFail(FakeStore):
    """Gets one more part to the server on every attempt, then the link drops; done on the 6th."""

    def put(self, job: UploadJob, stop: threading.Event, state: UploadState,
            progress: Callable[[UploadState], None]) -> None:  # fmt: skip
        self.puts.append(job.task_id)
        state.parts_sent += 1
        if len(self.puts) < 6:
            raise ConnectionResetError(104, "cut")


def test_attempts_that_make_progress_do_not_grow_the_backoff(tmp_path: Path, pools: list[UploadPool]) -> None:
    events = Events()
    pool = UploadPool(ProgressThenFail(), storage(retry_initial_seconds=0.05, retry_max_seconds=60), events.post)
    pools.append(pool)
    pool.start()
    pool.submit("cam1/t_1", make_file(tmp_path), "o.mp4", "ab" * 32, 100, created=1.0)
    done = events.until((UploadFinished, UploadFailed), timeout=20)
    assert isinstance(done, UploadFinished) and done.attempts == 6
    retries = [e for e in events.drain() if isinstance(e, UploadRetrying)]
    # The attempts themselves are instant, so the gaps between retry times are the waits. Without the
    # reset the last would be 0.05 * 2**4 + jitter >= 0.8 s; with it each is 0.05-0.1 s.
    when = [datetime.fromisoformat(e.next_retry_at.replace("Z", "+00:00")) for e in retries]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(when)]
    assert len(retries) == 5 and max(gaps) < 0.5, gaps


def make_file(tmp_path: Path, name: str = "t.mp4", data: bytes = b"\x00" * 100) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_transient_failures_then_success(tmp_path: Path, pools: list[UploadPool]) -> None:
    store = FakeStore([s3_error("SlowDown"), ConnectionResetError(104, "reset"), None])
    events = Events()
    pool = UploadPool(store, storage(download_url="retained"), events.post)
    pools.append(pool)
    path = make_file(tmp_path)
    pool.start()
    pool.submit("cam1/t_1", path, "edge-01/cam1/2026/11/28/t_1.mp4", "ab" * 32, 100, created=1.0)
    before = datetime.now(UTC)
    done = events.until((UploadFinished, UploadFailed))
    assert isinstance(done, UploadFinished)
    assert done.task_id == "cam1/t_1"
    assert done.attempts == 3
    assert done.bucket == "recordings"
    assert done.object_name == "edge-01/cam1/2026/11/28/t_1.mp4"
    assert done.download_url.startswith("https://s3.example/recordings/edge-01/cam1/")
    assert done.local_file_deleted is True
    assert not path.exists()
    kinds = [type(e).__name__ for e in events.seen]
    assert kinds == ["UploadAttempt", "UploadRetrying", "UploadAttempt", "UploadRetrying", "UploadAttempt",
                     "UploadFinished"]  # fmt: skip
    attempts = [e.attempt for e in events.seen if isinstance(e, UploadAttempt)]
    assert attempts == [1, 2, 3]
    retrying = [e for e in events.seen if isinstance(e, UploadRetrying)]
    assert [r.attempts for r in retrying] == [1, 2]
    assert "SlowDown" in retrying[0].error
    for r in retrying:
        when = parse_iso(r.next_retry_at)
        assert when.tzinfo is not None
        assert abs((when - before).total_seconds()) < 5


def test_attempts_continue_from_journal(tmp_path: Path, pools: list[UploadPool]) -> None:
    store = FakeStore([None])
    events = Events()
    pool = UploadPool(store, storage(delete_local_after_upload=False), events.post)
    pools.append(pool)
    path = make_file(tmp_path)
    pool.start()
    pool.submit("cam1/t_1", path, "o.mp4", "ab" * 32, 100, created=1.0, attempts_before=4)
    done = events.until((UploadFinished, UploadFailed))
    assert isinstance(done, UploadFinished)
    assert done.attempts == 5
    assert done.local_file_deleted is False
    assert path.exists()  # kept when delete_local_after_upload is off


def test_permanent_error_fails_after_one_attempt(tmp_path: Path, pools: list[UploadPool]) -> None:
    store = FakeStore(default=s3_error("AccessDenied"))
    events = Events()
    pool = UploadPool(store, storage(), events.post)
    pools.append(pool)
    path = make_file(tmp_path)
    pool.start()
    pool.submit("cam1/t_1", path, "o.mp4", "ab" * 32, 100, created=1.0)
    done = events.until((UploadFinished, UploadFailed))
    assert isinstance(done, UploadFailed)
    assert done.attempts == 1
    assert "AccessDenied" in done.error
    time.sleep(0.1)
    assert store.puts == ["cam1/t_1"]
    assert not any(isinstance(e, UploadRetrying) for e in events.drain())
    assert path.exists()  # a failed upload never deletes the recording


def test_worker_survives_store_crash_in_presign(tmp_path: Path, pools: list[UploadPool]) -> None:
    class NoPresign(FakeStore):
        def presign(self, object_name: str) -> str:
            raise RuntimeError("presign broke")

    events = Events()
    pool = UploadPool(NoPresign([None]), storage(download_url="retained"), events.post)
    pools.append(pool)
    pool.start()
    pool.submit("cam1/t_1", make_file(tmp_path), "o.mp4", "ab" * 32, 100, created=1.0)
    done = events.until((UploadFinished, UploadFailed))
    assert isinstance(done, UploadFinished)
    assert done.download_url == ""


@pytest.mark.parametrize("where", ["replies", "none"])
def test_no_presigned_url_is_made_unless_published_retained(
    tmp_path: Path, pools: list[UploadPool], where: str
) -> None:
    events = Events()
    pool = UploadPool(FakeStore([None]), storage(download_url=where), events.post)
    pools.append(pool)
    pool.start()
    pool.submit("cam1/t_1", make_file(tmp_path), "o.mp4", "ab" * 32, 100, created=1.0)
    done = events.until((UploadFinished, UploadFailed))
    assert isinstance(done, UploadFinished) and done.download_url == ""
    assert pool.presign("o.mp4").startswith("https://s3.example/")  # on demand, for replies


def test_stop_during_long_backoff_is_prompt(tmp_path: Path) -> None:
    store = FakeStore(default=s3_error("InternalError"))
    events = Events()
    pool = UploadPool(store, storage(retry_initial_seconds=30, retry_max_seconds=300), events.post)
    pool.start()
    pool.submit("cam1/t_1", make_file(tmp_path), "o.mp4", "ab" * 32, 100, created=1.0)
    retrying = events.until((UploadRetrying,))
    assert isinstance(retrying, UploadRetrying)
    assert (parse_iso(retrying.next_retry_at) - datetime.now(UTC)).total_seconds() > 20  # a long backoff
    started = time.monotonic()
    pool.stop(timeout=5.0)
    assert time.monotonic() - started < 2.0
    time.sleep(0.05)
    after = events.drain()
    assert not any(isinstance(e, UploadFinished | UploadFailed) for e in after)


def test_no_new_attempt_after_stop(tmp_path: Path) -> None:
    """`stop()` means stop retrying: the backoff sleep ending early must not start one more PUT."""
    store = FakeStore(default=s3_error("InternalError"))
    events = Events()
    pool = UploadPool(store, storage(retry_initial_seconds=30, retry_max_seconds=300), events.post)
    pool.start()
    pool.submit("cam1/t_1", make_file(tmp_path), "o.mp4", "ab" * 32, 100, created=1.0)
    events.until((UploadRetrying,))
    pool.stop(timeout=5.0)
    time.sleep(0.05)
    assert store.puts == ["cam1/t_1"]
    assert [e.attempt for e in events.drain() if isinstance(e, UploadAttempt)] == [1]


@pytest.mark.parametrize(("order", "expected"), [("oldest", ["a", "b", "c"]), ("newest", ["c", "b", "a"])])
def test_upload_order(tmp_path: Path, pools: list[UploadPool], order: str, expected: list[str]) -> None:
    store = FakeStore()
    events = Events()
    pool = UploadPool(store, storage(upload_order=order, upload_workers=1), events.post)
    pools.append(pool)
    # Submitted out of order before the single worker starts, so the queue decides the order.
    for name, created in (("b", 200.0), ("c", 300.0), ("a", 100.0)):
        pool.submit(name, make_file(tmp_path, f"{name}.mp4"), f"{name}.mp4", "ab" * 32, 100, created=created)
    pool.start()
    for _ in range(3):
        events.until((UploadFinished,))
    assert store.puts == expected
