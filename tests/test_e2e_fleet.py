"""A fleet on real parts (issue 14): K >= 50 agent processes on one Mosquitto, and spread over the
3-node NATS cluster of ``test_e2e_cluster.py``.

Each agent has one camera (a shared 320x180 10 fps mount of one simulator: cheap FFmpeg copies) and
is in the group ``fleet``. Checked on both brokers:

- a desired-configuration change (``recording.max_seconds``) published to every agent's
  ``P/D/config/desired`` rolls out: every ``reported`` reaches the version, and the tasks started
  afterwards carry the new ``max_seconds``;
- one group ``start`` on ``P/groups/fleet/cmd`` reaches every agent: each replies exactly once on
  ``P/D/groups/fleet/reply`` (replies are counted per device until no reply came for ``SETTLE_S``:
  a duplicate is a failure), each executes it once (its log), every camera records; one group
  ``stop`` likewise, and every task ends ``completed``.

On the cluster, additionally: the NATS node that some agents are connected to (read from each
node's ``/connz``) is killed, and a group ``start`` is published through a surviving node while
those agents fail over. NATS keeps a QoS 1 message for an MQTT session in JetStream (``$MQTT_msgs``,
replicated) with a durable consumer per subscription, so a session whose node died must get it when
it resumes on another node. Checked: every agent replies exactly once and executes it exactly once
(each task is short, ``max_seconds``, so a second execution would be a second task), including the
agents that were still away when the broker acknowledged the command (counted from their logs,
at least one required so the test checks what it claims).

NATS 2.9.10 sometimes acknowledges a group command (or a desired document) and never delivers it
to some members' sessions (no node killed; seen in 4 of 15 runs here and in the benchmark, see
docs/scaling.md "Lost group commands on NATS"). The NATS test then does what an operator's tool
must do: after ``REPLY_WAIT_S`` without an answer it publishes the same request (same
``request_id``; a desired document: the same version and content) again, still requires exactly
one reply and one execution per member, prints the broker's view of each loss and raises a warning
in pytest's summary. ``EDGE_FLEET_STRICT_DELIVERY=1`` makes such a loss fail the test instead. The
Mosquitto test has no such allowance.

Cost: a 2-core machine runs K Python agents and K FFmpegs. ``EDGE_FLEET_K`` (default 50, the
issue's minimum) sets K. On NATS the agents start in waves of ``NATS_WAVE`` with JetStream settled
between waves: 50 agents connecting at once made the JetStream API time out inside NATS (4 s) and
NATS refused an agent's QoS 1 subscription; the agent subscribed again 5 s later and then never
received a command (docs/scaling.md).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from nats import NatsCluster, NatsNode, NatsProbe
from parts import CameraSim, Mosquitto, MqttProbe
from parts.fleet import Fleet, Tally, describe, wait_quiet

pytestmark = [pytest.mark.integration, pytest.mark.serial]  # 50 agents: the machine to themselves

K = int(os.environ.get("EDGE_FLEET_K", "50"))
GROUP = "fleet"
SETTLE_S = 3.0  # no reply for this long after the last one: the count per device is final
NATS_WAVE = 10
REPLY_WAIT_S = 30.0  # a member silent this long after a group command never got it (replies take < 3 s)
FAILOVER_WAIT_S = 60.0  # the same across a node kill: reconnects after 4-12 s, PUBACK up to 8 s
STRICT_DELIVERY = os.environ.get("EDGE_FLEET_STRICT_DELIVERY") == "1"  # a broker loss fails the NATS test
ROLLOUT_MAX_SECONDS = 1234
FAILOVER_TASK_S = 8  # max_seconds of the failover command's task: 50 FFmpegs starting at once need ~4 s to first media
RECORDING = {"segment_seconds": 2, "segment_events": False, "first_frame_timeout_seconds": 30,
             "stall_timeout_seconds": 15, "stop_timeout_seconds": 10}  # fmt: skip
CONNECTED_RE = re.compile(r"^(\S+ \S+) INFO .* connected to 127\.0\.0\.1:(\d+) ", re.MULTILINE)


class Clock:
    """Phase times of one test, printed at the end (``pytest -s``) and on failure."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.phases: list[tuple[str, float]] = []

    def lap(self, what: str) -> float:
        now = time.monotonic()
        self.phases.append((what, now - self.last))
        self.last = now
        return self.phases[-1][1]

    def __str__(self) -> str:
        parts = ", ".join(f"{w} {s:.1f} s" for w, s in self.phases)
        return f"{parts}; total {time.monotonic() - self.t0:.1f} s"


