"""The cheapest crash-safe recording form, measured: CPU per camera-minute and loss on SIGKILL.

One camera simulator (1080p25 moving SMPTE bars, one shared mount, so every reader gets the same
stream for the same simulator cost). Per round, side by side over the same window, ``--copies``
FFmpeg processes of every form:

- ``current``: exactly ``edge_agent.ffmpeg.record_argv(mode="copy")`` with the default settings
  (fragmented-MP4 segments of 4 s, a fragment at least every second flushed as written, ``-progress``
  every ``recording.stats_period_seconds``), joined by ``edge_agent.fmp4join.join``;
- ``stats0.5``: the same with ``-stats_period 0.5`` (the earlier default);
- ``mpegts``: the form before it: MPEG-TS segments with every packet flushed (``flush_packets=1``),
  ``-stats_period 0.5``, joined by FFmpeg's concat (``concat_argv``: a remux into a faststart MP4);
- ``hls``: FFmpeg's HLS muxer with fMP4 segments (one muxer for all segments: joined by concatenating
  the files), which holds each segment in memory until it closes;
- ``plain``: the floor, ``ffmpeg -rtsp_transport tcp -i URL -c copy -movflags +faststart out.mp4``
  (not crash-safe: no ``moov`` until a clean exit).

Measured per form:
- steady CPU: /proc/PID/task/*/schedstat nanoseconds over the window, once every process has media;
- finalise: half of the copies get ``q`` (a clean stop, as the agent's recorder does); their exit
  work is their rusage beyond the window, and their segments are joined the form's way (CPU: the
  joining FFmpeg's rusage, or this thread's for a join in Python), so a form that is cheap to record
  but dear to join shows it;
- crash safety: the other half are SIGKILLed right after one of their ``-progress`` reports,
  at a seeded random point of a segment, then every file on disk is probed (``-count_packets``).
  Loss = frames FFmpeg had handed to its muxer at the kill (the report's ``frame=`` plus the time
  since it, at 25 fps) minus video packets readable on disk, in seconds. A SIGKILL keeps the page
  cache: this is the loss of a process crash, not of a power cut (unsynced pages are lost too).

Progress pipes are drained by this script, as the agent drains them. Results go to
``docs/results/forms_<date-time>.json`` and ``forms_latest.json`` with the commit and machine facts.

    .venv/bin/python bench/bench_forms.py [--quick] [--rounds 3] [--window 60] [--copies 2] [--forms a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import random
import resource
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CLK_TCK,
    Child,
    fmt,
    loadavg,
    log,
    md_table,
    pids_cpu_ns,
    pids_cpu_ticks,
    run_child,
    run_facts,
    summary,
    workdir,
    write_docs_results,
)
from parts import CameraSim

from edge_agent import ffmpeg as ff
from edge_agent import fmp4join
from edge_agent.config import RecordingConfig

FPS = 25
PATTERN = "smpte horizontal-speed=4"
FORMS = ("current", "stats0.5", "mpegts", "hls", "plain")
HLS_INIT = "init.mp4"


def _set_option(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def form_argv(form: str, url: str, out: Path) -> list[str]:
    """The command line of ``form``, derived from the agent's own ``record_argv`` (so it tracks the agent)."""
    ffmpeg_bin = shutil.which("ffmpeg") or "ffmpeg"
    if form == "plain":
        return [ffmpeg_bin, "-y", "-rtsp_transport", "tcp", "-i", url, "-c", "copy", "-movflags", "+faststart",
                str(out / "out.mp4")]  # fmt: skip
    cfg = RecordingConfig()
    stats = cfg.stats_period_seconds if form == "current" else 0.5
    if form == "hls":
        return [ffmpeg_bin, "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1",
                "-stats_period", f"{stats:g}", "-rtsp_transport", "tcp", "-i", url, "-map", "0:v:0", "-an",
                "-c:v", "copy", "-f", "hls", "-hls_time", str(cfg.segment_seconds), "-hls_list_size", "0",
                "-hls_segment_type", "fmp4", "-hls_fmp4_init_filename", HLS_INIT,
                "-hls_segment_filename", str(out / "seg_%06d.m4s"), str(out / "index.m3u8")]  # fmt: skip
    stream = ff.StreamInput(url, timeout_s=cfg.rtsp_timeout_seconds, analyzeduration_us=cfg.analyzeduration_us,
                            probesize=cfg.probesize)
    argv = ff.record_argv(ffmpeg_bin, stream, out, mode="copy", segment_seconds=cfg.segment_seconds,
                          stats_period_s=stats)
    if form == "mpegts":
        argv = _set_option(argv, "-segment_format", "mpegts")
        argv = _set_option(argv, "-segment_format_options", "flush_packets=1")
        argv[-1] = str(out / "seg_%06d.ts")
    return argv


