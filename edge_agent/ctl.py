"""`edge-agent ctl`: send one command to an agent over MQTT and print its reply (and progress).

    edge-agent ctl --config agent.yaml [--device D] start|stop|status|query CAMERA [TASK]
                   [--wait] [--timeout S] [--json]
    edge-agent ctl --config agent.yaml watch [--count N]

The broker, credentials, TLS, topic prefix and device id come from agent.yaml's `mqtt` section
(environment overrides apply). The tool is its own MQTT client (`edge-ctl-<random>`, clean
session), so it never disturbs the agent's persistent session.

Exit codes (scripts rely on them):
  0  the command was answered ok (with --wait: the task ended uploaded or completed)
  1  the command was answered ok:false (with --wait: the task ended failed)
  2  usage or configuration error
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

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import AgentConfig
from edge_agent.configload import load_config
from edge_agent.errors import ConfigError
from edge_agent.mqttclient import describe_connect_error, new_client
from edge_agent.tasks import TERMINAL_OK_STATUSES, TERMINAL_STATUSES
from edge_agent.topics import Topics

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

TERMINAL_OK = TERMINAL_OK_STATUSES
TERMINAL = TERMINAL_STATUSES
ACTIONS = ("start", "stop", "status", "query")

EPILOG = """exit codes:
  0  answered ok (with --wait: the task ended uploaded or completed)
  1  answered ok:false (with --wait: the task ended failed)
  2  usage or configuration error
  3  timeout: no reply in time, broker unreachable, or --wait-timeout passed"""


class CtlError(Exception):
    """Ends the command with `code` after printing `message` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    correlation: bytes | None


class _Conn:
    """A clean-session paho client whose callbacks only enqueue; the main thread reads `inbox`."""

    def __init__(self, cfg: AgentConfig, connect_timeout: float) -> None:
        self.cfg = cfg.mqtt
        self.v5 = self.cfg.protocol == "5"
        self.client_id = f"edge-ctl-{secrets.token_hex(4)}"
        self.inbox: queue.Queue[Msg] = queue.Queue()
        self._acks: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._subs: list[str] = []
        try:  # the agent's own login and TLS set-up
            self.client = new_client(self.cfg, self.client_id, persistent=False, cls=paho.Client)
        except ConfigError as exc:
            raise CtlError(EXIT_USAGE, str(exc)) from None
        self.client.connect_timeout = max(0.5, connect_timeout)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:  # fmt: skip
        if reason_code.is_failure:
            self._acks.put(("refused", str(reason_code)))
            return
        for topic in self._subs:  # a clean session forgets subscriptions on reconnect
            client.subscribe(topic, qos=1)
        self._acks.put(("connected", None))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._acks.put(("suback", mid))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        self.inbox.put(Msg(msg.topic, bytes(msg.payload), corr))

    def _wait_ack(self, kind: str, value: Any, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CtlError(EXIT_TIMEOUT, f"timed out waiting for the broker ({kind})")
            try:
                got, detail = self._acks.get(timeout=left)
            except queue.Empty:
                continue
            if got == "refused":
                raise CtlError(EXIT_TIMEOUT, f"broker refused the connection: {detail}")
            if got == kind and (value is None or detail == value):
                return

    def connect(self, deadline: float) -> None:
        errors = []
        for host, port in self.cfg.endpoints():  # the first node of a cluster that answers
            try:
                self.client.connect(
                    host, port, keepalive=self.cfg.keepalive,
                    clean_start=True if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                )  # fmt: skip
                break
            except OSError as exc:  # incl. ssl errors: the same one-line causes as the agent logs
                errors.append(describe_connect_error(exc, host, port))
            except ValueError as exc:
                errors.append(f"{host}:{port}: {exc}")
        else:
            raise CtlError(EXIT_TIMEOUT, "cannot reach the broker: " + "; ".join(errors))
        self.client.loop_start()
        self._wait_ack("connected", None, deadline)

    def subscribe(self, topic: str, deadline: float) -> None:
        self._subs.append(topic)
        _, mid = self.client.subscribe(topic, qos=1)
        self._wait_ack("suback", mid, deadline)

    def publish(self, topic: str, payload: bytes, props: Properties | None) -> None:
        self.client.publish(topic, payload, qos=1, properties=props)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


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
                "last_upload_error", "next_retry_at"):  # fmt: skip
        if doc.get(key) not in (None, ""):
            extras.append(f"{key}: {doc[key]}")
    return f"{line} ({', '.join(extras)})" if extras else line


def emit(doc: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(doc, ensure_ascii=False) if as_json else human_line(doc), flush=True)


