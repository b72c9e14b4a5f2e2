"""Contract of the S3 calls the resumable upload relies on, against the real S3 server (SeaweedFS).

`edge_agent.s3store.MinioStore` uses minio-py's non-public multipart calls (minio is pinned to
7.2.x for that); these tests fail first if a minio release or the server changes what they do:
ListParts reports each part's size and its MD5 as ETag, an upload id can be resumed after a crash,
found again by key, and aborted.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from minio.datatypes import Part

from edge_agent.config import StorageConfig
from edge_agent.s3store import MinioStore, UploadJob, UploadState

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PART = 5 * MiB


def make_store(s3: Any, bucket: str) -> MinioStore:
    cfg = StorageConfig(**s3.storage_config(bucket, part_size_bytes=PART))
    return MinioStore(cfg)


def make_file(tmp_path: Path, size: int) -> tuple[Path, str]:
    path = tmp_path / "rec.mp4"
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def job_for(path: Path, sha: str, key: str) -> UploadJob:
    return UploadJob(0.0, 0, "cam1/t", path, key, sha, path.stat().st_size)


class CountingClient:
    """Counts `_upload_part` calls made through a MinioStore's client."""

    def __init__(self, store: MinioStore) -> None:
        self.parts: list[int] = []
        client = store._client
        real = client._upload_part

        def upload_part(bucket: str, key: str, data: bytes, headers: Any, upload_id: str, number: int) -> str:
            self.parts.append(number)
            return str(real(bucket, key, data, headers, upload_id, number))

        client._upload_part = upload_part  # type: ignore[method-assign]


def test_list_parts_reports_size_and_md5_etag(s3: Any, bucket: str) -> None:
    store = make_store(s3, bucket)
    store._ensure_bucket()
    client = store._client
    key = "dev/cam1/contract.mp4"
    upload_id = client._create_multipart_upload(bucket, key, {"Content-Type": "video/mp4"})
    one, two = os.urandom(PART), os.urandom(1000)
    etag1 = client._upload_part(bucket, key, one, None, upload_id, 1)
    client._upload_part(bucket, key, two, None, upload_id, 2)
    listed = client._list_parts(bucket, key, upload_id)
    sizes = {p.part_number: (p.size, p.etag.strip('"')) for p in listed.parts}
    assert sizes[1] == (PART, hashlib.md5(one, usedforsecurity=False).hexdigest()) and etag1.strip('"') == sizes[1][1]
    assert sizes[2] == (1000, hashlib.md5(two, usedforsecurity=False).hexdigest())
    uploads = client._list_multipart_uploads(bucket, prefix=key).uploads
    assert [u.upload_id for u in uploads if u.object_name == key] == [upload_id]
    client._complete_multipart_upload(bucket, key, upload_id, [Part(1, sizes[1][1]), Part(2, sizes[2][1])])
    assert client.stat_object(bucket, key).size == PART + 1000
    assert not [u for u in client._list_multipart_uploads(bucket, prefix=key).uploads if u.object_name == key]


def test_resume_sends_only_the_missing_parts(s3: Any, bucket: str, tmp_path: Path) -> None:
    store = make_store(s3, bucket)
    path, sha = make_file(tmp_path, 3 * PART + 12345)
    key = "dev/cam1/resume.mp4"
    job = job_for(path, sha, key)
    # An earlier attempt (or process) got two parts up, then the link died.
    store._ensure_bucket()
    client = store._client
    upload_id = client._create_multipart_upload(
        bucket, key, {"Content-Type": "video/mp4", "x-amz-meta-sha256": sha}
    )
    data = path.read_bytes()
    client._upload_part(bucket, key, data[:PART], None, upload_id, 1)
    client._upload_part(bucket, key, data[PART : 2 * PART], None, upload_id, 2)
    counting = CountingClient(store)
    seen: list[int] = []
    state = UploadState(upload_id=upload_id)
    store.put(job, threading.Event(), state, lambda st: seen.append(st.bytes_uploaded))
    assert sorted(counting.parts) == [3, 4]
    assert seen[-1] == len(data) and state.upload_id == upload_id
    stat = client.stat_object(bucket, key)
    assert stat.size == len(data)
    assert client.get_object(bucket, key).read() == data


