"""The MQTT connection of `edge-agent ctl` and what every ctl command shares: exit codes, errors,
decoding, and collecting retained messages.

Callbacks only enqueue (`Conn.inbox`, acknowledgements); the main thread reads them with timeouts.
"""

from __future__ import annotations

import json
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError
from edge_agent.mqttclient import describe_connect_error, new_client

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


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
    retain: bool = False


class Conn:
    """A clean-session paho client whose callbacks only enqueue; the main thread reads `inbox`."""

    def __init__(self, cfg: AgentConfig, connect_timeout: float) -> None:
        self.cfg = cfg.mqtt
        self.v5 = self.cfg.protocol == "5"
        self.client_id = f"edge-ctl-{secrets.token_hex(4)}"
        self.inbox: queue.Queue[Msg] = queue.Queue()
        self._acks: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._subs: list[str] = []
        self._puback: dict[int, ReasonCode] = {}
        try:  # the agent's own login and TLS set-up
            self.client = new_client(self.cfg, self.client_id, persistent=False, cls=paho.Client)
        except ConfigError as exc:
            raise CtlError(EXIT_USAGE, str(exc)) from None
        self.client.connect_timeout = max(0.5, connect_timeout)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:  # fmt: skip
        if reason_code.is_failure:
            self._acks.put(("refused", str(reason_code)))
            return
        if self._subs:  # a clean session forgets subscriptions on reconnect
            client.subscribe([(topic, 1) for topic in self._subs])
        self._acks.put(("connected", None))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._acks.put(("suback", mid))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:  # fmt: skip
        self._puback[mid] = reason_code
        self._acks.put(("puback", mid))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        self.inbox.put(Msg(msg.topic, bytes(msg.payload), corr, bool(msg.retain)))

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
        self.subscribe_many([topic], deadline)

    def subscribe_many(self, topics: list[str], deadline: float) -> None:
        """One SUBSCRIBE for all of `topics` (QoS 1), returning once the broker has acknowledged it."""
        topics = [t for t in dict.fromkeys(topics) if t not in self._subs]
        if not topics:
            return
        self._subs.extend(topics)
        _, mid = self.client.subscribe([(topic, 1) for topic in topics])
        self._wait_ack("suback", mid, deadline)

    def publish(self, topic: str, payload: bytes, props: Properties | None = None, retain: bool = False) -> int:
        """QoS 1, not waiting for the broker; returns the message id."""
        return self.client.publish(topic, payload, qos=1, retain=retain, properties=props).mid

    def publish_acked(self, topic: str, payload: bytes, deadline: float, retain: bool = False) -> None:
        """QoS 1 and wait for the PUBACK; an MQTT 5 refusal (e.g. not authorized by the ACL) is an error."""
        mid = self.publish(topic, payload, retain=retain)
        if mid not in self._puback:
            self._wait_ack("puback", mid, deadline)
        code = self._puback.pop(mid)
        if code.is_failure:
            raise CtlError(EXIT_FAILED, f"the broker refused the publish on {topic}: {code}")

    def next_message(self, deadline: float) -> Msg | None:
        """The next message in the inbox, or None once `deadline` (monotonic) has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return self.inbox.get(timeout=left)
        except queue.Empty:
            return None

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def decode(payload: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# After the SUBACK of a wildcard subscription the broker sends the retained messages at once; they are
# all in when none has come for this long (capped by RETAINED_MAX_SECONDS and the command's deadline).
RETAINED_QUIET_SECONDS = 0.3
RETAINED_MAX_SECONDS = 3.0


def collect_retained(conn: Conn, filters: list[str], deadline: float,
                     enough: Callable[[list[Msg]], bool] | None = None) -> list[Msg]:  # fmt: skip
    """Subscribe to `filters` and return the messages the broker hands over at once (the retained
    ones): wait for the SUBACK, then until RETAINED_QUIET_SECONDS pass without one (or `enough`)."""
    conn.subscribe_many(filters, deadline)
    got: list[Msg] = []
    hard = min(deadline, time.monotonic() + RETAINED_MAX_SECONDS)
    quiet_until = time.monotonic() + RETAINED_QUIET_SECONDS
    while not (enough is not None and enough(got)):
        left = min(quiet_until, hard) - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(conn.inbox.get(timeout=left))
        except queue.Empty:
            break
        quiet_until = time.monotonic() + RETAINED_QUIET_SECONDS
    return got
