"""Idle footprint: the agent with 16 configured cameras and nothing recording.

Starts Mosquitto, SeaweedFS (storage minio, so the upload workers run too), a camera simulator (so
the URLs are real) and the agent; after it is online and has settled, samples VmRSS from
/proc/PID/status every second and measures CPU (stat utime+stime and schedstat ns) over the window.
Goal: RSS < 60 MB, CPU < 0.5 % of one core.

    .venv/bin/python bench/bench_idle.py [--quick] [--cameras 16] [--storage minio|local]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import uuid
from typing import Any

from _common import TreeCpu, fmt, log, md_table, summary, vm_rss_kib, workdir, write_results
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, write_config

DEVICE = "edge-bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s window")
    ap.add_argument("--window", type=float, default=None, help="seconds (60; quick 20)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after online before measuring")
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--storage", choices=("minio", "local"), default="minio")
    args = ap.parse_args()
    window = args.window or (20.0 if args.quick else 60.0)

    base = workdir("idle")
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    rss: list[float] = []
    try:
        with Mosquitto(base / "mosquitto") as broker, CameraSim(base / "camsim", mounts=["cam1"]) as cam:
            s3 = SeaweedS3(base / "s3").start() if args.storage == "minio" else None
            try:
                storage = s3.storage_config("idle") if s3 else {"type": "local"}
                cameras = {f"cam{i + 1}": {"url": cam.url("cam1")} for i in range(args.cameras)}
                cfg = write_config(
                    base / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix,
                    cameras=cameras, output_dir=base / "recordings", storage=storage,
                )  # fmt: skip
                probe = MqttProbe(broker.host, broker.port)
                agent = AgentProcess(cfg, base / "agent")
                try:
                    probe.subscribe(f"{prefix}/#")
                    t_launch = time.monotonic()
                    agent.start()
                    probe.wait_for_raw(f"{prefix}/{DEVICE}/status", lambda p: b"online" in p, timeout=30)
                    online_s = time.monotonic() - t_launch
                    log(f"online after {online_s:.2f} s; settling {args.settle:g} s")
                    time.sleep(args.settle)
                    n_msgs0 = len(probe.raw())
                    tree = TreeCpu(agent.pid)
                    s0 = tree.snapshot()
                    t_end = time.monotonic() + window
                    while time.monotonic() < t_end:
                        kib = vm_rss_kib(agent.pid)
                        if kib is not None:
                            rss.append(kib / 1024)
                        time.sleep(1.0)
                    s1 = tree.snapshot()
                    cpu = TreeCpu.between(s0, s1)
                    msgs = len(probe.raw()) - n_msgs0
                    threads = len(os.listdir(f"/proc/{agent.pid}/task"))
                    children = len(s1["kids"])
                finally:
                    agent.stop()
                    probe.close()
            finally:
                if s3 is not None:
                    s3.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    r = summary(rss)
    pct = 100 * cpu["ns_cpu_s"] / cpu["wall_s"]
    pct_ticks = 100 * cpu["cpu_s"] / cpu["wall_s"]
    rss_ok = "PASS" if r["max"] < 60 else "FAIL"
    cpu_ok = "PASS" if pct < 0.5 else "FAIL"
    print(f"\n### Idle agent: {args.cameras} cameras configured, storage {args.storage}, window {window:g} s\n")
    print(md_table(
        ["metric", "value", "goal"],
        [
            ["VmRSS median / max (MB)", f"{fmt(r['median'])} / **{fmt(r['max'])}**", f"< 60 MB: {rss_ok}"],
            ["CPU % of one core (schedstat)", f"**{pct:.3f} %**", f"< 0.5 %: {cpu_ok}"],
            ["CPU % of one core (stat ticks)", f"{pct_ticks:.3f} %", ""],
            ["threads / child processes", f"{threads} / {children}", ""],
            ["MQTT messages from the agent in the window", str(msgs), ""],
            ["launch -> retained online (s)", fmt(online_s), ""],
        ],
    ))  # fmt: skip
    data: dict[str, Any] = {
        "cameras": args.cameras, "storage": args.storage, "window_s": window, "rss_mb": r, "cpu": cpu,
        "cpu_percent": pct, "cpu_percent_ticks": pct_ticks, "threads": threads, "children": children,
        "mqtt_messages": msgs, "online_s": online_s, "goal_rss_mb": 60, "goal_cpu_percent": 0.5,
    }  # fmt: skip
    path = write_results("bench_idle", data, args.quick)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
