"""`edge-agent ctl config get|set|diff`: the desired configuration document of one device.

    config get            the retained P/D/config/desired (secrets redacted) and P/D/config/reported
    config set FILE       publish FILE (YAML or JSON: `{"config": {...}}` or the bare keys) as the
                          retained desired document, version = the highest seen + 1 (or --version),
                          and wait for the device to report it (exit 0) or reject it (exit 1)
    config diff [FILE]    unified diff of reported.config against desired.config (or FILE); exit 1
                          if they differ

The protocol is docs/remote-management.md. Only the managed keys may appear; the document is
checked here with the agent's own models before it is sent, so a typo never reaches the device.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from edge_agent import remoteconfig
from edge_agent.config import AgentConfig
from edge_agent.ctlconn import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Conn,
    CtlError,
    collect_retained,
    decode,
)
from edge_agent.redact import MASK, redact
from edge_agent.topics import Topics

MANAGED_KEYS = remoteconfig.MANAGED_KEYS
# Keys whose value is a secret wherever they appear (the SecretStr fields of the models but camera URLs,
# whose credentials `redact` removes while keeping the host).
SECRET_KEYS = frozenset({"password", "secret_key", "access_key", "key_password", "token"})
CHECK_DEVICE = "ctl-check"


# -------------------------------------------------------------------------------------- documents


def redact_config(value: Any) -> Any:
    """A copy of a configuration document safe to print: secret keys masked, URL credentials removed."""
    if isinstance(value, dict):
        return {k: (MASK if k in SECRET_KEYS and v not in (None, "") else redact_config(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_config(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value


def read_document(path: Path) -> dict[str, Any]:
    """The managed keys of a YAML or JSON file holding `{"config": {...}}` or the bare keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CtlError(EXIT_USAGE, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CtlError(EXIT_USAGE, f"{path} is not UTF-8 text") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # position only: the offending line may hold a secret
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise CtlError(EXIT_USAGE, f"{path} is not valid YAML or JSON{where}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise CtlError(EXIT_USAGE, f"{path}: the document must be a mapping")
    if "config" in doc:
        extra = sorted(str(k) for k in doc if k not in ("config", "version"))
        if extra:
            raise CtlError(EXIT_USAGE, f"{path}: beside 'config' only 'version' may appear, not {', '.join(extra)}")
        if "version" in doc:
            print(f"edge-agent ctl: {path}: its 'version' is ignored (the next version is chosen; "
                  "--version N sets one)", file=sys.stderr)  # fmt: skip
        doc = doc["config"] if doc["config"] is not None else {}
        if not isinstance(doc, dict):
            raise CtlError(EXIT_USAGE, f"{path}: 'config' must be a mapping")
    try:
        json.dumps(doc)
    except (TypeError, ValueError):  # e.g. a YAML date or a non-string key
        raise CtlError(EXIT_USAGE, f"{path}: holds values JSON cannot carry (quote dates and times)") from None
    return doc


def check(config: dict[str, Any]) -> list[str]:
    """Problems of a desired `config` found without the device, one `key.path: message` each.

    The agent's own rules (`remoteconfig`): only the managed keys, no local-only paths, and the
    document merged onto a minimal agent.yaml validated by the same models (a key replaces the
    device's local key whole, so it must be valid on its own). What depends on the device's own
    agent.yaml, files and disk is checked there, and rejected with key paths."""
    try:
        desired = remoteconfig.parse_desired(json.dumps({"version": 1, "config": config}).encode(), 2**24)
        remoteconfig.build({"device_id": CHECK_DEVICE}, desired, env={})
    except remoteconfig.Rejected as exc:
        return [f"{p.path}: {p.message}" for p in exc.problems]
    return []


def normalise(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as an agent reports it (the models' defaults filled in, secrets redacted, local-only
    paths left out), so that two documents meaning the same compare equal. Unchanged but redacted if
    it does not validate."""
    keys = [k for k in config if k in remoteconfig.MANAGED_KEYS]
    try:
        desired = remoteconfig.Desired(1, {k: config[k] for k in keys})
        full = remoteconfig.redacted(remoteconfig.build({"device_id": CHECK_DEVICE}, desired, env={}), full=True)
    except remoteconfig.Rejected:
        return dict(redact_config(config))
    out = {**config, **{k: full[k] for k in keys if k in full}}
    for path in remoteconfig.LOCAL_ONLY:  # the device's own paths: never sent, so never a difference
        section, key = path.split(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    if isinstance(out.get("cameras"), dict):
        out["cameras"] = {cid: {k: v for k, v in cam.items() if k not in remoteconfig.LOCAL_ONLY_CAMERA_KEYS}
                          if isinstance(cam, dict) else cam for cid, cam in out["cameras"].items()}  # fmt: skip
    return dict(redact_config(out))


def diff_text(reported: dict[str, Any], other: dict[str, Any], left: str, right: str) -> str:
    """Unified diff of sorted-key JSON, compared over the keys `other` sets (a key it leaves out keeps
    the device's local value, so it is no difference)."""
    a = normalise({k: v for k, v in reported.items() if k in other})
    b = normalise(other)

    def lines(doc: dict[str, Any]) -> list[str]:
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).splitlines()

    return "\n".join(difflib.unified_diff(lines(a), lines(b), left, right, lineterm=""))


def next_version(desired: dict[str, Any] | None, reported: dict[str, Any] | None) -> int:
    """One above every version seen: desired, reported and the last rejected one."""
    seen = [0]
    rejected = (reported or {}).get("rejected")
    for v in ((desired or {}).get("version"), (reported or {}).get("version"),
              rejected.get("version") if isinstance(rejected, dict) else None):  # fmt: skip
        if isinstance(v, int) and not isinstance(v, bool):
            seen.append(v)
    return max(seen) + 1


def outcome(reported: dict[str, Any], version: int) -> str | None:
    """`applied` / `pending` once `reported` reached `version`, `rejected` if it refused it, else None."""
    rejected = reported.get("rejected")
    if isinstance(rejected, dict) and rejected.get("version") == version:
        return "rejected"
    if reported.get("version") == version:
        return "pending" if reported.get("state") == "pending" else "applied"
    return None


def describe(device: str, reported: dict[str, Any], version: int) -> list[str]:
    """Human lines of what `reported` says about `version`."""
    state = outcome(reported, version)
    if state == "rejected":
        lines = [f"{device}: version {version} rejected; version {reported.get('version')} keeps running"]
        for err in reported["rejected"].get("errors") or []:
            if isinstance(err, dict):
                lines.append(f"  {err.get('path') or '(document)'}: {err.get('message')}")
        return lines
    lines = [f"{device}: version {version} {state}" + (f" at {reported['applied_at']}" if reported.get("applied_at")
                                                      else "")]  # fmt: skip
    for item in reported.get("pending") or []:
        if isinstance(item, dict):
            lines.append(f"  pending {item.get('path')}: {item.get('reason')}")
    return lines


# -------------------------------------------------------------------------------------- commands


def _fetch(conn: Conn, topics: Topics, deadline: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The retained desired and reported documents (None when there is none)."""
    msgs = collect_retained(conn, [topics.config_desired, topics.config_reported], deadline,
                            enough=lambda got: {m.topic for m in got} >= {topics.config_desired,
                                                                          topics.config_reported})  # fmt: skip
    found: dict[str, dict[str, Any] | None] = {}
    for msg in msgs:
        found[msg.topic] = decode(msg.payload)
    return found.get(topics.config_desired), found.get(topics.config_reported)


def _get(args: argparse.Namespace, conn: Conn, topics: Topics, deadline: float) -> int:
    desired, reported = _fetch(conn, topics, deadline)
    doc = {"device_id": topics.device_id, "desired": redact_config(desired), "reported": redact_config(reported)}
    print(json.dumps(doc, ensure_ascii=False) if args.json else json.dumps(doc, indent=2, ensure_ascii=False))
    if reported is None:
        print(f"edge-agent ctl: no retained {topics.config_reported}: the device has not reported a configuration "
              "(not connected yet, or an agent without remote configuration)", file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _set(args: argparse.Namespace, cfg: AgentConfig, conn: Conn, topics: Topics, deadline: float) -> int:
    config = read_document(args.file)
    problems = check(config)
    if problems:
        raise CtlError(EXIT_USAGE, f"{args.file} is not a valid desired configuration (nothing sent):\n  "
                       + "\n  ".join(problems))  # fmt: skip
    conn.connect(deadline)
    desired, reported = _fetch(conn, topics, deadline)
    applied = (reported or {}).get("version")
    version: int = args.version if args.version is not None else next_version(desired, reported)
    if isinstance(applied, int) and version < applied:
        raise CtlError(EXIT_USAGE, f"--version {version} is below the applied version {applied}: the device "
                       "would reject it as stale")  # fmt: skip
    payload = json.dumps({"version": version, "config": config}, ensure_ascii=False,
                         separators=(",", ":")).encode()  # fmt: skip
    if len(payload) > cfg.mqtt.max_payload_bytes:
        raise CtlError(EXIT_USAGE, f"the document is {len(payload)} bytes, more than mqtt.max_payload_bytes "
                       f"({cfg.mqtt.max_payload_bytes}) allows")  # fmt: skip
    conn.publish_acked(topics.config_desired, payload, deadline, retain=True)
    print(f"edge-agent ctl: published version {version} on {topics.config_desired}", file=sys.stderr, flush=True)
    result: dict[str, Any] | None = None  # the report the agent publishes on receipt (even for the same document)
    while result is None:
        msg = conn.next_message(deadline)
        if msg is None:
            raise CtlError(EXIT_TIMEOUT, f"{topics.device_id} did not report version {version} within "
                           f"{args.timeout:g} s; the retained document stays: the device applies it when it "
                           "connects (see `config get`)")  # fmt: skip
        doc = decode(msg.payload) if msg.topic == topics.config_reported else None
        if doc is not None and outcome(doc, version) is not None:
            result = doc
    if args.json:
        print(json.dumps(redact_config(result), ensure_ascii=False))
    else:
        print("\n".join(describe(topics.device_id, result, version)))
    return EXIT_FAILED if outcome(result, version) == "rejected" else EXIT_OK


def _diff(args: argparse.Namespace, conn: Conn, topics: Topics, deadline: float) -> int:
    other = read_document(args.file) if args.file is not None else None
    conn.connect(deadline)
    desired, reported = _fetch(conn, topics, deadline)
    if other is None:
        if desired is None:
            raise CtlError(EXIT_FAILED, f"no retained {topics.config_desired}: nothing to compare")
        raw = desired.get("config")
        other = raw if isinstance(raw, dict) else {}
        right = f"desired (version {desired.get('version')})"
    else:
        right = str(args.file)
    have = (reported or {}).get("config")
    left = f"reported (version {(reported or {}).get('version')})" if reported is not None else "reported (none)"
    text = diff_text(have if isinstance(have, dict) else {}, other, left, right)
    if text:
        print(text)
    return EXIT_FAILED if text else EXIT_OK


def run(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """`ctl config ...` for `--device` (default: agent.yaml's device_id)."""
    topics = Topics.of(cfg, args.device)
    deadline = time.monotonic() + args.timeout
    conn = Conn(cfg, args.timeout)
    try:
        if args.config_action == "get":
            conn.connect(deadline)
            return _get(args, conn, topics, deadline)
        if args.config_action == "set":
            return _set(args, cfg, conn, topics, deadline)
        return _diff(args, conn, topics, deadline)
    finally:
        conn.close()


def _version(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


Leaf = Callable[..., argparse.ArgumentParser]

SET_DESCRIPTION = f"""Publish FILE as the retained P/D/config/desired and wait for P/D/config/reported.

FILE is YAML or JSON: {{"config": {{...}}}} or the bare keys, only these:
  {", ".join(MANAGED_KEYS)}
A key given replaces the device's local agent.yaml key whole; a key left out keeps the local one
({{}} returns to the local file). The document is checked with the agent's models before it is
sent. The version is one above every version seen (desired, reported, rejected) unless --version."""

DIFF_DESCRIPTION = """Unified diff of the device's reported.config against desired.config (or FILE), as sorted-key
JSON with the models' defaults filled in, over the keys the desired document sets. Secrets are
redacted on both sides, so a changed password shows no difference."""

CONFIG_EPILOG = """exit codes:
  0  get: printed; set: the device reports the version (applied or pending); diff: no difference
  1  set: the device rejected the document (each problem by key path); diff: they differ
  2  usage or configuration error; set: the document is invalid (nothing sent)
  3  timeout: broker unreachable, or set: no report of the version in --timeout (the retained
     document stays: the device applies it when it connects)"""


def add_parser(actions: Any, leaf: Leaf, common: Callable[[argparse.ArgumentParser, bool], None]) -> None:
    """`ctl config get|set|diff` (`leaf` and `common` are ctl's helpers for a subcommand and its options)."""
    p = leaf(actions, "config", "show, set or compare the device's desired configuration (P/D/config/...)",
             description=__doc__.split("\n\n")[1], epilog=CONFIG_EPILOG)  # fmt: skip
    common(p, True)
    sub = p.add_subparsers(dest="config_action", required=True, metavar="get|set|diff")
    g = leaf(sub, "get", "print the retained desired (secrets redacted) and reported documents",
             epilog=CONFIG_EPILOG)
    common(g, True)
    s = leaf(sub, "set", "publish FILE as the desired configuration and wait until the device reports it",
             description=SET_DESCRIPTION, epilog=CONFIG_EPILOG)
    s.add_argument("file", type=Path, metavar="FILE")
    s.add_argument("--version", type=_version, default=None, metavar="N",
                   help="the document's version (default: one above every version seen)")  # fmt: skip
    common(s, True)
    d = leaf(sub, "diff", "unified diff of reported.config against desired.config (or FILE); exit 1 if they differ",
             description=DIFF_DESCRIPTION, epilog=CONFIG_EPILOG)
    d.add_argument("file", type=Path, metavar="FILE", nargs="?", default=None)
    common(d, True)
