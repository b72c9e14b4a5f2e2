"""`edge-agent ctl` for several devices at once: a `--device` glob over the online devices, or a `--group`.

    --device 'site-a-*' ACTION CAMERA [TASK]  the command goes to every device whose retained
                                              P/<device>/status is `online` and whose id matches
                                              (fnmatch); one request per device, replies gathered
                                              on one connection
    --group G ACTION [CAMERA[,CAMERA]] [TASK] one publish on P/groups/G/cmd; the members are the
                                              devices whose retained P/<device>/config/reported
                                              lists G; each answers once on P/<device>/groups/G/reply

Either way the result is one table (or JSON lines): a row per device and camera, and a device that
does not answer within `--timeout` is a row `no reply`. Exit 0 only if every row is ok.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from dataclasses import dataclass, field
from typing import Any

from edge_agent import names
from edge_agent.config import AgentConfig
from edge_agent.ctl import Request, command_payload, generate_task_name, new_request_id
from edge_agent.ctlconn import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Conn, CtlError, Msg, collect_retained, decode
from edge_agent.topics import Topics

NO_REPLY = "no reply"
HEADERS = ("DEVICE", "CAMERA", "OK", "STATUS", "TASK", "ERROR")


@dataclass(frozen=True)
class Row:
    """One device and camera of a fleet command: its answer, or `no reply`."""

    device: str
    camera: str
    ok: bool
    status: str
    task: str = ""
    error: str = ""
    doc: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, device: str, camera: str, doc: dict[str, Any]) -> Row:
        error = doc.get("error") or ""
        if not error and doc.get("running_task"):
            error = f"running_task: {doc['running_task']}"
        return cls(device, str(doc.get("camera_id") or camera), doc.get("ok") is True,
                   str(doc.get("status") or ("ok" if doc.get("ok") is True else "error")),
                   str(doc.get("task_name") or ""), str(error), doc)  # fmt: skip

    @classmethod
    def missing(cls, device: str, camera: str) -> Row:
        return cls(device, camera, False, NO_REPLY)

    def as_json(self) -> dict[str, Any]:
        if not self.doc:
            return {"device_id": self.device, "camera_id": self.camera, "ok": False, "status": self.status}
        return {**self.doc, "device_id": self.device, "camera_id": self.camera, "ok": self.ok}


def render_table(rows: list[Row]) -> str:
    """Aligned columns DEVICE CAMERA OK STATUS TASK ERROR, one line per row."""
    cells = [HEADERS] + [(r.device, r.camera, "yes" if r.ok else "no", r.status, r.task or "-", r.error)
                         for r in rows]  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(HEADERS))).rstrip() for c in cells)


def summary(rows: list[Row]) -> str:
    ok = sum(r.ok for r in rows)
    silent = sum(r.status == NO_REPLY for r in rows)
    devices = len({r.device for r in rows})
    text = f"{ok} of {len(rows)} ok on {devices} device{'s' if devices != 1 else ''}"
    return text + (f", {silent} without reply" if silent else "")


def report(rows: list[Row], as_json: bool) -> int:
    """Print the rows (sorted by device and camera); exit 0 only if there are rows and all are ok."""
    rows = sorted(rows, key=lambda r: (r.device, r.camera))
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json(), ensure_ascii=False), flush=True)
    else:
        print(render_table(rows))
        print(summary(rows), flush=True)
    return EXIT_OK if rows and all(r.ok for r in rows) else EXIT_FAILED


def device_of(topic: str, prefix: str) -> str | None:
    """The device level of a `P/<device>/...` topic."""
    levels = topic.split("/")
    n = len(prefix.split("/"))
    return levels[n] if len(levels) > n and levels[:n] == prefix.split("/") else None


def online(msgs: list[Msg], prefix: str) -> list[str]:
    """Devices whose newest availability message (`P/<device>/status`) says `online`."""
    state: dict[str, bytes] = {}
    for msg in msgs:
        device = device_of(msg.topic, prefix)
        if device is not None and msg.topic == Topics(prefix, device).availability:
            state[device] = msg.payload.strip()
    return sorted(d for d, payload in state.items() if payload == b"online")


def matching(devices: list[str], pattern: str) -> list[str]:
    return [d for d in devices if fnmatch.fnmatchcase(d, pattern)]


def members(msgs: list[Msg], prefix: str, group: str) -> list[str]:
    """Devices whose newest retained `config/reported` lists `group` in its `groups`."""
    groups: dict[str, list[Any]] = {}
    for msg in msgs:
        device = device_of(msg.topic, prefix)
        if device is None or msg.topic != Topics(prefix, device).config_reported:
            continue
        doc = decode(msg.payload)
        listed = doc.get("groups") if doc is not None else None
        groups[device] = listed if isinstance(listed, list) else []
    return sorted(d for d, listed in groups.items() if group in listed)


def _gather(conn: Conn, deadline: float, want: set[str], take: Any) -> None:
    """Read the inbox until `want` is empty or the deadline passes; `take(msg, doc)` names the device a
    message answers (removed from `want`), or None."""
    while want:
        msg = conn.next_message(deadline)
        if msg is None:
            return
        doc = decode(msg.payload)
        if doc is not None:
            device = take(msg, doc)
            if device is not None:
                want.discard(device)


# ------------------------------------------------------------------------------------ --device GLOB


def run_pattern(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """The command to every online device matching `--device`, replies gathered concurrently."""
    pattern: str = args.device
    prefix = cfg.mqtt.topic_prefix
    camera: str = args.camera
    task: str | None = args.task
    if args.action == "start" and not task:
        task = generate_task_name()  # one name on every device: `stop` it later with the same pattern
    deadline = time.monotonic() + args.timeout
    conn = Conn(cfg, args.timeout)
    try:
        conn.connect(deadline)
        seen = online(collect_retained(conn, [Topics(prefix, "+").availability], deadline), prefix)
        devices = matching(seen, pattern)
        if not devices:
            known = f" (online: {', '.join(seen[:20])}{' ...' if len(seen) > 20 else ''})" if seen else ""
            raise CtlError(EXIT_FAILED, f"no online device matches {pattern!r} under {prefix}/{known}")
        cmd = command_payload(args, task)
        requests = {d: Request.to(conn, Topics(prefix, d), camera, cmd) for d in devices}
        conn.subscribe_many([t for r in requests.values() for t in r.subscriptions], deadline)
        for req in requests.values():
            req.send(conn)
        replies: dict[str, dict[str, Any]] = {}

        def take(msg: Msg, doc: dict[str, Any]) -> str | None:
            device = device_of(msg.topic, prefix)
            req = requests.get(device or "")
            if device is None or req is None or device in replies or not req.answered_by(msg, doc):
                return None
            replies[device] = doc
            return device

        _gather(conn, deadline, set(devices), take)
    finally:
        conn.close()
    rows = [Row.of(d, camera, replies[d]) if d in replies else Row.missing(d, camera) for d in devices]
    return report(rows, args.json)


# ---------------------------------------------------------------------------------------- --group G


def group_payload(args: argparse.Namespace, cameras: list[str] | None) -> dict[str, Any]:
    """`{"action", "request_id", "cameras"?, "task_name"?, "max_seconds"?}` (docs/remote-management.md)."""
    task: str | None = args.task
    if args.action == "start" and not task:
        task = generate_task_name()
    cmd: dict[str, Any] = {"action": args.action, "request_id": new_request_id()}
    if cameras:
        cmd["cameras"] = cameras
    if task and args.action != "status":
        cmd["task_name"] = task
    if args.action == "start" and args.max_seconds is not None:
        cmd["max_seconds"] = args.max_seconds
    return cmd


def group_rows(device: str, doc: dict[str, Any]) -> list[Row]:
    """One row per camera of a member's reply (one row for the device if it names no camera)."""
    results = doc.get("results")
    if isinstance(results, dict) and results:
        return [Row.of(device, str(cam), r if isinstance(r, dict) else {"ok": False, "error": "bad result"})
                for cam, r in sorted(results.items())]  # fmt: skip
    return [Row.of(device, "-", doc)]


