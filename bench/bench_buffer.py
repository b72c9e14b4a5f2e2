"""Buffered cameras (pre-roll) against bare FFmpeg: CPU of N always-on rings, start latency, the byte cap.

Two camera simulators with the same settings (1280x720 25 fps moving bars, one shared mount each:
every reader of a mount gets the same stream for the same simulator cost), one read by the agent,
one by the plain FFmpegs. Per round, side by side over the same window:

(a) plain: N x ``ffmpeg -rtsp_transport tcp -i URL -c copy -movflags +faststart out.mp4``: the floor;
(b) agent: one agent with N cameras, each ``buffer_seconds`` 10 and a ``buffer_max_bytes`` cap,
    storage local, every other setting default: the agent's process tree (its Python and its N ring
    FFmpegs) over the same window, once the rings are full.

Then, on the running agent, K ``start`` commands with ``pre_roll_seconds`` 5 on buffered cameras, one
at a time: publish -> the task's retained ``recording`` status received, beside the broker's own
QoS 1 round trip measured by the same client; each task is stopped before the next. All the while
(the window and the starts) the bytes on disk of every ring directory are sampled every 0.5 s: the
closed segments are compared with the cap; the one FFmpeg is writing comes on top (its size is the
camera's: a segment ends at the first keyframe after 2 s).

CPU is taken two ways over the same window: clock ticks (/proc/PID/stat utime+stime, 10 ms, charged to
whoever runs when the tick fires: a sample) and schedstat nanoseconds (exact on-CPU time, as
bench_ring_forms takes it; ``ratio_ns``).

Results (raw per-round rows, commit and machine facts) go to ``docs/results/buffer_<date-time>.json``.

    .venv/bin/python bench/bench_buffer.py [--quick] [--cameras 16] [--rounds 3] [--window 45] [--starts 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from _common import (
    Child,
    TreeCpu,
    broker_rtt_samples,
    fmt,
    loadavg,
    log,
    md_table,
    percentile,
    pids_cpu_ns,
    pids_cpu_ticks,
    run_facts,
    workdir,
    write_docs_results,
)
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe

from edge_agent import ffmpeg
from edge_agent.config import RecordingConfig

DEVICE = "bench-buf"
CAP = 1024 * 1024  # per camera: less than 10 s of this stream, so the cap, not the time, bounds the ring
PATTERN = "smpte horizontal-speed=4"  # moving bars: about 1 Mbit/s at 720p


def ring_bytes(ring: Path) -> tuple[int, int]:
    """(bytes of the ring on disk, the same): what its files hold in blocks.

    The agent cuts the ring itself (edge_agent.ringcut): its segments are byte ranges of FFmpeg's
    ``ring_*.mp4`` run files, and dropped ones are punched out, so the blocks (not the sizes) are
    what the ring holds. With FFmpeg's segment muxer (a file system without holes) it is the
    ``seg_*`` files; the newest is the one being written (the first figure leaves it out).
    """
    runs = list(ring.glob(ffmpeg.RING_FILE_GLOB))
    if runs:
        held = 0
        for p in runs:
            try:
                held += p.stat().st_blocks * 512
            except OSError:  # removed while we looked
                pass
        return held, held
    sizes: dict[str, int] = {}
    for p in ring.glob("seg_*"):
        try:
            sizes[p.name] = p.stat().st_size
        except OSError:  # pruned while we looked
            pass
    total = sum(sizes.values())
    newest = max(sizes, default=None)  # names sort by number: the newest is the one being written
    return total - (sizes[newest] if newest else 0), total


def files(ring: Path) -> list[tuple[str, int]]:
    """(name, bytes held) of the ring's files: blocks, since run files are sparse."""
    out = []
    for p in ring.iterdir():
        try:
            out.append((p.name, p.stat().st_blocks * 512))
        except OSError:
            pass
    return out