@pytest.fixture
def fleet_camera(tmp_path: Path, track) -> CameraSim:
    """One small shared stream for every agent: K FFmpeg copies of 320x180 at 10 fps."""
    sim: CameraSim = track(CameraSim(tmp_path / "fleetcam", mounts=("cam1",), width=320, height=180, fps=10))
    return sim.start()


@pytest.fixture
def cluster(tmp_path: Path, track) -> NatsCluster:
    nats = NatsCluster(tmp_path / "nats")
    for node in nats:
        track(node)
    return nats.start()


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    """Fleets made by a test, all stopped at teardown (in parallel) before the broker goes."""
    made: list[Fleet] = []
    try:
        yield made
    finally:
        for fleet in made:
            fleet.stop()


# ------------------------------------------------------------------------------------ steps


def group_topic(fleet: Fleet) -> str:
    return f"{fleet.prefix}/groups/{GROUP}/cmd"


def reply_suffix() -> str:
    return f"groups/{GROUP}/reply"


def is_reply_topic(topic: str) -> bool:
    return topic.endswith(f"/{reply_suffix()}")


def wait_online(fleet: Fleet, tally: Tally, devices: list[str], timeout: float) -> None:
    """The retained ``online`` and a ``reported`` naming the group, from each of ``devices``."""
    deadline = time.monotonic() + timeout
    while True:
        online = tally.on("status", lambda m: m.payload == b"online")
        missing = [d for d in devices if not online[d]]
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise AssertionError(f"not online within {timeout:.0f} s: {describe(missing)}\n"
                                 f"{fleet.log_excerpts(missing)}")  # fmt: skip
        time.sleep(0.1)
    tally.wait_each("config/reported", lambda r: GROUP in r["groups"], max(5.0, deadline - time.monotonic()),
                    f"reported naming group {GROUP!r}", devices)  # fmt: skip


def rollout(fleet: Fleet, sender: MqttProbe, tally: Tally, version: int, timeout: float,
            diagnose: Diagnose | None = None, losses: Losses | None = None) -> float:  # fmt: skip
    """Publishes desired ``version`` (``recording.max_seconds`` changed) retained to every device;
    returns the seconds from the first publish until every ``reported`` reached it applied.

    A device whose ``reported`` never moves is a loss (see :class:`Losses`): with ``losses.resend``
    its document is published again (same version and content: idempotent), else the test fails.
    """
    started = time.monotonic()
    docs = {d: fleet.desired(d, version, max_seconds=ROLLOUT_MAX_SECONDS) for d in fleet.devices}
    for device, doc in docs.items():
        sender.publish(f"{fleet.base(device)}/config/desired", doc, retain=True, timeout=30)

    def answered(r: dict[str, Any]) -> bool:  # applied or rejected: a rejection fails at once, named
        return bool(r["version"] == version or (r.get("rejected") or {}).get("version") == version)

    what = f"reported version {version}"
    try:
        tally.wait_each("config/reported", answered, timeout, what)
    except AssertionError as exc:
        silent = [d for d, got in tally.json_on("config/reported", answered).items() if not got]
        evidence = f"{str(exc).splitlines()[0]}\n{diagnose(silent) if diagnose else ''}"
        if losses is None or not losses.resend:
            raise AssertionError(evidence) from None
        losses.found.append(f"desired version {version} not delivered to {describe(silent)}: {evidence}")
        print(f"BROKER LOSS: {losses.found[-1]}\npublishing their desired documents again")
        for device in silent:
            sender.publish(f"{fleet.base(device)}/config/desired", docs[device], retain=True, timeout=30)
        tally.wait_each("config/reported", answered, 60, f"{what} (published again)")
    rejected = {d: docs[-1]["rejected"] for d, docs in tally.json_on("config/reported").items()
                if docs and (docs[-1].get("rejected") or {}).get("version") == version}  # fmt: skip
    assert not rejected, f"desired version {version} rejected by {len(rejected)}: {list(rejected.items())[:2]}"
    last = tally.wait_each(
        "config/reported",
        lambda r: r["version"] == version and r["state"] == "applied"
        and r["config"]["recording"]["max_seconds"] == ROLLOUT_MAX_SECONDS,
        timeout, f"reported version {version} applied with recording.max_seconds {ROLLOUT_MAX_SECONDS}",
    )  # fmt: skip
    return last - started


