"""Where a ring buffer's CPU over a plain copy goes: FFmpeg output forms side by side on one stream.

bench_buffer.py measures the agent with buffered cameras against N plain ``ffmpeg -c copy`` and
misses its 1.10 goal. This isolates the FFmpeg part: K copies of each form read one shared mount of
one camera simulator (1280x720 25 fps moving bars, as bench_buffer.py) at once, started interleaved
(plain 1, ring 1, ..., plain 2, ring 2, ...: the order in which readers join a shared mount is the
same for every form), and each form's CPU (schedstat nanoseconds of its processes) is taken over the
same window once all run. Forms:

- ``plain``: ``ffmpeg -rtsp_transport tcp -i URL -c copy -movflags +faststart out.mp4`` (bench_buffer's floor)
- ``ring``: the agent's ring FFmpeg before 2026-12-07 (``edge_agent.ffmpeg.record_argv`` as the buffer called it:
  2 s fragmented-MP4 segments through FFmpeg's segment muxer, no flush per packet, the segment list
  on a pipe, progress every 2 s)
- ``fragmp4``: the same input and fragments, one fragmented MP4 file, no segment muxer
- ``cut``: exactly the agent's ring FFmpeg since it cuts the ring itself (``edge_agent.ffmpeg.ring_argv``:
  one fragmented MP4, a fragment per keyframe, flushed whole; the segment muxer form above is now
  only the fallback on file systems without holes)
- ``plain2``: ``plain`` again: the noise floor of the comparison

Ratios are per round against ``plain``; the rounds rotate which form joins first.

    .venv/bin/python bench/bench_ring_forms.py [--quick] [--copies 8] [--rounds 3] [--window 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    Child,
    fmt,
    loadavg,
    log,
    md_table,
    pids_cpu_ns,
    run_facts,
    summary,
    workdir,
    write_docs_results,
)
from parts import CameraSim

from edge_agent import ffmpeg
from edge_agent.lifecycle import BUFFER_SEGMENT_SECONDS

PATTERN = "smpte horizontal-speed=4"


def stream(url: str) -> ffmpeg.StreamInput:
    return ffmpeg.StreamInput(url=url, transport="tcp", timeout_s=10.0)


def drain(fd: int) -> None:
    """Reads a segment-list pipe until FFmpeg closes it (as the agent's recorder does)."""
    with os.fdopen(fd, "rb") as pipe:
        while pipe.read(4096):
            pass


def forms(url: str, base: Path) -> dict[str, Callable[[int], tuple[list[str], int | None]]]:
    """form -> (copy number -> (argv, the segment-list pipe's write end to pass, or None))."""

    def plain(name: str) -> Callable[[int], tuple[list[str], int | None]]:
        return lambda i: (["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-rtsp_transport", "tcp", "-i", url,
                           "-c", "copy", "-movflags", "+faststart", str(base / f"{name}{i}.mp4")], None)  # fmt: skip

    def ring(i: int) -> tuple[list[str], int | None]:
        seg_dir = base / f"ring{i}"
        seg_dir.mkdir()
        r, w = os.pipe()
        threading.Thread(target=drain, args=(r,), daemon=True).start()
        return ffmpeg.record_argv("ffmpeg", stream(url), seg_dir, mode="copy", segment_seconds=BUFFER_SEGMENT_SECONDS,
                                  segment_list_fd=w, flush_packets=False), w  # fmt: skip

    def fragmp4(i: int) -> tuple[list[str], int | None]:
        argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1", "-stats_period", "2",
                *stream(url).input_options(), "-map", "0:v:0", "-an", "-sn", "-dn", "-c:v", "copy",
                "-f", "mp4", "-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-frag_duration", "1000000",
                str(base / f"frag{i}.mp4")]  # fmt: skip
        return argv, None

    def cut(i: int) -> tuple[list[str], int | None]:
        return ffmpeg.ring_argv("ffmpeg", stream(url), base / (ffmpeg.RING_FILE_PATTERN % i), mode="copy",
                                segment_seconds=BUFFER_SEGMENT_SECONDS), None  # fmt: skip

    return {"plain": plain("plain"), "ring": ring, "fragmp4": fragmp4, "cut": cut, "plain2": plain("plainb")}


