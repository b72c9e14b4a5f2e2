"""Shared helpers of the benchmarks: the test harness on sys.path, statistics, /proc CPU and RSS, output.

Every benchmark prints a markdown table and writes the same numbers as JSON to ``bench/results/``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the real-parts harness (tests/parts.py)
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
