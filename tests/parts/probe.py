"""An independent MQTT client for end-to-end checks: subscribes, records every message, waits with timeouts."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Properties | None
    received_at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.payload)

    def __str__(self) -> str:
        text = self.payload[:300].decode("utf-8", errors="replace")
        return f"{self.topic} retain={self.retain} qos={self.qos} {text}"


PayloadPredicate = Callable[[dict[str, Any]], bool]
BytesPredicate = Callable[[bytes], bool]


def _matches(predicate: PayloadPredicate, payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    try:
        return bool(predicate(payload))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return False


class MqttProbe:
    """The tests' MQTT client: records every message it receives and waits on them without polling.

    Subscriptions are remembered and renewed after a reconnect (e.g. across a broker restart).
    """

    def __init__(
        self,
        host: str,
        port: int,
        protocol: int = 5,
        client_id: str | None = None,
        connect_timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:10]}"
        proto = {5: mqtt.MQTTv5, 4: mqtt.MQTTv311, 311: mqtt.MQTTv311}[protocol]
        self._v5 = proto == mqtt.MQTTv5
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._subscriptions: dict[str, int] = {}
        self._acked_mids: set[int] = set()
        self._connected = False
        self._connects = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        self.wait_connected(connect_timeout)

    # -- paho callbacks (network thread: never raise)
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        if rc.is_failure:
            return
        with self._cond:
            self._connected = True
            self._connects += 1
            subs = list(self._subscriptions.items())
            self._cond.notify_all()
        for topic, qos in subs:
            client.subscribe(topic, qos)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        with self._cond:
            self._acked_mids.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            qos=int(msg.qos),
            properties=getattr(msg, "properties", None),
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # -- connection
    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def wait_connected(self, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._connected, timeout):
                raise AssertionError(f"probe {self.client_id} not connected to {self.host}:{self.port}")

    # -- subscribe / publish
    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribes (and waits for the SUBACK so a following publish cannot race it)."""
        with self._cond:
            self._subscriptions[topic_filter] = qos
        result, mid = self._client.subscribe(topic_filter, qos)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"subscribe {topic_filter!r} failed: {mqtt.error_string(result)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acked_mids, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout} s")

    def publish(
        self,
        topic: str,
        payload: Mapping[str, Any] | str | bytes | None,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float = 10.0,
    ) -> mqtt.MQTTMessageInfo:
        """Publishes a dict (as JSON), str or bytes; with qos > 0 waits for the broker's ack."""
        if payload is None:
            data = b""
        elif isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = json.dumps(payload).encode()
        info = self._client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise AssertionError(f"publish to {topic!r} not acknowledged within {timeout} s")
        return info

    def request(
        self,
        cmd_topic: str,
        payload: Mapping[str, Any],
        reply_topic: str,
        timeout: float = 30.0,
        qos: int = 1,
    ) -> dict[str, Any]:
        """Publishes ``payload`` plus a unique ``request_id`` and waits for the reply carrying it."""
        request_id = uuid.uuid4().hex
        with self._cond:
            subscribed = reply_topic in self._subscriptions
        if not subscribed:
            self.subscribe(reply_topic)
        self.publish(cmd_topic, {**payload, "request_id": request_id}, qos=qos)
        return self.wait_for(reply_topic, lambda p: p.get("request_id") == request_id, timeout)

    # -- received messages
    def raw(self, topic: str | None = None) -> list[Message]:
        """Every message received (on ``topic`` exactly, if given), oldest first."""
        with self._cond:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def messages(self, topic: str) -> list[dict[str, Any]]:
        """JSON payloads received on ``topic``, oldest first, skipping empty (retain-clearing) ones."""
        out: list[dict[str, Any]] = []
        for m in self.raw(topic):
            if not m.payload:
                continue
            try:
                out.append(m.json())
            except ValueError as exc:
                raise AssertionError(f"non-JSON payload on {topic}: {m.payload[:200]!r}") from exc
        return out

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for_raw(
        self, topic: str, predicate: BytesPredicate | None = None, timeout: float = 30.0
    ) -> Message:
        """The first message (already received or arriving within ``timeout``) on ``topic`` matching."""

        def test(m: Message) -> bool:
            return predicate is None or bool(predicate(m.payload))

        return self._wait(topic, test, timeout)

    def wait_for_message(
        self, topic: str, predicate: PayloadPredicate | None = None, timeout: float = 30.0
    ) -> Message:
        """Like :meth:`wait_for` but returns the :class:`Message` (retain flag, properties...)."""

        def test(m: Message) -> bool:
            if not m.payload:
                return False
            try:
                payload = m.json()
            except ValueError:
                return False
            return _matches(predicate or (lambda _p: True), payload)

        return self._wait(topic, test, timeout)

    def wait_for(
        self, topic: str, predicate: PayloadPredicate | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first JSON object on exactly ``topic`` for which ``predicate`` holds.

        Messages received before the call count. A predicate raising KeyError/TypeError/... is a
        non-match. On timeout raises AssertionError listing the last messages seen on the topic.
        """
        payload: dict[str, Any] = self.wait_for_message(topic, predicate, timeout).json()
        return payload

    def _wait(self, topic: str, test: Callable[[Message], bool], timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        index = 0
        with self._cond:
            while True:
                for i in range(index, len(self._messages)):
                    m = self._messages[i]
                    if m.topic == topic and test(m):
                        return m
                index = len(self._messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            seen = [m for m in self._messages if m.topic == topic][-10:]
            others = sorted({m.topic for m in self._messages if m.topic != topic})[:20]
        lines = "\n".join(f"  {m}" for m in seen) or "  (none)"
        raise AssertionError(
            f"no matching message on {topic!r} within {timeout} s; last messages on it:\n{lines}\n"
            f"other topics seen: {others}"
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
