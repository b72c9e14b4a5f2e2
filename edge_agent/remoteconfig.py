"""Desired configuration over MQTT: parse, validate against the local file, plan, report.

The operator publishes a retained, versioned document on `P/D/config/desired` holding the parts of
`agent.yaml` that are safe to change remotely (`MANAGED_KEYS`). Each key present replaces the local
file's key whole; the merged document goes through the same models as `agent.yaml`, so every
problem is named by its key path, and an invalid document is rejected whole. Pure functions and one
small state holder (`RemoteConfig`, owned by the agent thread); the agent applies what `plan` says.
See docs/remote-management.md.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any

from edge_agent import redact
from edge_agent.config import AgentConfig
from edge_agent.configload import parse_config
from edge_agent.errors import ConfigError

MANAGED_KEYS = ("cameras", "recording", "storage", "groups", "telemetry_seconds", "log_level")
# Paths inside managed keys that stay local: where the journal lives, what the device executes, and
# which of its files it reads. A remote value there could run or read anything on the device.
LOCAL_ONLY = ("recording.output_dir", "recording.ffmpeg_path", "recording.ffprobe_path")
LOCAL_ONLY_CAMERA_KEYS = ("buffer_dir", "url_file")
LOCAL_ONLY_SUFFIX = "_file"  # secret files (`storage.secret_key_file`): send the value instead
JOURNAL_KEY = "desired_config"  # the accepted document, in the journal's settings (atomic, fsynced)


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def doc(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class Rejected(Exception):
    """The document cannot be applied; `problems` name each key path."""

    def __init__(self, problems: list[Problem], version: int | None = None) -> None:
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems
        self.version = version


@dataclass(frozen=True)
class Desired:
    version: int
    config: dict[str, Any]

    def doc(self) -> dict[str, Any]:
        return {"version": self.version, "config": self.config}


def parse_desired(payload: bytes, max_bytes: int) -> Desired:
    """The document, or `Rejected` naming what is wrong with it (never another exception)."""
    if len(payload) > max_bytes:
        raise Rejected([Problem("(document)", f"{len(payload)} bytes exceeds the {max_bytes}-byte limit")])
    try:
        raw = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected([Problem("(document)", f"not valid JSON: {str(exc)[:120]}")]) from None
    if not isinstance(raw, dict):
        raise Rejected([Problem("(document)", "must be a JSON object")])
    version = raw.get("version")
    vnum = version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else None
    problems = [Problem(str(k)[:60], "unknown key (expected version, config)") for k in raw
                if k not in ("version", "config")]  # fmt: skip
    if vnum is None or vnum >= 2**53:
        problems.append(Problem("version", "must be an integer from 1 to 2^53"))
    config = raw.get("config")
    if not isinstance(config, dict):
        problems.append(Problem("config", "must be an object of agent.yaml keys"))
    else:
        for key in config:
            if key not in MANAGED_KEYS:
                why = "stays local (not remotely manageable)" if key in AgentConfig.model_fields else "unknown key"
                problems.append(Problem(str(key)[:60], f"{why}; allowed: {', '.join(MANAGED_KEYS)}"))
        problems.extend(_local_only(config))
    if problems:
        raise Rejected(problems, vnum)
    assert vnum is not None and isinstance(config, dict)
    return Desired(vnum, config)


def _local_only(config: dict[str, Any]) -> list[Problem]:
    out = []
    for path in LOCAL_ONLY:
        section, key = path.split(".")
        sect = config.get(section)
        if isinstance(sect, dict) and key in sect:
            out.append(Problem(path, "stays local (set it in agent.yaml on the device)"))
    for section in ("recording", "storage"):
        sect = config.get(section)
        if isinstance(sect, dict):
            out += [Problem(f"{section}.{k}", "secret files stay local; send the value itself")
                    for k in sect if isinstance(k, str) and k.endswith(LOCAL_ONLY_SUFFIX)]  # fmt: skip
    cameras = config.get("cameras")
    if isinstance(cameras, dict):
        for cam_id, cam in cameras.items():
            if isinstance(cam, dict):
                out += [Problem(f"cameras.{cam_id}.{k}", "stays local (set it in agent.yaml on the device)")
                        for k in LOCAL_ONLY_CAMERA_KEYS if k in cam]  # fmt: skip
    return out


def merged(local_raw: dict[str, Any], desired: Desired | None) -> dict[str, Any]:
    """The local file's document with each managed key of `desired` replacing it whole."""
    raw = copy.deepcopy(local_raw)
    if desired is None:
        return raw
    for key, value in desired.config.items():
        if key == "recording" and isinstance(value, dict):
            value = dict(value)
            local_rec = local_raw.get("recording") if isinstance(local_raw.get("recording"), dict) else {}
            for local_key in ("output_dir", "ffmpeg_path", "ffprobe_path"):
                if isinstance(local_rec, dict) and local_key in local_rec:
                    value[local_key] = local_rec[local_key]
        if key == "cameras" and isinstance(value, dict):
            local_cams = local_raw.get("cameras") if isinstance(local_raw.get("cameras"), dict) else {}
            value = {cid: _with_local_camera_keys(cam, (local_cams or {}).get(cid)) for cid, cam in value.items()}
        raw[key] = copy.deepcopy(value)
    return raw