def _decode(payload: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# ---------------------------------------------------------------------------------- commands


def generate_task_name() -> str:
    return f"ctl-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def _command(args: argparse.Namespace, cfg: AgentConfig, topics: Topics) -> int:
    camera: str = args.camera
    task: str | None = args.task
    if args.action in ("stop", "query") and not task:
        raise CtlError(EXIT_USAGE, f"{args.action} needs a TASK name")
    if args.action == "start" and not task:
        task = generate_task_name()
    cmd: dict[str, Any] = {"action": args.action, "request_id": f"ctl-{uuid.uuid4().hex}"}
    if task and args.action != "status":
        cmd["task_name"] = task
    if args.action == "start" and args.max_seconds is not None:
        cmd["max_seconds"] = args.max_seconds
    deadline = time.monotonic() + args.timeout
    conn = _Conn(cfg, args.timeout)
    try:
        conn.connect(deadline)
        conn.subscribe(topics.reply(camera), deadline)
        props = None
        inbox = None
        corr = cmd["request_id"].encode()
        if conn.v5:
            inbox = topics.ctl_inbox(conn.client_id)
            conn.subscribe(inbox, deadline)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = inbox
            props.CorrelationData = corr
        task_topic = None
        if args.wait and task:  # subscribe first, so no status change between reply and subscribe is lost
            task_topic = topics.task(camera, task)
            conn.subscribe(task_topic, deadline)
        conn.publish(topics.command(camera), json.dumps(cmd).encode(), props)

        reply = None
        pending: list[dict[str, Any]] = []
        while reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CtlError(EXIT_TIMEOUT, f"no reply from {topics.base}/{camera} within {args.timeout:g} s")
            try:
                msg = conn.inbox.get(timeout=left)
            except queue.Empty:
                continue
            doc = _decode(msg.payload)
            if doc is None:
                continue
            if msg.topic == task_topic:
                pending.append(doc)
            elif (msg.topic == inbox and msg.correlation == corr) or (
                msg.topic == topics.reply(camera) and doc.get("request_id") == cmd["request_id"]
            ):
                reply = doc
        emit(reply, args.json)
        if reply.get("ok") is not True:
            return EXIT_FAILED
        if not args.wait or not reply.get("task_name"):
            return EXIT_OK
        return _follow(conn, args, topics, camera, reply, pending, task_topic)
    finally:
        conn.close()


def _follow(
    conn: _Conn, args: argparse.Namespace, topics: Topics, camera: str, reply: dict[str, Any],
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
            new = _decode(msg.payload)
            if new is not None:
                pending.append(new)


def _watch(args: argparse.Namespace, cfg: AgentConfig, topics: Topics) -> int:
    deadline = time.monotonic() + args.timeout
    conn = _Conn(cfg, args.timeout)
    try:
        conn.connect(deadline)
        conn.subscribe(f"{topics.base}/+/status", deadline)
        seen = 0
        while args.count is None or seen < args.count:
            try:
                msg = conn.inbox.get(timeout=1.0)
            except queue.Empty:
                continue
            doc = _decode(msg.payload)
            if doc is None:
                continue
            doc.setdefault("camera_id", msg.topic.split("/")[-2])
            emit(doc, args.json)
            seen += 1
        return EXIT_OK
    finally:
        conn.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of `edge-agent ctl` (parsed by `add_parser`)."""
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    device = args.device or cfg.device_id
    topics = Topics.of(cfg, device)
    try:
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


def _common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the action (`ctl --json status cam1` = `ctl status cam1 --json`)."""

    def d(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--config", type=Path, default=d(Path("agent.yaml")), help="agent.yaml (default: agent.yaml)")
    p.add_argument("--device", default=d(None), help="device id (default: agent.yaml's device_id)")
    p.add_argument("--timeout", type=_positive, default=d(10.0),
                   help="seconds to wait for the broker and the reply (default: 10)")  # fmt: skip
    p.add_argument("--json", action="store_true", default=d(False), help="print JSON lines instead of text")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `ctl` to the `edge-agent` subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    ctl: argparse.ArgumentParser = sub.add_parser(
        "ctl", help="send a command to an agent over MQTT", description="\n\n".join(__doc__.split("\n\n")[:2]),
        epilog=EPILOG, formatter_class=fmt,
    )  # fmt: skip
    _common(ctl, suppress=False)
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action in ACTIONS:
        p = actions.add_parser(action, help=f"send a {action} command", epilog=EPILOG, formatter_class=fmt)
        p.add_argument("camera", metavar="CAMERA")
        if action == "status":
            p.set_defaults(task=None)
        else:
            p.add_argument("task", metavar="TASK", nargs="?" if action == "start" else None,
                           help="task name" + (" (generated when left out)" if action == "start" else ""))  # fmt: skip
        if action == "start":
            p.add_argument("--max-seconds", type=int, default=None, help="lower this task's length limit")
        else:
            p.set_defaults(max_seconds=None)
        p.add_argument("--wait", action="store_true",
                       help="follow the task's status until uploaded, completed or failed")  # fmt: skip
        p.add_argument("--wait-timeout", type=_positive, default=None,
                       help="with --wait: give up (exit 3) after this many seconds (default: no limit)")  # fmt: skip
        _common(p, suppress=True)
    w = actions.add_parser("watch", help="print every camera's status as it changes, until Ctrl-C",
                           epilog=EPILOG, formatter_class=fmt)  # fmt: skip
    w.add_argument("--count", type=int, default=None, help="exit 0 after this many status messages")
    _common(w, suppress=True)
    return ctl
