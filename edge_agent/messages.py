"""Command payloads in, status payloads out.

`parse_command` turns untrusted bytes into a `Command` or raises `CommandError` with a message
that names the problem; it never lets a pydantic or JSON error escape.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from edge_agent.errors import CommandError

Action = Literal["start", "stop", "status", "query"]

# Status values. Active ones hold the camera; terminal ones free it.
ACTIVE_STATUSES = frozenset({"starting", "recording", "stopping"})
UPLOAD_STATUSES = frozenset({"uploading", "upload_pending"})
TERMINAL_STATUSES = frozenset({"uploaded", "completed", "failed"})

MAX_TASK_NAME_BYTES = 120
FORBIDDEN_TASK_CHARS = frozenset("/+#\\")


class Command(BaseModel):
    """One command from `P/D/C/cmd`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Action
    task_name: StrictStr | None = None
    request_id: StrictStr | None = Field(None, max_length=200)
    max_seconds: StrictInt | None = Field(None, ge=1)


def validate_task_name(name: str) -> str:
    """Return the task name if it is safe as a file name, object key and topic level."""
    if not name or not name.strip():
        raise CommandError("task_name must not be empty")
    bad = sorted({c for c in name if c in FORBIDDEN_TASK_CHARS})
    if bad:
        raise CommandError(f"task_name must not contain {' '.join(repr(c) for c in bad)}")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for c in name):
        raise CommandError("task_name must not contain control or format characters")
    if name in (".", "..") or name.startswith("."):
        raise CommandError("task_name must not start with '.'")
    if len(name.encode("utf-8")) > MAX_TASK_NAME_BYTES:
        raise CommandError(f"task_name is longer than {MAX_TASK_NAME_BYTES} bytes of UTF-8")
    return name


def parse_command(payload: bytes, max_bytes: int) -> Command:
    """Decode and validate a command payload."""
    if len(payload) > max_bytes:
        raise CommandError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        raw = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CommandError(f"payload is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(raw, dict):
        raise CommandError("payload must be a JSON object")
    try:
        cmd = Command.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise CommandError(problems) from None
    if cmd.action in ("start", "stop", "query"):
        if cmd.task_name is None:
            raise CommandError(f"action {cmd.action!r} needs a task_name")
        validate_task_name(cmd.task_name)
    elif cmd.task_name is not None:
        validate_task_name(cmd.task_name)
    return cmd


def request_id_of(payload: bytes) -> str | None:
    """Best-effort request_id of a payload that failed validation, so even a rejection can be matched."""
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(raw, dict):
        rid = raw.get("request_id")
        if isinstance(rid, str) and len(rid) <= 200:
            return rid
    return None


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
FINALISED_STATUSES = UPLOAD_STATUSES | {"completed"}


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
    if new == "recording":
        kinds.append("started")
    if old_status in ACTIVE_STATUSES and new in FINALISED_STATUSES:
        kinds.append("stopped")
    if new in ("uploaded", "failed", "completed"):
        kinds.append(new)
    out = []
    for kind in kinds:
        extra = {key: doc[key] for key in EVENT_FIELDS[kind] if doc.get(key) is not None}
        out.append(event_doc(kind, doc.get("camera_id"), doc.get("task_name"), doc.get("device_id"), at, **extra))
    return out
