"""What making segments durable costs: the recorder's fsync of each closed segment and its directory.

Runs the agent's own `Recorder` (in this process, on its own thread, as the agent does) against the
camera simulator, recording into a directory on the real disk, and times every `_make_durable`
call: wall time (how long the recorder thread is busy, never the agent thread) and the thread's
CPU time. FFmpeg writes each packet through (`flush_packets=1`), so at an fsync there is little
left for the disk to write: the cost is mostly the journal commit of the file system.

    .venv/bin/python bench/bench_fsync.py [--seconds 60] [--segment-seconds 4] [--width 1920 --height 1080]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from _common import fmt, log, md_table, workdir
from parts import CameraSim

from edge_agent import ffmpeg
from edge_agent.recorder import Recorder
from edge_agent.recording import RecorderEvent, RecordingFinished, RecordingSpec


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="recording length")
    ap.add_argument("--segment-seconds", type=int, default=4, help="the agent's default is 4")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--dir", type=Path, default=None, help="where to record (default: a fresh bench workdir)")
    args = ap.parse_args()

    base = workdir("fsync")
    out_dir = args.dir or base / "recordings"
    timings: list[tuple[float, float, int]] = []  # (wall s, thread CPU s, bytes) per call
    original = Recorder._make_durable

    def timed(self: Recorder, names: list[str]) -> None:
        size = sum((self.spec.segment_dir / n).stat().st_size for n in names if (self.spec.segment_dir / n).exists())
        wall, cpu = time.perf_counter(), time.thread_time()
        original(self, names)
        if names:
            timings.append((time.perf_counter() - wall, time.thread_time() - cpu, size))

    Recorder._make_durable = timed  # type: ignore[method-assign]
    events: list[RecorderEvent] = []
    with CameraSim(base / "camsim", mounts=["cam1"], width=args.width, height=args.height, pattern="smpte") as cam:
        ff = ffmpeg.resolve_executable("ffmpeg")
        spec = RecordingSpec(
            task_id="cam1/bench", camera_id="cam1", stream=ffmpeg.StreamInput(cam.url("cam1")), mode="copy",
            segment_dir=out_dir / "cam1" / ".bench.segments", output_file=out_dir / "cam1" / "bench.mp4",
            ffmpeg=ff, ffprobe=ffmpeg.ffprobe_next_to(ff), segment_seconds=args.segment_seconds,
            first_frame_timeout=20, stall_timeout=15, stop_timeout=10, restart_backoff_max=2,
            max_restarts=5, probe_timeout=15, preset="veryfast", stats_period=2.0,
        )  # fmt: skip
        rec = Recorder(spec, events.append)
        log(f"recording {args.seconds:g} s of {args.width}x{args.height} into {out_dir}")
        started_cpu, started_children = time.process_time(), _children_cpu()
        rec.start()
        time.sleep(args.seconds)
        rec.request_stop()
        rec.join(120)  # FFmpeg, the join and ffprobe are reaped by now (the camera is not)
        tree_cpu = time.process_time() - started_cpu + _children_cpu() - started_children
    done = [e for e in events if isinstance(e, RecordingFinished)]
    if not done or not timings:
        raise SystemExit(f"recording failed: {events[-3:]}")
    walls = [t[0] * 1000 for t in timings]
    cpus = [t[1] * 1000 for t in timings]
    sizes = [t[2] / 1e6 for t in timings]
    rows: list[list[Any]] = [
        ["segments made durable", len(timings)],
        ["segment size, MB (median)", fmt(statistics.median(sizes), 2)],
        ["wall per segment, ms: median / p90 / max",
         f"{fmt(statistics.median(walls), 2)} / {fmt(sorted(walls)[int(0.9 * (len(walls) - 1))], 2)} / "
         f"{fmt(max(walls), 2)}"],
        ["recorder-thread CPU per segment, ms (median)", fmt(statistics.median(cpus), 3)],
        ["fsync wall as share of the recording", f"{100 * sum(walls) / 1000 / args.seconds:.3f} %"],
        ["fsync CPU as share of the recording's CPU (recorder + FFmpeg + join)",
         f"{100 * sum(cpus) / 1000 / max(tree_cpu, 1e-9):.2f} %"],
        ["MP4", f"{done[0].duration_seconds:.1f} s, {done[0].size_bytes / 1e6:.1f} MB"],
    ]  # fmt: skip
    print(md_table(["what", "value"], rows))
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
