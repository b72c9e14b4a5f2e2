"""A clustered MQTT broker for the integration tests: three NATS servers with JetStream and MQTT.

NATS (Debian ``nats-server`` 2.9) speaks MQTT 3.1.1 only (QoS 0/1, retained messages, persistent
sessions), and only with JetStream on. Each :class:`NatsNode` is a :class:`ManagedProcess` with its
own config file, JetStream store dir, client, cluster-route, monitoring and MQTT ports (all on
127.0.0.1), so it can be killed and restarted on the same ports with the same data.
:class:`NatsCluster` starts three routed nodes and waits until the cluster can carry MQTT.

"Can carry MQTT" is more than ``/healthz``: MQTT on NATS sits on JetStream streams (``$MQTT_sess``,
``$MQTT_msgs``, ``$MQTT_rmsgs``, three replicas each) and on a consumer per QoS 1 subscription,
each a Raft group that elects its own leader. Each node creates its share of them when its first
MQTT client connects. Until they have settled, JetStream API requests inside the server time out
(4 s) and NATS refuses a QoS 1 subscription (SUBACK 0x80) or drops a client with a persistent
session a few seconds after CONNACK ("Unspecified error" on the client). So
:meth:`NatsCluster.wait_ready` waits until ``/jsz`` shows every stream and consumer with a live
leader and current replicas, and a client with a persistent session (as the agent's) has done a
quick QoS 1 round trip on every node, and stayed connected through all of them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from parts import LOCALHOST, ManagedProcess, MqttProbe, PartError, free_port, tcp_accepts

MQTT_STREAMS = ("$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs")
# Inside NATS a JetStream API request times out after 4 s; a readiness step slower than this
# means the cluster is still electing or catching up (or a request inside it already timed out).
READY_STEP_S = 3.0


def nats_binary() -> str:
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).exists()), None
    )
    if found is None:
        raise PartError("nats-server not found (apt-get install nats-server)")
    return found


def nats_version() -> str:
    done = subprocess.run([nats_binary(), "--version"], capture_output=True, timeout=10, check=False)
    return done.stdout.decode(errors="replace").strip()


class NatsNode(ManagedProcess):
    """One NATS server of a cluster, with JetStream (``<workdir>/js``) and an MQTT listener."""

    start_timeout = 30.0
    stop_timeout = 10.0

    def __init__(
        self,
        workdir: Path,
        server_name: str,
        cluster_name: str,
        route_ports: Sequence[int],
        index: int,
    ) -> None:
        self.name = server_name  # log file <workdir>/<server_name>.log
        super().__init__(workdir)
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.host = LOCALHOST
        self.client_port = free_port()
        self.http_port = free_port()
        self.mqtt_port = free_port()
        self.route_ports = list(route_ports)
        self.cluster_port = self.route_ports[index]
        self.store_dir = self.workdir / "js"
        self.config_path = self.workdir / f"{server_name}.conf"

    @property
    def port(self) -> int:
        """The MQTT port (what an MQTT client, e.g. the agent, dials)."""
        return self.mqtt_port

    @property
    def address(self) -> str:
        """``host:port`` of the MQTT listener, as in the agent's ``mqtt.hosts``."""
        return f"{self.host}:{self.mqtt_port}"

    def prepare(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats://{LOCALHOST}:{p}" for p in self.route_ports)
        self.config_path.write_text(
            f"server_name: {self.server_name}\n"
            f"listen: {LOCALHOST}:{self.client_port}\n"
            f"http: {LOCALHOST}:{self.http_port}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.store_dir))} }}\n"
            f"cluster {{ name: {self.cluster_name}, listen: {LOCALHOST}:{self.cluster_port}, routes: [{routes}] }}\n"
            f"mqtt {{ listen: {LOCALHOST}:{self.mqtt_port} }}\n"
        )

    def command(self) -> list[str]:
        return [nats_binary(), "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        # Listening only: JetStream (and so MQTT) needs a quorum of the cluster, see NatsCluster.
        return tcp_accepts(self.host, self.mqtt_port) and tcp_accepts(self.host, self.client_port)

    def healthy(self) -> bool:
        """``/healthz`` says ok (the server and its JetStream are up and current)."""
        try:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{self.http_port}/healthz", timeout=2) as resp:
                return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def jsz(self) -> dict[str, Any] | None:
        """``/jsz`` with every account, stream and consumer (and its Raft group), or None."""
        url = f"http://{LOCALHOST}:{self.http_port}/jsz?accounts=true&streams=true&consumers=true"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def mqtt_clients(self) -> list[str]:
        """The MQTT client ids connected to this node now (``/connz``; empty if it does not answer)."""
        url = f"http://{LOCALHOST}:{self.http_port}/connz?limit=100000"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                doc = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return []
        return [c["mqtt_client"] for c in doc.get("connections") or [] if c.get("mqtt_client")]

    def start_nowait(self) -> Self:
        """Spawns the server without waiting for readiness (a cluster node alone has no quorum)."""
        ready, self.is_ready = self.is_ready, lambda: True  # type: ignore[method-assign]
        try:
            return self.start()
        finally:
            self.is_ready = ready  # type: ignore[method-assign]


class _Session:
    """A bare paho client with a persistent session (``clean_session=False``, MQTT 3.1.1), like the agent's.

    Every step waits at most the given time; ``close_and_forget`` ends the session again (a clean
    reconnect with the same client id), so readiness checks leave no sessions behind.
    """

    def __init__(self, node: NatsNode, client_id: str) -> None:
        self.node = node
        self.client_id = client_id
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._connected = False
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._topics: list[str] = []
        self._client = self._make(clean=False)

    def _make(self, *, clean: bool) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                             clean_session=clean)  # fmt: skip
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        with self._cond:
            self._connack, self._connected = rc, not rc.is_failure
            self._cond.notify_all()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _rc: ReasonCode, _p: Properties | None) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Properties | None) -> None:
        with self._cond:
            self._subacks[mid] = rcs
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._topics.append(msg.topic)
            self._cond.notify_all()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(condition, timeout):
                raise AssertionError(f"{self.node.name}: no {what} within {timeout} s")

    def connect(self, timeout: float) -> None:
        self._client.connect(self.node.host, self.node.port, keepalive=30)
        self._client.loop_start()
        self._wait(lambda: self._connack is not None, timeout, "CONNACK")
        if not self._connected:
            raise AssertionError(f"{self.node.name}: CONNACK {self._connack}")

    def subscribe(self, topic: str, timeout: float) -> None:
        result, mid = self._client.subscribe(topic, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise AssertionError(f"{self.node.name}: subscribe failed: {mqtt.error_string(result)}")
        self._wait(lambda: mid in self._subacks, timeout, "SUBACK")
        if any(rc.is_failure for rc in self._subacks[mid]):  # NATS: no JetStream consumer (yet)
            raise AssertionError(f"{self.node.name}: subscription refused {self._subacks[mid]}")

    def wait_message(self, topic: str, timeout: float) -> None:
        self._wait(lambda: topic in self._topics, timeout, f"message on {topic}")

    def close_and_forget(self) -> None:
        """Disconnects, then removes the session with a clean connect (best effort, bounded)."""
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
        with self._cond:
            self._connack = None
        self._client = self._make(clean=True)
        try:
            self.connect(READY_STEP_S)
        except (AssertionError, OSError):
            pass  # the round already failed or will be retried; the session expires with the cluster
        finally:
            with contextlib.suppress(Exception):
                self._client.disconnect()
            self._client.loop_stop()


class NatsProbe(MqttProbe):
    """An :class:`MqttProbe` whose ``subscribe`` checks the SUBACK and retries a refused one.

    NATS answers a QoS 1 subscription with 0x80 when it cannot create the JetStream consumer
    behind it in time (after a node loss, while leaders are elected); the plain probe would then
    wait for messages that can never come.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._granted: dict[int, list[ReasonCode]] = {}
        super().__init__(*args, **kwargs)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        with self._cond:
            self._granted[mid] = rcs
        super()._on_subscribe(client, userdata, mid, rcs, props)

    def _acked(self, mid: int) -> bool:
        return mid in self._granted

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 30.0) -> None:
        """Subscribes until the broker grants it (each refusal retried after 0.5 s) or ``timeout``."""
        deadline = time.monotonic() + timeout
        refusals: list[str] = []
        while True:
            with self._cond:
                self._subscriptions[topic_filter] = qos
            result, mid = self._client.subscribe(topic_filter, qos)
            if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
                raise AssertionError(f"subscribe {topic_filter!r} failed: {mqtt.error_string(result)}")
            with self._cond:
                if not self._cond.wait_for(functools.partial(self._acked, mid), max(0.1, deadline - time.monotonic())):
                    raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout} s; refused: {refusals}")
                rcs = self._granted[mid]
            if not any(rc.is_failure for rc in rcs):
                return
            refusals.append(str(rcs))
            if time.monotonic() + 0.5 >= deadline:
                raise AssertionError(f"subscription {topic_filter!r} refused {len(refusals)} time(s) in {timeout} s")
            time.sleep(0.5)


class NatsCluster:
    """Three routed NATS nodes on free ports, each with JetStream and MQTT; any node killable."""

    size = 3

    def __init__(self, workdir: Path, cluster_name: str = "c1") -> None:
        self.workdir = Path(workdir)
        route_ports = [free_port() for _ in range(self.size)]
        self.nodes = [
            NatsNode(self.workdir / f"n{i + 1}", f"n{i + 1}", cluster_name, route_ports, i) for i in range(self.size)
        ]

    def __iter__(self) -> Iterator[NatsNode]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> NatsNode:
        return self.nodes[index]

    @property
    def addresses(self) -> list[str]:
        """The MQTT listeners as ``host:port``, node 1 first (the agent's ``mqtt.hosts``)."""
        return [n.address for n in self.nodes]

    def node_by_mqtt_port(self, port: int) -> NatsNode:
        for node in self.nodes:
            if node.mqtt_port == port:
                return node
        raise KeyError(f"no node has MQTT port {port}")

    def alive(self) -> list[NatsNode]:
        return [n for n in self.nodes if n.is_alive()]

    def start(self, timeout: float = 60.0) -> Self:
        try:
            for node in self.nodes:
                node.start_nowait()
            for node in self.nodes:
                node.wait_until(node.is_ready, timeout, "listen")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Every live node is healthy and the cluster is ready for MQTT clients (:meth:`wait_ready`)."""
        deadline = time.monotonic() + timeout
        for node in self.alive():
            node.wait_until(node.healthy, max(1.0, deadline - time.monotonic()), "report healthy")
        self.wait_ready(max(5.0, deadline - time.monotonic()))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Retries until JetStream has settled and a persistent MQTT session works on every live node.

        One round: for each live node, a persistent-session client (``clean_session=False`` and a
        QoS 1 subscription, as the agent's) connects and subscribes, and a message published with
        QoS 1 on the next node reaches it; each step within :data:`READY_STEP_S`, and every client
        still connected at the end of the round. Before and after the round ``/jsz`` must show
        every MQTT stream and consumer with a live leader and current replicas (the round itself
        creates consumers: they must settle too).
        """
        deadline = time.monotonic() + timeout
        why = "not checked"
        rounds = 0
        while time.monotonic() < deadline:
            why = self.jetstream_unsettled(mqtt_streams=False) or ""  # a first MQTT client creates them
            if not why:
                rounds += 1
                try:
                    self._session_round()
                except (AssertionError, OSError) as exc:
                    why = f"MQTT round {rounds}: {exc}"
                else:
                    why = self.jetstream_unsettled() or ""
                    if not why:
                        return
            time.sleep(0.25)
        raise PartError(f"cluster not ready for MQTT within {timeout:.0f} s: {why}\n{self.log_excerpts()}")

    def jetstream_unsettled(self, *, mqtt_streams: bool = True) -> str | None:
        """Why JetStream is not settled (None when it is), from every live node's ``/jsz``.

        Settled: all live nodes agree on a live meta leader; the MQTT streams exist (unless not
        ``mqtt_streams``: no MQTT client has connected yet); every stream
        and consumer has a live leader, and in that leader's view each replica on a live node is
        current (a non-leader's view of its peers is not kept up to date).
        """
        live = {n.server_name: n for n in self.alive()}
        views: dict[str, dict[str, Any]] = {}
        for name, node in live.items():
            view = node.jsz()
            if view is None:
                return f"{name}: /jsz did not answer"
            views[name] = view
        meta = {name: (view.get("meta_cluster") or {}).get("leader") for name, view in views.items()}
        if len(set(meta.values())) != 1 or next(iter(meta.values())) not in live:
            return f"meta leader not agreed: {meta}"
        groups: dict[str, set[str]] = {}  # "stream S" / "consumer S > C" -> leaders named in any view
        in_leader_view: dict[str, dict[str, Any]] = {}  # the same, as its leader reports it
        for name, view in views.items():
            for account in view.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    items = [(f"stream {stream['name']}", stream)]
                    consumers = stream.get("consumer_detail") or []
                    items += [(f"consumer {stream['name']} > {c['name']}", c) for c in consumers]
                    for key, item in items:
                        leader = (item.get("cluster") or {}).get("leader") or ""
                        groups.setdefault(key, set()).add(leader)
                        if leader == name:
                            in_leader_view[key] = item
        missing = [s for s in MQTT_STREAMS if f"stream {s}" not in groups]
        if missing and mqtt_streams:
            return f"MQTT streams not created yet: {missing}"
        for key, leaders in sorted(groups.items()):
            if len(leaders) != 1 or next(iter(leaders)) not in live or key not in in_leader_view:
                return f"{key}: leader {sorted(leaders)} (live: {sorted(live)})"
            replicas = (in_leader_view[key].get("cluster") or {}).get("replicas") or []
            behind = [r.get("name") for r in replicas if r.get("name") in live and not r.get("current")]
            if behind:
                return f"{key}: replicas not current: {behind}"
        return None

    def _session_round(self) -> None:
        """One persistent-session QoS 1 round trip per live node (see :meth:`wait_ready`)."""
        live = self.alive()
        tag = uuid.uuid4().hex[:8]
        sessions: list[_Session] = []
        try:
            for i, node in enumerate(live):
                src = live[(i + 1) % len(live)]
                topic = f"ready/{tag}/{node.name}"
                session = _Session(node, f"ready-{tag}-{node.name}")
                sessions.append(session)
                session.connect(READY_STEP_S)
                session.subscribe(topic, READY_STEP_S)
                with MqttProbe(src.host, src.port, protocol=4, connect_timeout=READY_STEP_S) as pub:
                    pub.publish(topic, b"ok", qos=1, timeout=READY_STEP_S)
                session.wait_message(topic, READY_STEP_S)
            dropped = [s.node.name for s in sessions if not s.connected]
            if dropped:
                raise AssertionError(f"persistent session dropped by {dropped}")
        finally:
            for session in sessions:
                session.close_and_forget()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def log_excerpts(self, lines: int = 30) -> str:
        return "\n".join(n.log_excerpt(lines) for n in self.nodes)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


__all__ = ["NatsCluster", "NatsNode", "NatsProbe", "nats_binary", "nats_version"]
