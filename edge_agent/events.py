"""The events other threads post to the agent's queue, as plain dataclasses.

paho's network thread posts the MQTT ones (`mqtt.MqttLink`), the upload workers the upload ones
(`uploads.UploadPool`), recorders theirs (`recorder`). Kept here so the agent, which must never
talk to paho or minio itself, does not load either to know what it receives.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- MQTT link -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    session_present: bool


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class CommandReceived:
    camera_id: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class MessageReceived:
    """A message on an extra subscription (`add_subscription`), e.g. Home Assistant's birth topic."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class OutboxReady:
    """paho's queue has room again and retained values are waiting (`MqttLink.flush_held`)."""


MqttEvent = Connected | Disconnected | CommandReceived | MessageReceived | OutboxReady


# ---- upload workers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadAttempt:
    task_id: str
    attempt: int


@dataclass(frozen=True)
class UploadProgress:
    """A multipart upload exists (`upload_id`, journaled at once so a restart resumes it) or one more
    part is on the server: `bytes_uploaded` of the file are there."""

    task_id: str
    upload_id: str
    bytes_uploaded: int


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


UploadEvent = UploadAttempt | UploadProgress | UploadRetrying | UploadFinished | UploadFailed