class ByteWatch(threading.Thread):
    """Samples the bytes of every ring directory every 0.5 s; keeps the largest seen per ring."""

    def __init__(self, rings: list[Path]) -> None:
        super().__init__(name="bytewatch", daemon=True)
        self.rings = rings
        self.max_seen = dict.fromkeys(map(str, rings), 0)  # closed segments
        self.max_total = dict.fromkeys(map(str, rings), 0)  # with the segment being written
        self.samples = 0
        self.worst_files: dict[str, list[tuple[str, int]]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for ring in self.rings:
                size, total = ring_bytes(ring)
                self.max_total[str(ring)] = max(self.max_total[str(ring)], total)
                if size > self.max_seen[str(ring)]:
                    self.max_seen[str(ring)] = size
                    self.worst_files[str(ring)] = sorted(files(ring))
            self.samples += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 cameras, 1 round, 15 s window, 5 starts")
    ap.add_argument("--cameras", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--window", type=float, default=None)
    ap.add_argument("--starts", type=int, default=None)
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    n = args.cameras or (4 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 3)
    window = args.window or (15.0 if args.quick else 45.0)
    starts = args.starts or (5 if args.quick else 20)
    load_before = loadavg()
    base = workdir("buffer")
    rows: list[dict[str, Any]] = []
    latency: list[float] = []
    rtts: list[float] = []
    t_start = time.monotonic()
    # Two simulators with the same settings: one for the agent's rings, one for the plain FFmpegs. With
    # one shared mount, the plain clients joining and leaving each round made the GStreamer server
    # burst its stream to everyone (measured: 12 s of stream time in 20 s of wall time, one 2-second
    # segment of 2.1 MB instead of 0.5 MB), which is the simulator's doing, not a camera's.
    with Mosquitto(base / "mq") as broker, \
            CameraSim(base / "cam", mounts=["cam1"], width=1280, height=720, fps=25, pattern=PATTERN) as cam, \
            CameraSim(base / "cam-plain", mounts=["cam1"], width=1280, height=720, fps=25, pattern=PATTERN) as cam2:
        url, plain_url = cam.url("cam1"), cam2.url("cam1")
        cams = [f"c{i:02d}" for i in range(n)]
        rings = [base / "rings" / c for c in cams]
        prefix = f"buf{uuid.uuid4().hex[:6]}"
        config = {
            "device_id": DEVICE,
            "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": prefix},
            "cameras": {c: {"url": url, "buffer_seconds": 10, "buffer_max_bytes": CAP, "buffer_dir": str(r)}
                        for c, r in zip(cams, rings, strict=True)},
            "recording": {"output_dir": str(base / "recordings")},
            "storage": {"type": "local"},
        }  # fmt: skip
        cfg_path = base / "agent.yaml"
        cfg_path.write_text(yaml.safe_dump(config))
        with MqttProbe(broker.host, broker.port) as probe:
            probe.subscribe(f"{prefix}/#")
            agent = AgentProcess(cfg_path, base / "agent").start()
            probe.wait_for_raw(f"{prefix}/{DEVICE}/status", lambda p: b"online" in p, timeout=60)
            watch = ByteWatch(rings)
            log(f"{n} buffered cameras: waiting for the rings to fill")
            time.sleep(15.0)
            # Sampled once every ring has moved past its first segments: at start-up the rings join the
            # simulator's shared mount at once and it bursts (measured: a first segment of ~4.5 MB,
            # 15 s long in wall time); the ring keeps its newest segment whatever its size.
            # 8 segments in: the agent cuts its rings itself (no segment files, FFmpeg's run files); on a
            # file system without holes the segment muxer names them.
            deadline = time.monotonic() + 90
            while not all(any(r.glob(ffmpeg.RING_FILE_GLOB)) or (r / "seg_000000.mp4").exists() for r in rings):
                if time.monotonic() > deadline:
                    raise RuntimeError("the rings never started")
                time.sleep(0.5)
            time.sleep(8 * 2.0)
            watch.start()
            try:
                for rnd in range(rounds):
                    plain = [Child(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-rtsp_transport", "tcp",
                                    "-i", plain_url, "-c", "copy", "-movflags", "+faststart",
                                    str(base / f"plain{rnd}-{i}.mp4")], base / "logs" / f"plain{rnd}-{i}.log",
                                   stdin=True) for i in range(n)]  # fmt: skip
                    time.sleep(5.0)  # plain FFmpegs past their start-up
                    tree = TreeCpu(agent.pid)
                    pids = [c.pid for c in plain]
                    a0, p0, n0, t0 = tree.snapshot(), pids_cpu_ticks(pids), pids_cpu_ns(pids), time.monotonic()
                    time.sleep(window)
                    a1, p1, n1 = tree.snapshot(), pids_cpu_ticks(pids), pids_cpu_ns(pids)
                    wall = time.monotonic() - t0
                    for c in plain:
                        c.quit()
                    for c in plain:
                        c.reap(30)
                    agent_cpu = TreeCpu.between(a0, a1)
                    plain_cpu = sum(p1.get(pid, 0) - p0.get(pid, 0) for pid in p1) / 100.0
                    # The same window in schedstat nanoseconds (what bench_ring_forms uses): utime/stime
                    # are charged in whole 10 ms ticks to whoever runs when the tick fires, a sample.
                    plain_ns = sum(n1.get(pid, 0) - n0.get(pid, 0) for pid in n1) / 1e9
                    row = {"round": rnd, "n": n, "window_s": wall, "agent_cpu_s": agent_cpu["cpu_s"],
                           "agent_python_cpu_s": agent_cpu["own_cpu_s"], "plain_cpu_s": plain_cpu,
                           "ratio": agent_cpu["cpu_s"] / plain_cpu if plain_cpu else float("nan"),
                           "agent_cpu_ns_s": agent_cpu["ns_cpu_s"], "agent_python_cpu_ns_s": agent_cpu["ns_own_cpu_s"],
                           "plain_cpu_ns_s": plain_ns,
                           "ratio_ns": agent_cpu["ns_cpu_s"] / plain_ns if plain_ns else float("nan"),
                           "plain_alive": sum(c.returncode is None for c in plain)}  # fmt: skip
                    rows.append(row)
                    log(f"round {rnd}: agent {row['agent_cpu_s']:.2f} CPU-s (python {row['agent_python_cpu_s']:.2f}),"
                        f" plain {plain_cpu:.2f} CPU-s over {wall:.0f} s: ratio {row['ratio']:.3f}; schedstat: agent "
                        f"{row['agent_cpu_ns_s']:.2f} (python {row['agent_python_cpu_ns_s']:.2f}), "
                        f"plain {plain_ns:.2f}: ratio {row['ratio_ns']:.3f}")  # fmt: skip
                rtts = broker_rtt_samples(probe, 30)
                rng = random.Random(7)
                for k in range(starts):
                    camera = rng.choice(cams)
                    name = f"s{k}"
                    topic = f"{prefix}/{DEVICE}/{camera}/tasks/{name}"
                    t0 = time.monotonic()
                    probe.publish(f"{prefix}/{DEVICE}/{camera}/cmd",
                                  {"action": "start", "task_name": name, "pre_roll_seconds": 5}, qos=1)  # fmt: skip
                    msg = probe.wait_for_message(topic, lambda p: p.get("status") == "recording", timeout=30)
                    latency.append(msg.received_at - t0)
                    probe.publish(f"{prefix}/{DEVICE}/{camera}/cmd", {"action": "stop", "task_name": name}, qos=1)
                    probe.wait_for(topic, lambda p: p.get("status") in ("completed", "failed"), timeout=60)
            finally:
                watch.stop.set()
                watch.join(5)
                agent.stop(timeout=60)
    elapsed = time.monotonic() - t_start
    ratios = [r["ratio"] for r in rows]
    lat = {"p50": percentile(latency, 50), "p95": percentile(latency, 95), "max": max(latency)} if latency else {}
    rtt = {"p50": percentile(rtts, 50), "p95": percentile(rtts, 95)} if rtts else {}
    worst_bytes = max(watch.max_seen.values()) if watch.max_seen else 0
    worst_total = max(watch.max_total.values()) if watch.max_total else 0
    print(f"\n### Buffered cameras, {n} x 1280x720 25 fps copy, {rounds} round(s) of {window:g} s\n")
    print(md_table(["round", "agent CPU-s (of which Python)", "plain CPU-s", "ratio agent/plain (goal <= 1.10)"],
                   [[r["round"], f"{r['agent_cpu_s']:.2f} ({r['agent_python_cpu_s']:.2f})", f"{r['plain_cpu_s']:.2f}",
                     f"{r['ratio']:.3f}"] for r in rows]))  # fmt: skip
    median = fmt(statistics.median(ratios)) if ratios else "-"
    print(f"\nratio median {median} [{', '.join(f'{x:.3f}' for x in ratios)}] (clock ticks)")
    ratios_ns = [r["ratio_ns"] for r in rows]
    median_ns = fmt(statistics.median(ratios_ns)) if ratios_ns else "-"
    print(f"ratio median {median_ns} [{', '.join(f'{x:.3f}' for x in ratios_ns)}] (schedstat ns)")
    margin = (lat.get("p95") or 0) - (rtt.get("p95") or 0)
    print(f"start -> recording ({len(latency)} starts): p50 {fmt(lat.get('p50'))} s, p95 {fmt(lat.get('p95'))} s, "
          f"max {fmt(lat.get('max'))} s; broker QoS 1 round trip p50 {fmt(rtt.get('p50'))} s, "
          f"p95 {fmt(rtt.get('p95'))} s; p95 margin {fmt(margin)} s (goal <= 0.050)")  # fmt: skip
    print(f"ring bytes (closed segments): largest seen {worst_bytes} of a {CAP} cap over {watch.samples} samples x "
          f"{n} rings ({'within' if worst_bytes <= CAP else 'OVER'} the cap); with the segment being written: "
          f"{worst_total}")  # fmt: skip
    path = write_docs_results("buffer", {
        "quick": args.quick,
        "settings": {"cameras": n, "rounds": rounds, "window_s": window, "starts": starts, "cap_bytes": CAP,
                     "buffer_seconds": 10, "resolution": "1280x720", "segment_seconds_recording":
                     RecordingConfig().segment_seconds},
        "facts": run_facts(load_before), "elapsed_s": elapsed, "rows": rows,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "ratio_ns_median": statistics.median(ratios_ns) if ratios_ns else None,
        "start_to_recording_s": latency, "broker_rtt_s": rtts, "latency": lat, "rtt": rtt,
        "ring_bytes_max": watch.max_seen,
        "ring_bytes_max_with_open_segment": watch.max_total, "ring_bytes_samples": watch.samples,
        "ring_files_at_max": watch.worst_files,
    }, args.results_dir)  # fmt: skip
    print(f"\n(elapsed {elapsed:.0f} s) results: {path}")


if __name__ == "__main__":
    main()
