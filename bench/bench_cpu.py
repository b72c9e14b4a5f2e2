"""Whole-task CPU: the agent against the plain `ffmpeg -c copy` MP4 users compare it with.

For each N (default 1, 4, 16), one camera simulator (1080p25 moving SMPTE bars; shared mounts: one
encoder per mount serves every reader, so the simulator costs the same whichever side reads it) and
one agent with its DEFAULT settings. Per round, over the same wall time, side by side, started and
stopped in an order that rotates between rounds:

(a) plain: N x ``ffmpeg -rtsp_transport tcp -i URL -c copy -movflags +faststart out.mp4``, started
    when the agent is sent ``start`` and sent ``q`` when the agent is sent ``stop``; its whole life,
    including the faststart rewrite at exit. The floor users compare the agent with.
(b) agent: N ``start`` commands, ``stop`` after the clip, until every camera's final status
    (``completed`` with the default local storage, ``uploaded`` with ``--storage s3``), then until
    the agent has no child left: the camera probe (``video: auto``), FFmpeg's fragmented-MP4
    segments, the copying join with its sha256, fsync (and the upload), and the agent's Python meanwhile.
(c) own argv: the agent's FFmpeg work without the agent: ``record_argv`` (the
    agent's form, default settings), then the agent's copying join (``fmp4join.join``). b/c isolates the
    Python (progress parsing, MQTT, journal, fsync); b/a is the headline.

CPU is the whole process tree's utime+stime. The agent's: deltas of /proc/<agent>/stat utime+stime
and cutime+cstime (its FFmpeg children, reaped by the agent, land there whole) plus any descendant
still alive. a and c are children of this script: each is reaped with wait4, whose rusage is the
same per-child figure the kernel adds to cutime/cstime. Ratios are of CPU over the whole task;
a ratio below 1.0 means noise or bias, not an agent cheaper than FFmpeg alone.

Each run writes its raw per-round table with the commit and machine facts to
``docs/results/cpu_<date-time>.json`` and ``docs/results/cpu_latest.json`` (``--results-dir``).

    .venv/bin/python bench/bench_cpu.py [--quick] [--ns 1,4,16] [--rounds 3] [--clip 60] [--storage local|s3]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import signal
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from _common import (
    CLK_TCK,
    Child,
    TreeCpu,
    descendants_of,
    fmt,
    loadavg,
    log,
    md_table,
    pids_cpu_ns,
    pids_cpu_ticks,
    run_facts,
    summary,
    workdir,
    write_docs_results,
)
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3

from edge_agent import ffmpeg as ff
from edge_agent import fmp4join
from edge_agent.config import CameraConfig, RecordingConfig

DEVICE = "edge-bench"
GOAL = 1.10
FINAL = ("completed", "uploaded", "failed")
SIDES = ("agent", "plain", "own")
PATTERN = "smpte horizontal-speed=4"  # moving bars: real P-frames (camsim puts it in its launch line)


def plain_argv(url: str, out: Path) -> list[str]:
    """What users compare with: a plain stream copy into a faststart MP4 (stderr keeps its stats)."""
    return ["ffmpeg", "-y", "-rtsp_transport", "tcp", "-i", url, "-c", "copy", "-movflags", "+faststart", str(out)]


def old_service_argv(url: str, out: Path) -> list[str]:
    """../shared/seed/camera.py.txt `_build_ffmpeg_command` with its defaults (veryfast)."""
    return [
        "ffmpeg", "-y", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp", "-i", url,
        "-an", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-movflags", "+faststart", str(out),
    ]  # fmt: skip


def media_seconds(path: Path) -> float:
    """ffprobe duration of a finished file (0.0 when unreadable); not part of any measured side."""
    ffprobe = ff.ffprobe_next_to(shutil.which("ffmpeg") or "ffmpeg")
    try:
        done = subprocess.run(ff.file_probe_argv(ffprobe, path), capture_output=True, text=True, timeout=30,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return 0.0
    info = ff.parse_file_probe(done.stdout) if done.returncode == 0 else None
    return info.duration if info else 0.0


# ----------------------------------------------------------------------------------- the three sides


class OwnArgv(threading.Thread):
    """(c) for one camera: the agent's FFmpeg work in the agent's order, without the agent.

    Record with ``record_argv`` until ``stop`` is set (no probe: the agent probes a ``video: auto``
    camera once, at start-up or at its first task, and caches the mode; the warm-up task paid it), send
    ``q`` as the recorder does, then join the segments as the agent does (``fmp4join.join``, on this
    thread: its CPU is this thread's rusage; it hashes as it copies).
    """

    def __init__(self, url: str, work: Path, stop: threading.Event) -> None:
        super().__init__(name=f"own-{work.name}", daemon=True)
        self.url, self.work, self.stop = url, work, stop
        self.cpu: dict[str, float] = {}
        self.record: Child | None = None
        self.recording = threading.Event()
        self.record_ticks_at_stop: int | None = None
        self.duration = 0.0
        self.error: str | None = None
        self.started = time.monotonic()
        self.done_at: float | None = None

    def run(self) -> None:
        rec_cfg, transport = RecordingConfig(), CameraConfig.model_fields["rtsp_transport"].default
        ffmpeg_bin = shutil.which(rec_cfg.ffmpeg_path) or rec_cfg.ffmpeg_path
        segdir = self.work / "segments"
        segdir.mkdir(parents=True, exist_ok=True)
        logs = self.work / "logs"
        try:
            stream = ff.StreamInput(self.url, transport=transport, timeout_s=rec_cfg.rtsp_timeout_seconds,
                                    analyzeduration_us=rec_cfg.analyzeduration_us, probesize=rec_cfg.probesize)
            self.record = Child(ff.record_argv(
                ffmpeg_bin, stream, segdir, mode="copy", segment_seconds=rec_cfg.segment_seconds,
                stats_period_s=rec_cfg.stats_period_seconds,
            ), logs / "record.log", stdin=True)  # fmt: skip
            self.recording.set()
            self.stop.wait(timeout=rec_cfg.max_seconds)
            st = pids_cpu_ticks([self.record.pid])
            self.record_ticks_at_stop = st.get(self.record.pid)
            self.record.quit()
            self.cpu["record"] = self.record.reap(rec_cfg.stop_timeout_seconds)
            segments = sorted((s for s in segdir.glob(ff.SEGMENT_GLOB) if ff.is_segment(s) and s.stat().st_size),
                              key=ff.segment_number)  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_THREAD)
            joined = fmp4join.join(segments, self.work / "own.mp4")
            after = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu["join"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            self.duration = joined.seconds
        except Exception as exc:
            self.error = repr(exc)
        finally:
            if self.record is not None and self.record.returncode is None:
                self.record.signal(signal.SIGKILL)
                self.record.reap(5)
            self.done_at = time.monotonic()


class AgentRig:
    """The agent process with N cameras and its DEFAULT settings, driven over MQTT by a probe client."""

    def __init__(self, base: Path, broker: Mosquitto, urls: list[str], storage: dict[str, Any]) -> None:
        self.prefix = f"bench{uuid.uuid4().hex[:6]}"
        self.cams = [f"cam{i + 1}" for i in range(len(urls))]
        # Only what has no default: no recording, MQTT or storage option is changed from the defaults.
        self.config: dict[str, Any] = {
            "device_id": DEVICE,
            "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": self.prefix},
            "cameras": {c: {"url": u} for c, u in zip(self.cams, urls, strict=True)},
            "recording": {"output_dir": str(base / "recordings")},
            "storage": storage,
        }
        cfg = base / "agent.yaml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.probe = MqttProbe(broker.host, broker.port)
        self.probe.subscribe(f"{self.prefix}/#")
        self.agent = AgentProcess(cfg, base / "agent").start()
        self.probe.wait_for_raw(f"{self.prefix}/{DEVICE}/status", lambda p: b"online" in p, timeout=30)
        self.seq = 0

    def topic(self, cam: str, leaf: str) -> str:
        return f"{self.prefix}/{DEVICE}/{cam}/{leaf}"

    def start_all(self) -> str:
        self.seq += 1
        name = f"r{self.seq}"
        self.probe.clear()
        for c in self.cams:
            self.probe.publish(self.topic(c, "cmd"), {"action": "start", "task_name": name, "request_id": f"{name}s"})
        return name

    def wait_recording(self, name: str, timeout: float = 60) -> None:
        for c in self.cams:
            self.probe.wait_for(self.topic(c, "status"),
                                lambda p: p["task_name"] == name and p["status"] == "recording", timeout=timeout)

    def stop_all(self, name: str) -> None:
        for c in self.cams:
            self.probe.publish(self.topic(c, "cmd"), {"action": "stop", "task_name": name, "request_id": f"{name}e"})

    def wait_final(self, name: str, timeout: float) -> list[tuple[dict[str, Any], float]]:
        """Every camera's final status document and when it arrived (monotonic)."""
        out = []
        for c in self.cams:
            msg = self.probe.wait_for_message(
                self.topic(c, "status"), lambda p: p["task_name"] == name and p["status"] in FINAL, timeout=timeout
            )
            out.append((msg.json(), msg.received_at))
        return out

    def wait_no_children(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while descendants_of(self.agent.pid):
            if time.monotonic() >= deadline:
                raise RuntimeError(f"agent still has children {descendants_of(self.agent.pid)} after {timeout} s")
            time.sleep(0.05)

    def close(self) -> None:
        self.agent.stop()
        self.probe.close()


# ------------------------------------------------------------------------------------------ a round


def run_round(rig: AgentRig, urls: list[str], work: Path, rnd: int, clip: float, order: tuple[str, ...],
              camsim_pid: int | None) -> dict[str, Any]:  # fmt: skip
    """One task of ``clip`` seconds on every side at once; CPU of each side over its whole task."""
    n = len(urls)
    work.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    plain: list[Child] = []
    own: list[OwnArgv] = []
    name = ""
    started: dict[str, float] = {}
    load_before = loadavg()
    tree = TreeCpu(rig.agent.pid)
    s0 = tree.snapshot()
    cam0 = pids_cpu_ns([camsim_pid]) if camsim_pid else {}
    try:
        for side in order:
            started[side] = time.monotonic()
            if side == "agent":
                name = rig.start_all()
            elif side == "plain":
                plain = [Child(plain_argv(u, work / f"plain{i}.mp4"), work / "logs" / f"plain{i}.log", stdin=True)
                         for i, u in enumerate(urls)]  # fmt: skip
            else:
                own = [OwnArgv(u, work / f"own{i}", stop) for i, u in enumerate(urls)]
                for t in own:
                    t.start()
        t0 = min(started.values())
        rig.wait_recording(name)
        for t in own:
            if not t.recording.wait(timeout=60):
                raise RuntimeError(f"own-argv recorder never started: {t.error}")
        # A steady window inside the recording (schedstat ns of the recording processes only): a
        # cross-check of the phases, and the recording form's cost without start-up and finalise.
        steady0 = steady_sample(rig, plain, own)
        time.sleep(max(0.0, clip - (time.monotonic() - t0)))  # the task's length is the workload, not a wait
        steady1 = steady_sample(rig, plain, own)
        dead = [c.argv for c in plain if not c.alive()] + [t.name for t in own if t.error or not t.is_alive()]
        if dead:
            raise RuntimeError(f"a recorder exited early: {dead[0]}")
        s_stop = tree.snapshot()
        plain_ticks_at_stop = pids_cpu_ticks(c.pid for c in plain)
        stopped: dict[str, float] = {}
        for side in order:
            stopped[side] = time.monotonic()
            if side == "agent":
                rig.stop_all(name)
            elif side == "plain":
                for c in plain:
                    c.quit()
            else:
                stop.set()
        finals = rig.wait_final(name, timeout=300 + clip)
        rig.wait_no_children()
        s1 = tree.snapshot()
        plain_cpu = [c.reap(60) for c in plain]
        for t in own:
            t.join(timeout=300 + clip)
            if t.is_alive() or t.error:
                raise RuntimeError(f"own-argv camera failed: {t.error or 'still running'}")
    finally:
        stop.set()
        for c in plain:
            if c.returncode is None:
                c.signal(signal.SIGKILL)
                c.reap(5)
        if name and rig.agent.is_alive():
            with contextlib.suppress(Exception):
                rig.stop_all(name)
    cam1 = pids_cpu_ns([camsim_pid]) if camsim_pid else {}
    failed = [doc for doc, _ in finals if doc["status"] == "failed"]
    if failed:
        raise RuntimeError(f"agent task failed: {failed[0]}")
    whole = TreeCpu.between(s0, s1)
    rec_phase = TreeCpu.between(s0, s_stop)
    t_final = max(at for _, at in finals)
    agent = {
        "cpu_s": whole["cpu_s"], "python_cpu_s": whole["own_cpu_s"], "ffmpeg_cpu_s": whole["children_cpu_s"],
        "record_phase_cpu_s": rec_phase["cpu_s"], "finalise_phase_cpu_s": whole["cpu_s"] - rec_phase["cpu_s"],
        "wall_s": t_final - started["agent"], "stop_to_final_s": t_final - stopped["agent"],
        "media_s": sum(float(doc.get("duration_seconds") or 0.0) for doc, _ in finals),
        "final_statuses": sorted({doc["status"] for doc, _ in finals}),
    }  # fmt: skip
    plain_rec = sum(plain_ticks_at_stop.values()) / CLK_TCK
    plain_side = {
        "cpu_s": sum(plain_cpu), "record_phase_cpu_s": plain_rec, "finalise_phase_cpu_s": sum(plain_cpu) - plain_rec,
        "wall_s": max(c.ended or 0.0 for c in plain) - started["plain"],
        "stop_to_final_s": max(c.ended or 0.0 for c in plain) - stopped["plain"],
        "media_s": sum(media_seconds(work / f"plain{i}.mp4") for i in range(n)),
        "exit_codes": sorted({c.returncode for c in plain}),
    }  # fmt: skip
    own_parts = {k: sum(t.cpu.get(k, 0.0) for t in own) for k in ("record", "join")}
    own_rec = sum((t.record_ticks_at_stop or 0) for t in own) / CLK_TCK
    own_side = {
        "cpu_s": sum(own_parts.values()), **{f"{k}_cpu_s": v for k, v in own_parts.items()},
        "record_phase_cpu_s": own_rec,
        "finalise_phase_cpu_s": sum(own_parts.values()) - own_rec,
        "wall_s": max(t.done_at or 0.0 for t in own) - started["own"],
        "stop_to_final_s": max(t.done_at or 0.0 for t in own) - stopped["own"],
        "media_s": sum(t.duration for t in own),
    }  # fmt: skip
    per_min = 60.0 / clip / n
    steady_wall = steady1["t"] - steady0["t"]
    for side_name, side in (("agent", agent), ("plain", plain_side), ("own", own_side)):
        a0, a1 = steady0[side_name], steady1[side_name]
        side["steady_recording_per_cam_min"] = (
            sum(v - a0.get(pid, 0) for pid, v in a1.items()) / 1e9 * 60.0 / steady_wall / n if steady_wall > 0 else None
        )
        side["steady_processes"] = len(a1)
    agent["steady_python_per_cam_min"] = (steady1["python"] - steady0["python"]) / 1e9 * 60.0 / steady_wall / n
    agent["children_at_stop"] = len(s_stop["kids"])
    for side in (agent, plain_side, own_side):
        side["per_cam_min"] = side["cpu_s"] * per_min
    agent["python_per_cam_min"] = agent["python_cpu_s"] * per_min
    cam_cpu = sum(cam1[p] - cam0.get(p, 0) for p in cam1) / 1e9 if cam1 else None
    return {
        "n": n, "round": rnd, "order": list(order), "clip_s": clip,
        "agent": agent, "plain": plain_side, "own": own_side,
        "ratio_agent_plain": agent["cpu_s"] / plain_side["cpu_s"] if plain_side["cpu_s"] else float("nan"),
        "ratio_agent_own": agent["cpu_s"] / own_side["cpu_s"] if own_side["cpu_s"] else float("nan"),
        # CPU per second of media each side kept (the agent starts recording after its probe)
        "ratio_agent_plain_per_media_s": _per_media_ratio(agent, plain_side),
        "camsim_cpu_s": cam_cpu, "loadavg_before": load_before, "loadavg_after": loadavg(),
    }  # fmt: skip


def steady_sample(rig: AgentRig, plain: list[Child], own: list[OwnArgv]) -> dict[str, Any]:
    """schedstat ns of each side's recording FFmpeg processes (and of the agent's Python) right now."""
    agent_ffmpeg = rig.agent.ffmpeg_pids()
    return {
        "t": time.monotonic(),
        "agent": pids_cpu_ns(agent_ffmpeg),
        "plain": pids_cpu_ns(c.pid for c in plain),
        "own": pids_cpu_ns(t.record.pid for t in own if t.record is not None),
        "python": pids_cpu_ns([rig.agent.pid]).get(rig.agent.pid, 0),
    }


def _per_media_ratio(b: dict[str, Any], a: dict[str, Any]) -> float:
    if not (b["media_s"] and a["media_s"] and a["cpu_s"]):
        return float("nan")
    return float((b["cpu_s"] / b["media_s"]) / (a["cpu_s"] / a["media_s"]))


def old_service_pass(url: str, work: Path, clip: float) -> dict[str, Any]:
    """The old service's always-re-encode command beside one plain copy, N=1, one clip (--old)."""
    work.mkdir(parents=True, exist_ok=True)
    plain = Child(plain_argv(url, work / "plain.mp4"), work / "plain.log", stdin=True)
    old = Child(old_service_argv(url, work / "old.mp4"), work / "old.log", stdin=True)
    try:
        time.sleep(clip)
        for c in (plain, old):
            c.quit()
        a, c = plain.reap(60), old.reap(120)
    finally:
        for ch in (plain, old):
            if ch.returncode is None:
                ch.signal(signal.SIGKILL)
                ch.reap(5)
    return {"plain_cpu_s": a, "old_cpu_s": c, "factor": c / a if a else float("nan"), "clip_s": clip}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: N=1, 1 round, 20 s clip, no warm-up")
    ap.add_argument("--ns", default=None, help="comma-separated N values (1,4,16)")
    ap.add_argument("--rounds", type=int, default=None, help="measured rounds per N (3; quick 1)")
    ap.add_argument("--clip", type=float, default=None, help="seconds from start to stop of each task (60; quick 20)")
    ap.add_argument("--720p", dest="sd", action="store_true", help="1280x720 instead of 1920x1080")
    ap.add_argument("--mounts", type=int, default=1,
                    help="simulator mounts; camera i reads mount i%%M on every side (1: one shared encoder)")
    ap.add_argument("--storage", choices=("local", "s3"), default="local",
                    help="local (the agent's default: task ends `completed`) or s3 (ends `uploaded`)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the unmeasured 5 s task per N")
    ap.add_argument("--old", action="store_true", help="also the old service's re-encoding command, N=1")
    ap.add_argument("--results-dir", type=Path, default=None, help="where cpu_*.json go (docs/results)")
    args = ap.parse_args()
    ns = [int(x) for x in args.ns.split(",")] if args.ns else ([1] if args.quick else [1, 4, 16])
    rounds_per_n = args.rounds or (1 if args.quick else 3)
    clip = args.clip or (20.0 if args.quick else 60.0)
    width, height = (1280, 720) if args.sd else (1920, 1080)
    warmup = not (args.no_warmup or args.quick)

    load_before = loadavg()
    base = workdir("cpu")
    rounds: list[dict[str, Any]] = []
    agent_config: dict[str, Any] = {}
    old: dict[str, Any] | None = None
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            broker = stack.enter_context(Mosquitto(base / "mosquitto"))
            storage: dict[str, Any] = {"type": "local"}
            if args.storage == "s3":
                s3 = stack.enter_context(SeaweedS3(base / "s3"))
                admin = s3.client()
                if not admin.bucket_exists("bench"):
                    admin.make_bucket("bench")
                storage = {"type": "minio", "endpoint": s3.endpoint, "access_key": s3.access_key,
                           "secret_key": s3.secret_key, "bucket": "bench"}  # fmt: skip
            for n in ns:
                mounts = [f"cam{i + 1}" for i in range(max(1, min(n, args.mounts)))]
                nb = base / f"n{n}"
                with CameraSim(nb / "camsim", mounts=mounts, width=width, height=height, fps=25,
                               pattern=PATTERN) as cam:  # fmt: skip
                    urls = [cam.url(mounts[i % len(mounts)]) for i in range(n)]
                    rig = AgentRig(nb, broker, urls, storage)
                    agent_config = {**rig.config, "cameras": {c: {"url": "<simulator>"} for c in rig.cams},
                                    "storage": {"type": storage["type"]}}  # fmt: skip
                    try:
                        if warmup:
                            log(f"N={n}: warm-up task (5 s, not measured)")
                            run_round(rig, urls, nb / "warmup", -1, 5.0, SIDES, None)
                        for r in range(rounds_per_n):
                            order = SIDES[r % 3:] + SIDES[: r % 3]
                            res = run_round(rig, urls, nb / f"r{r}", r, clip, order, cam.pid)
                            rounds.append(res)
                            log(f"N={n} round {r} (order {','.join(order)}): CPU-s/cam/min plain "
                                f"{res['plain']['per_cam_min']:.3f}, agent {res['agent']['per_cam_min']:.3f} "
                                f"(python {res['agent']['python_per_cam_min']:.3f}), own argv "
                                f"{res['own']['per_cam_min']:.3f}; ratio agent/plain {res['ratio_agent_plain']:.3f}, "
                                f"agent/own {res['ratio_agent_own']:.3f}")  # fmt: skip
                            shutil.rmtree(nb / f"r{r}", ignore_errors=True)
                        if args.old and n == 1:
                            log("N=1: the old service's re-encoding command beside one plain copy")
                            old = old_service_pass(urls[0], nb / "old", clip)
                    finally:
                        rig.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    per_n: dict[str, Any] = {}
    rows, phase_rows = [], []
    for n in ns:
        rs = [r for r in rounds if r["n"] == n]
        a = summary([r["plain"]["per_cam_min"] for r in rs])
        b = summary([r["agent"]["per_cam_min"] for r in rs])
        c = summary([r["own"]["per_cam_min"] for r in rs])
        py = summary([r["agent"]["python_per_cam_min"] for r in rs])
        ba = summary([r["ratio_agent_plain"] for r in rs])
        bc = summary([r["ratio_agent_own"] for r in rs])
        bam = summary([r["ratio_agent_plain_per_media_s"] for r in rs])
        per_n[str(n)] = {"plain_per_cam_min": a, "agent_per_cam_min": b, "own_per_cam_min": c,
                         "agent_python_per_cam_min": py, "ratio_agent_plain": ba, "ratio_agent_own": bc,
                         "ratio_agent_plain_per_media_s": bam}  # fmt: skip
        verdict = "PASS" if ba["median"] <= GOAL else "FAIL"
        if ba["min"] < 1.0:
            verdict += " (a round below 1.0: noise or bias)"
        rows.append([
            n, f"{fmt(a['median'])} ({fmt(a['min'])}-{fmt(a['max'])})",
            f"{fmt(b['median'])} ({fmt(b['min'])}-{fmt(b['max'])})", fmt(py["median"]),
            f"**{ba['median']:.3f}** [{', '.join(f'{v:.3f}' for v in ba['values'])}] {verdict}",
            f"{bam['median']:.3f}",
            f"{fmt(c['median'])}", f"{bc['median']:.3f} [{', '.join(f'{v:.3f}' for v in bc['values'])}]",
        ])  # fmt: skip
        for side in SIDES:
            phase_rows.append([
                n, side,
                fmt(statistics.median(r[side]["record_phase_cpu_s"] for r in rs)),
                fmt(statistics.median(r[side]["finalise_phase_cpu_s"] for r in rs)),
                fmt(statistics.median(r[side]["stop_to_final_s"] for r in rs)),
                fmt(statistics.median(r[side]["media_s"] for r in rs) / n),
                fmt(statistics.median(r[side]["steady_recording_per_cam_min"] or 0.0 for r in rs)),
            ])  # fmt: skip

    print(f"\n### Whole-task CPU, {width}x{height} 25 fps, {rounds_per_n} round(s) of a {clip:g} s task per N, "
          f"storage {args.storage}; a, b and c side by side, order rotating\n")  # fmt: skip
    print(md_table(
        ["N", "(a) plain ffmpeg -c copy faststart MP4, CPU-s/cam/min median (min-max)",
         "(b) agent whole task, CPU-s/cam/min", "of which agent Python",
         f"ratio b/a: median [per round], goal <= {GOAL:.2f}", "b/a per media second",
         "(c) agent's own FFmpeg work alone", "ratio b/c (the Python): median [per round]"], rows,
    ))  # fmt: skip
    print("\nCPU-seconds per task (median), recording phase (start -> stop) and finalise phase (stop -> done):\n")
    print(md_table(["N", "side", "record-phase CPU-s", "finalise-phase CPU-s", "stop -> done s", "media s per camera",
                    "recording FFmpeg alone, steady CPU-s/cam/min (schedstat)"], phase_rows))  # fmt: skip
    if old is not None:
        print(f"\nOld service's always-re-encode command: {old['old_cpu_s']:.2f} CPU-s vs plain copy "
              f"{old['plain_cpu_s']:.2f} CPU-s over {old['clip_s']:g} s: **{old['factor']:.0f}x**")  # fmt: skip
    path = write_docs_results("cpu", {
        "quick": args.quick,
        "settings": {"resolution": f"{width}x{height}", "fps": 25, "pattern": PATTERN, "mounts": args.mounts,
                     "ns": ns, "rounds_per_n": rounds_per_n, "clip_s": clip, "storage": args.storage,
                     "warmup": warmup, "goal_ratio": GOAL},
        "agent_config": agent_config,
        "sides": {"plain": " ".join(plain_argv("URL", Path("out.mp4"))),
                  "agent": "the agent process, default settings, whole task start -> final status",
                  "own": "edge_agent.ffmpeg record_argv, then edge_agent.fmp4join.join"},
        "facts": run_facts(load_before), "elapsed_s": elapsed,
        "rounds": rounds, "per_n": per_n, "old_service": old,
    }, args.results_dir)  # fmt: skip
    print(f"\n(elapsed {elapsed:.0f} s) results: {path}")


if __name__ == "__main__":
    main()
