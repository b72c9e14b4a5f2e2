"""A clustered broker end to end: the agent's MQTT node dies mid-recording and it fails over.

Three NATS servers (JetStream + MQTT 3.1.1 on each, ``tests/nats.py``) form one broker; the agent
gets all three in ``mqtt.hosts``. The node it is connected to is killed while a task records; a
stop command sent through a surviving node while the agent is reconnecting must be executed once,
and the task must end ``completed`` with a file covering the whole task.

The cluster fixture waits until JetStream has settled (``NatsCluster.wait_ready``). Even then NATS
may drop a client in its first seconds on a slow machine; the agent then moves to the next node, as
it should. So the test checks that the agent dialled node 1 first, and kills the node the agent is
on at that moment, whichever it is.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from nats import NatsCluster, NatsNode, NatsProbe
from parts import AgentProcess, Message, MqttProbe, ffprobe_info, moov_before_mdat, write_config
from rig import DEVICE, record_for

pytestmark = [pytest.mark.integration, pytest.mark.serial]

# Stated bound: from the kill of the agent's node to the agent logging a connection to a surviving
# node. Budget: the agent's first reconnect delay (1-3 s with reconnect_min_seconds=1), a refused
# or stalled attempt while the cluster re-elects its JetStream leaders (measured ~10 s before MQTT
# round trips work again) and paho's doubling backoff capped at RECONNECT_MAX_S.
RECONNECT_MAX_S = 4
RECONNECT_BOUND_S = 30.0
# NATS delivers QoS 1 through JetStream: for some seconds after a node loss, deliveries stall and a
# new QoS 1 subscription can be refused (SUBACK 0x80, "Unable to add JetStream consumer ... timeout").
# Retained messages reach each node through a JetStream consumer too, so for a while a node may
# still hand a new subscriber the previous retained status. A fresh reader is retried (a new client
# each time) for this long until it reads the newest one.
READER_RETRY_S = 45.0
FINAL = ("completed", "failed")
CONNECTED_RE = re.compile(r"connected to 127\.0\.0\.1:(\d+) ")
DISCONNECTED = "disconnected from the broker"
LINK_EVENT_RE = re.compile(rf"connected to 127\.0\.0\.1:(\d+) |{DISCONNECTED}")


def at(doc: dict, key: str = "updated_at") -> float:
    """The agent's own wall-clock time in a status document (``updated_at`` or ``start_time``)."""
    return datetime.fromisoformat(doc[key]).timestamp()


def read_retained(node: NatsNode, topic: str, timeout: float, until: Callable[[dict], bool]) -> Message:
    """The retained message on ``topic`` as a fresh client on ``node`` receives it, once ``until`` holds.

    Retried with a new client each time: right after a node loss the subscription may be refused,
    or the node may still hold an older retained message (eventually consistent, see above).
    """
    deadline = time.monotonic() + timeout
    attempts: list[str] = []
    while True:
        try:
            with NatsProbe(node.host, node.port, protocol=4, connect_timeout=5) as reader:
                reader.subscribe(topic, timeout=5)
                message = reader.wait_for_message(topic, timeout=5)
            if until(message.json()):
                return message
            attempts.append(f"older retained message: {message.payload[:80]!r}")
        except (AssertionError, OSError) as exc:
            attempts.append(str(exc).splitlines()[0])
        time.sleep(0.5)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no retained message on {topic} from {node.name} in {timeout} s: {attempts}")


def connected_ports(agent: AgentProcess) -> list[int]:
    """The MQTT ports of every "connected to" line in the agent's log, oldest first."""
    return [int(m) for m in CONNECTED_RE.findall(agent.log_text())]


def current_port(log: str) -> int | None:
    """The MQTT port the agent is connected to, per its log (the last link event is a connect), else None."""
    events = LINK_EVENT_RE.findall(log)
    return int(events[-1]) if events and events[-1] else None