Diagnose = Callable[[list[str]], str]


@dataclass
class Losses:
    """Group commands the broker acknowledged but never delivered to some members' sessions.

    With ``resend`` (the NATS test, unless ``EDGE_FLEET_STRICT_DELIVERY=1``) the test then does what
    an operator's tool must do with such a broker: publish the same request (same ``request_id``)
    once more; the agents' de-duplication keeps every member at one execution and one reply, which
    the test still checks. Each loss is recorded with the broker's own view (``diagnose``), printed,
    and raised as a warning in pytest's summary. Without ``resend`` a loss fails the test at once.
    """

    resend: bool
    found: list[str] = field(default_factory=list)


def group_command(fleet: Fleet, sender: MqttProbe, tally: Tally, payload: dict[str, Any], timeout: float,
                  diagnose: Diagnose = lambda _d: "", losses: Losses | None = None,
                  ) -> tuple[str, float, float]:  # fmt: skip
    """Publishes one group command; returns (request id, publish -> every device replied, ack time).

    On timeout the error names the members without a reply, with ``diagnose(them)`` (the broker's
    view), unless ``losses.resend``: then the loss is recorded and the same request published again.
    """
    rid = uuid.uuid4().hex
    body = {**payload, "request_id": rid}
    started = time.monotonic()
    sender.publish(group_topic(fleet), body, qos=1, timeout=30)
    acked = time.time()
    what = f"group {payload['action']} reply"
    try:
        last = tally.wait_each(reply_suffix(), lambda r: r["request_id"] == rid, timeout, what)
    except AssertionError as exc:
        silent = [d for d, docs in tally.json_on(reply_suffix(), lambda r: r["request_id"] == rid).items() if not docs]
        evidence = f"{str(exc).splitlines()[0]}\n{diagnose(silent)}"
        if losses is None or not losses.resend:
            raise AssertionError(evidence) from None
        losses.found.append(f"request {rid} ({payload['action']}) not delivered to {describe(silent)}: {evidence}")
        print(f"BROKER LOSS: {losses.found[-1]}\npublishing request {rid} again")
        sender.publish(group_topic(fleet), body, qos=1, timeout=30)
        try:
            last = tally.wait_each(reply_suffix(), lambda r: r["request_id"] == rid, 60, f"{what} (published again)")
        except AssertionError as again:
            silent = [d for d, docs in tally.json_on(reply_suffix(), lambda r: r["request_id"] == rid).items()
                      if not docs]  # fmt: skip
            raise AssertionError(f"{again}\n{diagnose(silent)}") from None
    return rid, last - started, acked


