"""`edge-agent ctl`: send commands to agents over MQTT and print their replies (and progress).

    edge-agent ctl [--device D] start|stop|status|query CAMERA [TASK] [--wait] [--timeout S] [--json]
    edge-agent ctl [--device D] export CAMERA TASK --from ISO --to ISO
    edge-agent ctl [--device D] snapshot CAMERA [--output FILE]
    edge-agent ctl --device 'site-a-*' start|stop|status|query CAMERA [TASK]   (every online match)
    edge-agent ctl --group G start|stop|status [CAMERA] [TASK] [--cameras a,b]
    edge-agent ctl [--device D] config get | set FILE [--version N] | diff [FILE]
    edge-agent ctl watch [--count N]

The broker, credentials, TLS, topic prefix and device id come from agent.yaml's `mqtt` section
(environment overrides apply; `--config`, default ./agent.yaml). The tool is its own MQTT client
(`edge-ctl-<random>`, clean session), so it never disturbs the agent's persistent session.

Exit codes (scripts rely on them):
  0  the command was answered ok (with --wait: the task ended uploaded or completed; several
     devices: every one answered ok; config set: the device reports the new version)
  1  answered ok:false (with --wait: the task ended failed); several devices: one failed or did
     not answer, or none matched; config set: rejected; config diff: there are differences
  2  usage or configuration error (config set: the document is invalid before it is sent)
  3  timeout: no reply in time, broker unreachable or refused, or --wait-timeout passed
"""

from __future__ import annotations

import argparse
import json
import queue
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import AgentConfig
from edge_agent.configload import load_config
from edge_agent.ctlconn import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Conn,
    CtlError,
    Msg,
    decode,
)
from edge_agent.errors import ConfigError
from edge_agent.tasks import TERMINAL_OK_STATUSES, TERMINAL_STATUSES
from edge_agent.topics import Topics

_Conn = Conn  # its name before the split into ctlconn.py (tests/test_e2e_acl.py, tests/test_unit_tls.py)

TERMINAL_OK = TERMINAL_OK_STATUSES
TERMINAL = TERMINAL_STATUSES
ACTIONS = ("start", "stop", "status", "query")
GROUP_ACTIONS = ("start", "stop", "status")
GLOB_CHARS = frozenset("*?[")

EPILOG = """exit codes:
  0  answered ok (with --wait: the task ended uploaded or completed; several devices: all ok)
  1  answered ok:false (with --wait: the task ended failed); several devices: one failed, did not
     answer, or none matched
  2  usage or configuration error
  3  timeout: no reply in time, broker unreachable, or --wait-timeout passed"""


# ------------------------------------------------------------------------------------ output


def human_line(doc: dict[str, Any]) -> str:
    """`cam1 patrol-7: recording (...)`, or `cam1: idle` before the first task."""
    head = str(doc.get("camera_id", "?"))
    if doc.get("task_name"):
        head += f" {doc['task_name']}"
    line = f"{head}: {doc.get('status', '?')}"
    extras = []
    if doc.get("ok") is False:
        extras.append("ok: false")
    for key in ("error", "running_task", "stop_reason", "duration_seconds", "object_name", "local_file",
                "last_upload_error", "next_retry_at", "frame_time", "bytes"):  # fmt: skip
        if doc.get(key) not in (None, ""):
            extras.append(f"{key}: {doc[key]}")
    return f"{line} ({', '.join(extras)})" if extras else line


def emit(doc: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(doc, ensure_ascii=False) if as_json else human_line(doc), flush=True)


# ---------------------------------------------------------------------------------- commands


def generate_task_name() -> str:
    return f"ctl-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def new_request_id() -> str:
    return f"ctl-{uuid.uuid4().hex}"


def command_payload(args: argparse.Namespace, task: str | None) -> dict[str, Any]:
    """The JSON command for `args.action` (without request_id: each device gets its own)."""
    cmd: dict[str, Any] = {"action": args.action}
    if task and args.action not in ("status", "snapshot"):
        cmd["task_name"] = task
    if args.action == "start" and args.max_seconds is not None:
        cmd["max_seconds"] = args.max_seconds
    if args.action == "export":
        cmd["from"], cmd["to"] = args.range_from.isoformat(), args.range_to.isoformat()
    return cmd