def wait_connected(agent: AgentProcess, timeout: float) -> int:
    """Waits until the agent is connected (it may be between nodes); returns the port."""
    deadline = time.monotonic() + timeout
    while (port := current_port(agent.log_text())) is None:
        if time.monotonic() >= deadline or not agent.is_alive():
            raise AssertionError(f"agent not connected within {timeout} s\n{agent.log_excerpt()}")
        time.sleep(0.05)
    return port


def wait_disconnects(agent: AgentProcess, count: int, timeout: float) -> None:
    """Waits until the agent has logged at least ``count`` disconnections."""
    deadline = time.monotonic() + timeout
    while agent.log_text().count(DISCONNECTED) < count:
        if time.monotonic() >= deadline or not agent.is_alive():
            raise AssertionError(f"agent logged no disconnect #{count} within {timeout} s\n{agent.log_excerpt()}")
        time.sleep(0.05)


def wait_connects(agent: AgentProcess, count: int, timeout: float) -> list[int]:
    """Waits until the agent has logged at least ``count`` connections; returns their ports."""
    deadline = time.monotonic() + timeout
    while True:
        ports = connected_ports(agent)
        if len(ports) >= count:
            return ports
        if not agent.is_alive():
            raise AssertionError(f"agent exited ({agent.returncode})\n{agent.log_excerpt()}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"agent logged {len(ports)} connection(s), not {count}, within {timeout} s\n{agent.log_excerpt()}"
            )
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path: Path, track) -> NatsCluster:
    nats = NatsCluster(tmp_path / "nats")
    for node in nats:
        track(node)  # stopped at teardown, log tails in the failure report
    return nats.start()  # includes wait_ready: JetStream settled, persistent sessions work on every node


