"""Capacity: how many 1080p25 cameras one device records at once in copy mode, for D minutes.

One camera simulator, 1920x1080 25 fps ``smpte horizontal-speed=4`` (moving bars, so the H.264
stream has real P-frames, about 2.2 Mbit/s), with ONE shared mount: one x264 encoder serves every
client, so N recording clients cost the simulator almost nothing more than one. The agent's config
needs distinct camera ids, so N cameras ``cam001..camN`` all point at the same mount
(``--url-style query`` appends ``?n=i`` to each URL instead; the GStreamer RTSP server accepts both).

The agent (``video: copy``, storage local, ``segment_seconds`` 4) is told to start all N at once;
the benchmark waits until every retained status reads ``recording``, lets them record D minutes
while sampling CPU (schedstat ns of the agent and of its FFmpeg children), RSS and the load average
every few seconds, then stops all N at once. Each finished MP4 is checked with ffprobe: its duration
must be within 1 s of the wall-clock recording time of that camera, measured from the arrival of its
``recording`` status to the arrival of its ``stopping`` status (the stop the agent acted on); the
final status must be ``completed`` with no ``interruptions``.

    .venv/bin/python bench/bench_capacity.py [--quick] [--cameras N] [--minutes D]

Defaults N=64, D=10; ``--quick`` N=16, D=1.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _common import (
    TreeCpu,
    fmt,
    loadavg,
    log,
    md_table,
    pids_cpu_ns,
    summary,
    vm_rss_kib,
    workdir,
    write_results,
)
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, ffprobe_info, write_config

DEVICE = "edge-cap"
PATTERN = "smpte horizontal-speed=4"  # camsim interpolates --pattern into the videotestsrc launch line


class Sampler(threading.Thread):
    """Every ``period`` s: TreeCpu snapshot of the agent, RSS of the agent and its children, loadavg."""

    def __init__(self, agent_pid: int, camsim_pid: int | None, period: float) -> None:
        super().__init__(daemon=True)
        self.agent_pid, self.camsim_pid, self.period = agent_pid, camsim_pid, period
        self.tree = TreeCpu(agent_pid)
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def sample(self) -> dict[str, Any]:
        snap = self.tree.snapshot()
        kids = list(snap["kids"])
        kid_rss = [vm_rss_kib(p) or 0 for p in kids]
        cam = pids_cpu_ns([self.camsim_pid]) if self.camsim_pid else {}
        return {
            "snap": snap,
            "agent_rss_mb": (vm_rss_kib(self.agent_pid) or 0) / 1024,
            "children": len(kids),
            "children_rss_mb": sum(kid_rss) / 1024,
            "loadavg": loadavg(),
            "camsim_ns": sum(cam.values()),
        }

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self.sample())
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def window_metrics(samples: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """CPU cores, RSS and load over the recording window (first to last sample)."""
    if len(samples) < 2:
        return {}
    a, b = samples[0], samples[-1]
    cpu = TreeCpu.between(a["snap"], b["snap"])
    wall = cpu["wall_s"]
    return {
        "cpu": {
            "window_s": wall,
            "agent_python_cores": cpu["ns_own_cpu_s"] / wall,
            "ffmpeg_cores": cpu["ns_children_cpu_s"] / wall,
            "total_cores": cpu["ns_cpu_s"] / wall,
            "per_camera_cores": cpu["ns_cpu_s"] / wall / n,
            "camsim_cores": (b["camsim_ns"] - a["camsim_ns"]) / 1e9 / wall,
            "ticks_total_cores": cpu["cpu_s"] / wall,
        },
        "rss": {
            "agent_mb": summary([s["agent_rss_mb"] for s in samples]),
            "children_mb": summary([s["children_rss_mb"] for s in samples]),
            "children_count": summary([s["children"] for s in samples]),
        },
        "loadavg_1m": summary([s["loadavg"][0] for s in samples]),
    }


def run(n: int, minutes: float, url_style: str, sample_period: float, final_timeout: float) -> dict[str, Any]:
    base = workdir("capacity")
    prefix = f"cap{uuid.uuid4().hex[:6]}"
    cams = [f"cam{i + 1:03d}" for i in range(n)]
    result: dict[str, Any] = {"n": n, "minutes": minutes, "url_style": url_style}
    try:
        with (
            Mosquitto(base / "mosquitto") as broker,
            CameraSim(base / "camsim", mounts=["cam1"], width=1920, height=1080, fps=25, pattern=PATTERN) as cam,
        ):
            url = cam.url("cam1")
            urls = {c: (f"{url}?n={i}" if url_style == "query" else url) for i, c in enumerate(cams)}
            cfg = write_config(
                base / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix,
                cameras={c: {"url": urls[c]} for c in cams}, output_dir=base / "recordings",
                storage={"type": "local", "min_free_bytes": 0},
                recording={"video": "copy", "segment_seconds": 4},
            )  # fmt: skip
            probe = MqttProbe(broker.host, broker.port)
            agent = AgentProcess(cfg, base / "agent")
            sampler: Sampler | None = None
            try:
                probe.subscribe(f"{prefix}/{DEVICE}/#")
                agent.start()
                probe.wait_for_raw(f"{prefix}/{DEVICE}/status", lambda p: b"online" in p, timeout=60)
                time.sleep(2)  # let the background probes / start-up settle
                status = {c: f"{prefix}/{DEVICE}/{c}/status" for c in cams}
                name = "cap"

                def is_(st: tuple[str, ...]) -> Any:
                    return lambda p: p.get("task_name") == name and p.get("status") in st

                sampler = Sampler(agent.pid, cam.pid, sample_period)
                t0 = time.monotonic()
                for c in cams:
                    probe.publish(
                        f"{prefix}/{DEVICE}/{c}/cmd", {"action": "start", "task_name": name, "request_id": f"{c}-s"}
                    )
                publish_s = time.monotonic() - t0
                rec_at: dict[str, float] = {}
                failed_start: dict[str, Any] = {}
                for c in cams:
                    m = probe.wait_for_message(status[c], is_(("recording", "failed")), timeout=180)
                    if m.json()["status"] == "recording":
                        rec_at[c] = m.received_at
                    else:
                        failed_start[c] = m.json()
                all_rec = max(rec_at.values()) - t0 if rec_at else math.nan
                log(f"N={n}: {len(rec_at)} recording, {len(failed_start)} failed; all recording after {all_rec:.2f} s")
                result.update(publish_starts_s=publish_s, start_to_all_recording_s=all_rec,
                              start_to_recording=summary([v - t0 for v in rec_at.values()]),
                              failed_at_start=failed_start)  # fmt: skip
                sampler.start()
                t_end = time.monotonic() + minutes * 60
                next_log = time.monotonic() + 60
                while time.monotonic() < t_end:
                    time.sleep(min(5.0, max(0.0, t_end - time.monotonic())))
                    if not agent.is_alive():
                        raise RuntimeError(f"agent exited during the run\n{agent.log_excerpt()}")
                    if time.monotonic() >= next_log and sampler.samples:
                        s = sampler.samples[-1]
                        log(
                            f"  {int((time.monotonic() - t0) / 60)} min: {s['children']} ffmpeg, load {s['loadavg']}, "
                            f"agent RSS {s['agent_rss_mb']:.1f} MB, ffmpeg RSS {s['children_rss_mb']:.0f} MB"
                        )
                        next_log += 60
                sampler.stop()
                result.update(window_metrics(sampler.samples, n))
                log(
                    f"N={n}: recording window: {result.get('cpu')}; "
                    f"agent RSS max {result.get('rss', {}).get('agent_mb', {}).get('max')}"
                )
                t1 = time.monotonic()
                for c in cams:
                    probe.publish(
                        f"{prefix}/{DEVICE}/{c}/cmd", {"action": "stop", "task_name": name, "request_id": f"{c}-e"}
                    )
                finals: dict[str, dict[str, Any]] = {}
                stop_at: dict[str, float] = {}
                deadline = t1 + final_timeout
                for c in cams:
                    try:
                        m = probe.wait_for_message(status[c], is_(("completed", "failed", "stopped")),
                                                   timeout=max(0.1, deadline - time.monotonic()))  # fmt: skip
                    except AssertionError:
                        last = probe.messages(status[c])
                        finals[c] = {**(last[-1] if last else {}), "status": "not final within --final-timeout"}
                        continue
                    finals[c] = m.json()
                    with_stop = [x for x in probe.raw(status[c]) if x.payload and b'"stopping"' in x.payload]
                    if with_stop:
                        stop_at[c] = with_stop[-1].received_at
                all_done = time.monotonic() - t1
                log(f"N={n}: stop -> all final after {all_done:.2f} s")
                rows = []
                for c in cams:
                    doc = finals[c]
                    row: dict[str, Any] = {"camera": c, "status": doc.get("status"),
                                           "interruptions": doc.get("interruptions") or 0,
                                           "agent_duration_s": doc.get("duration_seconds")}  # fmt: skip
                    if c in rec_at:
                        wall = stop_at.get(c, t1) - rec_at[c]
                        row.update(
                            wall_s=wall,
                            wall_to_publish_s=t1 - rec_at[c],
                            stop_mark="stopping" if c in stop_at else "publish",
                        )
                    path = doc.get("local_file")
                    if path and Path(path).exists():
                        try:
                            info = ffprobe_info(path, timeout=120)
                            row["ffprobe_s"] = info["duration"]
                            row["size_bytes"] = Path(path).stat().st_size
                        except AssertionError as exc:
                            row["ffprobe_error"] = str(exc)[-300:]
                        Path(path).unlink(missing_ok=True)  # keep the disk free for the next run
                    if "ffprobe_s" in row and "wall_s" in row:
                        row["delta_s"] = row["ffprobe_s"] - row["wall_s"]
                    rows.append(row)
                log_text = agent.log_text()
                result.update(stop_to_all_final_s=all_done, cameras=rows,
                              concat_timeouts=log_text.count("joining the segments timed out"),
                              joined_short_rescreens=log_text.count("joined file short or unreadable"))  # fmt: skip
            finally:
                if sampler is not None and sampler.is_alive():
                    sampler.stop()
                agent.stop()
                probe.close()
            result["camsim_log_tail"] = cam.log_tail(5)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    return result


def report(res: dict[str, Any]) -> list[Any]:
    rows = res.get("cameras", [])
    n = res["n"]
    completed = sum(1 for r in rows if r["status"] == "completed")
    deltas = [r["delta_s"] for r in rows if "delta_s" in r]
    within = sum(1 for d in deltas if abs(d) <= 1.0)
    worst = max((abs(d) for d in deltas), default=math.nan)
    interrupted = sum(1 for r in rows if r["interruptions"])
    cpu = res.get("cpu", {})
    rss = res.get("rss", {})
    ok = completed == n and within == n and interrupted == 0
    res["verdict"] = {"completed": completed, "within_1s": within, "worst_abs_delta_s": worst,
                      "interrupted_cameras": interrupted, "pass": ok}  # fmt: skip
    return [
        n,
        f"{res['minutes']:g} min",
        f"{completed}/{n}",
        f"{within}/{n}",
        f"{fmt(worst)} (median delta {fmt(statistics.median(deltas)) if deltas else '-'})",
        f"{interrupted} cams ({sum(r['interruptions'] for r in rows)} total)",
        fmt(cpu.get("agent_python_cores")),
        fmt(cpu.get("ffmpeg_cores")),
        fmt(cpu.get("per_camera_cores"), 4),
        f"{fmt(rss.get('agent_mb', {}).get('max'))} / {fmt(rss.get('children_mb', {}).get('median'))}",
        fmt(res.get("loadavg_1m", {}).get("median")),
        fmt(res.get("start_to_all_recording_s")),
        fmt(cpu.get("camsim_cores")),
        fmt(res.get("stop_to_all_final_s")),
        f"{res.get('concat_timeouts', '-')} / {res.get('joined_short_rescreens', '-')}",
        "PASS" if ok else "FAIL",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=16, D=1")
    ap.add_argument("--cameras", type=str, default=None, help="N, or comma-separated list (64; quick 16)")
    ap.add_argument("--minutes", type=float, default=None, help="D (10; quick 1)")
    ap.add_argument("--url-style", choices=("same", "query"), default="same",
                    help="every camera uses the same URL, or URL?n=i")  # fmt: skip
    ap.add_argument(
        "--final-timeout",
        type=float,
        default=600.0,
        help="seconds after the stops to wait for every final status (600)",
    )
    ap.add_argument("--sample", type=float, default=5.0, help="sampling period in seconds")
    args = ap.parse_args()
    # a background run ignores SIGINT: make SIGTERM unwind through the finally blocks (parts stopped, dirs removed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    ns = [int(x) for x in args.cameras.split(",")] if args.cameras else [16 if args.quick else 64]
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 10.0)
    results = []
    t_start = time.monotonic()
    for n in ns:
        log(f"N={n} cameras for {minutes:g} min")
        try:
            results.append(run(n, minutes, args.url_style, args.sample, args.final_timeout))
        except (Exception, SystemExit) as exc:  # report how far it got
            log(f"N={n} aborted: {exc!r}"[:2000])
            results.append({"n": n, "minutes": minutes, "error": repr(exc)[:4000]})
    print(f"\n### Capacity: N x 1920x1080 25 fps H.264 (~2.2 Mbit/s, one shared simulator mount), copy mode, "
          f"storage local, segment_seconds 4 (nproc {os.cpu_count()})\n")  # fmt: skip
    table = []
    for res in results:
        if "error" in res:
            table.append([res["n"], f"{res['minutes']:g} min", "error", res["error"][:120]] + [""] * 12)
        else:
            table.append(report(res))
    print(md_table(
        ["N", "recorded", "completed", "MP4 within 1 s", "worst abs(delta) s (median signed)", "interruptions",
         "agent python cores", "ffmpeg cores total", "cores per camera (all)", "RSS MB agent max / ffmpeg total",
         "load 1m median", "start -> all recording s", "camsim cores", "stop -> all final s",
         "concat timeouts / per-segment re-screens", "goal"], table,
    ))  # fmt: skip
    print(
        "\ndelta = ffprobe duration - (arrival of `stopping` - arrival of `recording`) per camera; CPU from "
        "schedstat over the recording window (between all `recording` and the stop)."
    )
    elapsed = time.monotonic() - t_start
    path = write_results("bench_capacity", {"runs": results, "elapsed_s": elapsed, "git_commit": commit}, args.quick)
    print(f"\n(git {commit}; elapsed {elapsed:.0f} s) JSON: {path}")


if __name__ == "__main__":
    main()