@dataclass(frozen=True)
class Request:
    """One command to one camera of one device: where it goes and where its reply can come from
    (the camera's reply topic, matched by request_id; with MQTT 5 also ctl's own inbox under
    `P/D/_ctl/<client>/reply`, matched by correlation data)."""

    camera: str
    cmd: dict[str, Any]
    command_topic: str
    reply_topic: str
    inbox: str | None

    @classmethod
    def to(cls, conn: Conn, topics: Topics, camera: str, cmd: dict[str, Any]) -> Request:
        inbox = topics.ctl_inbox(conn.client_id) if conn.v5 else None
        return cls(camera, {**cmd, "request_id": new_request_id()}, topics.command(camera), topics.reply(camera),
                   inbox)  # fmt: skip

    @property
    def request_id(self) -> str:
        return str(self.cmd["request_id"])

    @property
    def subscriptions(self) -> list[str]:
        return [self.reply_topic] + ([self.inbox] if self.inbox else [])

    def send(self, conn: Conn) -> None:
        """Publish (subscribe to `subscriptions` first, so the reply cannot be missed)."""
        props = None
        if self.inbox is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.inbox
            props.CorrelationData = self.request_id.encode()
        conn.publish(self.command_topic, json.dumps(self.cmd).encode(), props)

    def answered_by(self, msg: Msg, doc: dict[str, Any]) -> bool:
        if self.inbox is not None and msg.topic == self.inbox:
            return msg.correlation == self.request_id.encode()
        return msg.topic == self.reply_topic and doc.get("request_id") == self.request_id


def _command(args: argparse.Namespace, cfg: AgentConfig, topics: Topics) -> int:
    camera: str = args.camera
    task: str | None = args.task
    if args.action == "start" and not task:
        task = generate_task_name()
    deadline = time.monotonic() + args.timeout
    conn = Conn(cfg, args.timeout)
    try:
        conn.connect(deadline)
        req = Request.to(conn, topics, camera, command_payload(args, task))
        task_topic = None
        if args.wait and task:  # subscribe first, so no status change between reply and subscribe is lost
            task_topic = topics.task(camera, task)
        snap_topic = topics.snapshot(camera) if getattr(args, "output", None) else None
        conn.subscribe_many([t for t in (*req.subscriptions, task_topic, snap_topic) if t], deadline)
        req.send(conn)

        reply = None
        pending: list[dict[str, Any]] = []
        images: list[Msg] = []
        while reply is None:
            msg = conn.next_message(deadline)
            if msg is None:
                raise CtlError(EXIT_TIMEOUT, f"no reply from {topics.base}/{camera} within {args.timeout:g} s")
            if msg.topic == snap_topic:
                images.append(msg)
                continue
            doc = decode(msg.payload)
            if doc is None:
                continue
            if msg.topic == task_topic:
                pending.append(doc)
            elif req.answered_by(msg, doc):
                reply = doc
        emit(reply, args.json)
        if reply.get("ok") is not True:
            return EXIT_FAILED
        if snap_topic is not None:
            _save_snapshot(conn, snap_topic, images, reply, args.output, deadline)
        if not args.wait or not reply.get("task_name"):
            return EXIT_OK
        return _follow(conn, args, topics, camera, reply, pending, task_topic)
    finally:
        conn.close()


def _save_snapshot(conn: Conn, topic: str, images: list[Msg], reply: dict[str, Any], output: Path,
                   deadline: float) -> None:  # fmt: skip
    """Write the JPEG the snapshot command published (the live message on the retained topic, not
    the older retained one delivered at subscribe time) to `output`."""
    size = reply.get("bytes")

    def fresh(m: Msg) -> bool:
        return not m.retain and (not isinstance(size, int) or len(m.payload) == size)

    while not any(fresh(m) for m in images):
        msg = conn.next_message(deadline)
        if msg is None:
            raise CtlError(EXIT_TIMEOUT, f"the snapshot was answered but its image never arrived on {topic}")
        if msg.topic == topic:
            images.append(msg)
    jpeg = next(m for m in reversed(images) if fresh(m)).payload
    try:
        output.write_bytes(jpeg)
    except OSError as exc:
        raise CtlError(EXIT_FAILED, f"cannot write {output}: {exc.strerror}") from None
    print(f"wrote {len(jpeg)} bytes to {output}", file=sys.stderr, flush=True)


