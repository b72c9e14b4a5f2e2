"""Command latency of the agent, against the floors set by the broker and by FFmpeg itself.

One camera (simulator, 720p25 unless --1080p), the agent process with storage minio (SeaweedFS).
M tasks one after another: publish ``start`` -> retained ``P/D/cam1/status`` says ``recording``;
record a short clip; publish ``stop`` -> retained ``uploaded``. In the same run, the floors:
- broker: MqttProbe publish (QoS 1) -> its own subscription receives it (median of 50);
- FFmpeg: launch -> first ``frame=`` > 0 line of ``-progress pipe:1`` for a bare
  ``ffmpeg ... -i URL -c copy -f null -`` with the agent's -analyzeduration/-probesize and -stats_period.
Margin = p95(start->recording) - (broker floor + FFmpeg floor) (goal <= 0.3 s).

    .venv/bin/python bench/bench_latency.py [--quick] [--tasks M] [--clip S] [--video auto|copy]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import time
import uuid
from typing import Any

from _common import fmt, log, md_table, summary, workdir, write_results
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, write_config

from edge_agent import ffmpeg as ff
from edge_agent.config import RecordingConfig

DEVICE = "edge-bench"


def broker_floor(probe: MqttProbe, prefix: str, count: int) -> list[float]:
    topic = f"{prefix}/floor/ping"
    probe.subscribe(topic)
    out = []
    for i in range(count):
        tag = f"{uuid.uuid4().hex}-{i}".encode()
        t0 = time.monotonic()
        probe.publish(topic, tag, qos=1)
        m = probe.wait_for_raw(topic, lambda p: p == tag, timeout=10)  # noqa: B023
        out.append(m.received_at - t0)
    return out


def ffmpeg_first_frame(url: str, rc: RecordingConfig, timeout: float = 20.0) -> float:
    stream = ff.StreamInput(url, timeout_s=rc.rtsp_timeout_seconds, analyzeduration_us=rc.analyzeduration_us,
                            probesize=rc.probesize)  # the agent's own input options
    argv = [
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1",
        "-stats_period", f"{rc.stats_period_seconds:g}", *stream.input_options(),
        "-map", "0:v:0", "-an", "-c", "copy", "-f", "null", "-",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("frame="):
                try:
                    frames = int(line.split("=", 1)[1])
                except ValueError:
                    continue
                if frames > 0:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                break
        raise RuntimeError("ffmpeg reported no frame")
    finally:
        proc.kill()
        proc.wait(5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 tasks of 3 s (< 2 min)")
    ap.add_argument("--tasks", type=int, default=None, help="M (50; quick 10)")
    ap.add_argument("--clip", type=float, default=None, help="seconds per clip (10; quick 3)")
    ap.add_argument("--video", choices=("auto", "copy"), default="auto", help="recording.video (agent default auto)")
    ap.add_argument("--ffmpeg-runs", type=int, default=None, help="FFmpeg floor samples (15; quick 5)")
    ap.add_argument("--1080p", dest="hd", action="store_true")
    args = ap.parse_args()
    m = args.tasks or (10 if args.quick else 50)
    clip = args.clip or (3.0 if args.quick else 10.0)
    ff_runs = args.ffmpeg_runs or (5 if args.quick else 15)
    width, height = (1920, 1080) if args.hd else (1280, 720)
    rc = RecordingConfig()

    base = workdir("latency")
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    tasks: list[dict[str, Any]] = []
    try:
        with Mosquitto(base / "mosquitto") as broker, SeaweedS3(base / "s3") as s3, CameraSim(
            base / "camsim", width=width, height=height, fps=25
        ) as cam:
            cfg_path = write_config(
                base / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix,
                cameras={"cam1": {"url": cam.url("cam1")}}, output_dir=base / "recordings",
                storage=s3.storage_config("latency"), recording={"video": args.video},
            )  # fmt: skip
            probe = MqttProbe(broker.host, broker.port)
            agent = AgentProcess(cfg_path, base / "agent")
            try:
                probe.subscribe(f"{prefix}/{DEVICE}/#")
                agent.start()
                probe.wait_for_raw(f"{prefix}/{DEVICE}/status", lambda p: b"online" in p, timeout=30)
                status = f"{prefix}/{DEVICE}/cam1/status"
                cmd = f"{prefix}/{DEVICE}/cam1/cmd"
                log("broker floor")
                broker_rtts = broker_floor(probe, prefix, 50)
                log("ffmpeg floor")
                ff = [ffmpeg_first_frame(cam.url("cam1"), rc) for _ in range(ff_runs)]
                for i in range(m):
                    name = f"lat{i}"

                    def is_(st: tuple[str, ...], name: str = name) -> Any:
                        return lambda p: p["task_name"] == name and p["status"] in st

                    t0 = time.monotonic()
                    probe.publish(cmd, {"action": "start", "task_name": name, "request_id": f"{name}-s"})
                    rec = probe.wait_for_message(status, is_(("recording", "failed")), timeout=60)
                    if rec.json()["status"] != "recording":
                        raise RuntimeError(f"task failed: {rec.json()}")
                    starting = probe.wait_for_message(status, is_(("starting",)), timeout=1)
                    time.sleep(max(0.0, clip - (time.monotonic() - rec.received_at)))
                    t1 = time.monotonic()
                    probe.publish(cmd, {"action": "stop", "task_name": name, "request_id": f"{name}-e"})
                    up = probe.wait_for_message(status, is_(("uploaded", "failed")), timeout=120)
                    if up.json()["status"] != "uploaded":
                        raise RuntimeError(f"task failed: {up.json()}")
                    stopping = probe.wait_for_message(status, is_(("stopping",)), timeout=1)
                    uploading = probe.wait_for_message(status, is_(("uploading",)), timeout=1)
                    row = {
                        "task": name, "start_to_starting": starting.received_at - t0,
                        "start_to_recording": rec.received_at - t0, "stop_to_stopping": stopping.received_at - t1,
                        "stop_to_uploading": uploading.received_at - t1, "stop_to_uploaded": up.received_at - t1,
                        "size_bytes": up.json().get("size_bytes"),
                        "duration_seconds": up.json().get("duration_seconds"),
                    }  # fmt: skip
                    tasks.append(row)
                    log(f"{name}: start->recording {row['start_to_recording']:.3f} s, "
                        f"stop->uploaded {row['stop_to_uploaded']:.3f} s")  # fmt: skip
            finally:
                agent.stop()
                probe.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    b = summary(broker_rtts)
    f = summary(ff)
    keys = ["start_to_starting", "start_to_recording", "stop_to_stopping", "stop_to_uploading", "stop_to_uploaded"]
    stats_all = {k: summary([t[k] for t in tasks]) for k in keys}
    stats_warm = {k: summary([t[k] for t in tasks[1:]]) for k in keys} if len(tasks) > 2 else stats_all
    floor = b["median"] + f["median"]
    margin = stats_all["start_to_recording"]["p95"] - floor
    margin_warm = stats_warm["start_to_recording"]["p95"] - floor

    print(f"\n### Command latency: {m} tasks, {clip:g} s clips, {width}x{height}, video {args.video}, storage minio\n")
    rows = []
    for k in keys:
        a, w = stats_all[k], stats_warm[k]
        rows.append([k.replace("_", " "), fmt(a["median"]), fmt(a["p95"]), fmt(a["max"]), fmt(w["median"]),
                     fmt(w["p95"]), fmt(tasks[0][k])])  # fmt: skip
    rows.append(["floor: broker publish->receive", fmt(b["median"]), fmt(b["p95"]), fmt(b["max"]), "", "", ""])
    rows.append(["floor: ffmpeg launch->first frame", fmt(f["median"]), fmt(f["p95"]), fmt(f["max"]), "", "", ""])
    print(md_table(["seconds", "p50", "p95", "max", "p50 (tasks 2..M)", "p95 (tasks 2..M)", "task 1"], rows))
    goal = "PASS" if margin <= 0.3 else "FAIL"
    print(f"\nmargin p95(start->recording) - (broker floor {b['median']:.3f} + ffmpeg floor {f['median']:.3f}) = "
          f"**{margin:.3f} s** (goal <= 0.3 s: {goal}); excluding task 1: {margin_warm:.3f} s")  # fmt: skip
    sizes = [t["size_bytes"] or 0 for t in tasks]
    print(f"clip size median {statistics.median(sizes) / 1e6:.2f} MB, "
          f"duration median {statistics.median([t['duration_seconds'] or 0 for t in tasks]):.2f} s")
    path = write_results("bench_latency", {
        "tasks_count": m, "clip_s": clip, "video": args.video, "resolution": f"{width}x{height}",
        "broker_floor": b, "ffmpeg_floor": f, "tasks": tasks, "stats_all": stats_all, "stats_warm": stats_warm,
        "margin_p95_s": margin, "margin_p95_warm_s": margin_warm, "goal_margin_s": 0.3,
    }, args.quick)  # fmt: skip
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
