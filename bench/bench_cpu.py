"""CPU per camera: the agent recording N cameras in copy mode against N bare FFmpeg processes.

For each N, one camera simulator with N mounts (``--single-mount``: every camera reads ``cam1``),
then per round, side by side in the same measurement window:
(a) N bare ``ffmpeg`` processes with exactly ``edge_agent.ffmpeg.record_argv(mode="copy")``
    (stdout, the ``-progress`` stream, goes to /dev/null: nothing to drain);
(b) the agent process recording the N cameras (``video: copy``): CPU of the agent and its FFmpeg
    children from /proc/<pid>/stat utime+stime (children found by ppid).
Which of a/b is started first alternates between rounds. With N=1 only, (c) the old service's
always-re-encode command line (libx264 veryfast, yuv420p, scale, +faststart MP4) is measured side by
side with one more bare copy FFmpeg.

Reported: CPU-seconds per camera per minute (median over rounds, spread), ratio b/a (goal <= 1.10)
and factor c/a.

    .venv/bin/python bench/bench_cpu.py [--quick] [--full] [--1080p] [--py-spy]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO, Any

from _common import TreeCpu, fmt, log, md_table, pids_cpu_ticks, summary, workdir, write_results, CLK_TCK
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, write_config

from edge_agent.ffmpeg import record_argv

DEVICE = "edge-bench"


def old_service_argv(url: str, out: Path) -> list[str]:
    """/work/shared/seed/camera.py.txt `_build_ffmpeg_command` with its defaults (veryfast)."""
    return [
        "ffmpeg", "-y", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp", "-i", url,
        "-an", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-movflags", "+faststart", str(out),
    ]  # fmt: skip


class BareGroup:
    """N FFmpeg processes started by the benchmark itself."""

    def __init__(self, argvs: list[list[str]], logdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        logdir.mkdir(parents=True, exist_ok=True)
        for i, argv in enumerate(argvs):
            logf = (logdir / f"ffmpeg{i}.log").open("ab")
            self._logs.append(logf)
            self.procs.append(subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=logf, start_new_session=True,
            ))  # fmt: skip

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"bare ffmpeg exited early: {dead[0]}")

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError, ValueError):
                assert p.stdin is not None
                p.stdin.write(b"q")
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)
                p.wait(timeout=5)
        for f in self._logs:
            f.close()


class AgentRig:
    """The agent process with N cameras (copy mode, local storage) and an MQTT probe."""

    def __init__(self, base: Path, broker: Mosquitto, cam: CameraSim, urls: list[str]) -> None:
        self.prefix = f"bench{uuid.uuid4().hex[:6]}"
        self.cams = [f"cam{i + 1}" for i in range(len(urls))]
        cfg = write_config(
            base / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=self.prefix,
            cameras={c: {"url": u} for c, u in zip(self.cams, urls, strict=True)},
            output_dir=base / "recordings", storage={"type": "local"}, recording={"video": "copy"},
        )  # fmt: skip
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

    def wait_recording(self, name: str) -> None:
        for c in self.cams:
            self.probe.wait_for(self.topic(c, "status"),
                                lambda p: p["task_name"] == name and p["status"] == "recording", timeout=60)  # noqa: B023

    def stop_all(self, name: str) -> None:
        for c in self.cams:
            self.probe.publish(self.topic(c, "cmd"), {"action": "stop", "task_name": name, "request_id": f"{name}e"})
        for c in self.cams:
            doc = self.probe.wait_for(self.topic(c, "status"),
                                      lambda p: p["task_name"] == name and p["status"] in ("completed", "failed"),  # noqa: B023
                                      timeout=120)  # fmt: skip
            if doc["status"] != "completed":
                raise RuntimeError(f"agent task failed: {doc}")

    def close(self) -> None:
        self.agent.stop()
        self.probe.close()


def bare_copy_argvs(urls: list[str], segroot: Path, tag: str) -> list[list[str]]:
    out = []
    for i, url in enumerate(urls):
        d = segroot / f"{tag}-{i}"
        d.mkdir(parents=True, exist_ok=True)
        out.append(record_argv("ffmpeg", url, d, mode="copy"))
    return out


def measure_round(rig: AgentRig, urls: list[str], base: Path, rnd: int, window: float, warmup: float,
                  camsim_pid: int | None) -> dict[str, Any]:  # fmt: skip
    n = len(urls)
    bare_first = rnd % 2 == 0
    bare: BareGroup | None = None
    name = ""
    if bare_first:
        bare = BareGroup(bare_copy_argvs(urls, base / "segments", f"r{rnd}"), base / "bare-logs")
        name = rig.start_all()
    else:
        name = rig.start_all()
        bare = BareGroup(bare_copy_argvs(urls, base / "segments", f"r{rnd}"), base / "bare-logs")
    try:
        rig.wait_recording(name)
        time.sleep(warmup)
        bare.check_alive()
        tree = TreeCpu(rig.agent.pid)
        a0, b0 = pids_cpu_ticks(bare.pids), tree.snapshot()
        s0 = pids_cpu_ticks([camsim_pid]) if camsim_pid else {}
        t0 = time.monotonic()
        time.sleep(window)
        a1, b1 = pids_cpu_ticks(bare.pids), tree.snapshot()
        s1 = pids_cpu_ticks([camsim_pid]) if camsim_pid else {}
        wall = time.monotonic() - t0
        bare.check_alive()
        agent_children = len(b1["kids"])
    finally:
        bare.stop()
        rig.stop_all(name)
    a_cpu = sum(a1[p] - a0.get(p, 0) for p in a1) / CLK_TCK
    b = TreeCpu.between(b0, b1)
    cam_cpu = sum(s1[p] - s0.get(p, 0) for p in s1) / CLK_TCK if s1 else None
    per_min = 60.0 / wall / n
    return {
        "n": n, "round": rnd, "first": "bare" if bare_first else "agent", "wall_s": wall,
        "bare_cpu_s": a_cpu, "agent_cpu_s": b["cpu_s"], "agent_own_cpu_s": b["own_cpu_s"],
        "agent_children_cpu_s": b["children_cpu_s"], "agent_children": agent_children,
        "bare_per_cam_min": a_cpu * per_min, "agent_per_cam_min": b["cpu_s"] * per_min,
        "agent_own_per_cam_min": b["own_cpu_s"] * per_min, "agent_ffmpeg_per_cam_min": b["children_cpu_s"] * per_min,
        "ratio": b["cpu_s"] / a_cpu if a_cpu else float("nan"),
        "camsim_cores": cam_cpu / wall if cam_cpu is not None else None,
    }  # fmt: skip


def measure_old_service(url: str, base: Path, window: float, warmup: float) -> dict[str, Any]:
    out = base / "old"
    out.mkdir(parents=True, exist_ok=True)
    group = BareGroup([record_argv("ffmpeg", url, out, mode="copy"), old_service_argv(url, out / "old.mp4")],
                      base / "old-logs")  # fmt: skip
    try:
        time.sleep(warmup + 1.0)
        group.check_alive()
        t0 = time.monotonic()
        c0 = pids_cpu_ticks(group.pids)
        time.sleep(window)
        c1 = pids_cpu_ticks(group.pids)
        wall = time.monotonic() - t0
        group.check_alive()
    finally:
        group.stop()
    a_pid, c_pid = group.pids
    a = (c1[a_pid] - c0[a_pid]) / CLK_TCK
    c = (c1[c_pid] - c0[c_pid]) / CLK_TCK
    return {"wall_s": wall, "copy_cpu_s": a, "old_cpu_s": c, "copy_per_min": a * 60 / wall,
            "old_per_min": c * 60 / wall, "factor": c / a if a else float("nan")}  # fmt: skip


def py_spy_profile(rig: AgentRig, seconds: float, out_dir: Path) -> dict[str, Any]:
    """py-spy record (raw collapsed stacks) of the agent while it records every camera."""
    spy = shutil.which("py-spy", path=str(Path(__file__).resolve().parents[1] / ".venv" / "bin")) or shutil.which(
        "py-spy"
    )
    if spy is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    name = rig.start_all()
    raw = out_dir / "pyspy.txt"
    try:
        rig.wait_recording(name)
        time.sleep(2)
        done = subprocess.run(
            [spy, "record", "-p", str(rig.agent.pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw",
             "-o", str(raw), "--nonblocking"],
            capture_output=True, text=True, timeout=seconds + 60, check=False,
        )  # fmt: skip
    finally:
        rig.stop_all(name)
    if done.returncode != 0 or not raw.exists():
        return {"error": (done.stderr or done.stdout)[-500:]}
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_counts[frames[-1]] += c
        for f in set(frames[1:]):  # frames[0] is the thread name
            incl_counts[f] += c
    return {
        "samples": total, "seconds": seconds, "rate_hz": 200,
        "top_self": self_counts.most_common(15), "top_inclusive": incl_counts.most_common(20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="15 s windows (< 2 min)")
    ap.add_argument("--full", action="store_true", help="N = 1, 4, 16")
    ap.add_argument("--1080p", dest="hd", action="store_true", help="1920x1080 instead of 1280x720")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=None, help="seconds (30; quick 15)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds after all are recording (2; quick 1)")
    ap.add_argument("--single-mount", action="store_true", help="every camera reads the same mount")
    ap.add_argument("--ns", default=None, help="comma-separated N values, e.g. 1,4")
    ap.add_argument("--no-old", action="store_true", help="skip (c), the old re-encoding command")
    ap.add_argument("--py-spy", dest="pyspy", type=float, nargs="?", const=20.0, default=None,
                    help="after the N=4 rounds, profile the agent with py-spy for this many seconds (20)")  # fmt: skip
    args = ap.parse_args()
    window = args.window or (15.0 if args.quick else 30.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    ns = [int(x) for x in args.ns.split(",")] if args.ns else ([1, 4, 16] if args.full else [1, 4])
    width, height = (1920, 1080) if args.hd else (1280, 720)

    base = workdir("cpu")
    rounds: list[dict[str, Any]] = []
    old: dict[str, Any] | None = None
    spy: dict[str, Any] | None = None
    t_start = time.monotonic()
    try:
        with Mosquitto(base / "mosquitto") as broker:
            for n in ns:
                mounts = ["cam1"] if args.single_mount else [f"cam{i + 1}" for i in range(n)]
                nb = base / f"n{n}"
                with CameraSim(nb / "camsim", mounts=mounts, width=width, height=height, fps=25) as cam:
                    urls = [cam.url(mounts[i % len(mounts)]) for i in range(n)]
                    rig = AgentRig(nb, broker, cam, urls)
                    try:
                        for r in range(args.rounds):
                            res = measure_round(rig, urls, nb, r, window, warmup, cam.pid)
                            rounds.append(res)
                            log(f"N={n} round {r} ({res['first']} first): bare {res['bare_per_cam_min']:.2f}, "
                                f"agent {res['agent_per_cam_min']:.2f} CPU-s/cam/min, ratio {res['ratio']:.2f}")  # fmt: skip
                        if args.pyspy and n == max(ns):
                            spy = py_spy_profile(rig, args.pyspy, nb)
                    finally:
                        rig.close()
                    if n == 1 and not args.no_old:
                        old = measure_old_service(urls[0], nb, window, warmup)
                        log(f"old service: {old['old_per_min']:.1f} CPU-s/min vs copy {old['copy_per_min']:.2f}")
                shutil.rmtree(nb / "segments", ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n### CPU per camera ({width}x{height} 25 fps, window {window:g} s, {args.rounds} rounds, "
          f"a and b side by side, start order alternating)\n")  # fmt: skip
    rows = []
    per_n: dict[int, Any] = {}
    for n in ns:
        rs = [r for r in rounds if r["n"] == n]
        a = summary([r["bare_per_cam_min"] for r in rs])
        b = summary([r["agent_per_cam_min"] for r in rs])
        own = summary([r["agent_own_per_cam_min"] for r in rs])
        ratio = summary([r["ratio"] for r in rs])
        cams = summary([r["camsim_cores"] for r in rs if r["camsim_cores"] is not None])
        per_n[n] = {"bare": a, "agent": b, "agent_python": own, "ratio": ratio, "camsim_cores": cams}
        goal = "PASS" if ratio["median"] <= 1.10 else "FAIL"
        rows.append([
            n, f"{fmt(a['median'])} ({fmt(a['min'])}-{fmt(a['max'])})",
            f"{fmt(b['median'])} ({fmt(b['min'])}-{fmt(b['max'])})", fmt(own["median"]),
            f"**{ratio['median']:.2f}** ({ratio['min']:.2f}-{ratio['max']:.2f}) {goal}",
            f"{b['median'] / a['median']:.2f}", fmt(cams.get("median")),
        ])  # fmt: skip
    print(md_table(
        ["N", "(a) bare CPU-s/cam/min median (min-max)", "(b) agent+ffmpeg CPU-s/cam/min", "of which agent python",
         "ratio b/a per round: median (min-max), goal <= 1.10", "ratio of medians", "camsim cores"], rows,
    ))  # fmt: skip
    if old is not None:
        print("\n### (c) old service, always re-encode (libx264 veryfast), N=1, same window as one bare copy\n")
        print(md_table(
            ["(a) copy CPU-s/min", "(c) old CPU-s/min", "factor c/a"],
            [[fmt(old["copy_per_min"]), fmt(old["old_per_min"]), f"**{old['factor']:.0f}x**"]],
        ))  # fmt: skip
    if spy is not None:
        print(f"\n### py-spy of the agent recording N={max(ns)} cameras\n")
        if "error" in spy:
            print(f"py-spy failed: {spy['error']}")
        else:
            total = spy["samples"] or 1
            print(f"{spy['samples']} non-idle samples in {spy['seconds']:g} s at {spy['rate_hz']} Hz\n")
            print(md_table(["function (self)", "samples", "% of non-idle"],
                           [[f"`{f}`", c, f"{100 * c / total:.1f}%"] for f, c in spy["top_self"][:10]]))  # fmt: skip
    elapsed = time.monotonic() - t_start
    print(f"\n(elapsed {elapsed:.0f} s; per-round ratios: "
          + "; ".join(f"N={n}: " + ", ".join(f"{r['ratio']:.2f}" for r in rounds if r["n"] == n) for n in ns)
          + ")")  # fmt: skip
    path = write_results("bench_cpu", {
        "resolution": f"{width}x{height}", "window_s": window, "warmup_s": warmup, "ns": ns,
        "single_mount": args.single_mount, "rounds": rounds, "per_n": per_n, "old_service": old,
        "goal_ratio": 1.10, "py_spy": spy, "median_ratio_all": statistics.median([r["ratio"] for r in rounds]),
        "elapsed_s": elapsed,
    }, args.quick)  # fmt: skip
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
