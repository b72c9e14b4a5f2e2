"""Command payloads in, status payloads out.

`parse_command` turns untrusted bytes into a `Command` or raises `CommandError` with a message
that names the problem; it never lets a pydantic or JSON error escape.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from edge_agent import names
from edge_agent.errors import CommandError
from edge_agent.tasks import ACTIVE_STATUSES, TERMINAL_STATUSES, UPLOAD_STATUSES, Status

__all__ = ["ACTIVE_STATUSES", "TERMINAL_STATUSES", "UPLOAD_STATUSES", "Status"]  # re-exported

Action = Literal["start", "stop", "status", "query", "pause_uploads", "resume_uploads", "export", "snapshot"]


MAX_TASK_NAME_BYTES = names.MAX_NAME_BYTES
MAX_REQUEST_ID_CHARS = 200


class Command(BaseModel):
    """One command from `P/D/C/cmd`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Action
    task_name: StrictStr | None = None
    request_id: StrictStr | None = Field(None, max_length=MAX_REQUEST_ID_CHARS)
    max_seconds: StrictInt | None = Field(None, ge=1, le=10**9)
    pre_roll_seconds: StrictInt | StrictFloat | None = Field(None, ge=0, le=3600)
    # export: the UTC range to cut from the camera's ring buffer ("from" is a Python keyword)
    range_from: datetime | None = Field(None, alias="from")
    range_to: datetime | None = Field(None, alias="to")
    upload: StrictBool | None = None  # snapshot: also keep the JPEG in storage (object store or disk)

    @field_validator("range_from", "range_to")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("must be a UTC time with its zone, e.g. 2026-12-06T16:00:00Z")
        return v


GroupAction = Literal["start", "stop", "status"]
MAX_GROUP_CAMERAS = 64


class GroupCommand(BaseModel):
    """One command from `P/groups/G/cmd`, executed by every member of the group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: GroupAction
    request_id: StrictStr = Field(min_length=1, max_length=MAX_REQUEST_ID_CHARS)
    cameras: list[StrictStr] | None = Field(None, max_length=MAX_GROUP_CAMERAS)
    task_name: StrictStr | None = None
    max_seconds: StrictInt | None = Field(None, ge=1, le=10**9)
    pre_roll_seconds: StrictInt | StrictFloat | None = Field(None, ge=0, le=3600)

    def for_camera(self, task_name: str | None) -> Command:
        """The camera command this group command means for one member camera."""
        return Command(action=self.action, task_name=task_name, request_id=self.request_id,
                       max_seconds=self.max_seconds, pre_roll_seconds=self.pre_roll_seconds)  # fmt: skip


def decode_group_command(payload: bytes, max_bytes: int) -> tuple[GroupCommand | None, str | None, str | None]:
    """(command, request_id, error): decoded once, like `decode_command`, every failure named."""
    raw, error = _load_object(payload, max_bytes)
    if raw is None:
        return None, None, error
    rid = _clean_request_id(raw.get("request_id"))
    if rid is None:
        return None, None, f"request_id is required: a string of 1-{MAX_REQUEST_ID_CHARS} printable characters"
    try:
        cmd = GroupCommand.model_validate(raw)
    except ValidationError as exc:
        return None, rid, _validation_problems(exc)
    for value, what in [(c, "cameras[]") for c in cmd.cameras or []] + [(cmd.task_name, "task_name")]:
        if value is not None:
            try:
                names.check_name(value, what, MAX_TASK_NAME_BYTES)
            except names.InvalidName as exc:
                return None, rid, str(exc)
    return cmd, rid, None


def _validation_problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
                     for e in exc.errors(include_url=False, include_input=False))  # fmt: skip


def _load_object(payload: bytes, max_bytes: int) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON object from untrusted bytes, or why not (size first; never an exception)."""
    if len(payload) > max_bytes:
        return None, f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit"
    try:
        raw = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "payload is not UTF-8"
    except json.JSONDecodeError as exc:
        return None, f"payload is not valid JSON: {exc.msg} at position {exc.pos}"
    except RecursionError:
        return None, "payload is nested too deeply"
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"payload cannot be decoded: {str(exc)[:120]}"
    if not isinstance(raw, dict):
        return None, "payload must be a JSON object"
    return raw, None


def validate_task_name(name: str) -> str:
    """Return the task name if it is safe as a file name, object key and topic level (`names`)."""
    try:
        return names.check_name(name, "task_name", MAX_TASK_NAME_BYTES)
    except names.InvalidName as exc:
        raise CommandError(str(exc)) from None


def _clean_request_id(value: object) -> str | None:
    """A request_id worth echoing: a short string without control, format or noncharacters (it is
    logged and echoed; a newline in it would forge log lines)."""
    if not isinstance(value, str) or not value or len(value) > MAX_REQUEST_ID_CHARS:
        return None
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") or names.is_noncharacter(c) for c in value):
        return None
    return value


