"""Snapshots kept on request (`"upload": true`): where the JPEG goes, and how a failure is reported.

The grab is a real FFmpeg run on a small clip; the object store is a fake (the real one is in
tests/test_e2e_preroll.py).
"""

from __future__ import annotations

import queue
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent import snapshot
from edge_agent.errors import PermanentUploadError, TransientUploadError
from edge_agent.recording import SnapshotTaken

FRAME_TIME = datetime(2026, 12, 6, 19, 5, 7, 250000, tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=5:duration=1",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)  # fmt: skip
    return path


def take(clip: Path, keep: snapshot.Keeper | None, secrets: tuple[str, ...] = ()) -> SnapshotTaken:
    got: queue.SimpleQueue[SnapshotTaken] = queue.SimpleQueue()
    snapshot.take_async("cam1", "ffmpeg", clip, FRAME_TIME, 30, secrets, got.put, keep).join(60)
    return got.get(timeout=1)


def test_names_follow_the_recordings_layout() -> None:
    assert snapshot.snapshot_name(FRAME_TIME) == "snapshot_20261206T190507250Z.jpg"
    assert snapshot.object_key("dev1", "cam1", FRAME_TIME) == "dev1/cam1/2026/12/06/snapshot_20261206T190507250Z.jpg"


def test_a_kept_snapshot_is_written_whole_next_to_the_recordings(tmp_path: Path, clip: Path) -> None:
    taken = take(clip, lambda jpeg, at: {"local_file": str(snapshot.write_local(tmp_path, "cam1", jpeg, at))})
    assert taken.error is None and taken.store_error is None and taken.stored is not None
    path = Path(taken.stored["local_file"])
    assert path == tmp_path.resolve() / "cam1" / "snapshot_20261206T190507250Z.jpg"
    assert path.read_bytes() == taken.jpeg and taken.jpeg.startswith(b"\xff\xd8")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_store_failure_is_reported_redacted_with_the_jpeg_still_there(clip: Path) -> None:
    def failing(jpeg: bytes, at: float) -> dict[str, str]:
        raise PermanentUploadError("access denied for key s3cr3t-key")

    taken = take(clip, failing, secrets=("s3cr3t-key",))
    assert taken.error is None and taken.jpeg.startswith(b"\xff\xd8") and taken.stored is None
    assert taken.store_error is not None and "access denied" in taken.store_error
    assert "s3cr3t-key" not in taken.store_error


def test_without_upload_nothing_is_kept(clip: Path) -> None:
    taken = take(clip, None)
    assert taken.error is None and taken.stored is None and taken.store_error is None


class FlakyStore:
    """A fake object store whose first `failures` puts raise `error`."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error = failures, error
        self.puts: list[str] = []
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, object_name: str, data: bytes, content_type: str) -> None:
        self.puts.append(object_name)
        if len(self.puts) <= self.failures:
            raise self.error
        self.objects[object_name] = data

    def presign(self, object_name: str) -> str:
        return f"http://s3.example/{object_name}?sig"


def keeper(store: FlakyStore, output_dir: Path, sleeps: list[float]) -> snapshot.Keeper:
    return snapshot.store_keeper(store, "dev1", "cam1", "bkt", True, output_dir, sleep=sleeps.append)


def test_a_transient_store_failure_is_retried_with_backoff(tmp_path: Path) -> None:
    store, sleeps = FlakyStore(2, TransientUploadError("network error: timeout")), []
    out = keeper(store, tmp_path, sleeps)(b"\xff\xd8jpeg", FRAME_TIME)
    key = "dev1/cam1/2026/12/06/snapshot_20261206T190507250Z.jpg"
    assert out == {"bucket": "bkt", "object_name": key, "download_url": f"http://s3.example/{key}?sig"}
    assert store.puts == [key] * 3 and store.objects[key] == b"\xff\xd8jpeg"
    assert sleeps == [0.5, 1.0]
    assert not (tmp_path / "cam1").exists()  # not kept on disk as well


@pytest.mark.parametrize(("failures", "error", "attempts"), [
    (99, TransientUploadError("S3 server error 503"), snapshot.PUT_ATTEMPTS),  # an outage: tried, then kept
    (99, PermanentUploadError("uploads are paused (resume_uploads)"), 1),  # retrying cannot help
])  # fmt: skip
def test_a_snapshot_the_store_does_not_take_is_kept_on_disk(tmp_path: Path, failures: int, error: Exception,
                                                           attempts: int) -> None:  # fmt: skip
    store, sleeps = FlakyStore(failures, error), []
    out = keeper(store, tmp_path, sleeps)(b"\xff\xd8jpeg", FRAME_TIME)
    assert len(store.puts) == attempts and len(sleeps) == attempts - 1 and not store.objects
    assert out["upload_error"] == str(error)
    path = Path(out["local_file"])
    assert path == tmp_path.resolve() / "cam1" / "snapshot_20261206T190507250Z.jpg"
    assert path.read_bytes() == b"\xff\xd8jpeg"