def replied_once(fleet: Fleet, probe: MqttProbe, tally: Tally, rid: str) -> dict[str, dict[str, Any]]:
    """After ``SETTLE_S`` without any group reply: exactly one reply per device, ok, from that device."""
    wait_quiet(probe, is_reply_topic, SETTLE_S, timeout=60)
    replies = tally.json_on(reply_suffix(), lambda r: r["request_id"] == rid)
    missing = [d for d, docs in replies.items() if not docs]
    dups = {d: len(docs) for d, docs in replies.items() if len(docs) > 1}
    assert not missing and not dups, f"request {rid}: no reply from {describe(missing)}; more than one from {dups}"
    bad = {d: docs[0] for d, docs in replies.items() if not docs[0]["ok"] or docs[0]["device_id"] != d}
    assert not bad, f"request {rid}: replies not ok: {list(bad.items())[:3]}"
    return {d: docs[0] for d, docs in replies.items()}


def executions(fleet: Fleet, rid: str) -> dict[str, int]:
    """How many times each agent logged executing group request ``rid``."""
    return {d: sum(1 for line in fleet.grep(d, f"(request '{rid}')") if "group command" in line)
            for d in fleet.devices}  # fmt: skip


def executed_once(fleet: Fleet, rid: str) -> None:
    counts = executions(fleet, rid)
    wrong = {d: n for d, n in counts.items() if n != 1}
    assert not wrong, f"request {rid} executed other than once: {wrong}"


def start_stop(fleet: Fleet, sender: MqttProbe, probe: MqttProbe, tally: Tally, clock: Clock,
               diagnose: Diagnose = lambda _d: "", losses: Losses | None = None) -> dict[str, float]:  # fmt: skip
    """Group start -> every camera records with the rolled-out max_seconds -> group stop -> completed."""
    task = f"fleet-{uuid.uuid4().hex[:6]}"
    rid, replied_s, _ = group_command(fleet, sender, tally, {"action": "start", "task_name": task}, REPLY_WAIT_S,
                                      diagnose, losses)  # fmt: skip
    tally.wait_each(f"cam1/tasks/{task}", lambda s: s["status"] == "recording", 60, f"task {task} recording")
    clock.lap("group start -> all replied and recording")
    replies = replied_once(fleet, probe, tally, rid)
    assert all(r["results"]["cam1"]["ok"] and r["results"]["cam1"]["task_name"] == task for r in replies.values())
    executed_once(fleet, rid)
    recording = tally.json_on(f"cam1/tasks/{task}", lambda s: s["status"] == "recording")
    wrong_max = {d: docs[0].get("max_seconds") for d, docs in recording.items()
                 if docs[0].get("max_seconds") != ROLLOUT_MAX_SECONDS}  # fmt: skip
    assert not wrong_max, f"tasks started after the rollout without its max_seconds: {wrong_max}"
    clock.lap("settle")

    stop_rid, stop_s, _ = group_command(fleet, sender, tally, {"action": "stop"}, REPLY_WAIT_S, diagnose, losses)
    tally.wait_each(f"cam1/tasks/{task}", lambda s: s["status"] in ("completed", "failed"), 90, f"task {task} ended")
    clock.lap("group stop -> all replied and ended")
    replied_once(fleet, probe, tally, stop_rid)
    executed_once(fleet, stop_rid)
    ends = tally.json_on(f"cam1/tasks/{task}", lambda s: s["status"] in ("completed", "failed"))
    failed = {d: docs[-1] for d, docs in ends.items() if docs[-1]["status"] != "completed"}
    assert not failed, f"tasks not completed: {list(failed.items())[:3]}"
    clock.lap("settle")
    return {"start_replied_s": replied_s, "stop_replied_s": stop_s}


# ------------------------------------------------------------------------------------ tests


