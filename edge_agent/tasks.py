"""The task record: one recording run from `start` to `uploaded`/`completed`/`failed`.

Its public face is `status_doc()`, the JSON published on the retained topics and in replies; field
names match the HTTP service it replaces, and unknown fields are left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any


class Status(StrEnum):
    """A task's status: the one list of them (published as their plain string values)."""

    STARTING = "starting"
    RECORDING = "recording"
    STOPPING = "stopping"
    UPLOADING = "uploading"
    UPLOAD_PENDING = "upload_pending"
    UPLOADED = "uploaded"
    COMPLETED = "completed"
    FAILED = "failed"


# Active ones hold the camera; terminal ones free it.
ACTIVE_STATUSES = frozenset({Status.STARTING, Status.RECORDING, Status.STOPPING})
UPLOAD_STATUSES = frozenset({Status.UPLOADING, Status.UPLOAD_PENDING})
TERMINAL_STATUSES = frozenset({Status.UPLOADED, Status.COMPLETED, Status.FAILED})
TERMINAL_OK_STATUSES = frozenset({Status.UPLOADED, Status.COMPLETED})

# Order matters: it is the order of keys in the published JSON.
STATUS_FIELDS = (
    "status", "camera_id", "task_name", "device_id", "start_time", "updated_at", "storage_type",
    "local_file", "bucket", "object_name", "download_url", "stop_reason", "error", "local_file_deleted",
    "duration_seconds", "size_bytes", "sha256", "max_seconds", "interruptions", "recovered",
    "upload_attempts", "bytes_uploaded", "next_retry_at", "last_upload_error", "rejected_segments",
    "media_start", "pre_roll_seconds",
)  # fmt: skip


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_epoch(epoch: float) -> str:
    """Epoch seconds as `iso` writes them."""
    return iso(datetime.fromtimestamp(epoch, UTC))


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def stamp(dt: datetime) -> str:
    """Compact UTC timestamp, to the millisecond, for file names and object keys: 20261128T145000123Z."""
    utc = dt.astimezone(UTC)
    return utc.strftime("%Y%m%dT%H%M%S") + f"{utc.microsecond // 1000:03d}Z"


@dataclass
class Task:
    """Mutable state of one task; only the agent thread changes it."""

    task_id: str
    camera_id: str
    task_name: str
    device_id: str
    started: datetime
    storage_type: str
    local_file: str
    max_seconds: int
    status: Status = Status.STARTING
    updated: datetime = field(default_factory=utc_now)
    bucket: str | None = None
    object_name: str | None = None
    download_url: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    local_file_deleted: bool | None = None
    duration_seconds: float | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    interruptions: int | None = None
    recovered: bool | None = None
    upload_attempts: int | None = None
    next_retry_at: str | None = None
    last_upload_error: str | None = None
    rejected_segments: list[str] | None = None
    request_id: str | None = None
    bytes_uploaded: int | None = None  # of the file, on the server (multipart progress)
    upload_id: str | None = None  # the S3 multipart upload to resume (journaled, not published)
    media_start: str | None = None  # buffered camera: UTC time of the MP4's first frame (pre-roll)
    pre_roll_seconds: float | None = None  # buffered camera: the pre-roll asked for

    @property
    def start_time(self) -> str:
        return iso(self.started)

    @property
    def updated_at(self) -> str:
        return iso(self.updated)

    @property
    def segment_dir(self) -> Path:
        p = Path(self.local_file)
        return p.with_name("." + p.stem + ".segments")

    def status_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for name in STATUS_FIELDS:
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        return doc

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild the task after a restart."""
        rec = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rec["started"] = iso(self.started)
        rec["updated"] = iso(self.updated)
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Task:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in rec.items() if k in known}
        data["status"] = Status(rec["status"])
        data["started"] = parse_iso(rec["started"])
        data["updated"] = parse_iso(rec["updated"])
        return cls(**data)


def new_task(camera: str, name: str, device_id: str, output_dir: Path, storage_type: str, bucket: str | None,
             max_seconds: int, started: datetime | None = None) -> Task:  # fmt: skip
    """A task as `start` creates it, with the naming rules for its file and object key.

    File: `<output_dir>/<camera>/<task>_<start UTC stamp>.mp4`; object key (MinIO):
    `<device>/<camera>/YYYY/MM/DD/<same file name>`, deterministic per run, so a retried upload
    overwrites the same key. `name` has passed the naming rule (`edge_agent.names`).
    """
    started = started or utc_now()
    ts = stamp(started)
    file_name = f"{name}_{ts}.mp4"
    task = Task(
        task_id=f"{camera}/{name}_{ts}", camera_id=camera, task_name=name, device_id=device_id,
        started=started, storage_type=storage_type, local_file=str(output_dir.resolve() / camera / file_name),
        max_seconds=max_seconds,
    )  # fmt: skip
    if storage_type == "minio":
        task.bucket = bucket
        task.object_name = f"{device_id}/{camera}/{started:%Y/%m/%d}/{file_name}"
        task.local_file_deleted = False
    return task