def media_files(form: str, out: Path) -> list[Path]:
    if form == "plain":
        return [out / "out.mp4"] if (out / "out.mp4").exists() else []
    if form == "hls":
        init = out / HLS_INIT
        return ([init] if init.exists() else []) + sorted(out.glob("seg_*.m4s"))
    return sorted((p for p in out.glob("seg_*") if ff.is_segment(p)), key=ff.segment_number)


def thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def cat_join(files: list[Path], joined: Path) -> float:
    """Join HLS fMP4 segments: concatenate the files once, hashing them. This thread's CPU-s."""
    t0 = thread_cpu()
    digest = hashlib.sha256()
    with joined.open("wb") as dst:
        for f in files:
            data = f.read_bytes()
            digest.update(data)
            dst.write(data)
    return thread_cpu() - t0


def count_packets(path: Path) -> int | None:
    """Video packets ffprobe can read from ``path`` (None: unreadable, e.g. an MP4 with no moov)."""
    ffprobe = ff.ffprobe_next_to(shutil.which("ffmpeg") or "ffmpeg")
    try:
        done = subprocess.run(
            [ffprobe, "-v", "error", "-select_streams", "v:0", "-count_packets",
             "-show_entries", "stream=nb_read_packets", "-of", "csv=p=0", str(path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    text = done.stdout.strip().split("\n")[0].strip().rstrip(",")
    return int(text) if done.returncode == 0 and text.isdigit() else None


@dataclass
class Recorder:
    """One FFmpeg process of one form, with its progress pipe drained and its last report kept."""

    form: str
    copy: int
    out: Path
    child: Child
    reports: int = 0
    last_frame: int = 0
    last_report_at: float = 0.0
    report_event: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def start_reader(self) -> None:
        self.reader = threading.Thread(target=self._drain, name=f"progress-{self.form}-{self.copy}", daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        stream = self.child.proc.stdout
        if stream is None:
            return
        frame = self.last_frame
        with stream:
            for raw in stream:
                line = raw.strip()
                if line.startswith(b"frame="):
                    with contextlib.suppress(ValueError):
                        frame = int(line[6:])
                elif line.startswith(b"progress="):
                    self.last_frame, self.last_report_at = frame, time.monotonic()
                    self.reports += 1
                    self.report_event.set()

    def has_media(self) -> bool:
        if self.form == "plain":  # no progress: a growing file is its only sign of life
            return (self.out / "out.mp4").exists() and (self.out / "out.mp4").stat().st_size > 0
        return self.last_frame > 0

    def kill_after_report(self, timeout: float) -> dict[str, Any]:
        """SIGKILL right after the next progress report; what FFmpeg had muxed by then."""
        if self.form != "plain":
            self.report_event.clear()
            self.report_event.wait(timeout)
        t_kill = time.monotonic()
        self.child.signal(signal.SIGKILL)
        lag = t_kill - self.last_report_at if self.last_report_at else None
        muxed = self.last_frame + (lag or 0.0) * FPS if self.form != "plain" else None
        return {"t_kill": t_kill, "report_lag_s": lag, "frames_muxed": muxed,
                "wall_since_start_s": t_kill - self.child.started}  # fmt: skip


def run_round(forms: list[str], copies: int, url: str, work: Path, window: float, rng: random.Random,
              rnd: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every form side by side (order shuffled), one window; half the copies killed, half stopped."""
    recs: list[Recorder] = []
    order = [(f, c) for f in forms for c in range(copies)]
    rng.shuffle(order)
    results: list[dict[str, Any]] = []
    try:
        for form, c in order:
            out = work / f"{form}-{c}"
            out.mkdir(parents=True, exist_ok=True)
            child = Child(form_argv(form, url, out), work / "logs" / f"{form}-{c}.log", stdin=True,
                          pipe_stdout=form != "plain")  # fmt: skip
            rec = Recorder(form, c, out, child)
            if form != "plain":
                rec.start_reader()
            recs.append(rec)
        deadline = time.monotonic() + 60
        while not all(r.has_media() for r in recs):
            dead = [r for r in recs if not r.child.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].form} exited before media: see {dead[0].child.argv}")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no media within 60 s from {[r.form for r in recs if not r.has_media()]}")
            time.sleep(0.1)
        time.sleep(2.0)  # settle: the first segment and the simulator's first GOPs are behind us
        pids = [r.child.pid for r in recs]
        ns0, t0 = pids_cpu_ns(pids), time.monotonic()
        time.sleep(window)
        ns1, wall = pids_cpu_ns(pids), time.monotonic() - t0
        if any(not r.child.alive() for r in recs):
            raise RuntimeError(f"exited during the window: {[r.form for r in recs if not r.child.alive()]}")
        # crash half: a seeded random point within a segment, then kill each right after a report
        time.sleep(rng.uniform(0.0, 4.0))
        killed = [r for r in recs if r.copy % 2 == 0]
        stopped = [r for r in recs if r.copy % 2 == 1]
        ticks_at_stop = pids_cpu_ticks(r.child.pid for r in stopped)
        for r in stopped:
            r.child.quit()
        kills = {id(r): r.kill_after_report(timeout=5.0) for r in killed}
        for r in recs:
            r.child.reap(60)
            if r.reader is not None:  # the pipe ends with the process
                r.reader.join(timeout=10)
        for r in recs:
            pid = r.child.pid
            res: dict[str, Any] = {
                "form": r.form, "copy": r.copy, "round": rnd, "window_s": wall,
                "steady_cpu_s": (ns1.get(pid, 0) - ns0.get(pid, 0)) / 1e9,
                "life_cpu_s": r.child.cpu_s, "progress_reports": r.reports,
            }  # fmt: skip
            res["steady_per_min"] = res["steady_cpu_s"] * 60.0 / wall
            files = media_files(r.form, r.out)
            res["files"] = len(files)
            if id(r) in kills:
                k = kills[id(r)]
                if r.form == "hls" and files:  # .m4s files read only behind their init segment
                    cat_join(files, r.out / "joined.mp4")
                    files = [r.out / "joined.mp4"]
                counts = [count_packets(p) for p in files]
                on_disk = sum(x or 0 for x in counts)
                res.update(kind="killed", **k, unreadable_files=sum(1 for x in counts if x is None),
                           packets_on_disk=on_disk, seconds_on_disk=on_disk / FPS)  # fmt: skip
                if k["frames_muxed"] is not None:
                    res["loss_s"] = (k["frames_muxed"] - on_disk) / FPS
                else:  # plain: nothing to compare with but the wall time it ran
                    res["loss_s"] = k["wall_since_start_s"] - on_disk / FPS
            else:
                res["kind"] = "stopped"
                res["exit_code"] = r.child.returncode
                res["exit_work_cpu_s"] = (r.child.cpu_s or 0.0) - ticks_at_stop.get(pid, 0) / CLK_TCK
                res.update(join_form(r, work))
            results.append(res)
    finally:
        for r in recs:
            if r.child.returncode is None:
                r.child.signal(signal.SIGKILL)
                r.child.reap(5)
    return results


def join_form(r: Recorder, work: Path) -> dict[str, Any]:
    """A cleanly stopped form's segments joined the form's way: CPU and media seconds."""
    files = media_files(r.form, r.out)
    joined = r.out / "joined.mp4"
    if r.form == "plain":  # already one faststart MP4: nothing to join
        n = count_packets(files[0]) if files else None
        return {"join_cpu_s": 0.0, "joined_s": (n or 0) / FPS}
    if r.form == "hls":
        cpu = cat_join(files, joined)
    elif r.form == "mpegts":
        listing = r.out / "concat.txt"
        listing.write_text(ff.concat_list([f for f in files if f.stat().st_size > 0]), encoding="utf-8")
        code, cpu, _ = run_child(ff.concat_argv(shutil.which("ffmpeg") or "ffmpeg", listing, joined),
                                 work / "logs" / f"join-{r.form}-{r.copy}.log", 300)  # fmt: skip
        if code != 0:
            return {"join_cpu_s": cpu, "join_exit_code": code, "joined_s": 0.0}
    else:  # the agent's own join
        t0 = thread_cpu()
        fmp4join.join([f for f in files if f.stat().st_size > 0], joined)
        cpu = thread_cpu() - t0
    n = count_packets(joined)
    return {"join_cpu_s": cpu, "join_exit_code": 0 if n else 1, "joined_s": (n or 0) / FPS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 15 s window")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (3; quick 1)")
    ap.add_argument("--window", type=float, default=None, help="steady window seconds (60; quick 15)")
    ap.add_argument("--copies", type=int, default=2, help="processes per form per round (half killed, half stopped)")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma list of {', '.join(FORMS)}")
    ap.add_argument("--720p", dest="sd", action="store_true", help="1280x720 instead of 1920x1080")
    ap.add_argument("--seed", type=int, default=None, help="seed of the start order and kill points (random)")
    ap.add_argument("--results-dir", type=Path, default=None, help="where forms_*.json go (docs/results)")
    args = ap.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        ap.error(f"unknown forms {unknown}")
    if args.copies < 2:
        ap.error("--copies must be at least 2 (one killed, one stopped)")
    rounds_n = args.rounds or (1 if args.quick else 3)
    window = args.window or (15.0 if args.quick else 60.0)
    width, height = (1280, 720) if args.sd else (1920, 1080)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    log(f"seed {seed} (--seed {seed} replays the order and kill points)")

    load_before = loadavg()
    base = workdir("forms")
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        with CameraSim(base / "camsim", mounts=["cam1"], width=width, height=height, fps=FPS, pattern=PATTERN) as cam:
            for rnd in range(rounds_n):
                res = run_round(forms, args.copies, cam.url("cam1"), base / f"r{rnd}", window, rng, rnd)
                rows.extend(res)
                log(f"round {rnd}: " + ", ".join(
                    f"{f} {summary([x['steady_per_min'] for x in res if x['form'] == f])['median']:.3f}"
                    for f in forms) + " CPU-s/min")  # fmt: skip
                shutil.rmtree(base / f"r{rnd}", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    per_form: dict[str, Any] = {}
    cur = summary([r["steady_per_min"] for r in rows if r["form"] == "current"]) if "current" in forms else None
    table = []
    for f in forms:
        rs = [r for r in rows if r["form"] == f]
        steady = summary([r["steady_per_min"] for r in rs])
        stopped = [r for r in rs if r["kind"] == "stopped"]
        killed = [r for r in rs if r["kind"] == "killed"]
        join_per_min = summary([r["join_cpu_s"] * 60.0 / r["joined_s"] for r in stopped if r["joined_s"]])
        exit_work = summary([r["exit_work_cpu_s"] for r in stopped])
        loss = summary([r["loss_s"] for r in killed])
        unreadable = sum(r["unreadable_files"] for r in killed)
        per_form[f] = {"steady_per_cam_min": steady, "join_cpu_per_media_min": join_per_min,
                       "exit_work_cpu_s": exit_work, "sigkill_loss_s": loss, "unreadable_after_kill": unreadable,
                       "argv": " ".join(form_argv(f, "URL", Path("OUT")))}  # fmt: skip
        vs = f"{steady['median'] / cur['median']:.2f}" if cur and cur.get("median") else "-"
        total = steady["median"] + (join_per_min.get("median") or 0.0)
        table.append([
            f"`{f}`", f"{fmt(steady['median'])} ({fmt(steady['min'])}-{fmt(steady['max'])})", vs,
            fmt(join_per_min.get("median")), fmt(total),
            f"{fmt(loss.get('median'))} / {fmt(loss.get('max'))}", unreadable,
        ])  # fmt: skip
    print(f"\n### Recording forms, {width}x{height} 25 fps copy, {rounds_n} round(s) x {args.copies} copies, "
          f"{window:g} s window, seed {seed}\n")  # fmt: skip
    print(md_table(
        ["form", "steady CPU-s per camera-minute median (min-max)", "vs current",
         "join CPU-s per media minute", "steady + join", "SIGKILL loss s median / max",
         "unreadable files after kill"], table,
    ))  # fmt: skip
    print("\nLoss: frames handed to the muxer at the kill minus packets readable on disk (page cache kept: a "
          "process crash, not a power cut). `plain`: its whole recording (no moov).")  # fmt: skip
    path = write_docs_results("forms", {
        "quick": args.quick,
        "settings": {"resolution": f"{width}x{height}", "fps": FPS, "pattern": PATTERN, "rounds": rounds_n,
                     "window_s": window, "copies": args.copies, "forms": forms, "seed": seed},
        "facts": run_facts(load_before), "elapsed_s": elapsed, "per_form": per_form, "rows": rows,
    }, args.results_dir)  # fmt: skip
    print(f"\n(elapsed {elapsed:.0f} s) results: {path}")


if __name__ == "__main__":
    main()
