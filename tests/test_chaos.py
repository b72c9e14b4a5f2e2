"""Chaos: random faults (agent, FFmpeg, broker, object store, camera) at random phases of a task,
each held to a loss bound of its kind measured against the agent's own timestamps.

Each round starts a uniquely named task on one of two cameras, injects one fault at one phase,
verifies that the fault really happened (the process is dead, the service's port refuses), restores
the part after 0-5 s, makes sure the task is told to stop and waits (bounded) for its terminal
status. A fault that could not be injected (no FFmpeg left to kill) is not a round: another is run
in its place (at most ``MAX_EXTRA`` of them).

Every round must end with:

- ``uploaded``: a playable H.264 MP4 whose sha256 matches, one object per task and no other object;
  or ``failed`` only when no media ever arrived, with a reason that says so;
- that final status on the task's retained topic, as a new subscriber reads it (broker outage or not);
- loss within its fault kind's bound (see ``bound_for``): loss = the agent's recording window minus
  the MP4's duration. The window runs from the task's ``recording`` status (``updated_at``: FFmpeg
  reported its first frame) to its first ``stopping`` status (the stop command, or the restart that
  recovered the task) or, for an agent kill, the kill, whichever came first. Media before the first
  progress report makes the window a little shorter than what was recorded (loss about -0.6 s when
  nothing is lost);
- an MP4 no longer than could have been recorded (from ``start_time`` to the window's end, or for an
  agent kill to the restarted agent's recovery, which stops the orphaned FFmpeg);
- no FFmpeg reading our cameras that the running agent does not own (a killed agent's orphans are
  stopped by the restarted agent's recovery);
- the agent's ``query`` answer agreeing with what it published;
- stream copy chosen for every camera (the simulator sends browser-ready H.264, so a probe a fault
  cut short must not make the agent transcode).

The seed is printed first and is in the report and in every failure message; the summary table
(per fault kind: rounds, outcomes, worst loss against the bound) and every round's facts are written
as JSON to ``<tmp_path>/chaos-report.json``, whose path is printed.

    EDGE_CHAOS_ROUNDS   rounds with an injected fault (default 16: CI)
    EDGE_CHAOS_SEED     seed of the fault schedule (random if unset): replays the same schedule
    EDGE_CHAOS_REPORT   also copy the JSON report to this path
    EDGE_CHAOS_FAULTS / EDGE_CHAOS_PHASES   comma lists narrowing the choice (replaying one case)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, ffprobe_info, tcp_accepts
from rig import Rig, download, make_rig, minio_storage

ROUNDS = int(os.environ.get("EDGE_CHAOS_ROUNDS", "16"))
MAX_EXTRA = max(5, ROUNDS // 4)  # rounds run in place of faults that could not be injected
ALL_FAULTS = ("agent", "ffmpeg", "broker", "s3", "camera")
ALL_PHASES = ("starting", "recording", "stopping", "uploading")
# Optional narrowing for replaying one kind of fault, e.g. EDGE_CHAOS_FAULTS=agent EDGE_CHAOS_PHASES=starting
FAULTS = (
    tuple(os.environ.get("EDGE_CHAOS_FAULTS", "").split(",")) if os.environ.get("EDGE_CHAOS_FAULTS") else ALL_FAULTS
)
PHASES = (
    tuple(os.environ.get("EDGE_CHAOS_PHASES", "").split(",")) if os.environ.get("EDGE_CHAOS_PHASES") else ALL_PHASES
)
KINDS = ("agent.kill", "agent.kill_group", "ffmpeg", "broker", "s3", "camera")
CAMERAS = ("cam1", "cam2")
TERMINAL = frozenset({"uploaded", "failed"})
ACTIVE = frozenset({"starting", "recording"})
ROUND_DEADLINE_S = 90.0  # a task must reach uploaded/failed within this after its fault is restored
RESTOP_EVERY_S = 10.0
# Stated bound (as in test_e2e_faults.py): a fresh subscriber reads the task's final status from its
# retained topic this long after the task ended, broker outage or not.
RETAINED_BOUND_S = 15.0

# ---- what the loss bounds are made of (measured figures: 286 rounds on a 2-core machine running
# other test suites and benchmarks at the same time; see the issue 11 notes)
# The recorder settings the bounds derive from (passed to the rig explicitly below).
SEGMENT_S = 2  # recording.segment_seconds
STALL_S = 6.0  # recording.stall_timeout_seconds: no new frame this long -> FFmpeg restarted
BACKOFF_MAX_S = 2.0  # recording.restart_backoff_max_seconds
# FFmpeg writes a fragment at every keyframe and at least every second (ffmpeg.FRAGMENTED_MP4_OPTIONS:
# frag_duration 1 s) and flushes each as it is written, so a SIGKILLed FFmpeg loses the fragment in
# progress: at most FRAGMENT_S plus a frame. The simulator's keyframe interval (x264 key-int-max =
# 2 x fps, tests/camsim.py) is larger, so the GOP does not set the bound. An agent killed without its
# FFmpeg loses nothing: FFmpeg records on until recovery stops it with SIGTERM (its last fragment
# written). CRASH_TOLERANCE_S keeps the earlier bound of one GOP, which the fragment bound is inside.
FRAGMENT_S = 1.0
GOP_S = 2.0
CRASH_TOLERANCE_S = max(GOP_S, FRAGMENT_S + 0.1)
# A broker or object-store outage does not touch the recording at all: the MP4 must cover the
# window. It holds more than the window when nothing is lost (the window starts at the first progress
# report, -stats_period 0.5 s, after the first frame): measured loss -0.72 to -0.60 s in 118 rounds.
# This leaves only timing noise; a lost second fails. (As COVERAGE_TOLERANCE_S in test_e2e_faults.py.)
UNTOUCHED_TOLERANCE_S = 0.5
# The recorder's restart delay: min(backoff_max, 0.5 * 2^k) * uniform(0.8, 1.2).
RESTART_DELAY_MAX_S = 1.2 * BACKOFF_MAX_S
# `start` to FFmpeg's first frame reported, on the agent's clock (`recording.updated_at - start_time`,
# the report's `first_frame_seconds`, which includes a camera probe when the mode was not cached):
# median 0.8 s, at most 1.94 s.
FIRST_FRAME_S = 2.5
# An FFmpeg kill costs the restart gap (the restart delay and the new FFmpeg's first frame) and the
# fragment the killed FFmpeg had in progress (its earlier fragments are complete on disk). Measured
# with MPEG-TS segments (packets flushed one by one): loss at most +0.22 s (the window's head start
# hides about 0.6 s of the gap); fragments add at most FRAGMENT_S.
RESTART_GAP_S = RESTART_DELAY_MAX_S + FIRST_FRAME_S + FRAGMENT_S
# A camera outage costs the outage plus the reconnect. A killed camera closes its connection, so
# FFmpeg ends at once (STALL_S is for a camera that goes silent without closing, which this fault is
# not); FFmpeg is then restarted with backoff until the camera answers. Measured (18 outages during
# a recording): loss minus outage at most 1.52 s.
CAMERA_EXTRA_S = RESTART_DELAY_MAX_S + FIRST_FRAME_S
# The MP4 may run past the window's end by FFmpeg reading its 'q' (sent right after `stopping`).
OVERRUN_S = 1.0
# The agent's log line for each camera mode decision (agent.py: "camera %s sends %s: %s mode").
MODE_RE = re.compile(r"camera \S+ sends .*: (\w+) mode$", re.MULTILINE)
# A task may fail only for lack of media: these are the agent's reasons for that.
NO_MEDIA_RE = re.compile(
    r"no media|before the camera delivered any media|camera probe failed|camera did not answer a probe"
)

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.serial]


def phases_for(fault: str) -> tuple[str, ...]:
    """The phases a fault can hit: while a task uploads there is no recording FFmpeg to kill."""
    usable = tuple(p for p in PHASES if not (fault == "ffmpeg" and p == "uploading"))
    return usable or PHASES


def bound_for(fault: str, outage: float | None) -> float:
    """The most media a round of this fault kind may lose, in seconds (see the constants above)."""
    if fault == "ffmpeg":
        return RESTART_GAP_S
    if fault == "camera":
        return (outage or 0.0) + CAMERA_EXTRA_S
    if fault.startswith("agent"):
        return CRASH_TOLERANCE_S  # agent killed, with or without its FFmpeg
    return UNTOUCHED_TOLERANCE_S  # broker, object store


def epoch(iso_text: str) -> float:
    """An agent timestamp (ISO-8601 UTC, ``Z``) as epoch seconds."""
    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------- /proc helpers


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def _processes() -> dict[int, Proc]:
    """Live processes (zombies left out: a killed process counts as dead before it is reaped)."""
    table: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        table[int(entry.name)] = Proc(int(entry.name), int(fields[1]), argv)
    return table


def _descendants(root: int, table: dict[int, Proc]) -> list[Proc]:
    out: list[Proc] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for proc in table.values():
            if proc.ppid == parent:
                out.append(proc)
                frontier.append(proc.pid)
    return out


def _is_recording_ffmpeg(proc: Proc, url: str) -> bool:
    return bool(proc.argv) and Path(proc.argv[0]).name == "ffmpeg" and url in proc.argv


def agent_ffmpegs(agent: AgentProcess, url: str) -> list[int]:
    """The agent's recording FFmpeg(s) for ``url`` (FFmpeg runs in its own session: walk the tree)."""
    table = _processes()
    if not agent.is_alive():
        return []
    return sorted(p.pid for p in _descendants(agent.pid, table) if _is_recording_ffmpeg(p, url))


