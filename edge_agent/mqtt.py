"""The MQTT link: paho-mqtt 2.x wrapped so the rest of the agent never sees paho.

paho's network thread only decodes and enqueues (`Connected`, `Disconnected`, `CommandReceived`);
any exception in a callback is logged and swallowed so it cannot kill that thread. The session is
persistent (v5 clean_start=False + session expiry, or v3.1.1 clean_session=False) and commands are
QoS 1, so commands sent while the agent was offline are delivered when it comes back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent import names
from edge_agent.config import MqttConfig
from edge_agent.events import (  # re-exported: the link's events
    CommandReceived,
    Connected,
    Disconnected,
    MessageReceived,
    MqttEvent,
    OutboxReady,
)
from edge_agent.limits import InboundGate
from edge_agent.mqttclient import DiagnosingClient, FailureLog, new_client
from edge_agent.outbox import INPUT_REASONS, PACKET_OVERHEAD, Outbox, PoisonGuard
from edge_agent.topics import Topics

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def catch_log_exception(func: Callable[P, None]) -> Callable[P, None]:
    """A paho callback that raises would kill the network loop; log instead."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            func(*args, **kwargs)
        except Exception:
            log.exception("error in MQTT callback %s", func.__name__)

    return wrapper


class MqttLink:
    """Dials out to the broker, keeps the session, and publishes for the agent."""

    def __init__(
        self, cfg: MqttConfig, topics: Topics, client_id: str, post: Callable[[MqttEvent], None],
        gate: InboundGate | None = None,
    ) -> None:  # fmt: skip
        self._cfg = cfg
        self._topics = topics
        self._post = post
        self._v5 = cfg.protocol == "5"
        self._connected = threading.Event()
        self._closing = False
        self._extra: frozenset[str] = frozenset()  # exact topics, subscribed on every connect
        self._client = new_client(cfg, client_id, persistent=True, cls=DiagnosingClient)  # ConfigError: bad TLS
        self._gate = gate
        self._outbox = Outbox(cfg.outbound_queue)
        self._broker_max_packet: int | None = None
        self._connected_at = time.monotonic()
        self._poison = PoisonGuard()  # strikes per message in flight, the packet size a 3.1.1 broker refused
        self._got_connack = False  # this connection was accepted (CONNACK), whatever happened after
        # bounded: paho's default is unlimited; Outbox keeps the newest retained status of a topic
        # that did not fit and publishes it when there is room again.
        self._client.max_queued_messages_set(cfg.outbound_queue)
        self._client.max_inflight_messages_set(100)
        # The last cause logged per broker address: a failure is logged once, again only when its cause
        # changes (DEBUG otherwise), and afresh after a successful connection.
        self._failures = FailureLog(cfg.tls.enabled)
        self._client.will_set(topics.availability, b"offline", qos=1, retain=True)
        self._failed_attempts = 0
        self._jitter_reconnect()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._endpoints = cfg.endpoints()
        self._endpoint = 0

    def _jitter_reconnect(self) -> None:
        """Full-jitter exponential backoff: the next delay is uniform in [min, min(max, 3 * min * 2^n)].

        paho doubles its delay without jitter, so a fleet would reconnect in lockstep after a broker
        restart; this is called after every failed attempt (on_disconnect / on_connect_fail) and
        sets paho's next delay directly (paho types it int; any number of seconds works).
        """
        lo, hi = self._cfg.reconnect_min_seconds, self._cfg.reconnect_max_seconds
        cap = min(hi, 3 * lo * 2 ** min(self._failed_attempts, 30))
        delay: Any = random.uniform(lo, max(lo, cap))
        self._failed_attempts += 1
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)

    def add_subscription(self, topic: str) -> None:
        """Also subscribe to `topic` (exact, QoS 1) on every connect; its messages are posted as
        `MessageReceived`. Call before `start()` (or it takes effect at the next connect)."""
        self._extra = self._extra | {topic}
        if self._connected.is_set():
            self._client.subscribe(topic, qos=1)

    def remove_subscription(self, topic: str) -> None:
        """Stop receiving `topic` (added by `add_subscription`): at once, and at every later connect."""
        self._extra = self._extra - {topic}
        if self._connected.is_set():
            self._client.unsubscribe(topic)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._cfg.session_expiry_seconds
            # The broker must not send us anything absurdly big: it drops such a message for us
            # instead of making us read it. Up to 4x the command limit still arrives, so a sender
            # of a moderately oversized command gets a reply saying so.
            props.MaximumPacketSize = max(4 * self._cfg.max_payload_bytes, 262144) + PACKET_OVERHEAD
        host, port = self._endpoints[0]
        self._client.connect_async(
            host, port, keepalive=self._cfg.keepalive,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY, properties=props,
        )  # fmt: skip
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `offline`, flush, disconnect, and stop the network thread (bounded)."""
        self._closing = True
        if self._connected.is_set():
            info = self._client.publish(self._topics.availability, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- Publisher ---------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._send(topic, payload, retain, None)

    def reply(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        self._send(topic, payload, False, None)
        if response_topic and self._v5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation is not None:
                props.CorrelationData = correlation
            self._send(response_topic, payload, False, props)

    def publish_stats(self) -> dict[str, int]:
        return self._outbox.stats()

    def _send(self, topic: str, payload: bytes, retain: bool, props: Properties | None) -> None:
        """Every publish goes through here: checked, counted, and never silently lost if retained.

        A topic that is not valid MQTT UTF-8 or a packet over the broker's Maximum Packet Size would
        make the broker drop the connection, and paho would re-send it after every reconnect: such a
        publish is refused here and counted. A publish paho cannot queue (queue full, or QoS 0 while
        offline) is counted if it is a reply or event, and kept as the topic's newest value if retained.
        """
        problem = names.topic_problem(topic)
        size = len(topic.encode("utf-8", "surrogatepass")) + len(payload) + 16
        limit, learned = self._broker_max_packet, self._poison.learned_max_packet
        if problem is None and limit is not None and size > limit:
            problem = f"{size} bytes exceed the broker's maximum packet size of {limit}"
        elif problem is None and learned is not None and size >= learned:
            problem = f"{size} bytes: the broker dropped us for a {learned}-byte packet before"
        if problem is not None:
            self._outbox.count("publishes_refused")
            log.error("not publishing on %r: %s", topic[:200], problem)
            return
        with self._outbox.lock:
            if retain and self._outbox.holds(topic):
                self._outbox.hold(topic, payload)  # keep order: the held value must not overtake this
                return
            info = self._client.publish(topic, payload, qos=self._cfg.qos, retain=retain, properties=props)
            rc = info.rc
            if rc == paho.MQTT_ERR_SUCCESS or (rc == paho.MQTT_ERR_NO_CONN and self._cfg.qos > 0):
                self._outbox.sent(info.mid, topic, size)  # QoS 1 while offline: paho sends it on reconnect
            elif retain:
                self._outbox.hold(topic, payload)
            else:
                self._outbox.count("publishes_dropped")
                if rc != paho.MQTT_ERR_NO_CONN:
                    log.warning("dropped a publish on %r: %s", topic[:200], paho.error_string(rc))

    def flush_held(self) -> int:
        """Publish retained values that did not fit earlier, while paho's queue has room."""
        self._outbox.ready_posted = False
        sent = 0
        for topic, payload in self._outbox.take_held(self._outbox.room()):
            self._send(topic, payload, True, None)
            sent += 1
        return sent

    # -- paho callbacks (network thread: translate and enqueue only) ---------------------------

    @catch_log_exception
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Small publishes (replies, statuses) must not wait for Nagle + the broker's delayed ACK:
        # measured 44 ms -> 1.7 ms per command round trip (with set_tcp_nodelay on the broker too).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @catch_log_exception
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:  # fmt: skip
        if reason_code.is_failure:
            host, port = self._client.attempt_address
            hint = ""
            if reason_code.value in (4, 5, 134, 135):  # bad user name or password / not authorized (3.1.1, 5)
                hint = " (check mqtt.username and mqtt.password, or the broker's ACL)"
            self._connect_failed(logging.ERROR, f"broker {host}:{port} refused the connection: {reason_code}{hint}")
            return  # paho disconnects; _on_disconnect moves on to the next cluster node
        # Set first: the broker may drop us again while this callback is still subscribing and
        # publishing (paho then calls on_disconnect from inside it, before `_connected` is set), and
        # that disconnect must still count against a poison message re-sent right after CONNACK.
        self._got_connack = True
        self._connected_at = time.monotonic()
        log.info("connected to %s:%s (session present: %s)", client.host, client.port, flags.session_present)
        client.subscribe(self._topics.command_filter, qos=1)
        for topic in sorted(self._extra):
            client.subscribe(topic, qos=1)
        client.publish(self._topics.availability, b"online", qos=1, retain=True)
        # The broker's own limit (v5 CONNACK): a bigger packet would make it drop us.
        self._broker_max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        self._connected_at = time.monotonic()
        self._connected.set()
        self._post(Connected(bool(flags.session_present)))

    @catch_log_exception
    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:  # fmt: skip
        was = self._connected.is_set()
        self._connected.clear()
        if self._closing:
            if was:
                log.info("disconnected from the broker (shutdown)")
            return
        if not was and not self._client.attempt_reported:
            # Closed before CONNACK: a TLS alert after the handshake (TLS 1.3: the broker rejected
            # our client certificate), or a node that accepts TCP but cannot serve MQTT.
            self._connect_failed_with(self._client.attempt_error)
        # Lost an established connection, or closed before CONNACK: either way the next attempt
        # goes to the next cluster node.
        self._next_endpoint()
        got_connack, self._got_connack = self._got_connack, False
        if was:
            self._failed_attempts = 0
            self._failures.clear()
        if got_connack:
            self._check_poison(reason_code)
        self._jitter_reconnect()
        if was:
            log.warning("disconnected from the broker: %s", reason_code)
            self._post(Disconnected(str(reason_code)))

    @catch_log_exception
    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:  # fmt: skip
        if any(rc.is_failure for rc in reason_codes):
            # Without its command subscription the agent would be deaf; retry later (a cluster
            # broker may refuse subscriptions while it elects a leader), never from this thread.
            log.error("broker refused a subscription (%s); retrying in 5 s", [str(rc) for rc in reason_codes])
            timer = threading.Timer(5.0, self._resubscribe)
            timer.daemon = True
            timer.start()

    def _resubscribe(self) -> None:
        if self._connected.is_set() and not self._closing:
            self._client.subscribe(self._topics.command_filter, qos=1)
            for topic in sorted(self._extra):
                self._client.subscribe(topic, qos=1)

    @catch_log_exception
    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # TCP connect, name resolution or the TLS handshake failed (reconnect() raised).
        self._connect_failed_with(self._client.attempt_error)
        self._next_endpoint()
        self._jitter_reconnect()

    def _connect_failed_with(self, exc: OSError | None) -> None:
        self._failures.failed_with(self._client, exc)

    def _connect_failed(self, level: int, cause: str) -> None:
        self._failures.failed(self._client, level, cause)

    def _next_endpoint(self) -> None:
        """With a broker cluster (`mqtt.hosts`), try the next node at the next reconnect."""
        if len(self._endpoints) < 2 or self._closing:
            return
        index = (self._endpoint + 1) % len(self._endpoints)
        host, port = self._endpoints[index]
        try:
            self._client.host, self._client.port = host, port
        except RuntimeError:
            # paho 2.x refuses the public setters from its own callbacks (its state is still
            # CONNECTED/CONNECTING though the socket is gone); its reconnect() dials _host/_port.
            self._client._host, self._client._port = host, port
        self._endpoint = index
        log.info("next broker node: %s:%s", host, port)

    def _check_poison(self, reason_code: ReasonCode) -> None:
        """Drop a publish the broker keeps refusing, so one message can never keep us off the air.

        paho re-sends every unacknowledged QoS 1 message after a reconnect, so a message that makes
        the broker close the connection (a publish its ACL forbids on AWS IoT Core, a packet over a
        3.1.1 broker's size limit) would do so forever. The oldest message in flight is blamed when
        the broker's v5 DISCONNECT says we sent something wrong, or when it was in flight at
        `POISON_STRIKES` disconnects in a row that each came within `QUICK_SECONDS` of connecting.
        """
        # paho's own queue is the truth: the agent thread records a mid only after paho's publish()
        # returned, and the broker can drop us before that (then the message would miss a strike).
        outstanding = self._outbox.outstanding()
        client = self._client
        with client._out_message_mutex:
            for mid, msg in client._out_messages.items():
                if mid not in outstanding:
                    size = len(msg._topic) + len(msg.payload) + 16
                    outstanding[mid] = (msg._topic.decode("utf-8", "replace"), msg.timestamp, size)
        lived = time.monotonic() - self._connected_at
        blamed = reason_code.value in INPUT_REASONS and reason_code.packetType == PacketTypes.DISCONNECT
        verdict = self._poison.judge(outstanding, lived, blamed)
        if verdict is None:
            return
        mid, strikes = verdict
        topic, _, size = outstanding[mid]
        client.drop_before_reconnect = (client.drop_before_reconnect or set()) | {mid}
        self._outbox.forget(mid)
        self._poison.dropped(size, self._outbox.max_acked)
        self._outbox.count("publishes_poisoned")
        log.error("dropped the message on %r (%d bytes): the broker closed the connection while it was in flight "
                  "(%s, %d time(s))", topic[:200], size, reason_code, strikes)  # fmt: skip

    @catch_log_exception
    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties | None,
    ) -> None:  # fmt: skip
        self._outbox.done(mid)
        if self._outbox.has_held() and self._outbox.room() > 0 and not self._outbox.ready_posted:
            self._outbox.ready_posted = True
            self._post(OutboxReady())

    @catch_log_exception
    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        camera_id = self._topics.camera_of_command(msg.topic)
        if camera_id is None:
            # Extra topics (HA's birth, the desired configuration, group commands) count against the
            # same bound as commands, at most half of it: a flood on a group topic must neither grow
            # the agent's queue nor crowd out the camera commands.
            if msg.topic in self._extra and (self._gate is None or self._gate.admit(extra=True)):
                self._post(MessageReceived(msg.topic, bytes(msg.payload)))
            return
        if self._gate is not None and not self._gate.admit():
            return  # shed: the agent has `mqtt.inbound_queue` commands waiting already (counted)
        response_topic = correlation = None
        props = getattr(msg, "properties", None)
        if props is not None:
            response_topic = getattr(props, "ResponseTopic", None)
            correlation = getattr(props, "CorrelationData", None)
        self._post(CommandReceived(camera_id, bytes(msg.payload), response_topic, correlation))
