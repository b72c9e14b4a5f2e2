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

from _common import CLK_TCK, TreeCpu, fmt, log, md_table, pids_cpu_ns, pids_cpu_ticks, summary, workdir, write_results
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
                                lambda p: p["task_name"] == name and p["status"] == "recording", timeout=60)

    def stop_all(self, name: str) -> None:
        for c in self.cams:
            self.probe.publish(self.topic(c, "cmd"), {"action": "stop", "task_name": name, "request_id": f"{name}e"})
        for c in self.cams:
            doc = self.probe.wait_for(self.topic(c, "status"),
                                      lambda p: p["task_name"] == name and p["status"] in ("completed", "failed"),
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
                  camsim_pid: int | None, with_old: bool) -> dict[str, Any]:  # fmt: skip
    """One window with (a) N bare copy FFmpegs, (b) the agent on N cameras and, if asked, (c) beside them."""
    n = len(urls)
    bare_first = rnd % 2 == 0
    old: BareGroup | None = None
    if with_old:
        (base / "old").mkdir(parents=True, exist_ok=True)
        old = BareGroup([old_service_argv(urls[0], base / "old" / f"r{rnd}.mp4")], base / "old-logs")
    bare: BareGroup | None = None
    name = ""
    try:
        if bare_first:
            bare = BareGroup(bare_copy_argvs(urls, base / "segments", f"r{rnd}"), base / "bare-logs")
            name = rig.start_all()
        else:
            name = rig.start_all()
            bare = BareGroup(bare_copy_argvs(urls, base / "segments", f"r{rnd}"), base / "bare-logs")
        rig.wait_recording(name)
        time.sleep(warmup)
        bare.check_alive()
        tree = TreeCpu(rig.agent.pid)
        old_pids = old.pids if old else []
        b0 = tree.snapshot()
        a0, a0ns = pids_cpu_ticks(bare.pids), pids_cpu_ns(bare.pids)
        c0, c0ns = pids_cpu_ticks(old_pids), pids_cpu_ns(old_pids)
        s0 = pids_cpu_ns([camsim_pid]) if camsim_pid else {}
        t0 = time.monotonic()
        time.sleep(window)
        b1 = tree.snapshot()
        a1, a1ns = pids_cpu_ticks(bare.pids), pids_cpu_ns(bare.pids)
        c1, c1ns = pids_cpu_ticks(old_pids), pids_cpu_ns(old_pids)
        s1 = pids_cpu_ns([camsim_pid]) if camsim_pid else {}
        wall = time.monotonic() - t0
        bare.check_alive()
        if old:
            old.check_alive()
        agent_children = len(b1["kids"])
    finally:
        if bare is not None:
            bare.stop()
        if old is not None:
            old.stop()
        if name:
            rig.stop_all(name)
    a_cpu = sum(a1[p] - a0.get(p, 0) for p in a1) / CLK_TCK
    a_ns = sum(a1ns[p] - a0ns.get(p, 0) for p in a1ns) / 1e9
    b = TreeCpu.between(b0, b1)
    cam_cpu = sum(s1[p] - s0.get(p, 0) for p in s1) / 1e9 if s1 else None
    per_min = 60.0 / wall / n
    out = {
        "n": n, "round": rnd, "first": "bare" if bare_first else "agent", "wall_s": wall,
        "agent_children": agent_children,
        # /proc/PID/stat utime+stime (clock ticks)
        "bare_cpu_s": a_cpu, "agent_cpu_s": b["cpu_s"], "agent_own_cpu_s": b["own_cpu_s"],
        "agent_children_cpu_s": b["children_cpu_s"],
        "bare_per_cam_min": a_cpu * per_min, "agent_per_cam_min": b["cpu_s"] * per_min,
        "agent_own_per_cam_min": b["own_cpu_s"] * per_min,
        "ratio": b["cpu_s"] / a_cpu if a_cpu else float("nan"),
        # schedstat (nanoseconds)
        "ns_bare_per_cam_min": a_ns * per_min, "ns_agent_per_cam_min": b["ns_cpu_s"] * per_min,
        "ns_agent_own_per_cam_min": b["ns_own_cpu_s"] * per_min,
        "ns_agent_ffmpeg_per_cam_min": b["ns_children_cpu_s"] * per_min,
        "ns_ratio": b["ns_cpu_s"] / a_ns if a_ns else float("nan"),
        "camsim_cores": cam_cpu / wall if cam_cpu is not None else None,
    }  # fmt: skip
    if old is not None:
        c_cpu = sum(c1[p] - c0.get(p, 0) for p in c1) / CLK_TCK
        c_ns = sum(c1ns[p] - c0ns.get(p, 0) for p in c1ns) / 1e9
        out.update(old_per_min=c_cpu * 60 / wall, ns_old_per_min=c_ns * 60 / wall,
                   old_factor=c_cpu / (a_cpu / n) if a_cpu else float("nan"),
                   ns_old_factor=c_ns / (a_ns / n) if a_ns else float("nan"))  # fmt: skip
    return out


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
                            with_old = n == 1 and not args.no_old
                            res = measure_round(rig, urls, nb, r, window, warmup, cam.pid, with_old)
                            rounds.append(res)
                            log(f"N={n} round {r} ({res['first']} first): CPU-s/cam/min bare "
                                f"{res['ns_bare_per_cam_min']:.3f}, agent {res['ns_agent_per_cam_min']:.3f} "
                                f"(ratio {res['ns_ratio']:.2f}; ticks {res['ratio']:.2f})"
                                + (f"; old {res['ns_old_per_min']:.2f}" if with_old else ""))  # fmt: skip
                            shutil.rmtree(nb / "segments", ignore_errors=True)
                        if args.pyspy and n == max(ns):
                            spy = py_spy_profile(rig, args.pyspy, nb)
                    finally:
                        rig.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"\n### CPU per camera ({width}x{height} 25 fps, copy mode, window {window:g} s, {args.rounds} rounds; "
          f"a, b (and c at N=1) side by side in each window, a/b start order alternating)\n")  # fmt: skip
    rows = []
    per_n: dict[int, Any] = {}
    for n in ns:
        rs = [r for r in rounds if r["n"] == n]
        a = summary([r["ns_bare_per_cam_min"] for r in rs])
        b = summary([r["ns_agent_per_cam_min"] for r in rs])
        own = summary([r["ns_agent_own_per_cam_min"] for r in rs])
        ratio = summary([r["ns_ratio"] for r in rs])
        ta = summary([r["bare_per_cam_min"] for r in rs])
        tb = summary([r["agent_per_cam_min"] for r in rs])
        tratio = summary([r["ratio"] for r in rs])
        cams = summary([r["camsim_cores"] for r in rs if r["camsim_cores"] is not None])
        per_n[n] = {"bare": a, "agent": b, "agent_python": own, "ratio": ratio, "ticks_bare": ta,
                    "ticks_agent": tb, "ticks_ratio": tratio, "camsim_cores": cams}  # fmt: skip
        goal = "PASS" if ratio["median"] <= 1.10 else "FAIL"
        rows.append([
            n, f"{fmt(a['median'])} ({fmt(a['min'])}-{fmt(a['max'])})",
            f"{fmt(b['median'])} ({fmt(b['min'])}-{fmt(b['max'])})", fmt(own["median"]),
            f"**{ratio['median']:.3f}** ({ratio['min']:.2f}-{ratio['max']:.2f}) {goal}",
            f"{fmt(ta['median'])} / {fmt(tb['median'])} = {tratio['median']:.2f} "
            f"({tratio['min']:.2f}-{tratio['max']:.2f})",
            fmt(cams.get("median")),
        ])  # fmt: skip
    print(md_table(
        ["N", "(a) bare CPU-s/cam/min median (min-max)", "(b) agent+ffmpeg CPU-s/cam/min", "of which agent python",
         "ratio b/a per round: median (min-max), goal <= 1.10",
         "stat utime+stime (10 ms ticks): a / b = ratio (min-max)", "camsim cores"], rows,
    ))  # fmt: skip
    print("\nCPU from /proc/PID/task/*/schedstat (ns); the stat-tick column is the same windows in 10 ms ticks.")
    olds = [r for r in rounds if "ns_old_per_min" in r]
    old: dict[str, Any] | None = None
    if olds:
        old = {"old_per_min": summary([r["ns_old_per_min"] for r in olds]),
               "copy_per_min": summary([r["ns_bare_per_cam_min"] for r in olds]),
               "factor": summary([r["ns_old_factor"] for r in olds]),
               "ticks_factor": summary([r["old_factor"] for r in olds])}  # fmt: skip
        print("\n### (c) old service's always-re-encode command (libx264 veryfast + scale + faststart), N=1\n")
        print(md_table(
            ["(a) bare copy CPU-s/min", "(c) old CPU-s/min", "factor c/a median (min-max)", "factor from ticks"],
            [[fmt(old["copy_per_min"]["median"]), fmt(old["old_per_min"]["median"]),
              f"**{old['factor']['median']:.0f}x** ({old['factor']['min']:.0f}-{old['factor']['max']:.0f})",
              f"{old['ticks_factor']['median']:.0f}x"]],
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
          + "; ".join(f"N={n}: " + ", ".join(f"{r['ns_ratio']:.3f}" for r in rounds if r["n"] == n) for n in ns)
          + ")")  # fmt: skip
    path = write_results("bench_cpu", {
        "resolution": f"{width}x{height}", "window_s": window, "warmup_s": warmup, "ns": ns,
        "single_mount": args.single_mount, "rounds": rounds, "per_n": per_n, "old_service": old,
        "goal_ratio": 1.10, "py_spy": spy, "median_ratio_all": statistics.median([r["ns_ratio"] for r in rounds]),
        "elapsed_s": elapsed,
    }, args.quick)  # fmt: skip
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
