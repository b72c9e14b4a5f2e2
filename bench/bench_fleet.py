"""Fleet: K agent processes on one broker; one platform client starts every camera at once.

Measures, as K grows, the time from publishing K `start` commands until every retained status reads
`recording`, beside the broker's own publish->receive round trip measured in the same run.

    .venv/bin/python bench/bench_fleet.py            # K = 10, 25
    .venv/bin/python bench/bench_fleet.py --full     # K = 10, 50, 100
    .venv/bin/python bench/bench_fleet.py --quick    # K = 5, 10

Each run writes its rows with the commit and machine facts to ``docs/results/fleet_<date-time>.json``
and ``fleet_latest.json`` (``--results-dir``); ``bench/plot.py`` draws ``docs/img/fleet_latency.png``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from _common import broker_rtt_samples, loadavg, md_table, run_facts, write_docs_results
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, write_config


def run_fleet(k: int, workdir: Path, broker: Mosquitto, camera: CameraSim) -> dict[str, float]:
    prefix = f"fleet{uuid.uuid4().hex[:6]}"
    agents = []
    try:
        for i in range(k):
            cfg = write_config(
                workdir / f"a{i}" / "agent.yaml", device_id=f"dev{i:04d}", mqtt_port=broker.port, topic_prefix=prefix,
                cameras={"cam1": {"url": camera.url("cam1"), "video": "copy"}}, output_dir=workdir / f"a{i}" / "rec",
                storage={"type": "local", "min_free_bytes": 0}, mqtt={"reconnect_min_seconds": 1},
            )  # fmt: skip
            agents.append(AgentProcess(cfg, workdir / f"a{i}").start())
        with MqttProbe(broker.host, broker.port) as platform:
            platform.subscribe(f"{prefix}/+/status")
            platform.subscribe(f"{prefix}/+/cam1/status")
            for i in range(k):
                platform.wait_for_raw(f"{prefix}/dev{i:04d}/status", lambda p: p == b"online", timeout=120)
            rtt = statistics.median(broker_rtt_samples(platform))
            t0 = time.monotonic()
            for i in range(k):
                platform.publish(f"{prefix}/dev{i:04d}/cam1/cmd", {"action": "start", "task_name": "fleet"}, qos=1)
            sent = time.monotonic() - t0
            for i in range(k):
                platform.wait_for(f"{prefix}/dev{i:04d}/cam1/status", lambda p: p["status"] == "recording", 120)
            all_recording = time.monotonic() - t0
            for i in range(k):
                platform.publish(f"{prefix}/dev{i:04d}/cam1/cmd", {"action": "stop", "task_name": "fleet"}, qos=1)
            t1 = time.monotonic()
            for i in range(k):
                platform.wait_for(f"{prefix}/dev{i:04d}/cam1/status", lambda p: p["status"] in ("completed", "failed"),
                                  120)  # fmt: skip
            all_done = time.monotonic() - t1
            failed = sum(
                1 for i in range(k) if platform.messages(f"{prefix}/dev{i:04d}/cam1/status")[-1]["status"] == "failed"
            )
    finally:
        for a in agents:
            a.stop(timeout=30)
    return {"k": k, "broker_rtt_s": rtt, "publish_all_s": sent, "all_recording_s": all_recording,
            "all_completed_s": all_done, "failed": failed}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=None, help="where fleet_*.json go (docs/results)")
    args = ap.parse_args()
    load_before = loadavg()
    started = time.monotonic()
    sizes = [5, 10] if args.quick else [10, 50, 100] if args.full else [10, 25]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        with Mosquitto(work / "mq") as broker, CameraSim(work / "cam", mounts=("cam1",)) as camera:
            for k in sizes:
                rows.append(run_fleet(k, work / f"k{k}", broker, camera))
                r = rows[-1]
                rtt_ms = r["broker_rtt_s"] * 1000
                print(f"K={k}: all recording after {r['all_recording_s']:.2f} s, broker RTT {rtt_ms:.1f} ms")
    print()
    print(md_table(
        ["agents K", "broker RTT (ms)", "publish K starts (s)", "start -> all `recording` (s)",
         "stop -> all `completed` (s)", "failed"],
        [[r["k"], f"{r['broker_rtt_s']*1000:.1f}", f"{r['publish_all_s']:.2f}", f"{r['all_recording_s']:.2f}",
          f"{r['all_completed_s']:.2f}", r["failed"]] for r in rows],
    ))  # fmt: skip
    path = write_docs_results("fleet", {
        "quick": args.quick, "settings": {"sizes": sizes, "camera": "720p25 copy, one shared simulator mount",
                                          "storage": "local", "broker": "one Mosquitto"},
        "facts": run_facts(load_before), "elapsed_s": time.monotonic() - started, "rows": rows,
    }, args.results_dir)  # fmt: skip
    print(f"results: {path}")


if __name__ == "__main__":
    main()
