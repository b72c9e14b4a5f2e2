"""Shared helpers of the benchmarks: the test harness on sys.path, statistics, /proc CPU and RSS, output.

Every benchmark prints a markdown table and writes the same numbers as JSON to ``bench/results/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the real-parts harness (tests/parts/)
sys.path.insert(0, str(ROOT))

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), like numpy's default."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """median, p95, min, max and spread ((max-min)/median) of a sample."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    med = statistics.median(vals)
    return {
        "n": len(vals),
        "median": med,
        "p95": percentile(vals, 95),
        "min": min(vals),
        "max": max(vals),
        "spread": (max(vals) - min(vals)) / med if med else float("nan"),
        "values": vals,
    }


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "nan"
    a = abs(value)
    decimals = digits if a < 10 else max(0, digits - 1) if a < 100 else max(0, digits - 2) if a < 1000 else 0
    return f"{value:.{decimals}f}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> tuple[int, int, int, int, int, int] | None:
    """(utime, stime, cutime, cstime, ppid, pgrp) in clock ticks, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11
    return (int(fields[11]), int(fields[12]), int(fields[13]), int(fields[14]), int(fields[1]), int(fields[2]))


def cpu_ns(pid: int) -> int | None:
    """On-CPU nanoseconds of every live thread of ``pid`` (sum of /proc/PID/task/*/schedstat).

    /proc/PID/stat's utime+stime come in clock ticks (10 ms): a copy-mode FFmpeg uses only a few
    ticks in a 15 s window, so ratios from ticks alone are quantised; schedstat is nanoseconds.
    Threads that exited are not included (their time is in stat's utime/stime only).
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid`` (by ppid), found by scanning /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = proc_stat(int(entry.name))
        if st is not None and st[4] == pid:
            out.append(int(entry.name))
    return out


def descendants_of(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)] = st[4]
    found: list[int] = []
    frontier = {pid}
    while frontier:
        nxt = {p for p, pp in parents.items() if pp in frontier}
        found.extend(sorted(nxt))
        frontier = nxt
    return found


class TreeCpu:
    """CPU seconds used by a process tree over a window.

    ``snapshot()`` records utime+stime of the root and each live descendant, plus the root's
    cutime+cstime (time of children it has reaped). The window's CPU is the root's delta, plus each
    descendant's delta (its full time if it appeared during the window), plus the delta of reaped
    children's time. A child reaped during the window is counted by its last sample plus whatever
    the cutime delta adds beyond it (its pre-window time is subtracted when it was sampled).
    """

    def __init__(self, root: int) -> None:
        self.root = root

    def snapshot(self) -> dict[str, Any]:
        st = proc_stat(self.root)
        kids = {}
        kids_ns = {}
        for pid in descendants_of(self.root):
            k = proc_stat(pid)
            if k is not None:
                kids[pid] = k[0] + k[1]
                kids_ns[pid] = cpu_ns(pid) or 0
        return {
            "t": time.monotonic(),
            "own": (st[0] + st[1]) if st else 0,
            "own_ns": cpu_ns(self.root) or 0,
            "reaped": (st[2] + st[3]) if st else 0,
            "kids": kids,
            "kids_ns": kids_ns,
        }

    @staticmethod
    def between(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        own = b["own"] - a["own"]
        kids = 0
        for pid, ticks in b["kids"].items():
            kids += ticks - a["kids"].get(pid, 0)
        # children alive at `a` and reaped by `b`: cutime grew by their full time; remove the part
        # already used before the window
        gone_before = sum(t for pid, t in a["kids"].items() if pid not in b["kids"])
        reaped = b["reaped"] - a["reaped"] - gone_before
        seconds = b["t"] - a["t"]
        own_ns = b["own_ns"] - a["own_ns"]
        kids_ns = sum(t - a["kids_ns"].get(pid, 0) for pid, t in b["kids_ns"].items())
        reaped_ns = max(0, reaped) / CLK_TCK * 1e9  # reaped children: ticks are all there is
        return {
            "wall_s": seconds,
            "own_cpu_s": own / CLK_TCK,
            "children_cpu_s": (kids + max(0, reaped)) / CLK_TCK,
            "cpu_s": (own + kids + max(0, reaped)) / CLK_TCK,
            "ns_own_cpu_s": own_ns / 1e9,
            "ns_children_cpu_s": (kids_ns + reaped_ns) / 1e9,
            "ns_cpu_s": (own_ns + kids_ns + reaped_ns) / 1e9,
        }


def pids_cpu_ticks(pids: Iterable[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        st = proc_stat(pid)
        if st is not None:
            out[pid] = st[0] + st[1]
    return out


def pids_cpu_ns(pids: Iterable[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        ns = cpu_ns(pid)
        if ns is not None:
            out[pid] = ns
    return out


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ------------------------------------------------------------------------------------------ output


def workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))


def machine_info() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": loadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_results(name: str, data: dict[str, Any], quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}{'-quick' if quick else ''}-{stamp}.json"
    data = {"benchmark": name, "quick": quick, "machine": machine_info(), **data}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def broker_rtt_samples(probe: Any, n: int = 30) -> list[float]:
    """`n` QoS 1 publish -> receive round trips through the broker, by one `parts.MqttProbe` (seconds)."""
    topic = f"rtt/{uuid.uuid4().hex}"
    probe.subscribe(topic)
    out = []
    for i in range(n):
        t0 = time.monotonic()
        probe.publish(topic, {"i": i}, qos=1)
        probe.wait_for(topic, lambda p, i=i: p["i"] == i, timeout=10)
        out.append(time.monotonic() - t0)
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- children measured by rusage


class Child:
    """A process the benchmark starts itself, reaped with ``os.wait4`` so its CPU is exact.

    A process that has exited has no /proc entry left: its utime+stime (and those of the children
    it reaped) are what the kernel adds to its parent's cutime/cstime in /proc/<parent>/stat, and
    ``wait4`` returns exactly that figure for this one child (in microseconds, not 10 ms ticks).
    So the whole life of the process is counted, start-up and exit work (a faststart rewrite)
    included. Never call ``proc.wait()``/``poll()`` on it: reaping must go through :meth:`reap`.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, *, stdin: bool = False,
                 stdout: Path | None = None, pipe_stdout: bool = False,
                 pass_fds: Sequence[int] = ()) -> None:  # fmt: skip
        self.argv = list(argv)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._out = stdout.open("wb") if stdout is not None else None
        out: Any = subprocess.PIPE if pipe_stdout else (self._out or subprocess.DEVNULL)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=out, stderr=self._log,
            start_new_session=True, pass_fds=tuple(pass_fds),
        )  # fmt: skip
        self.ended: float | None = None
        self.returncode: int | None = None
        self.cpu_s: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """True while the process has not exited (checked without reaping it)."""
        if self.returncode is not None:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def quit(self) -> None:
        """``q`` on stdin: FFmpeg's own clean stop (writes the trailer, runs +faststart)."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"q")
            self.proc.stdin.close()

    def signal(self, sig: signal.Signals) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def reap(self, timeout: float) -> float:
        """Wait (bounded) for the exit, SIGKILL after ``timeout``; returns the CPU seconds of its life."""
        if self.cpu_s is not None:
            return self.cpu_s
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                break
            if time.monotonic() >= deadline:
                log(f"pid {self.pid} did not exit within {timeout:g} s: SIGKILL ({self.argv[0]})")
                self.signal(signal.SIGKILL)
                _, status, usage = os.wait4(self.pid, 0)
                break
            time.sleep(0.02)
        self.ended = time.monotonic()
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # reaped here: Popen must not wait for it again
        self.cpu_s = usage.ru_utime + usage.ru_stime
        for f in (self._log, self._out, self.proc.stdin):  # a stdout pipe belongs to whoever drains it
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()
        return self.cpu_s


def run_child(argv: Sequence[str], log_path: Path, timeout: float) -> tuple[int, float, str]:
    """Run a short command to its end: (exit code, CPU seconds from rusage, its stdout)."""
    out = log_path.with_suffix(".out")
    child = Child(argv, log_path, stdout=out)
    cpu = child.reap(timeout)
    text = out.read_text(errors="replace")
    out.unlink(missing_ok=True)
    return child.returncode or 0, cpu, text


# ------------------------------------------------------------------------------ committed results

DOCS_RESULTS = ROOT / "docs" / "results"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_facts() -> dict[str, Any]:
    """The commit measured and whether tracked files differed from it (the agent loads its code at start)."""
    head = _git("rev-parse", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no")
    paths = [line[3:] for line in (changed or "").splitlines() if line.strip()]
    return {
        "commit": head.strip() if head else None,
        "dirty": bool(paths) if changed is not None else None,
        "dirty_paths": paths[:50],
        "dirty_package": any(p.startswith("edge_agent/") for p in paths),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_total_kib() -> int | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return None


def tool_version(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else None


def run_facts(loadavg_before: list[float]) -> dict[str, Any]:
    """Commit and machine facts stored beside every committed result (load before and after the run)."""
    return {
        **git_facts(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "mem_total_kib": mem_total_kib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ffmpeg": tool_version(["ffmpeg", "-version"]),
        "host": platform.node(),
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_docs_results(kind: str, data: dict[str, Any], results_dir: Path | None = None) -> Path:
    """``<dir>/<kind>_<date-time>.json`` plus the stable ``<kind>_latest.json`` (default dir docs/results)."""
    directory = results_dir or DOCS_RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps({"benchmark": kind, **data}, indent=2, default=str) + "\n"
    path = directory / f"{kind}_{stamp}.json"
    path.write_text(text)
    (directory / f"{kind}_latest.json").write_text(text)
    return path