def test_fleet_on_one_broker(tmp_path: Path, broker: Mosquitto, prefix: str, fleet_camera: CameraSim,
                             fleets: list[Fleet]) -> None:  # fmt: skip
    clock = Clock()
    fleet = Fleet(tmp_path / "fleet", k=K, prefix=prefix, mqtt_port=broker.port,
                  cameras={"cam1": fleet_camera.url("cam1")}, groups_for=lambda _i: [GROUP],
                  recording=RECORDING, extra={"telemetry_seconds": 0})  # fmt: skip
    fleets.append(fleet)
    with MqttProbe(broker.host, broker.port) as probe:
        probe.subscribe(f"{prefix}/#")
        tally = Tally(probe, fleet)
        fleet.start()
        wait_online(fleet, tally, fleet.devices, timeout=180)
        clock.lap(f"{K} agents online")
        rollout_s = rollout(fleet, probe, tally, 1, timeout=60)
        clock.lap("rollout -> all reported")
        times = start_stop(fleet, probe, probe, tally, clock)
        assert not fleet.dead(), fleet.dead()
    fleet.stop()
    clock.lap("stop agents")
    print(f"fleet of {K} on one Mosquitto: rollout {rollout_s:.2f} s, group start -> all replied "
          f"{times['start_replied_s']:.2f} s, stop {times['stop_replied_s']:.2f} s; {clock}")  # fmt: skip


