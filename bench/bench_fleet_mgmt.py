"""Fleet management: group command -> all replied, config rollout -> all reported, K agents, one
Mosquitto beside the 3-node NATS cluster (issue 14).

For each K, two fleets of K agent processes run at the same time, one on a Mosquitto and one spread
over three NATS nodes (JetStream + MQTT 3.1.1; each agent gets all three in ``mqtt.hosts``, rotated,
so a third starts on each node). Every agent has one camera (one shared 320x180 10 fps simulator
mount, ``video: copy``, local storage) and is in the group ``fleet``. Each round, on each side in
turn (the order alternates between rounds):

- broker round trip: ``_common.broker_rtt_samples`` (QoS 1 publish -> ack -> receive by one
  client; ~44 ms of it is that client's Nagle/delayed-ACK stall, see docs/scaling.md), and the
  transit of a QoS 1 message from the operator's client to the watcher (the path of a command);
- rollout: a new desired version (``recording.max_seconds`` changed) published retained to each
  device's ``P/D/config/desired`` (pipelined QoS 1) -> every ``P/D/config/reported`` applied;
- group ``status`` -> every member's reply on ``P/D/groups/fleet/reply``;
- group ``start`` -> every reply, then every camera ``recording``; group ``stop`` -> every reply,
  then every task ended (``completed``).

On NATS the operator's client publishes through node 1 and the watcher reads on node 3: commands
and replies cross the cluster. Times are from the (first) publish to the last device's message at
the watcher. Replies are counted per device after each round (a duplicate is reported).

    .venv/bin/python bench/bench_fleet_mgmt.py            # K = 10, 25; 3 rounds
    .venv/bin/python bench/bench_fleet_mgmt.py --full     # K = 10, 50, 100; 3 rounds
    .venv/bin/python bench/bench_fleet_mgmt.py --quick    # K = 5, 10; 1 round
    .venv/bin/python bench/bench_fleet_mgmt.py --table docs/results/fleetmgmt_latest.json  # the table again

Writes ``docs/results/fleetmgmt_<date-time>.json`` and ``fleetmgmt_latest.json`` with the commit and
machine facts (``--results-dir``); ``bench/plot.py`` draws ``docs/img/fleet_mgmt.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import broker_rtt_samples, fmt, loadavg, log, md_table, run_facts, summary, write_docs_results
from nats import NatsCluster, NatsProbe, nats_version
from parts import CameraSim, Mosquitto, MqttProbe
from parts.fleet import Fleet, Tally, publish_all, wait_quiet

GROUP = "fleet"
SIDES = ("mosquitto", "nats")
METRICS = {  # key -> what the table calls it
    "rtt_s": "broker QoS 1 round trip, one client (`broker_rtt_samples`)",
    "transit_s": "broker transit, operator -> watcher",
    "rollout_s": "rollout -> all `reported`",
    "status_s": "group `status` -> all replied",
    "start_s": "group `start` -> all replied",
    "recording_s": "group `start` -> all `recording`",
    "stop_s": "group `stop` -> all replied",
    "ended_s": "group `stop` -> all `completed`",
}
NATS_WAVE = 10
RECORDING = {"segment_seconds": 2, "segment_events": False, "first_frame_timeout_seconds": 60}


@dataclass
class Side:
    name: str
    fleet: Fleet
    watcher: MqttProbe
    sender: MqttProbe
    tally: Tally
    version: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def replies_of(side: Side, rid: str) -> dict[str, int]:
    docs = side.tally.json_on(f"groups/{GROUP}/reply", lambda r: r["request_id"] == rid)
    return {d: len(v) for d, v in docs.items()}


def group(side: Side, payload: dict[str, Any], timeout: float, row: dict[str, Any]) -> tuple[str, float | None]:
    """One group command: (request id, publish -> every member replied), the time None when some
    member never answered within ``timeout``. Those are named in ``row["lost"]`` and the same
    request (same request_id: members that already answered do not execute it again) is published
    once more so the round can go on; ``row["resent_recovered"]`` says whether that reached them."""
    rid = uuid.uuid4().hex
    body = {**payload, "request_id": rid}
    t0 = time.monotonic()
    side.sender.publish(side.fleet.group_topic(GROUP), body, qos=1, timeout=60)
    what = f"{side.name}: group {payload['action']}"
    try:
        last = side.tally.wait_each(f"groups/{GROUP}/reply", lambda r: r["request_id"] == rid, timeout, what)
        return rid, last - t0
    except AssertionError:
        missing = [d for d, n in replies_of(side, rid).items() if n == 0]
        row.setdefault("lost", []).append({"action": payload["action"], "request_id": rid, "devices": missing})
        log(f"{what}: no reply from {len(missing)} member(s) after {timeout:.0f} s: {missing}; publishing it again")
        side.sender.publish(side.fleet.group_topic(GROUP), body, qos=1, timeout=60)
        try:
            side.tally.wait_each(f"groups/{GROUP}/reply", lambda r: r["request_id"] == rid, 60, f"{what} (resent)")
            row["lost"][-1]["resent_recovered"] = True
        except AssertionError:
            row["lost"][-1]["resent_recovered"] = False
            raise
        return rid, None


def transit_samples(side: Side, n: int = 20) -> list[float]:
    """Publish (QoS 1, by the operator's client) -> receive (by the watcher): the path a command
    and a reply take (on NATS across nodes), without the one-client round trip's ack wait."""
    topic = f"transit/{uuid.uuid4().hex}"
    side.watcher.subscribe(topic)
    out = []
    for i in range(n):
        t0 = time.monotonic()
        publish_all(side.sender, [(topic, json.dumps({"i": i}).encode())], timeout=30)
        msg = side.watcher.wait_for_message(topic, lambda p, i=i: p["i"] == i, timeout=30)
        out.append(msg.received_at - t0)
    return out


def one_round(side: Side, timeout: float) -> dict[str, Any]:
    fleet, tally = side.fleet, side.tally
    row: dict[str, Any] = {"side": side.name, "k": len(fleet)}
    row["rtt_s"] = statistics.median(broker_rtt_samples(side.watcher, n=20))
    row["transit_s"] = statistics.median(transit_samples(side))

    side.version += 1
    version, max_seconds = side.version, 3000 + side.version
    docs = {d: fleet.desired(d, version, max_seconds=max_seconds) for d in fleet.devices}
    items = [(f"{fleet.base(d)}/config/desired", json.dumps(doc).encode()) for d, doc in docs.items()]
    t0 = time.monotonic()
    publish_all(side.sender, items, retain=True, timeout=120)
    row["rollout_publish_s"] = time.monotonic() - t0

    def applied(r: dict[str, Any]) -> bool:
        return bool(r["version"] == version and r["state"] == "applied"
                    and r["config"]["recording"]["max_seconds"] == max_seconds)  # fmt: skip

    what = f"{side.name}: reported version {version}"
    try:
        row["rollout_s"] = tally.wait_each("config/reported", applied, timeout, what) - t0
    except AssertionError:  # as in group(): name who never got it, publish theirs again, go on
        missing = [d for d, got in tally.json_on("config/reported", applied).items() if not got]
        row.setdefault("lost", []).append({"action": "rollout", "version": version, "devices": missing})
        log(f"{what}: not reached by {len(missing)} device(s) after {timeout:.0f} s: {missing}; publishing again")
        publish_all(side.sender, [i for i in items if i[0].split("/")[1] in missing], retain=True, timeout=60)
        row["lost"][-1]["resent_recovered"] = False
        tally.wait_each("config/reported", applied, 60, f"{what} (resent)")
        row["lost"][-1]["resent_recovered"] = True
        row["rollout_s"] = None

    rids = []
    rid, row["status_s"] = group(side, {"action": "status"}, timeout, row)
    rids.append(rid)
    task = f"b{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    rid, row["start_s"] = group(side, {"action": "start", "task_name": task}, timeout, row)
    rids.append(rid)
    recording = tally.wait_each(f"cam1/tasks/{task}", lambda s: s["status"] == "recording", timeout,
                                f"{side.name}: {task} recording") - t0  # fmt: skip
    row["recording_s"] = None if row["start_s"] is None else recording  # a lost start was published again
    t0 = time.monotonic()
    rid, row["stop_s"] = group(side, {"action": "stop"}, timeout, row)
    rids.append(rid)
    ended = tally.wait_each(f"cam1/tasks/{task}", lambda s: s["status"] in ("completed", "failed"), timeout,
                            f"{side.name}: {task} ended") - t0  # fmt: skip
    row["ended_s"] = None if row["stop_s"] is None else ended
    ends = tally.json_on(f"cam1/tasks/{task}", lambda s: s["status"] in ("completed", "failed"))
    row["failed"] = sum(1 for docs in ends.values() if docs[-1]["status"] != "completed")
    wait_quiet(side.watcher, lambda t: t.endswith(f"/groups/{GROUP}/reply"), 1.0, timeout=60)
    counts = [replies_of(side, r) for r in rids]
    row["duplicate_replies"] = sum(n - 1 for c in counts for n in c.values() if n > 1)
    row["missing_replies"] = sum(1 for c in counts for n in c.values() if n == 0)  # after any resend
    return row


@contextlib.contextmanager
def mosquitto_side(k: int, work: Path, camera: CameraSim) -> Iterator[Side]:
    with Mosquitto(work / "mosquitto") as broker:
        fleet = Fleet(work / "fleet", k=k, prefix=f"fm{uuid.uuid4().hex[:6]}", mqtt_port=broker.port,
                      cameras={"cam1": camera.url("cam1")}, groups_for=lambda _i: [GROUP], recording=RECORDING,
                      extra={"telemetry_seconds": 0})  # fmt: skip
        try:
            with MqttProbe(broker.host, broker.port) as watcher, MqttProbe(broker.host, broker.port) as sender:
                watcher.subscribe(f"{fleet.prefix}/#")
                side = Side("mosquitto", fleet, watcher, sender, Tally(watcher, fleet))
                t0 = time.monotonic()
                fleet.start()
                wait_started(side, fleet.devices, 300)
                log(f"mosquitto: {k} agents up in {time.monotonic() - t0:.1f} s")
                yield side
        finally:
            fleet.stop()


@contextlib.contextmanager
def nats_side(k: int, work: Path, camera: CameraSim) -> Iterator[Side]:
    cluster = NatsCluster(work / "nats")
    fleet: Fleet | None = None
    try:
        cluster.start()
        addresses = cluster.addresses
        fleet = Fleet(work / "fleet", k=k, prefix=f"fn{uuid.uuid4().hex[:6]}", mqtt_port=1,
                      cameras={"cam1": camera.url("cam1")}, groups_for=lambda _i: [GROUP], recording=RECORDING,
                      mqtt_for=lambda i: {"protocol": "3.1.1", "hosts": addresses[i % 3:] + addresses[: i % 3],
                                          "reconnect_max_seconds": 6},
                      extra={"telemetry_seconds": 0})  # fmt: skip
        n1, n3 = cluster.nodes[0], cluster.nodes[2]
        with NatsProbe(n3.host, n3.port, protocol=4) as watcher, MqttProbe(n1.host, n1.port, protocol=4) as sender:
            watcher.subscribe(f"{fleet.prefix}/#")
            side = Side("nats", fleet, watcher, sender, Tally(watcher, fleet))
            t0 = time.monotonic()
            # In waves, JetStream settled in between: all at once, the JetStream API inside NATS
            # timed out (4 s) and refused agents' QoS 1 subscriptions (tests/test_e2e_fleet.py).
            for w in range(0, k, NATS_WAVE):
                wave = fleet.devices[w : w + NATS_WAVE]
                for device in wave:
                    fleet.agents[device].start()
                wait_started(side, wave, 120)
                deadline = time.monotonic() + 60
                while (why := cluster.jetstream_unsettled()) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if why:
                    raise RuntimeError(f"JetStream not settled after wave {w}: {why}")
            refused = [d for d in fleet.devices if fleet.grep(d, "refused a subscription")]
            if refused:
                log(f"nats: subscriptions refused at start (agents retry): {refused}")
            log(f"nats: {k} agents up in {time.monotonic() - t0:.1f} s")
            yield side
    finally:
        if fleet is not None:
            fleet.stop()
        cluster.stop()


def wait_started(side: Side, devices: list[str], timeout: float) -> None:
    side.tally.wait_each("config/reported", lambda r: GROUP in r["groups"], timeout, f"{side.name}: reported",
                         devices)  # fmt: skip


def run_k(k: int, rounds: int, work: Path, rows: list[dict[str, Any]]) -> None:
    timeout = 30 + 0.5 * k  # a member silent this long never got the command (see group())
    # One simulator per side: one GStreamer RTSP server with 100 readers coming and going (the two
    # fleets in turn) left FFmpeg failing to connect ("exited with code 1") in a first full run.
    with CameraSim(work / "cam-m", mounts=("cam1",), width=320, height=180, fps=10) as cam_m, \
            CameraSim(work / "cam-n", mounts=("cam1",), width=320, height=180, fps=10) as cam_n, \
            mosquitto_side(k, work / "m", cam_m) as mosq, nats_side(k, work / "n", cam_n) as nats:  # fmt: skip
        sides = {"mosquitto": mosq, "nats": nats}
        for r in range(rounds):
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            for name in order:
                row = one_round(sides[name], timeout)
                row.update(round=r, first=order[0])
                rows.append(row)
                log(f"K={k} round {r + 1}/{rounds} {name}: " + ", ".join(
                    f"{key} {fmt(row[key])}" for key in METRICS) + f", failed {row['failed']}, "
                    f"duplicate replies {row['duplicate_replies']}")  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for k in sorted({r["k"] for r in rows}):
        out[str(k)] = {}
        for side in SIDES:
            mine = [r for r in rows if r["k"] == k and r["side"] == side]
            out[str(k)][side] = {m: summary([r[m] for r in mine if r[m] is not None])
                                 for m in [*METRICS, "rollout_publish_s"]}  # fmt: skip
            out[str(k)][side]["rounds_with_lost_commands"] = sum(1 for r in mine if r.get("lost"))
    return out


def cell(s: dict[str, Any], scale: float = 1.0) -> str:
    if not s.get("n"):
        return "-"
    return f"{fmt(s['median'] * scale)} ({fmt(s['min'] * scale)}-{fmt(s['max'] * scale)})"


def table(summ: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = []
    for k, sides in summ.items():
        for key, label in METRICS.items():
            scale, unit = (1000.0, "ms") if key in ("rtt_s", "transit_s") else (1.0, "s")
            rows.append([k, f"{label} ({unit})", cell(sides["mosquitto"][key], scale), cell(sides["nats"][key], scale)])
    return md_table(["K", "median (min-max) over rounds", "one Mosquitto", "3 NATS nodes"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None, help="e.g. 10,50")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--results-dir", type=Path, default=None, help="where fleetmgmt_*.json go (docs/results)")
    ap.add_argument("--table", type=Path, default=None, help="only print the table of this results file")
    args = ap.parse_args()
    if args.table is not None:
        doc = json.loads(args.table.read_text())
        print(table(doc["summary"]))
        return
    sizes = args.sizes or ([5, 10] if args.quick else [10, 50, 100] if args.full else [10, 25])
    rounds = args.rounds or (1 if args.quick else 3)
    load_before = loadavg()
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    error = None
    with tempfile.TemporaryDirectory(prefix="bench-fleetmgmt-") as tmp:
        work = Path(tmp)
        try:
            for k in sizes:
                run_k(k, rounds, work / f"k{k}", rows)
        except (AssertionError, RuntimeError, OSError) as exc:  # keep what was measured, say what stopped it
            error = str(exc)[:2000]
            log(f"stopped early: {error}")
    summ = summarise(rows)
    print()
    print(table(summ))
    problems = [r for r in rows if r["failed"] or r["duplicate_replies"] or r["missing_replies"] or r.get("lost")]
    print(f"\nrounds with failed tasks, duplicate or missing replies, or a command some member never got: "
          f"{len(problems)}")  # fmt: skip
    for r in problems:
        lost = [(x["action"], len(x["devices"]), x["resent_recovered"]) for x in r.get("lost", [])]
        print(
            f"  K={r['k']} {r['side']} round {r['round'] + 1}: failed {r['failed']}, "
            f"duplicates {r['duplicate_replies']}, lost (action, members, recovered by resending) {lost}"
        )
    path = write_docs_results("fleetmgmt", {
        "quick": args.quick,
        "settings": {"sizes": sizes, "rounds": rounds, "group": GROUP, "nats_wave": NATS_WAVE,
                     "camera": "320x180 10 fps H.264, one shared simulator mount per side, video copy",
                     "storage": "local", "recording": RECORDING,
                     "brokers": {"mosquitto": "one Mosquitto 2 (MQTT 5 agents)",
                                 "nats": f"3 NATS nodes, JetStream + MQTT 3.1.1 ({nats_version()})"},
                     "sender_watcher": "mosquitto: both on the broker; nats: sender on node 1, watcher on node 3"},
        "facts": run_facts(load_before), "elapsed_s": time.monotonic() - started, "stopped_early": error,
        "summary": summ, "rounds": rows,
    }, args.results_dir)  # fmt: skip
    print(f"results: {path}")


if __name__ == "__main__":
    main()