def _follow(
    conn: Conn, args: argparse.Namespace, topics: Topics, camera: str, reply: dict[str, Any],
    pending: list[dict[str, Any]], task_topic: str | None,
) -> int:  # fmt: skip
    """Print one line per status change of the replied task's run until it is terminal."""
    task = str(reply["task_name"])
    run_start = reply.get("start_time")
    last = reply.get("status")
    if last in TERMINAL:
        return EXIT_OK if last in TERMINAL_OK else EXIT_FAILED
    deadline = time.monotonic() + args.wait_timeout if args.wait_timeout else None
    if task_topic != topics.task(camera, task):  # e.g. `status --wait`: the task was not known before
        task_topic = topics.task(camera, task)
        conn.subscribe(task_topic, deadline if deadline is not None else time.monotonic() + args.timeout)
    while True:
        while pending:
            doc = pending.pop(0)
            if doc.get("task_name") != task or (run_start and doc.get("start_time") != run_start):
                continue  # an earlier run of the same task name (its retained status)
            status = doc.get("status")
            if status != last:
                last = status
                emit(doc, args.json)
            if status in TERMINAL:
                return EXIT_OK if status in TERMINAL_OK else EXIT_FAILED
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise CtlError(EXIT_TIMEOUT, f"{camera} {task}: still {last} after {args.wait_timeout:g} s")
        try:
            msg = conn.inbox.get(timeout=min(left, 1.0) if left is not None else 1.0)
        except queue.Empty:
            continue
        if msg.topic == task_topic:
            new = decode(msg.payload)
            if new is not None:
                pending.append(new)


def _watch(args: argparse.Namespace, cfg: AgentConfig, topics: Topics) -> int:
    deadline = time.monotonic() + args.timeout
    conn = Conn(cfg, args.timeout)
    try:
        conn.connect(deadline)
        conn.subscribe(f"{topics.base}/+/status", deadline)
        seen = 0
        while args.count is None or seen < args.count:
            try:
                msg = conn.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            doc = decode(msg.payload)
            if doc is None:
                continue
            doc.setdefault("camera_id", msg.topic.split("/")[-2])
            emit(doc, args.json)
            seen += 1
        return EXIT_OK
    finally:
        conn.close()