def one_round(url: str, base: Path, copies: int, window: float, rotate: int) -> dict[str, float]:
    makers = forms(url, base)
    names = list(makers)
    order = names[rotate % len(names):] + names[: rotate % len(names)]
    children: dict[str, list[Child]] = {name: [] for name in names}
    for i in range(copies):
        for name in order:
            argv, pass_fd = makers[name](i)
            child = Child(argv, base / "logs" / f"{name}{i}.log", stdin=True, pass_fds=(pass_fd,) if pass_fd else ())
            if pass_fd is not None:
                os.close(pass_fd)
            children[name].append(child)
    try:
        time.sleep(8.0)  # past start-up (probing, the first segments)
        before = {name: pids_cpu_ns(c.pid for c in cs) for name, cs in children.items()}
        time.sleep(window)
        after = {name: pids_cpu_ns(c.pid for c in cs) for name, cs in children.items()}
        alive = {name: sum(c.alive() for c in cs) for name, cs in children.items()}
    finally:
        for cs in children.values():
            for c in cs:
                c.quit()
        for cs in children.values():
            for c in cs:
                c.reap(30)
    if any(n != copies for n in alive.values()):
        raise RuntimeError(f"a reader died during the window: {alive}")
    return {name: sum(after[name][pid] - before[name].get(pid, 0) for pid in after[name]) / 1e9 for name in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, 2 copies, 15 s (a smoke run)")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    copies, rounds, window = (2, 1, 15.0) if args.quick else (args.copies, args.rounds, args.window)
    load_before = loadavg()
    base = workdir("ring-forms")
    sim = CameraSim(base / "cam", mounts=("cam1",), width=1280, height=720, fps=25, pattern=PATTERN)
    sim.start()
    rows: list[dict[str, float]] = []
    try:
        for rnd in range(rounds):
            round_dir = base / f"round{rnd}"
            (round_dir / "logs").mkdir(parents=True)
            log(f"round {rnd + 1}/{rounds}: {copies} copies of each form, {window:g} s")
            cpu = one_round(sim.url("cam1"), round_dir, copies, window, rnd)
            rows.append({"round": rnd, **{f"{k}_cpu_s": v for k, v in cpu.items()},
                         **{f"{k}_ratio": v / cpu["plain"] for k, v in cpu.items() if k != "plain"}})  # fmt: skip
    finally:
        sim.stop()
        shutil.rmtree(base, ignore_errors=True)
    names = [k.removesuffix("_ratio") for k in rows[0] if k.endswith("_ratio")]
    ratios = {name: summary([r[f"{name}_ratio"] for r in rows]) for name in names}
    print(f"\n## FFmpeg forms against a plain copy: {copies} copies each, {window:g} s, {rounds} round(s)\n")
    print(md_table(["form", "ratio to plain (median)", "min-max", "per round"],
                   [[n, fmt(ratios[n]["median"]), f"{fmt(ratios[n]['min'])}-{fmt(ratios[n]['max'])}",
                     ", ".join(fmt(v) for v in ratios[n]["values"])] for n in names]))  # fmt: skip
    plain_per_min = statistics.median(r["plain_cpu_s"] for r in rows) / copies / (window / 60)
    print(f"\nplain: {plain_per_min:.3f} CPU-s per camera-minute (median)")
    data = {"quick": args.quick, "settings": {"copies": copies, "rounds": rounds, "window_s": window,
            "resolution": "1280x720", "fps": 25, "segment_seconds": BUFFER_SEGMENT_SECONDS},
            "facts": run_facts(load_before), "rows": rows, "ratios": ratios}  # fmt: skip
    path = write_docs_results("ringforms", data, args.results_dir)
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
