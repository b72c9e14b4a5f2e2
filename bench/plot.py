"""Images of the committed benchmark results: ``docs/results/*.json`` -> ``docs/img/*.png``.

Each image is drawn only from a results file (the newest ``<kind>_latest.json``, else the newest
``<kind>_*.json``), so the pictures in ``docs/`` can always be regenerated from what is committed:

- ``cpu_per_camera.png`` (``cpu``): whole-task CPU-seconds per camera-minute against N for the plain
  ``ffmpeg -c copy`` MP4, the agent and the agent's own FFmpeg work, and every round's ratio
  agent/plain against the 1.10 goal;
- ``forms.png`` (``forms``): steady CPU and SIGKILL loss of each recording form;
- ``upload.png`` (``upload``): MB/s per round of the bare client and the agent (with its sha256);
- ``fleet_latency.png`` (``fleet``): ``start`` -> all ``recording`` and ``stop`` -> all
  ``completed`` against K agents, with the broker's round trip;
- ``chaos_loss.png`` (``chaos``): every measured round's loss per fault kind, with its bound;
- ``fleet_mgmt.png`` (``fleetmgmt``): group command -> all replied and config rollout -> all
  reported against K, one Mosquitto beside the 3-node NATS cluster, with each broker's round trip.

A missing input is reported and skipped. Files from ``--quick`` runs are drawn with "quick" in the
title: quote only the full runs.

    .venv/bin/python bench/plot.py [--results-dir docs/results] [--out docs/img] [--chaos FILE] [--fleet FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or a server
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"plain": "#4c72b0", "agent": "#dd8452", "own": "#55a868", "goal": "#c44e52"}


def newest(results: Path, kind: str) -> Path | None:
    latest = results / f"{kind}_latest.json"
    if latest.exists():
        return latest
    found = sorted(p for p in results.glob(f"{kind}_*.json") if p.name != latest.name)
    return found[-1] if found else None


def caption(doc: dict[str, Any], path: Path) -> str:
    """Source file, commit and machine, so an image says where its numbers come from."""
    facts = doc.get("facts") or {}
    commit = (facts.get("commit") or "?")[:10] + ("+dirty" if facts.get("dirty") else "")
    machine = f"{facts.get('cores', '?')} cores {facts.get('cpu_model', '')}".strip()
    quick = "QUICK RUN, not for quoting; " if doc.get("quick") else ""
    return f"{quick}{path.name}, commit {commit}, {machine}"


def finish(fig: Figure, out: Path, note: str) -> Path:
    fig.text(0.01, 0.005, note, fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------- images


def plot_cpu(doc: dict[str, Any], path: Path, out: Path) -> Path:
    rounds = doc["rounds"]
    ns = sorted({r["n"] for r in rounds})
    s = doc.get("settings", {})
    fig, (ax, axr) = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = {"plain": "plain ffmpeg -c copy -> faststart MP4", "agent": "agent, whole task",
              "own": "agent's FFmpeg work alone"}  # fmt: skip
    for side in ("plain", "agent", "own"):
        med, lo, hi = [], [], []
        for n in ns:
            vals = [r[side]["per_cam_min"] for r in rounds if r["n"] == n]
            m = statistics.median(vals)
            med.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
        ax.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, label=labels[side], color=COLORS[side])
    py = [statistics.median(r["agent"]["python_per_cam_min"] for r in rounds if r["n"] == n) for n in ns]
    ax.plot(ns, py, linestyle=":", marker=".", color=COLORS["agent"], label="of which the agent's Python")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("cameras N")
    ax.set_ylabel("CPU-seconds per camera-minute")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Whole task ({s.get('clip_s', '?'):g} s clips, {s.get('resolution', '?')}): median, min-max")
    ax.legend(fontsize=8)
    for i, n in enumerate(ns):
        vals = [r["ratio_agent_plain"] for r in rounds if r["n"] == n]
        axr.scatter([i] * len(vals), vals, color=COLORS["agent"], alpha=0.7, zorder=3)
        axr.hlines(statistics.median(vals), i - 0.25, i + 0.25, color="black", zorder=4)
    axr.axhline(s.get("goal_ratio", 1.10), color=COLORS["goal"], linestyle="--", label="goal <= 1.10")
    axr.axhline(1.0, color="#999999", linewidth=0.8)
    axr.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
    axr.set_ylabel("agent / plain CPU (per round; bar = median)")
    axr.set_ylim(bottom=0)
    axr.set_title("Ratio per round")
    axr.legend(fontsize=8)
    return finish(fig, out / "cpu_per_camera.png", caption(doc, path))


def plot_forms(doc: dict[str, Any], path: Path, out: Path) -> Path:
    per = doc["per_form"]
    forms = list(per)
    steady = [per[f]["steady_per_cam_min"].get("median", math.nan) for f in forms]
    join = [per[f]["join_cpu_per_media_min"].get("median") or 0.0 for f in forms]
    loss = [per[f]["sigkill_loss_s"].get("max", math.nan) for f in forms]
    fig, (ax, axl) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = range(len(forms))
    ax.bar(x, steady, color=COLORS["own"], label="recording (steady)")
    ax.bar(x, join, bottom=steady, color=COLORS["agent"], alpha=0.7, label="join (agent's concat)")
    ax.set_xticks(list(x), forms, rotation=30, ha="right")
    ax.set_ylabel("CPU-seconds per camera-minute")
    ax.set_title("Cost of each recording form")
    ax.legend(fontsize=8)
    axl.bar(x, loss, color=COLORS["goal"])
    axl.set_xticks(list(x), forms, rotation=30, ha="right")
    axl.set_yscale("symlog", linthresh=0.1)
    axl.set_ylabel("seconds lost on SIGKILL (worst round)")
    axl.set_title("Crash safety (process kill; page cache kept)")
    return finish(fig, out / "forms.png", caption(doc, path))


def plot_upload(doc: dict[str, Any], path: Path, out: Path) -> Path:
    rows = doc["rounds"]
    names = {"bare": "bare fput_object", "bare-agent-part": "bare, agent's part size",
             "agent": "agent (sha256 + upload)"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, key in enumerate(names):
        vals = [r["mb_s"] for r in rows if r["path"] == key]
        if not vals:
            continue
        ax.scatter([i] * len(vals), vals, alpha=0.7, zorder=3)
        ax.hlines(statistics.median(vals), i - 0.25, i + 0.25, color="black", zorder=4)
        ax.text(i + 0.28, statistics.median(vals), f"{statistics.median(vals):.0f}", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), list(names.values()))
    ax.set_ylabel("MB/s per round (bar = median)")
    ax.set_ylim(bottom=0)
    ratio = doc.get("ratio_agent_over_bare")
    ax.set_title(f"Upload throughput: agent / bare = {ratio:.2f} (goal >= 0.90)" if ratio else "Upload throughput")
    return finish(fig, out / "upload.png", caption(doc, path))


def plot_fleet(doc: Any, path: Path, out: Path) -> Path:
    rows = doc if isinstance(doc, list) else doc.get("rows") or doc.get("rounds") or []
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ks, [r["all_recording_s"] for r in rows], marker="o", label="K starts -> all `recording`")
    if all("all_completed_s" in r for r in rows):
        ax.plot(ks, [r["all_completed_s"] for r in rows], marker="s", label="K stops -> all `completed`")
    ax.plot(ks, [r["broker_rtt_s"] for r in rows], marker=".", linestyle=":", label="broker QoS 1 round trip")
    ax.set_xlabel("agents K (one camera each, one broker)")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title("Fleet latency against K")
    ax.legend(fontsize=8)
    return finish(fig, out / "fleet_latency.png", caption(doc if isinstance(doc, dict) else {}, path))


def plot_fleetmgmt(doc: dict[str, Any], path: Path, out: Path) -> Path:
    """Group command -> all replied and rollout -> all reported against K, Mosquitto beside NATS."""
    summ = doc["summary"]
    ks = sorted(int(k) for k in summ)
    panels = [("status_s", "group `status` -> all replied"), ("start_s", "group `start` -> all replied"),
              ("rollout_s", "rollout -> all `reported`")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.2), sharey=False)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for side, label, color in (("mosquitto", "one Mosquitto", COLORS["plain"]),
                                   ("nats", "3 NATS nodes", COLORS["agent"])):  # fmt: skip
            stats = [summ[str(k)][side][key] for k in ks]
            med = [s["median"] for s in stats]
            err = [[m - s["min"] for m, s in zip(med, stats, strict=True)],
                   [s["max"] - m for m, s in zip(med, stats, strict=True)]]  # fmt: skip
            ax.errorbar(ks, med, yerr=err, marker="o", capsize=3, label=label, color=color)
            rtt = [summ[str(k)][side]["rtt_s"]["median"] for k in ks]
            ax.plot(ks, rtt, linestyle=":", marker=".", color=color, label=f"{label}: broker round trip")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("agents K")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("seconds (median, bars: min-max over rounds)")
    axes[0].legend(fontsize=7)
    return finish(fig, out / "fleet_mgmt.png", caption(doc, path))


def plot_chaos(doc: dict[str, Any], path: Path, out: Path) -> Path:
    rounds = [r for r in doc.get("rounds", []) if r.get("loss") is not None and r.get("injected", True)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if rounds:
        kinds = sorted({r["fault"] for r in rounds})
        for i, kind in enumerate(kinds):
            rs = [r for r in rounds if r["fault"] == kind]
            ax.scatter([i] * len(rs), [r["loss"] for r in rs], alpha=0.6, zorder=3)
            bounds = [r["bound"] for r in rs if r.get("bound") is not None]
            ax.scatter([i] * len(bounds), bounds, marker="_", s=600, color=COLORS["goal"], zorder=2)
        ax.scatter([], [], marker="_", s=200, color=COLORS["goal"], label="each round's bound")
        ax.scatter([], [], color="#777777", label="each round's loss")
        ax.set_xticks(range(len(kinds)), [f"{k}\n({sum(r['fault'] == k for r in rounds)})" for k in kinds])
        ax.legend(fontsize=8)
    else:  # an older report: only the worst loss per fault kind
        worst = {k: v for k, v in (doc.get("worst_loss_seconds") or {}).items() if v is not None}
        ax.bar(range(len(worst)), list(worst.values()))
        ax.set_xticks(range(len(worst)), list(worst))
    ax.axhline(0, color="#999999", linewidth=0.8)
    ax.set_ylabel("seconds lost (recording window - MP4)")
    ax.set_title(f"Chaos: loss per fault kind (seed {doc.get('seed', '?')}, {doc.get('rounds_run', '?')} rounds)")
    return finish(fig, out / "chaos_loss.png", caption(doc, path))


PLOTS: dict[str, Callable[[Any, Path, Path], Path]] = {
    "cpu": plot_cpu, "forms": plot_forms, "upload": plot_upload, "fleet": plot_fleet, "chaos": plot_chaos,
    "fleetmgmt": plot_fleetmgmt,
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    for kind in PLOTS:
        ap.add_argument(f"--{kind}", type=Path, default=None, help=f"this file instead of the newest {kind}_*.json")
    args = ap.parse_args()
    written, skipped = [], []
    for kind, draw in PLOTS.items():
        path = getattr(args, kind) or newest(args.results_dir, kind)
        if path is None:
            skipped.append(f"{kind}: no {kind}_*.json in {args.results_dir}")
            continue
        try:
            written.append(draw(json.loads(path.read_text()), path, args.out))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            skipped.append(f"{kind}: {path} not drawable ({exc!r})")
    for p in written:
        print(f"wrote {p}")
    for s in skipped:
        print(f"skipped {s}")


if __name__ == "__main__":
    main()