def run_group(args: argparse.Namespace, cfg: AgentConfig) -> int:
    """One publish on P/groups/G/cmd, one row per member and camera."""
    group: str = args.group
    try:
        names.check_name(group, "group")
    except names.InvalidName as exc:
        raise CtlError(EXIT_USAGE, str(exc)) from None
    cameras: list[str] | None = args.cameras or ([c for c in args.camera.split(",") if c] if args.camera else None)
    prefix = cfg.mqtt.topic_prefix
    anyone = Topics(prefix, "+")
    cmd = group_payload(args, cameras)
    deadline = time.monotonic() + args.timeout
    conn = Conn(cfg, args.timeout)
    try:
        conn.connect(deadline)
        # The reply filter is subscribed with (before the publish); only `reported` has retained messages.
        known = members(collect_retained(conn, [anyone.config_reported, anyone.group_reply(group)], deadline),
                        prefix, group)  # fmt: skip
        if not known:
            raise CtlError(EXIT_FAILED, f"no device lists group {group!r} in its retained "
                           f"{anyone.config_reported}: nothing sent")  # fmt: skip
        topic, payload = Topics(prefix, "_").group_command(group), json.dumps(cmd).encode()
        conn.publish_acked(topic, payload, deadline)
        replies: dict[str, dict[str, Any]] = {}

        def take(msg: Msg, doc: dict[str, Any]) -> str | None:
            device = device_of(msg.topic, prefix)
            if (device is None or device in replies or msg.topic != Topics(prefix, device).group_reply(group)
                    or doc.get("request_id") != cmd["request_id"]):  # fmt: skip
                return None
            replies[device] = doc
            return device

        # A broker may acknowledge a QoS 1 message and never deliver it to some subscribers (NATS 2.9
        # did, docs/scaling.md): the same request goes out again at a third and two thirds of the
        # timeout while members are silent. A member that has it already does not run it again.
        want = set(known)
        start = time.monotonic()
        for resend_at in (start + args.timeout / 3, start + 2 * args.timeout / 3, deadline):
            _gather(conn, min(resend_at, deadline), want, take)
            if not want or resend_at >= deadline:
                break
            conn.publish_acked(topic, payload, deadline)
    finally:
        conn.close()
    rows: list[Row] = []
    for device in sorted(set(known) | set(replies)):  # a device that answered without a visible report counts
        if device in replies:
            rows.extend(group_rows(device, replies[device]))
        else:
            rows.extend(Row.missing(device, cam) for cam in (cameras or ["-"]))
    return report(rows, args.json)
