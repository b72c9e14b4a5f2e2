"""A clustered MQTT broker for the integration tests: three NATS servers with JetStream and MQTT.

NATS (Debian ``nats-server`` 2.9) speaks MQTT 3.1.1 only (QoS 0/1, retained messages, persistent
sessions), and only with JetStream on. Each :class:`NatsNode` is a :class:`ManagedProcess` with its
own config file, JetStream store dir, client, cluster-route, monitoring and MQTT ports (all on
127.0.0.1), so it can be killed and restarted on the same ports with the same data.
:class:`NatsCluster` starts three routed nodes and waits until the cluster can carry MQTT.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from parts import LOCALHOST, ManagedProcess, MqttProbe, PartError, free_port, tcp_accepts


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

    def start_nowait(self) -> Self:
        """Spawns the server without waiting for readiness (a cluster node alone has no quorum)."""
        ready, self.is_ready = self.is_ready, lambda: True  # type: ignore[method-assign]
        try:
            return self.start()
        finally:
            self.is_ready = ready  # type: ignore[method-assign]


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
        """Every live node is healthy and a retained MQTT message goes from one node to another."""
        deadline = time.monotonic() + timeout
        for node in self.alive():
            node.wait_until(node.healthy, max(1.0, deadline - time.monotonic()), "report healthy")
        live = self.alive()
        self.wait_mqtt_path(live[0], live[-1], max(5.0, deadline - time.monotonic()))

    def wait_mqtt_path(self, src: NatsNode, dst: NatsNode, timeout: float) -> None:
        """Retries until a retained QoS 1 message published on ``src`` is read from ``dst``.

        Right after start (or a node loss) MQTT connects may be refused or time out while the
        JetStream streams behind MQTT elect leaders, so each attempt is short and retried.
        """
        topic = f"health/{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with MqttProbe(src.host, src.port, protocol=4, connect_timeout=5) as pub:
                    pub.publish(topic, b"ok", qos=1, retain=True, timeout=5)
                    pub.publish(topic, b"", qos=1, retain=True, timeout=5)  # clear it again
                    pub.publish(topic, b"ok2", qos=1, retain=True, timeout=5)
                with MqttProbe(dst.host, dst.port, protocol=4, connect_timeout=5) as sub:
                    sub.subscribe(topic, timeout=5)
                    sub.wait_for_raw(topic, lambda p: p == b"ok2", timeout=5)
                with MqttProbe(src.host, src.port, protocol=4, connect_timeout=5) as pub:
                    pub.publish(topic, b"", qos=1, retain=True, timeout=5)
                return
            except (AssertionError, OSError) as exc:
                last = exc
                time.sleep(0.5)
        raise PartError(f"no MQTT path {src.name} -> {dst.name} within {timeout:.0f} s: {last}\n{self.log_excerpts()}")

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


__all__ = ["NatsCluster", "NatsNode", "nats_binary", "nats_version"]