def log_time(line_time: str) -> float:
    return datetime.strptime(line_time, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def reconnects(fleet: Fleet, device: str, after: int) -> list[tuple[float, int]]:
    """(wall time, port) of each "connected to" in the agent's log after the first ``after``."""
    found = CONNECTED_RE.findall(fleet.agents[device].log_text())
    return [(log_time(t), int(p)) for t, p in found[after:]]


def test_fleet_on_nats_cluster_with_node_loss(tmp_path: Path, cluster: NatsCluster, prefix: str,
                                              fleet_camera: CameraSim, fleets: list[Fleet]) -> None:  # fmt: skip
    clock = Clock()
    addresses = cluster.addresses
    watcher_node = cluster.nodes[2]
    fleet = Fleet(tmp_path / "fleet", k=K, prefix=prefix, mqtt_port=1,
                  cameras={"cam1": fleet_camera.url("cam1")}, groups_for=lambda _i: [GROUP],
                  # Rotated: agent i dials node i % 3 first. A first reconnect delay of 4-12 s keeps
                  # the agents of a killed node away until NATS has stored the command: its PUBACK
                  # took up to 8 s after the kill (JetStream re-electing the leader of $MQTT_msgs).
                  mqtt_for=lambda i: {"protocol": "3.1.1", "hosts": addresses[i % 3:] + addresses[: i % 3],
                                      "reconnect_min_seconds": 4, "reconnect_max_seconds": 12},
                  recording=RECORDING, extra={"telemetry_seconds": 0})  # fmt: skip
    fleets.append(fleet)
    with NatsProbe(watcher_node.host, watcher_node.port, protocol=4) as probe:
        probe.subscribe(f"{prefix}/#")
        tally = Tally(probe, fleet)
        for w in range(0, K, NATS_WAVE):
            wave = fleet.devices[w : w + NATS_WAVE]
            for device in wave:
                fleet.agents[device].start()
            wait_online(fleet, tally, wave, timeout=90)
            settle_jetstream(cluster, 30)
        refused = [d for d in fleet.devices if fleet.grep(d, "refused a subscription")]
        clock.lap(f"{K} agents online in waves of {NATS_WAVE}")
        spread = {n.name: len(clients_of(n, fleet)) for n in cluster.nodes}
        assert all(spread.values()), f"agents per node: {spread}"

        losses = Losses(resend=not STRICT_DELIVERY)
        rollout_s = rollout(fleet, probe, tally, 1, REPLY_WAIT_S,
                            lambda d: nats_diagnosis(cluster, fleet, d, "config.desired"), losses)  # fmt: skip
        clock.lap("rollout -> all reported")

        def diagnose(silent: list[str]) -> str:
            return nats_diagnosis(cluster, fleet, silent, f"groups.{GROUP}.cmd")

        times = start_stop(fleet, probe, probe, tally, clock, diagnose, losses)

        # The victim: the node (not the watcher's) with the most agents on it now.
        victim = max(cluster.nodes[:2], key=lambda n: len(clients_of(n, fleet)))
        sender_node = next(n for n in cluster.nodes[:2] if n is not victim)
        away = sorted(clients_of(victim, fleet))
        assert len(away) >= 5, f"only {away} on {victim.name}"
        connects_before = {d: len(CONNECTED_RE.findall(fleet.agents[d].log_text())) for d in away}
        with MqttProbe(sender_node.host, sender_node.port, protocol=4) as sender:
            victim.kill()
            killed, killed_wall = time.monotonic(), time.time()
            rid, all_replied_s, acked_wall = group_command(
                fleet,
                sender,
                tally,
                {"action": "start", "max_seconds": FAILOVER_TASK_S},
                FAILOVER_WAIT_S,
                diagnose,
                losses,
            )
        clock.lap(f"kill {victim.name} + group start -> all replied")
        replies = replied_once(fleet, probe, tally, rid)
        executed_once(fleet, rid)
        survivors = {n.port for n in cluster.nodes if n is not victim}
        back = {d: reconnects(fleet, d, connects_before[d]) for d in away}
        not_back = [d for d, r in back.items() if not r]
        assert not not_back, f"agents of {victim.name} never reconnected: {not_back}"
        elsewhere = {d: r for d, r in back.items() if r[0][1] not in survivors}
        assert not elsewhere, elsewhere
        still_away = [d for d, r in back.items() if r[0][0] > acked_wall]
        assert still_away, (
            f"every agent of {victim.name} was back before the command was acknowledged: the test did not "
            f"exercise delivery to a session whose node died ({back})"
        )
        tasks = {d: r["results"]["cam1"]["task_name"] for d, r in replies.items()}
        ended = {}
        for device, task in tasks.items():
            ended[device] = tally.wait_each(f"cam1/tasks/{task}", lambda s: s["status"] in ("completed", "failed"), 60,
                                            f"failover task {task} ended", [device])  # fmt: skip
        final = {d: tally.json_on(f"cam1/tasks/{t}")[d][-1]["status"] for d, t in tasks.items()}
        failed = {d: s for d, s in final.items() if s != "completed"}
        assert not failed, failed
        # One task per device from this command: a second execution would have started another
        # (the agents republish their older, ended tasks on reconnecting: those are not active).
        others = {d: sorted({m.topic.rsplit("/", 1)[1] for m in probe.raw()
                             if m.topic.startswith(f"{fleet.base(d)}/cam1/tasks/") and m.received_at > killed
                             and m.topic.rsplit("/", 1)[1] != tasks[d] and m.payload
                             and m.json().get("status") in ("starting", "recording")})
                  for d in fleet.devices}  # fmt: skip
        extra_tasks = {d: names for d, names in others.items() if names}
        assert not extra_tasks, f"tasks started since the kill other than the failover command's: {extra_tasks}"
        clock.lap("failover tasks ended + settle")
        redelivered = [d for d in fleet.devices if fleet.grep(d, "delivered again; already answered")]
        assert not fleet.dead(), fleet.dead()
    fleet.stop()
    clock.lap("stop agents")
    print(
        f"fleet of {K} on 3 NATS nodes {spread}: rollout {rollout_s:.2f} s, group start -> all replied "
        f"{times['start_replied_s']:.2f} s, stop {times['stop_replied_s']:.2f} s; killed {victim.name} with "
        f"{len(away)} agents; command acked {acked_wall - killed_wall:.2f} s "
        f"after the kill, {len(still_away)} of them still away then; all {K} replied once "
        f"{all_replied_s:.2f} s after the publish; redelivered and deduplicated: {len(redelivered)}; "
        f"subscriptions refused at start: {refused}; messages NATS never delivered to some members "
        f"(published again): {len(losses.found)}; {clock}"
    )
    if losses.found:
        warnings.warn(
            f"NATS acknowledged {len(losses.found)} message(s) (group command, desired document) and never "
            f"delivered them to some members' sessions (recovered by publishing the same again; "
            f"EDGE_FLEET_STRICT_DELIVERY=1 fails "
            f"instead): {losses.found}",
            stacklevel=1,
        )


def clients_of(node: NatsNode, fleet: Fleet) -> set[str]:
    """Fleet devices whose agent is connected to ``node`` now (its ``/connz``)."""
    devices = set(fleet.devices)
    return {c.removeprefix("edge-agent-") for c in node.mqtt_clients()} & devices


def nats_diagnosis(cluster: NatsCluster, fleet: Fleet, devices: list[str], subject_tail: str) -> str:
    """Where a QoS 1 message to ``devices`` stopped, from every live node's monitoring.

    For each device: the node it is connected to; the message count of its core subscription to
    the subject ending in ``subject_tail`` (NATS routes every publish there too; the MQTT layer
    ignores it for a QoS 1 subscription) beside that of the JetStream delivery subscription that
    actually feeds the client; and the consumer's state in its leader's own view (delivered,
    ack floor, pending). Core count > delivery count with nothing pending: JetStream skipped it.
    """
    wanted = {f"edge-agent-{d}": d for d in devices}
    lines = []
    by_deliver: dict[str, dict[str, Any]] = {}  # deliver subject -> the consumer, as its leader reports it
    subs: dict[str, tuple[str, list[tuple[str, int]]]] = {}
    for node in cluster.alive():
        url = f"http://{node.host}:{node.http_port}"
        try:
            with urllib.request.urlopen(f"{url}/connz?subs=detail&limit=100000", timeout=5) as resp:
                connz = json.loads(resp.read())
            with urllib.request.urlopen(f"{url}/jsz?accounts=true&streams=true&consumers=true&config=true",
                                        timeout=5) as resp:  # fmt: skip
                jsz = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            lines.append(f"{node.name}: monitoring did not answer: {exc}")
            continue
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == "$MQTT_msgs" and (stream.get("cluster") or {}).get("leader") == node.name:
                    lines.append(
                        f"$MQTT_msgs: leader {node.name}, last seq {(stream.get('state') or {}).get('last_seq')}"
                    )
                for cons in stream.get("consumer_detail") or []:
                    config = cons.get("config") or {}
                    if (cons.get("cluster") or {}).get("leader") == node.name \
                            and str(config.get("filter_subject", "")).endswith(subject_tail):  # fmt: skip
                        by_deliver[str(config.get("deliver_subject"))] = cons
        for conn in connz.get("connections") or []:
            device = wanted.get(conn.get("mqtt_client", ""))
            if device is not None:
                detail = conn.get("subscriptions_list_detail") or []
                subs[device] = (node.name, [(sub["subject"], int(sub.get("msgs") or 0)) for sub in detail])
    for device in devices:
        node_name, detail = subs.get(device, ("(not connected)", []))
        core = [n for subj, n in detail if subj.endswith(subject_tail)]
        feeds = [(subj, n) for subj, n in detail if subj in by_deliver]
        line = f"{device} on {node_name}: core subscription got {core}, JetStream delivery got {[n for _, n in feeds]}"
        for subj, _ in feeds:
            cons = by_deliver[subj]
            line += (f"; consumer {cons['name']} (leader {(cons.get('cluster') or {}).get('leader')}): delivered "
                     f"{(cons.get('delivered') or {}).get('consumer_seq')} (stream seq "
                     f"{(cons.get('delivered') or {}).get('stream_seq')}), ack floor "
                     f"{(cons.get('ack_floor') or {}).get('consumer_seq')}, pending {cons.get('num_pending')}, "
                     f"ack pending {cons.get('num_ack_pending')}")  # fmt: skip
        lines.append(line)
    return "NATS monitoring:\n" + "\n".join(lines[:120])


def settle_jetstream(cluster: NatsCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (why := cluster.jetstream_unsettled()) is not None:
        if time.monotonic() >= deadline:
            raise AssertionError(f"JetStream not settled within {timeout:.0f} s: {why}")
        time.sleep(0.2)