def _with_local_camera_keys(cam: Any, local: Any) -> Any:
    if not isinstance(cam, dict) or not isinstance(local, dict):
        return cam
    out = dict(cam)
    if "buffer_dir" in local:
        out["buffer_dir"] = local["buffer_dir"]
    return out


def build(local_raw: dict[str, Any], desired: Desired | None, env: dict[str, str] | None = None) -> AgentConfig:
    """The configuration `desired` asks for, validated like `agent.yaml`; `Rejected` names problems."""
    try:
        return parse_config(merged(local_raw, desired), env)
    except ConfigError as exc:
        raise Rejected(_problems(str(exc)), desired.version if desired else None) from None


def _problems(text: str) -> list[Problem]:
    out = []
    for line in text.splitlines():
        path, sep, message = line.partition(": ")
        out.append(Problem(path, message) if sep else Problem("(document)", line))
    return out or [Problem("(document)", "invalid")]


def redacted(cfg: AgentConfig, full: bool = False) -> dict[str, Any]:
    """The managed keys of `cfg` as JSON, every secret masked (camera URLs keep their host).

    Values equal to their defaults are left out unless `full`: `reported` says what is set, and
    stays small enough for brokers with a small packet limit. Local-only paths are left out."""
    doc = cfg.model_dump(mode="json", include=set(MANAGED_KEYS), exclude_defaults=not full)
    for cam_id, cam in cfg.cameras.items():
        url = cam.url.get_secret_value()
        doc.setdefault("cameras", {}).setdefault(cam_id, {})["url"] = redact.redact(url, tuple(redact.url_secrets(url)))
        doc["cameras"][cam_id].pop("buffer_dir", None)
    for path in LOCAL_ONLY:  # the device's own (output_dir, FFmpeg paths): not the operator's to see or set
        section, key = path.split(".")
        if isinstance(doc.get(section), dict):
            doc[section].pop(key, None)
    out: dict[str, Any] = _finite(doc)
    return out


def _finite(value: Any) -> Any:
    """JSON-safe: inf/nan floats (none expected) become null rather than breaking the encoder."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---- what changes, and what has to wait ----------------------------------------------------------


@dataclass
class Plan:
    """How to get from the running configuration to the target one right now."""

    effective: AgentConfig  # what can run now (busy parts keep their running values)
    pending: list[Problem] = field(default_factory=list)  # what waits, and why

    @property
    def complete(self) -> bool:
        return not self.pending


def plan(current: AgentConfig, target: AgentConfig, busy_cameras: dict[str, str]) -> Plan:
    """Apply everything except a change to a camera that is recording (`busy_cameras`: camera ->
    its task name). A storage change applies at once: waiting uploads move to the new store (an
    operator fixing the credentials of an unreachable store must not wait for it to drain)."""
    cameras = dict(target.cameras)
    pending: list[Problem] = []
    for cam_id, task_name in sorted(busy_cameras.items()):
        old = current.cameras.get(cam_id)
        new = target.cameras.get(cam_id)
        if old is None or old == new:
            continue
        if new is None:
            cameras[cam_id] = old
            why = f"removed; task {task_name} is recording, the camera goes when it ends"
        else:
            cameras[cam_id] = old
            why = f"changed; task {task_name} is recording, applied when it ends"
        pending.append(Problem(f"cameras.{cam_id}", why))
    if not pending:
        return Plan(target)
    effective = target.model_copy(update={"cameras": cameras})
    return Plan(effective, pending)