def is_pattern(device: str | None) -> bool:
    """A `--device` holding `*`, `?` or `[` is a glob over the online devices (device ids never hold them)."""
    return device is not None and any(c in GLOB_CHARS for c in device)


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a combination of arguments argparse alone cannot check, or None."""
    action = args.action
    wait = getattr(args, "wait", False)
    camera, task = getattr(args, "camera", None), getattr(args, "task", None)
    cameras = getattr(args, "cameras", None)
    if args.group is not None:
        if args.device is not None:
            return "--group and --device exclude each other"
        if action not in GROUP_ACTIONS:
            return f"--group works with {', '.join(GROUP_ACTIONS)}, not {action}"
        if wait:
            return "--wait follows one task of one device, not a group"
        if cameras and camera:
            return "name the cameras either as CAMERA or with --cameras, not both"
        return None
    if cameras:
        return "--cameras is for --group; otherwise name one CAMERA"
    if is_pattern(args.device):
        if action not in ACTIONS:
            return f"a --device pattern works with {', '.join(ACTIONS)}, not {action} (give one device NAME)"
        if wait:
            return "--wait follows one task of one device, not a --device pattern"
    if action in (*ACTIONS, "export", "snapshot") and not camera:
        return f"{action} needs a CAMERA" + (" (or --group G)" if action in GROUP_ACTIONS else "")
    if action in ("stop", "query", "export") and not task:
        return f"{action} needs a TASK name"
    return None


def run(args: argparse.Namespace) -> int:
    """Entry point of `edge-agent ctl` (parsed by `add_parser`)."""
    problem = usage_problem(args)
    if problem is not None:
        args.usage_error(problem)  # argparse: prints the usage and the problem, exits 2
        return EXIT_USAGE
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    from edge_agent import configctl, fleetctl  # they build on this module

    try:
        if args.action == "config":
            return configctl.run(args, cfg)
        if args.group is not None:
            return fleetctl.run_group(args, cfg)
        if is_pattern(args.device):
            return fleetctl.run_pattern(args, cfg)
        topics = Topics.of(cfg, args.device)
        if args.action == "watch":
            return _watch(args, cfg, topics)
        return _command(args, cfg, topics)
    except CtlError as exc:
        print(f"edge-agent ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _utc_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError("give the zone, e.g. 2026-12-06T16:00:00Z")
    return value.astimezone(UTC)


def _camera_list(text: str) -> list[str]:
    cameras = [c.strip() for c in text.split(",") if c.strip()]
    if not cameras:
        raise argparse.ArgumentTypeError("name at least one camera: a,b")
    return cameras


def _common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the action (`ctl --json status cam1` = `ctl status cam1 --json`)."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--config", type=Path, default=d(Path("agent.yaml")), help="agent.yaml (default: agent.yaml)")
    p.add_argument("--device", default=d(None), metavar="DEVICE",
                   help="device id (default: agent.yaml's device_id); with * ? [ a pattern: every device whose "
                   "retained P/<device>/status is online and matches")  # fmt: skip
    p.add_argument("--group", default=d(None), metavar="G",
                   help="send start/stop/status once on P/groups/G/cmd; every member answers")  # fmt: skip
    p.add_argument("--timeout", type=_positive, default=d(10.0),
                   help="seconds to wait for the broker and the replies (default: 10)")  # fmt: skip
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON lines instead of text")


def _leaf(actions: Any, name: str, help: str, description: str | None = None,
          epilog: str = EPILOG) -> argparse.ArgumentParser:  # fmt: skip
    p: argparse.ArgumentParser = actions.add_parser(
        name, help=help, description=description or help, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.set_defaults(usage_error=p.error)
    return p


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `ctl` to the `edge-agent` subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    ctl: argparse.ArgumentParser = sub.add_parser(
        "ctl", help="send commands to agents over MQTT", description="\n\n".join(__doc__.split("\n\n")[:2]),
        epilog=EPILOG, formatter_class=fmt,
    )  # fmt: skip
    _common(ctl, suppress=False)
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ACTIONS:
        grouped = action in GROUP_ACTIONS
        p = _leaf(actions, action, f"send a {action} command" + (" (to a device, a --device pattern or a --group)"
                  if grouped else " (to a device or a --device pattern)"))  # fmt: skip
        p.add_argument("camera", metavar="CAMERA", nargs="?" if grouped else None,
                       help="camera id" + ("; with --group optional, a,b for several (default: all cameras)"
                                           if grouped else ""))  # fmt: skip
        if action == "status":
            p.set_defaults(task=None)
        else:
            p.add_argument("task", metavar="TASK", nargs="?" if grouped else None,
                           help="task name" + (" (generated when left out)" if action == "start" else ""))  # fmt: skip
        if action == "start":
            p.add_argument("--max-seconds", type=int, default=None, help="lower this task's length limit")
        else:
            p.set_defaults(max_seconds=None)
        if grouped:
            p.add_argument("--cameras", type=_camera_list, default=None, metavar="A,B",
                           help="with --group: only these cameras of each member (default: all)")  # fmt: skip
        p.add_argument("--wait", action="store_true",
                       help="follow the task's status until uploaded, completed or failed (one device)")  # fmt: skip
        p.add_argument("--wait-timeout", type=_positive, default=None,
                       help="with --wait: give up (exit 3) after this many seconds (default: no limit)")  # fmt: skip
        _common(p, suppress=True)
    e = _leaf(actions, "export", "cut FROM..TO of a camera's ring buffer into a recording named TASK (uploaded "
              "like any other)")  # fmt: skip
    e.add_argument("camera", metavar="CAMERA")
    e.add_argument("task", metavar="TASK", help="name of the exported recording")
    e.add_argument("--from", dest="range_from", type=_utc_time, required=True, metavar="ISO",
                   help="UTC start, e.g. 2026-12-06T16:00:00Z")  # fmt: skip
    e.add_argument("--to", dest="range_to", type=_utc_time, required=True, metavar="ISO", help="UTC end")
    e.add_argument("--wait", action="store_true", help="follow the export until uploaded, completed or failed")
    e.add_argument("--wait-timeout", type=_positive, default=None,
                   help="with --wait: give up (exit 3) after this many seconds (default: no limit)")  # fmt: skip
    e.set_defaults(max_seconds=None)
    _common(e, suppress=True)
    s = _leaf(actions, "snapshot", "take a JPEG of a recent frame (published retained on P/D/C/snapshot)")
    s.add_argument("camera", metavar="CAMERA")
    s.add_argument("--output", type=Path, default=None, metavar="FILE", help="also save the JPEG to FILE")
    s.set_defaults(task=None, max_seconds=None, wait=False)
    _common(s, suppress=True)
    w = _leaf(actions, "watch", "print every camera's status as it changes, until Ctrl-C")
    w.add_argument("--count", type=int, default=None, help="exit 0 after this many status messages")
    _common(w, suppress=True)
    from edge_agent import configctl

    configctl.add_parser(actions, _leaf, _common)
    return ctl