def test_broker_node_loss_fails_over_and_keeps_recording(
    tmp_path, cluster: NatsCluster, prefix, make_agent, camera
) -> None:
    n1, _n2, n3 = cluster.nodes
    base = f"{prefix}/{DEVICE}"
    cmd_topic, reply_topic = f"{base}/cam1/cmd", f"{base}/cam1/reply"
    task_topic, status_topic = f"{base}/cam1/tasks/ha", f"{base}/cam1/status"
    config = write_config(
        tmp_path / "agent.yaml", device_id=DEVICE, mqtt_port=n1.port, topic_prefix=prefix,
        cameras={"cam1": {"url": camera.url("cam1")}}, output_dir=tmp_path / "recordings",
        storage={"type": "local", "min_free_bytes": 0},
        recording={"segment_seconds": 2, "first_frame_timeout_seconds": 15, "stall_timeout_seconds": 6,
                   "stop_timeout_seconds": 8, "restart_backoff_max_seconds": 2},
        mqtt={"protocol": "3.1.1", "hosts": cluster.addresses, "reconnect_min_seconds": 1,
              "reconnect_max_seconds": RECONNECT_MAX_S},
    )  # fmt: skip

    with NatsProbe(n3.host, n3.port, protocol=4) as watcher:
        watcher.subscribe(f"{prefix}/#")  # checked: a refused QoS 1 subscription is retried
        agent = make_agent(config)
        watcher.wait_for_raw(f"{base}/status", lambda p: p == b"online", timeout=30)
        first = wait_connects(agent, 1, 10)
        assert first[0] == n1.port, (first, cluster.addresses)  # hosts are tried in order

        rid_start = uuid.uuid4().hex
        watcher.publish(cmd_topic, {"action": "start", "task_name": "ha", "request_id": rid_start})
        reply = watcher.wait_for(reply_topic, lambda p: p.get("request_id") == rid_start, timeout=30)
        assert reply["status"] == "starting", reply
        recording = watcher.wait_for(task_topic, lambda p: p["status"] == "recording", timeout=30)
        record_for(4)

        # The victim is the node the agent is on now: normally node 1, or the next one if NATS
        # dropped the agent while settling (it reconnects within seconds: wait for that).
        victim: NatsNode = cluster.node_by_mqtt_port(wait_connected(agent, RECONNECT_BOUND_S))
        survivors = [n for n in cluster.nodes if n is not victim]
        assert watcher.port != victim.port, ("the watcher must be on a surviving node", connected_ports(agent))
        sender_node = survivors[0]
        rid_stop = uuid.uuid4().hex
        with MqttProbe(sender_node.host, sender_node.port, protocol=4) as sender:
            log = agent.log_text()  # one snapshot, taken just before the kill
            assert current_port(log) == victim.port, connected_ports(agent)
            connects_before, disconnects_before = len(CONNECTED_RE.findall(log)), log.count(DISCONNECTED)
            victim.kill()
            killed, killed_wall = time.monotonic(), time.time()
            # The agent's TCP connection is reset at once; its first reconnect waits >= 1 s. The
            # PUBACK may take seconds (NATS stores the message in JetStream, re-electing leaders).
            wait_disconnects(agent, disconnects_before + 1, timeout=10)
            sent_while_reconnecting = len(connected_ports(agent)) == connects_before
            sender.publish(cmd_topic, {"action": "stop", "task_name": "ha", "request_id": rid_stop},
                           qos=1, timeout=RECONNECT_BOUND_S)  # fmt: skip
            published = time.monotonic()
        ports = wait_connects(agent, connects_before + 1, RECONNECT_BOUND_S)
        reconnected = time.monotonic() - killed
        assert set(ports[connects_before:]) <= {n.port for n in survivors}, (ports, victim.port)
        assert reconnected <= RECONNECT_BOUND_S, reconnected
        assert sent_while_reconnecting, "the stop was sent after the agent was back"

        stopping = watcher.wait_for(task_topic, lambda p: p["status"] == "stopping", timeout=30)
        assert stopping["stop_reason"] == "stop command", stopping
        final = watcher.wait_for(task_topic, lambda p: p["status"] in FINAL, timeout=60)
        assert final["status"] == "completed", final
        time.sleep(1)  # a late duplicate delivery of the stop would be answered by now
        stop_replies = [m for m in watcher.messages(reply_topic) if m.get("request_id") == rid_stop]
        assert stop_replies and all(m == stop_replies[0] for m in stop_replies), stop_replies
        assert stop_replies[0]["status"] in ("stopping", "stopped", "completed"), stop_replies

    log = agent.log_text()
    stop_lines = [line for line in log.splitlines() if "command stop on cam1" in line and rid_stop in line]
    assert len(stop_lines) == 1, agent.log_excerpt()  # executed once, though sent while reconnecting
    statuses = [m["status"] for m in watcher.messages(task_topic)]
    assert statuses.count("completed") >= 1 and "failed" not in statuses, statuses

    # Recording went on through the broker node loss: one playable MP4 covering the task. Times are
    # the agent's own (status `updated_at`): NATS may deliver statuses to the watcher seconds late.
    mp4 = Path(final["local_file"])
    assert list(mp4.parent.glob("*.mp4")) == [mp4]
    info = ffprobe_info(mp4)
    assert info["codec"] == "h264" and moov_before_mdat(mp4), info
    recorded = at(stopping) - at(recording)
    assert at(recording) < killed_wall < at(stopping), (recording, killed_wall, stopping)
    assert recorded - 1.5 <= info["duration"] <= at(stopping) - at(recording, "start_time") + 1.0, (
        info["duration"],
        recorded,
    )

    # A fresh client on a surviving node reads the retained camera status: the task ended, completed.
    retained = read_retained(survivors[-1], status_topic, READER_RETRY_S, lambda d: d["status"] in FINAL)
    assert retained.retain, retained
    doc = retained.json()
    assert doc["status"] == "completed" and doc["task_name"] == "ha", doc
    print(
        f"agent connections before the kill: {ports[:connects_before]}; "
        f"node {victim.name} killed: agent back on 127.0.0.1:{ports[-1]} after {reconnected:.1f} s "
        f"(bound {RECONNECT_BOUND_S:.0f} s); stop acked {published - killed:.2f} s after the kill; "
        f"MP4 {info['duration']:.1f} s of a {recorded:.1f} s task"
    )