@dataclass(frozen=True)
class Decoded:
    """A command payload decoded once: the command, or why it was refused, plus the request_id to
    echo (set whenever one could be read, so even a rejection can be matched by the sender)."""

    command: Command | None
    request_id: str | None = None
    error: str | None = None
    switch: Literal["start", "stop"] | None = None  # a plain ON/OFF payload


def decode_command(payload: bytes, max_bytes: int) -> Decoded:
    """Decode and validate a command payload exactly once, limits first.

    The size is checked before anything is parsed; a plain switch word (`ON`/`OFF`) is recognised
    next; then JSON, whose every failure (bad UTF-8, syntax, nesting too deep, integers too long
    for Python's int-from-string limit) becomes an `error`, never an exception.
    """
    if len(payload) > max_bytes:
        return Decoded(None, None, f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    switch = parse_switch(payload)
    if switch is not None:
        return Decoded(None, switch=switch)
    raw, error = _load_object(payload, max_bytes)
    if raw is None:
        return Decoded(None, None, error)
    rid = _clean_request_id(raw.get("request_id"))
    if "request_id" in raw and rid is None:
        return Decoded(None, None, f"request_id must be a string of 1-{MAX_REQUEST_ID_CHARS} printable characters")
    try:
        cmd = Command.model_validate(raw)
    except ValidationError as exc:
        return Decoded(None, rid, _validation_problems(exc))
    if cmd.action == "export":
        if cmd.range_from is None or cmd.range_to is None:
            return Decoded(None, rid, "action 'export' needs from and to (UTC times)")
        if cmd.range_to <= cmd.range_from:
            return Decoded(None, rid, "export: to must be after from")
    elif cmd.range_from is not None or cmd.range_to is not None:
        return Decoded(None, rid, f"from/to are for export, not {cmd.action}")
    if cmd.upload is not None and cmd.action != "snapshot":
        return Decoded(None, rid, f"upload is for snapshot, not {cmd.action}")
    if cmd.action in ("start", "stop", "query", "export") and cmd.task_name is None:
        return Decoded(None, rid, f"action {cmd.action!r} needs a task_name")
    if cmd.task_name is not None:
        try:
            validate_task_name(cmd.task_name)
        except CommandError as exc:
            return Decoded(None, rid, str(exc))
    return Decoded(cmd, rid)


def parse_command(payload: bytes, max_bytes: int) -> Command:
    """Decode and validate a JSON command payload, raising CommandError naming the problem."""
    decoded = decode_command(payload, max_bytes)
    if decoded.command is None:
        raise CommandError(decoded.error or "a plain ON/OFF payload is not a JSON command")
    return decoded.command


def dumps(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (non-ASCII task names stay readable)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---- plain switch payloads ------------------------------------------------------------------------

SWITCH_WORDS: dict[str, Literal["start", "stop"]] = {"on": "start", "start": "start", "off": "stop", "stop": "stop"}


def parse_switch(payload: bytes) -> Literal["start", "stop"] | None:
    """`ON`/`OFF`/`start`/`stop` (any case, surrounding whitespace ignored) as sent by switch-style
    clients and Home Assistant buttons; None for anything else (then it must be a JSON command)."""
    if len(payload) > 16:
        return None
    try:
        word = payload.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    return SWITCH_WORDS.get(word)


# ---- flow events ----------------------------------------------------------------------------------

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "started": ("start_time", "max_seconds"),
    "stopped": ("duration_seconds", "size_bytes", "local_file", "stop_reason"),
    "uploaded": ("object_name", "bucket", "size_bytes", "sha256", "download_url"),
    "failed": ("error",),
    "completed": ("local_file", "duration_seconds", "size_bytes", "sha256"),
}
FINALISED_STATUSES = UPLOAD_STATUSES | {Status.COMPLETED}


def event_doc(kind: str, camera_id: Any, task_name: Any, device_id: Any, at: str, **fields: Any) -> dict[str, Any]:
    """One `P/D/C/events` payload: the fields every event has, then the kind's own."""
    return {"event": kind, "camera_id": camera_id, "task_name": task_name, "device_id": device_id, "at": at,
            **fields}  # fmt: skip


def transition_events(old_status: str, doc: dict[str, Any], at: str) -> list[dict[str, Any]]:
    """The flow events one status change causes, in order (a local recording that finishes yields
    `stopped` then `completed`). `doc` is the task's status document after the change."""
    new = doc["status"]
    if new == old_status:
        return []
    kinds: list[str] = []
    if new == Status.RECORDING:
        kinds.append("started")
    if old_status in ACTIVE_STATUSES and new in FINALISED_STATUSES:
        kinds.append("stopped")
    if new in TERMINAL_STATUSES:
        kinds.append(new)
    out = []
    for kind in kinds:
        extra = {key: doc[key] for key in EVENT_FIELDS[kind] if doc.get(key) is not None}
        out.append(event_doc(kind, doc.get("camera_id"), doc.get("task_name"), doc.get("device_id"), at, **extra))
    return out