def all_ffmpegs(url: str) -> list[int]:
    return sorted(p.pid for p in _processes().values() if _is_recording_ffmpeg(p, url))


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def wait_dead(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Waits until none of ``pids`` is alive; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        table = _processes()
        alive = [pid for pid in pids if pid in table]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- a round


@dataclass
class Round:
    index: int
    cam: str
    task: str
    fault: str  # one of KINDS
    phase: str
    restore_after: float
    notes: list[str] = field(default_factory=list)
    injected: bool = False
    evidence: str = ""  # how the fault was seen to be in place
    fault_at: float | None = None  # epoch, just before the fault
    restarted_at: float | None = None  # epoch: a killed agent's successor is online (recovery has begun)
    outage: float | None = None  # seconds the part was down (kill -> ready again)
    status_at_fault: str | None = None  # the task's latest status when the fault was injected
    stop_replies: list[dict[str, Any]] = field(default_factory=list)
    stop_replied: bool = False
    orphans_at_kill: list[int] = field(default_factory=list)  # FFmpeg a killed agent left running
    strays: list[int] = field(default_factory=list)  # FFmpeg nobody owned after the round (killed)
    final: dict[str, Any] | None = None
    retained: str | None = None  # the task topic's retained status as a new subscriber reads it
    elapsed: float = 0.0
    mp4_duration: float | None = None
    # The agent's own timestamps (epoch), from its statuses and replies.
    start_time: float | None = None
    recording_at: float | None = None  # first `recording`: FFmpeg reported its first frame
    stopping_at: float | None = None  # first `stopping`: the stop command, or the recovering restart
    recovered_at: float | None = None  # the restarted agent's `stopping` (recovery stops orphans then)

    @property
    def crash_at(self) -> float | None:
        return self.fault_at if self.fault.startswith("agent") and self.injected else None

    @property
    def window_end(self) -> float | None:
        """Until when media must be in the MP4: the first `stopping`, or an agent kill before it."""
        ends = [t for t in (self.stopping_at, self.crash_at) if t is not None]
        return min(ends) if ends else None

    @property
    def latest_end(self) -> float | None:
        """Until when media may be in the MP4: a killed agent's orphaned FFmpeg records until the
        restarted agent's recovery stops it, even past a stop command whose 'q' it never got."""
        if self.fault == "agent.kill":
            return self.recovered_at or self.restarted_at
        return self.window_end

    @property
    def window(self) -> float | None:
        if self.recording_at is None or self.window_end is None:
            return None
        return max(0.0, self.window_end - self.recording_at)

    @property
    def kept(self) -> float | None:
        status = (self.final or {}).get("status")
        return self.mp4_duration if status == "uploaded" else 0.0 if status == "failed" else None

    @property
    def loss(self) -> float | None:
        """The agent's recording window minus the MP4's duration (a failed task kept 0 s)."""
        if self.window is None or self.kept is None:
            return None
        return self.window - self.kept

    @property
    def bound(self) -> float:
        return bound_for(self.fault, self.outage)

    @property
    def first_frame(self) -> float | None:
        """`start` to first frame, on the agent's clock (only for a task whose first FFmpeg was not
        killed before its first frame)."""
        if self.recording_at is None or self.start_time is None:
            return None
        if self.fault_at is not None and self.fault_at < self.recording_at:
            return None
        return self.recording_at - self.start_time

    def verdict(self) -> list[str]:
        """What this round did wrong (empty: nothing)."""
        out: list[str] = []
        where = f"round {self.index} ({self.fault}/{self.phase}, task {self.task})"
        final = self.final
        if final is None:
            return [f"{where}: stuck, no terminal status ({' '.join(self.notes)})"]
        if self.retained != final["status"]:
            out.append(f"{where}: its retained task topic says {self.retained!r} {RETAINED_BOUND_S:g} s after "
                       f"it ended {final['status']!r}")  # fmt: skip
        if self.strays:
            out.append(f"{where}: FFmpeg not owned by the running agent still recording after the round: "
                       f"{self.strays} (orphans of the kill: {self.orphans_at_kill})")  # fmt: skip
        if final["status"] == "failed":
            error = str(final.get("error") or "")
            if not NO_MEDIA_RE.search(error):
                out.append(f"{where}: failed although not for lack of media: {error!r}")
            elif self.recording_at is not None:  # media did arrive: at most a crash's torn GOP of it
                had = (self.window_end or epoch(final["updated_at"])) - self.recording_at
                if had > CRASH_TOLERANCE_S:
                    out.append(f"{where}: failed ({error!r}) after the agent reported media for {had:.2f} s")
        if self.loss is not None and self.loss > self.bound:
            out.append(f"{where}: lost {self.loss:.2f} s of a {self.window:.2f} s window "
                       f"(MP4 {self.kept:.2f} s), bound {self.bound:.2f} s")  # fmt: skip
        before_first_frame = self.fault.startswith("agent") and self.status_at_fault in (None, "starting")
        if self.loss is None and final["status"] == "uploaded" and not before_first_frame:
            # Only an agent killed before its first frame leaves an upload with no `recording` status
            # to measure from (a failed task with none is checked above: no media ever arrived).
            out.append(f"{where}: loss not measurable: recording at {self.recording_at}, window end "
                       f"{self.window_end}, final {final.get('status')}")  # fmt: skip
        end = self.latest_end
        if self.kept and end is not None and self.start_time is not None:
            most = end - self.start_time + OVERRUN_S
            if self.kept > most:
                out.append(f"{where}: MP4 {self.kept:.2f} s is longer than could have been recorded "
                           f"({most:.2f} s from start to the end of recording)")  # fmt: skip
        return out

    def facts(self) -> dict[str, Any]:
        final = self.final or {}

        def r2(v: float | None) -> float | None:
            return None if v is None else round(v, 2)

        return {
            "index": self.index, "camera": self.cam, "task": self.task, "fault": self.fault,
            "phase": self.phase, "status_at_fault": self.status_at_fault, "injected": self.injected,
            "evidence": self.evidence, "restore_after": r2(self.restore_after), "outage": r2(self.outage),
            "status": final.get("status"), "retained": self.retained, "error": final.get("error"),
            "recovered": bool(final.get("recovered")),
            "interruptions": int(final.get("interruptions") or 0), "stop_reason": final.get("stop_reason"),
            "window": r2(self.window), "mp4_duration": self.mp4_duration, "loss": r2(self.loss),
            "bound": r2(self.bound), "first_frame": r2(self.first_frame),
            "orphans_at_kill": self.orphans_at_kill, "strays": self.strays, "elapsed": round(self.elapsed, 1),
            "notes": self.notes, "problems": self.verdict(),
        }  # fmt: skip


class Chaos:
    """The parts, the agent and a never-cleared watcher of every task topic."""

    def __init__(self, rig: Rig, broker: Mosquitto, s3: SeaweedS3, sim: CameraSim, watch: MqttProbe) -> None:
        self.rig, self.broker, self.s3, self.sim, self.watch = rig, broker, s3, sim, watch
        self.urls = [sim.url(c) for c in CAMERAS]

    @property
    def agent(self) -> AgentProcess:
        assert self.rig.agent is not None
        return self.rig.agent

    def history(self, r: Round) -> list[dict[str, Any]]:
        return [m for m in self.watch.messages(self.rig.task_topic(r.cam, r.task)) if m.get("task_name") == r.task]

    def latest(self, r: Round) -> dict[str, Any] | None:
        hist = self.history(r)
        return hist[-1] if hist else None

    def wait_status(self, r: Round, wanted: set[str] | frozenset[str], timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            for doc in self.history(r):
                if doc.get("status") in wanted:
                    return dict(doc)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def note_times(self, r: Round) -> None:
        """The task's own timestamps: earliest `recording` and `stopping` (a later doc of the same
        status is an update, e.g. an interruption count, or a repeated stop)."""
        docs = self.history(r) + r.stop_replies
        starts = [epoch(d["start_time"]) for d in docs if d.get("start_time")]
        r.start_time = min(starts) if starts else None
        recording = [epoch(d["updated_at"]) for d in docs if d.get("status") == "recording" and d.get("updated_at")]
        stopping = [epoch(d["updated_at"]) for d in docs if d.get("status") == "stopping" and d.get("updated_at")]
        r.recording_at = min(recording) if recording else None
        r.stopping_at = min(stopping) if stopping else None
        recovered = [epoch(d["updated_at"]) for d in docs if d.get("status") == "stopping" and d.get("recovered")]
        r.recovered_at = min(recovered) if recovered else None

    def request(self, cam: str, payload: dict[str, Any], timeout: float = 10) -> dict[str, Any] | None:
        try:
            return self.rig.request(cam, payload, timeout=timeout)
        except (AssertionError, RuntimeError):  # no reply / not connected: the agent or broker is not back yet
            return None

    def send_stop(self, r: Round) -> dict[str, Any] | None:
        reply = self.request(r.cam, {"action": "stop", "task_name": r.task})
        if reply is None:
            r.notes.append("stop->no reply")
            return None
        r.stop_replied = True
        r.notes.append(f"stop->{reply.get('status')}")
        if reply.get("task_name") == r.task:
            r.stop_replies.append(reply)  # a `stopping` reply carries the agent's time of the stop
        return reply

    def settle(self) -> None:
        """Both test clients connected (after a broker restart they reconnect and resubscribe in 1-2 s)."""
        if not (self.rig.probe.connected and self.watch.connected):
            self.rig.probe.wait_connected(30)
            self.watch.wait_connected(30)
            time.sleep(0.5)  # let the renewed subscriptions be acknowledged

    # -- faults

    def _service_down(self, r: Round, part: Mosquitto | SeaweedS3 | CameraSim, name: str) -> None:
        """Kill a service, check it is down (process gone, port refusing), hold, bring it back."""
        began = time.monotonic()
        part.kill()
        down = not part.is_alive() and not tcp_accepts(part.host, part.port, timeout=0.5)
        r.evidence = f"{name} exit {part.returncode}, port {part.port} refused" if down else ""
        r.injected = down
        time.sleep(max(0.0, r.restore_after - (time.monotonic() - began)))
        part.start()
        r.outage = time.monotonic() - began

    def inject(self, r: Round) -> None:
        url = self.sim.url(r.cam)
        r.status_at_fault = (self.latest(r) or {}).get("status")
        r.fault_at = time.time()
        if r.fault.startswith("agent"):
            agent = self.agent
            table = _processes()
            children = [p.pid for p in _descendants(agent.pid, table)
                        if any(_is_recording_ffmpeg(p, u) for u in self.urls)]  # fmt: skip
            if r.fault == "agent.kill":
                code: int | None = agent.kill()  # a crash: FFmpeg children are orphaned
                r.orphans_at_kill = [pid for pid in children if pid in _processes()]
                r.injected = code == -signal.SIGKILL
                r.evidence = f"agent exit {code}; orphaned FFmpeg {r.orphans_at_kill}"
            else:
                agent.kill_group()  # a power cut: FFmpeg (own session) dies with it
                for pid in children:
                    _sigkill(pid)
                code = agent.returncode
                survivors = wait_dead(children)
                r.injected = code == -signal.SIGKILL and not survivors
                r.evidence = f"agent exit {code}; FFmpeg {children} killed, survivors {survivors}"
            time.sleep(r.restore_after)
            self.rig.start_agent()
            r.restarted_at = time.time()
        elif r.fault == "ffmpeg":
            pids = agent_ffmpegs(self.agent, url)
            until = time.monotonic() + (5 if r.phase == "starting" else 1)
            while not pids and time.monotonic() < until:  # right after a start FFmpeg may not be spawned yet
                time.sleep(0.05)
                pids = agent_ffmpegs(self.agent, url)
            r.status_at_fault = (self.latest(r) or {}).get("status")
            r.fault_at = time.time()
            for pid in pids:
                _sigkill(pid)
            survivors = wait_dead(pids)
            r.injected = bool(pids) and not survivors
            r.evidence = f"FFmpeg {pids} killed, survivors {survivors}" if pids else ""
            if not pids:
                r.notes.append("no FFmpeg running to kill: not a round")
            time.sleep(r.restore_after)
        elif r.fault == "broker":
            self._service_down(r, self.broker, "mosquitto")
            self.settle()
        elif r.fault == "s3":
            self._service_down(r, self.s3, "seaweedfs")
        elif r.fault == "camera":
            self._service_down(r, self.sim, "camsim")
        else:  # pragma: no cover
            raise AssertionError(r.fault)

    def run_round(self, r: Round, rng: random.Random) -> None:
        began = time.monotonic()
        self.settle()
        reply = None
        until = time.monotonic() + 60
        while reply is None and time.monotonic() < until:
            # A repeated start of the same task is idempotent (it answers with that task's status).
            reply = self.request(r.cam, {"action": "start", "task_name": r.task}, timeout=15)
            if reply is None:
                time.sleep(1)
        assert reply is not None and reply.get("ok") and reply.get("task_name") == r.task, (r, reply)
        stop_sent = False
        if r.phase == "recording":
            if self.wait_status(r, {"recording"} | TERMINAL, 30) is None:
                r.notes.append("never recording before fault")
            time.sleep(rng.uniform(1, 5))
        elif r.phase in ("stopping", "uploading"):
            if self.wait_status(r, {"recording"} | TERMINAL, 30) is None:
                r.notes.append("never recording before stop")
            time.sleep(rng.uniform(1, 4))
            self.send_stop(r)
            stop_sent = True
            if r.phase == "uploading" and self.wait_status(r, {"uploading"} | TERMINAL, 30) is None:
                r.notes.append("never uploading before fault")
        self.inject(r)

        if not stop_sent:
            # Let the task (or its recovery) record a little after the fault, then stop it.
            doc = self.wait_status(r, {"recording"} | TERMINAL, 20)
            if doc is not None and doc["status"] == "recording":
                time.sleep(rng.uniform(1, 3))
        deadline = time.monotonic() + ROUND_DEADLINE_S
        last_stop = -math.inf
        while time.monotonic() < deadline:
            latest = self.latest(r)
            if r.stop_replied and self.wait_status(r, TERMINAL, 0) is not None:
                break  # (the latest message may be an older retained one re-read after a broker restart)
            # Every task gets a stop that is answered; one still active after it gets another.
            pending = not r.stop_replied or (latest is not None and latest["status"] in ACTIVE)
            if pending and time.monotonic() - last_stop >= (RESTOP_EVERY_S if r.stop_replied else 2.0):
                last_stop = time.monotonic()
                self.send_stop(r)
            self.wait_status(r, TERMINAL, 1.0)
        self.note_times(r)
        r.final = self.wait_status(r, TERMINAL, 0)
        if r.final is None:
            r.notes.append(f"STUCK: last status {self.latest(r)}")
        else:
            r.retained = self.read_retained(self.rig.task_topic(r.cam, r.task), r.final["status"])
        r.elapsed = time.monotonic() - began

    def read_retained(self, topic: str, expected: str) -> str | None:
        """The retained status on ``topic`` as a new subscriber reads it, retried (a new client each
        time) until it is ``expected`` or RETAINED_BOUND_S has passed; the last one read."""
        deadline = time.monotonic() + RETAINED_BOUND_S
        status = None
        while True:
            with contextlib.suppress(AssertionError, OSError), MqttProbe(self.broker.host, self.broker.port) as reader:
                reader.subscribe(topic)
                status = reader.wait_for(topic, timeout=2).get("status")
            if status == expected or time.monotonic() >= deadline:
                return status
            time.sleep(1.0)

    def reap_strays(self) -> list[int]:
        """FFmpeg reading our cameras that the running agent does not own (then killed, so one
        orphan is counted once and does not disturb later rounds)."""
        owned: set[int] = set()
        for url in self.urls:
            owned.update(agent_ffmpegs(self.agent, url))
        strays = [pid for url in self.urls for pid in all_ffmpegs(url) if pid not in owned]
        for pid in strays:
            _sigkill(pid)
        return strays


# ------------------------------------------------------------------------------------ report


def summary(rounds: list[Round]) -> dict[str, Any]:
    """Per fault kind: rounds, outcomes, worst loss against its bound (and per fault and phase)."""
    counted = [r for r in rounds if r.injected]
    kinds: list[dict[str, Any]] = []
    for kind in KINDS:
        rs = [r for r in counted if r.fault == kind]
        if not rs and kind.split(".")[0] not in FAULTS:
            continue
        losses = [r for r in rs if r.loss is not None]
        worst = max(losses, key=lambda r: r.loss - r.bound if r.loss is not None else -math.inf, default=None)
        kinds.append({
            "fault": kind,
            "rounds": len(rs),
            "uploaded": sum(1 for r in rs if (r.final or {}).get("status") == "uploaded"),
            "failed": sum(1 for r in rs if (r.final or {}).get("status") == "failed"),
            "stuck": sum(1 for r in rs if r.final is None),
            "measured": len(losses),
            "recovered": sum(1 for r in rs if (r.final or {}).get("recovered")),
            "interruptions": sum(int((r.final or {}).get("interruptions") or 0) for r in rs),
            "worst_loss": None if worst is None or worst.loss is None else round(worst.loss, 2),
            "bound_of_worst": None if worst is None else round(worst.bound, 2),
            "violations": sum(1 for r in rs if r.verdict()),
        })  # fmt: skip
    # By the task's status when the fault hit (the phase aimed at may have passed: an upload of a few
    # seconds of video can be done before the object store is killed).
    phases: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in counted:
        hit = r.status_at_fault or "-"
        empty = {"fault": r.fault, "phase": r.phase, "status_at_fault": hit, "rounds": 0, "uploaded": 0,
                 "failed": 0, "stuck": 0}  # fmt: skip
        row = phases.setdefault((r.fault, r.phase, hit), empty)
        row["rounds"] += 1
        row[(r.final or {}).get("status") or "stuck"] += 1
    first_frames = [r.first_frame for r in counted if r.first_frame is not None]
    return {
        "kinds": kinds,
        "phases": [phases[k] for k in sorted(phases)],
        "not_injected": [r.index for r in rounds if not r.injected],
        "first_frame_seconds": {
            "count": len(first_frames),
            "max": round(max(first_frames), 2) if first_frames else None,
            "median": round(sorted(first_frames)[len(first_frames) // 2], 2) if first_frames else None,
        },
        "bounds": {
            "crash_tolerance": CRASH_TOLERANCE_S,
            "untouched_tolerance": UNTOUCHED_TOLERANCE_S,
            "ffmpeg_restart_gap": round(RESTART_GAP_S, 2),
            "camera": f"outage + {CAMERA_EXTRA_S:.1f}",
            "overrun": OVERRUN_S,
            "gop": GOP_S,
            "segment": SEGMENT_S,
            "stall_timeout": STALL_S,
            "restart_backoff_max": BACKOFF_MAX_S,
            "first_frame": FIRST_FRAME_S,
        },
    }


def fmt(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.2f}"


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'fault':<17}{'rounds':>7}{'uploaded':>9}{'failed':>7}{'stuck':>6}{'measured':>9}{'recov':>6}"
            f"{'intr':>5}{'worst loss':>11}{'bound':>7}{'bad':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for row in report["summary"]["kinds"]:
        worst = "-" if row["worst_loss"] is None else f"{row['worst_loss']:+.2f}"
        bound = "-" if row["bound_of_worst"] is None else f"{row['bound_of_worst']:.2f}"
        lines.append(
            f"{row['fault']:<17}{row['rounds']:>7}{row['uploaded']:>9}{row['failed']:>7}{row['stuck']:>6}"
            f"{row['measured']:>9}{row['recovered']:>6}{row['interruptions']:>5}{worst:>11}{bound:>7}"
            f"{row['violations']:>5}"
        )
    ff = report["summary"]["first_frame_seconds"]
    lines.append(f"loss = the agent's recording window minus the MP4 (negative: media before the first "
                 f"progress report); first frame median {ff['median']} s, max {ff['max']} s; "
                 f"not injected (not counted): {report['summary']['not_injected']}")  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- test


@pytest.mark.timeout(300 + 60 * (ROUNDS + MAX_EXTRA))
def test_chaos_rounds(tmp_path: Path, broker, probe, prefix, make_agent, track, bucket, capsys) -> None:
    seed = int(os.environ.get("EDGE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    report_path = tmp_path / "chaos-report.json"
    with capsys.disabled():
        print(f"\nchaos: seed={seed} rounds={ROUNDS} (replay: EDGE_CHAOS_SEED={seed}); report {report_path}")
    rng = random.Random(seed)
    started = time.monotonic()

    sim = track(CameraSim(tmp_path / "camsim", mounts=CAMERAS, width=640, height=360, shared=False)).start()
    s3 = track(SeaweedS3(tmp_path / "s3")).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={c: {"url": sim.url(c)} for c in CAMERAS},
                   storage=minio_storage(s3, bucket),
                   recording={"segment_seconds": SEGMENT_S, "stall_timeout_seconds": STALL_S,
                              "restart_backoff_max_seconds": BACKOFF_MAX_S})  # fmt: skip
    watch = MqttProbe(broker.host, broker.port)
    rounds: list[Round] = []
    chaos = Chaos(rig, broker, s3, sim, watch)
    problems: list[str] = []
    try:
        watch.subscribe(f"{rig.base}/+/tasks/#")
        rig.start_agent()
        index = 0
        first = rng.sample(FAULTS, len(FAULTS))  # every fault kind at least once, even in a short run
        while sum(r.injected for r in rounds) < ROUNDS:
            if index >= ROUNDS + MAX_EXTRA:
                problems.append(f"only {sum(r.injected for r in rounds)} of {ROUNDS} faults could be injected "
                                f"in {index} rounds")  # fmt: skip
                break
            fault = first[index] if index < len(first) else rng.choice(FAULTS)
            if fault == "agent":
                fault = rng.choice(("agent.kill", "agent.kill_group"))
            r = Round(index=index, cam=CAMERAS[index % len(CAMERAS)], task=f"chaos-{seed}-{index:03d}", fault=fault,
                      phase=rng.choice(phases_for(fault)), restore_after=rng.uniform(0, 5))  # fmt: skip
            index += 1
            rounds.append(r)
            chaos.run_round(r, random.Random(rng.random()))  # timings: the schedule stays seed-determined
            r.strays = chaos.reap_strays()
            final = r.final or {}
            print(f"round {r.index:>3} {r.cam} {r.fault:<16} {r.phase:<10} at {r.status_at_fault or '-':<9} "
                  f"restore {r.restore_after:4.1f}s -> {final.get('status', 'STUCK'):<8} {r.elapsed:5.1f}s "
                  f"recovered={bool(final.get('recovered'))} intr={final.get('interruptions', 0)} "
                  f"{'' if r.injected else 'NOT INJECTED '}{final.get('error') or ''} {' '.join(r.notes)}")  # fmt: skip

        # ---- media: every upload downloads, matches its checksum and plays
        client = s3.client()
        uploaded: dict[str, Round] = {}
        for r in rounds:
            final = r.final
            if final is None or final["status"] != "uploaded":
                continue
            name = final.get("object_name")
            if name in uploaded:
                problems.append(f"tasks {uploaded[name].task} and {r.task} share object {name}")
            uploaded[name] = r
            dest = tmp_path / f"{r.task}.mp4"
            try:
                download(final["download_url"], dest)
            except Exception as exc:
                problems.append(f"round {r.index} task {r.task}: download of {name} failed: {exc!r}")
                continue
            digest = hashlib.sha256(dest.read_bytes()).hexdigest()
            if digest != final.get("sha256"):
                problems.append(f"round {r.index} task {r.task}: sha256 {digest} != status {final.get('sha256')}")
            try:
                info = ffprobe_info(dest)
            except AssertionError as exc:
                problems.append(f"round {r.index} task {r.task}: unplayable upload: {exc}")
                continue
            if info["codec"] != "h264" or not info["duration"] > 0:
                problems.append(f"round {r.index} task {r.task}: bad media {info['codec']} {info['duration']}")
                continue
            r.mp4_duration = round(float(info["duration"]), 3)
            dest.unlink()
        # ---- per round: outcome, loss bound, orphans (rounds that were not injected too: only the
        # table leaves them out)
        for r in rounds:
            problems.extend(r.verdict())
        # The agent's own answer agrees with what it published.
        for r in rounds:
            if r.final is None:
                continue
            answer = chaos.request(r.cam, {"action": "query", "task_name": r.task}, timeout=15)
            if answer is None or answer.get("status") != r.final["status"]:
                problems.append(f"round {r.index} task {r.task}: query says {answer}, published {r.final}")
        listed = client.list_objects(bucket, recursive=True) if client.bucket_exists(bucket) else []
        objects = sorted(o.object_name for o in listed)
        expected = sorted(uploaded)
        if objects != expected:
            extra = sorted(set(objects) - set(expected)) + [o for o in set(objects) if objects.count(o) > 1]
            missing = sorted(set(expected) - set(objects))
            problems.append(f"bucket mismatch: extra/duplicated {extra}, missing {missing}")
        if not chaos.agent.is_alive():
            problems.append(f"agent not alive at the end (exit {chaos.agent.returncode})")
        if strays := chaos.reap_strays():
            problems.append(f"FFmpeg not owned by the agent still recording at the end: {strays}")
        # The simulator sends browser-ready H.264 (yuv420p, even size): stream copy is the only right
        # mode, whatever a fault did to a probe (every agent started in this test logs its decisions).
        logs = "\n".join(log.read_text(errors="replace") for log in sorted(tmp_path.glob("agent*/agent.log")))
        if wrong := [m.group(0) for m in MODE_RE.finditer(logs) if m.group(1) != "copy"]:
            problems.append(f"the agent chose to transcode a browser-ready H.264 camera: {wrong}")
    finally:
        runtime = time.monotonic() - started
        report = {
            "seed": seed, "rounds_requested": ROUNDS, "rounds_run": len(rounds),
            "rounds_counted": sum(r.injected for r in rounds), "runtime_seconds": round(runtime, 1),
            "summary": summary(rounds), "problems": problems, "rounds": [r.facts() for r in rounds],
        }  # fmt: skip
        report_path.write_text(json.dumps(report, indent=2))
        if extra_path := os.environ.get("EDGE_CHAOS_REPORT"):
            Path(extra_path).write_text(json.dumps(report, indent=2))
        print("\nper round: fault, phase (status at the fault), outcome, window, MP4, loss / bound")
        for r in rounds:
            print(f"  {r.index:>3} {r.fault:<16} {r.phase:<10} ({r.status_at_fault or '-':<9}) "
                  f"{(r.final or {}).get('status', 'STUCK'):<8} window {fmt(r.window):>6} mp4 {fmt(r.mp4_duration):>6} "
                  f"loss {fmt(r.loss, '+'):>6} / {r.bound:.2f}{'' if r.injected else '  (not injected)'}")  # fmt: skip
        with capsys.disabled():
            print(f"\nchaos: seed {seed}, {report['rounds_counted']} rounds counted of {len(rounds)} run, "
                  f"{runtime:.0f} s; report {report_path}")  # fmt: skip
            print(format_table(report))
        with contextlib.suppress(Exception):  # teardown also after a failed start
            chaos.reap_strays()
        watch.close()
    assert not problems, f"seed {seed} (replay: EDGE_CHAOS_SEED={seed}), report {report_path}:\n" + "\n".join(problems)