def test_a_part_that_differs_on_the_server_is_sent_again(s3: Any, bucket: str, tmp_path: Path) -> None:
    store = make_store(s3, bucket)
    path, sha = make_file(tmp_path, 2 * PART + 10)
    key = "dev/cam1/differs.mp4"
    store._ensure_bucket()
    client = store._client
    upload_id = client._create_multipart_upload(bucket, key, {"x-amz-meta-sha256": sha})
    client._upload_part(bucket, key, os.urandom(PART), None, upload_id, 1)  # not our bytes
    counting = CountingClient(store)
    store.put(job_for(path, sha, key), threading.Event(), UploadState(upload_id=upload_id), lambda st: None)
    assert sorted(counting.parts) == [1, 2, 3]
    assert client.get_object(bucket, key).read() == path.read_bytes()


def test_an_upload_whose_id_was_never_journaled_is_found_by_key(s3: Any, bucket: str, tmp_path: Path) -> None:
    store = make_store(s3, bucket)
    path, sha = make_file(tmp_path, 2 * PART + 10)
    key = "dev/cam1/adopt.mp4"
    store._ensure_bucket()
    client = store._client
    upload_id = client._create_multipart_upload(bucket, key, {"x-amz-meta-sha256": sha})
    client._upload_part(bucket, key, path.read_bytes()[:PART], None, upload_id, 1)
    counting = CountingClient(store)
    state = UploadState()
    store.put(job_for(path, sha, key), threading.Event(), state, lambda st: None)
    assert state.upload_id == upload_id and sorted(counting.parts) == [2, 3]


def test_a_vanished_upload_id_starts_a_new_upload(s3: Any, bucket: str, tmp_path: Path) -> None:
    store = make_store(s3, bucket)
    path, sha = make_file(tmp_path, PART + 10)
    key = "dev/cam1/vanished.mp4"
    state = UploadState(upload_id="no-such-upload-id")
    store.put(job_for(path, sha, key), threading.Event(), state, lambda st: None)
    assert state.upload_id not in (None, "no-such-upload-id")
    assert store._client.stat_object(bucket, key).size == PART + 10


def test_sweep_aborts_only_uploads_not_kept(s3: Any, bucket: str) -> None:
    store = make_store(s3, bucket)
    store._ensure_bucket()
    client = store._client
    for key in ("dev/cam1/keep.mp4", "dev/cam1/stale.mp4", "other/cam1/x.mp4"):
        client._create_multipart_upload(bucket, key, {})
    assert store.sweep("dev/", {"dev/cam1/keep.mp4"}) == 1
    left = sorted(u.object_name for u in client._list_multipart_uploads(bucket, prefix="").uploads)
    assert left == ["dev/cam1/keep.mp4", "other/cam1/x.mp4"]


def test_a_stored_object_whose_local_file_is_gone_counts_as_uploaded(s3: Any, bucket: str, tmp_path: Path) -> None:
    """A cut after the upload and the local delete but before the journal said `uploaded`."""
    store = make_store(s3, bucket)
    path, sha = make_file(tmp_path, 1000)
    key = "dev/cam1/gone.mp4"
    job = job_for(path, sha, key)
    store.put(job, threading.Event(), UploadState(), lambda st: None)
    path.unlink()
    state = UploadState()
    store.put(job, threading.Event(), state, lambda st: None)  # no FileNotFoundError
    assert state.bytes_uploaded == 1000
    other = UploadJob(0.0, 0, "cam1/t", path, key, "0" * 64, 1000)  # another recording at that key: refused
    with pytest.raises(FileNotFoundError):
        store.put(other, threading.Event(), UploadState(), lambda st: None)
