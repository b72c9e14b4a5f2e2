"""Chaos: random faults (agent, FFmpeg, broker, object store, camera) at random phases of a task.

Each round starts a uniquely named task on one of two cameras, injects one fault at one phase,
restores the part after 0-5 s, makes sure the task is told to stop and waits (bounded) for its
terminal status. After all rounds every task must have ended ``uploaded`` (a playable H.264 MP4
whose sha256 matches, exactly one object in the bucket) or ``failed`` with a reason.

    EDGE_CHAOS_ROUNDS   rounds (default 20)
    EDGE_CHAOS_SEED     seed of the fault schedule (random and printed if unset)
    EDGE_CHAOS_REPORT   write the tally as JSON to this path
    EDGE_CHAOS_FAULTS / EDGE_CHAOS_PHASES   comma lists narrowing the choice (replaying one case)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, ffprobe_info
from rig import Rig, download, make_rig, minio_storage

ROUNDS = int(os.environ.get("EDGE_CHAOS_ROUNDS", "20"))
ALL_FAULTS = ("agent", "ffmpeg", "broker", "s3", "camera")
ALL_PHASES = ("starting", "recording", "stopping", "uploading")
# Optional narrowing for replaying one kind of fault, e.g. EDGE_CHAOS_FAULTS=agent EDGE_CHAOS_PHASES=starting
FAULTS = (
    tuple(os.environ.get("EDGE_CHAOS_FAULTS", "").split(",")) if os.environ.get("EDGE_CHAOS_FAULTS") else ALL_FAULTS
)
PHASES = (
    tuple(os.environ.get("EDGE_CHAOS_PHASES", "").split(",")) if os.environ.get("EDGE_CHAOS_PHASES") else ALL_PHASES
)
CAMERAS = ("cam1", "cam2")
TERMINAL = frozenset({"uploaded", "failed"})
ACTIVE = frozenset({"starting", "recording"})
ROUND_DEADLINE_S = 90.0  # a task must reach uploaded/failed within this after its fault is restored
RESTOP_EVERY_S = 10.0

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


# ------------------------------------------------------------------------------- /proc helpers


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def _processes() -> dict[int, Proc]:
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
    """The agent's recording FFmpeg(s) for ``url``.

    FFmpeg runs in its own session, so ``group_pids()`` alone misses it: walk the process tree too.
    """
    table = _processes()
    candidates = {p.pid for p in _descendants(agent.pid, table)} | set(agent.group_pids())
    return sorted(pid for pid in candidates if pid in table and _is_recording_ffmpeg(table[pid], url))


def all_ffmpegs(url: str) -> list[int]:
    return sorted(p.pid for p in _processes().values() if _is_recording_ffmpeg(p, url))


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------- a round


@dataclass
class Round:
    index: int
    cam: str
    task: str
    fault: str  # agent.kill | agent.kill_group | ffmpeg | broker | s3 | camera
    phase: str
    restore_after: float
    notes: list[str] = field(default_factory=list)
    recording_at: float | None = None  # epoch: updated_at of the task's first `recording` status
    stop_at: float | None = None  # epoch: when a stop command that took effect was sent
    fault_at: float | None = None  # epoch: when the fault was injected
    stop_replied: bool = False
    final: dict[str, Any] | None = None
    elapsed: float = 0.0
    mp4_duration: float | None = None

    @property
    def recording_ended_at(self) -> float | None:
        """When recording should have ended: our stop, else the crash (the task was recovered without it)."""
        if self.stop_at is not None:
            return self.stop_at
        if self.fault.startswith("agent") and self.final is not None and self.final.get("recovered"):
            return self.fault_at
        return None

    @property
    def loss(self) -> float | None:
        """Wall time from `recording` to the stop minus the MP4's duration (a failed task kept 0 s)."""
        end = self.recording_ended_at
        if self.recording_at is None or end is None or self.final is None:
            return None
        kept = self.mp4_duration if self.final["status"] == "uploaded" else 0.0
        return None if kept is None else (end - self.recording_at) - kept


class Chaos:
    """The parts, the agent and a never-cleared watcher of every task topic."""

    def __init__(self, rig: Rig, broker: Mosquitto, s3: SeaweedS3, sim: CameraSim, watch: MqttProbe) -> None:
        self.rig, self.broker, self.s3, self.sim, self.watch = rig, broker, s3, sim, watch
        self.orphans: dict[int, str] = {}  # pid -> url of FFmpeg left running by a killed agent

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
            for msg in self.watch.raw(self.rig.task_topic(r.cam, r.task)):
                if not msg.payload:
                    continue
                doc = msg.json()
                if doc.get("task_name") == r.task and doc.get("status") in wanted:
                    self.note_recording(r)
                    return dict(doc)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def note_recording(self, r: Round) -> None:
        if r.recording_at is not None:
            return
        for doc in self.history(r):
            if doc.get("status") == "recording":  # the agent's clock, not when the probe got it
                r.recording_at = datetime.fromisoformat(doc["updated_at"].replace("Z", "+00:00")).timestamp()
                return

    def request(self, cam: str, payload: dict[str, Any], timeout: float = 10) -> dict[str, Any] | None:
        try:
            return self.rig.request(cam, payload, timeout=timeout)
        except (AssertionError, RuntimeError):  # no reply / not connected: the agent or broker is not back yet
            return None

    def send_stop(self, r: Round) -> dict[str, Any] | None:
        sent = time.time()
        reply = self.request(r.cam, {"action": "stop", "task_name": r.task})
        if reply is None:
            r.notes.append("stop->no reply")
            return None
        r.stop_replied = True
        r.notes.append(f"stop->{reply.get('status')}")
        if r.stop_at is None and reply.get("status") in ACTIVE | {"stopping"}:
            r.stop_at = sent  # this stop ended the recording (else it had ended already)
        return reply

    def settle(self) -> None:
        """Both test clients connected (after a broker restart they reconnect and resubscribe in 1-2 s)."""
        if not (self.rig.probe.connected and self.watch.connected):
            self.rig.probe.wait_connected(30)
            self.watch.wait_connected(30)
            time.sleep(0.5)  # let the renewed subscriptions be acknowledged

    # -- faults

    def inject(self, r: Round, rng: random.Random) -> None:
        url = self.sim.url(r.cam)
        if r.fault.startswith("agent"):
            agent = self.agent
            table = _processes()
            urls = [self.sim.url(c) for c in CAMERAS]
            children = [p.pid for p in _descendants(agent.pid, table) if any(_is_recording_ffmpeg(p, u) for u in urls)]
            if r.fault == "agent.kill":
                agent.kill()  # a crash: FFmpeg children are orphaned
                for pid in children:
                    if pid in _processes():
                        self.orphans[pid] = next(a for a in table[pid].argv if a.startswith("rtsp://"))
            else:
                agent.kill_group()  # a power cut: FFmpeg (own session) must die too
                for pid in children:
                    _sigkill(pid)
            time.sleep(r.restore_after)
            self.rig.start_agent()
        elif r.fault == "ffmpeg":
            pids = agent_ffmpegs(self.agent, url)
            until = time.monotonic() + 5
            while not pids and time.monotonic() < until:  # right after a start FFmpeg may not be spawned yet
                time.sleep(0.05)
                pids = agent_ffmpegs(self.agent, url)
            if not pids:
                r.notes.append("no ffmpeg running to kill")
            for pid in pids:
                _sigkill(pid)
            time.sleep(r.restore_after)
        elif r.fault == "broker":
            self.broker.kill()
            time.sleep(r.restore_after)
            self.broker.start()
            self.settle()
        elif r.fault == "s3":
            self.s3.kill()
            time.sleep(r.restore_after)
            self.s3.start()
        elif r.fault == "camera":
            self.sim.kill()
            time.sleep(r.restore_after)
            self.sim.start()
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
        r.fault_at = time.time()
        self.inject(r, rng)

        if not stop_sent:
            # Let the task (or its recovery) record a little after the fault, then stop it.
            doc = self.wait_status(r, {"recording"} | TERMINAL, 20)
            if doc is not None and doc["status"] == "recording":
                time.sleep(rng.uniform(1, 3))
        deadline = time.monotonic() + ROUND_DEADLINE_S
        last_stop = -math.inf
        while time.monotonic() < deadline:
            latest = self.latest(r)
            if latest is not None and latest["status"] in TERMINAL and r.stop_replied:
                break
            # Every task gets a stop that is answered; one still active after it gets another.
            pending = not r.stop_replied or (latest is not None and latest["status"] in ACTIVE)
            if pending and time.monotonic() - last_stop >= (RESTOP_EVERY_S if r.stop_replied else 2.0):
                last_stop = time.monotonic()
                self.send_stop(r)
            self.wait_status(r, TERMINAL, 1.0)
        self.note_recording(r)
        r.final = self.wait_status(r, TERMINAL, 0)
        if r.final is None:
            r.notes.append(f"STUCK: last status {self.latest(r)}")
        r.elapsed = time.monotonic() - began

    def live_orphans(self) -> list[int]:
        return [pid for pid, url in self.orphans.items() if pid in all_ffmpegs(url)]

    def reap_orphans(self) -> list[int]:
        """Orphaned FFmpeg still alive (then killed, so they do not outlive the test)."""
        alive = self.live_orphans()
        for pid in alive:
            _sigkill(pid)
        return alive


# ------------------------------------------------------------------------------------ tally


def tally(rounds: list[Round]) -> dict[str, Any]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    worst: dict[str, float | None] = {}
    for r in rounds:
        row = rows.setdefault(
            (r.fault, r.phase),
            {
                "fault": r.fault,
                "phase": r.phase,
                "rounds": 0,
                "uploaded": 0,
                "failed": 0,
                "stuck": 0,
                "recovered": 0,
                "interruptions": 0,
            },
        )
        row["rounds"] += 1
        final = r.final or {}
        status = final.get("status")
        row["uploaded" if status == "uploaded" else "failed" if status == "failed" else "stuck"] += 1
        row["recovered"] += 1 if final.get("recovered") else 0
        row["interruptions"] += int(final.get("interruptions") or 0)
        worst.setdefault(r.fault, None)
        if r.loss is not None:
            prev = worst[r.fault]
            worst[r.fault] = r.loss if prev is None else max(prev, r.loss)
    return {
        "rows": [rows[k] for k in sorted(rows)],
        "worst_loss_seconds": {k: None if v is None else round(v, 2) for k, v in sorted(worst.items())},
        "rounds": [
            {
                "index": r.index,
                "camera": r.cam,
                "task": r.task,
                "fault": r.fault,
                "phase": r.phase,
                "restore_after": round(r.restore_after, 2),
                "status": (r.final or {}).get("status"),
                "error": (r.final or {}).get("error"),
                "recovered": bool((r.final or {}).get("recovered")),
                "interruptions": int((r.final or {}).get("interruptions") or 0),
                "mp4_duration": r.mp4_duration,
                "loss": None if r.loss is None else round(r.loss, 2),
                "elapsed": round(r.elapsed, 1),
                "notes": r.notes,
            }
            for r in rounds
        ],
    }


def format_table(report: dict[str, Any]) -> str:
    head = f"{'fault':<17}{'phase':<11}{'rounds':>7}{'uploaded':>9}{'failed':>7}{'stuck':>6}{'recov':>6}{'intr':>6}"
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        lines.append(
            f"{row['fault']:<17}{row['phase']:<11}{row['rounds']:>7}{row['uploaded']:>9}{row['failed']:>7}"
            f"{row['stuck']:>6}{row['recovered']:>6}{row['interruptions']:>6}"
        )
    lines.append("")
    lines.append("worst-case loss (wall time recording->stop minus MP4 duration), per fault:")
    for kind, loss in report["worst_loss_seconds"].items():
        lines.append(f"  {kind:<17}{'n/a' if loss is None else f'{loss:+.2f} s'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- test


@pytest.mark.timeout(300 + 60 * ROUNDS)
def test_chaos_rounds(tmp_path: Path, broker, probe, prefix, make_agent, track, bucket) -> None:
    seed = int(os.environ.get("EDGE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nchaos: seed={seed} rounds={ROUNDS} (EDGE_CHAOS_SEED={seed} to replay)")
    rng = random.Random(seed)
    started = time.monotonic()

    sim = track(CameraSim(tmp_path / "camsim", mounts=CAMERAS, width=640, height=360, shared=False)).start()
    s3 = track(SeaweedS3(tmp_path / "s3")).start()
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={c: {"url": sim.url(c)} for c in CAMERAS},
                   storage=minio_storage(s3, bucket))  # fmt: skip
    watch = MqttProbe(broker.host, broker.port)
    rounds: list[Round] = []
    chaos = Chaos(rig, broker, s3, sim, watch)
    try:
        watch.subscribe(f"{rig.base}/+/tasks/#")
        rig.start_agent()
        for i in range(ROUNDS):
            fault = rng.choice(FAULTS)
            if fault == "agent":
                fault = rng.choice(("agent.kill", "agent.kill_group"))
            r = Round(index=i, cam=CAMERAS[i % len(CAMERAS)], task=f"chaos-{seed}-{i:03d}", fault=fault,
                      phase=rng.choice(PHASES), restore_after=rng.uniform(0, 5))  # fmt: skip
            rounds.append(r)
            chaos.run_round(r, random.Random(rng.random()))  # timings: the schedule stays seed-determined
            if alive := chaos.live_orphans():
                r.notes.append(f"orphaned FFmpeg alive after the round: {alive}")
            final = r.final or {}
            print(f"round {i:>3} {r.cam} {r.fault:<16} {r.phase:<10} restore {r.restore_after:4.1f}s -> "
                  f"{final.get('status', 'STUCK'):<8} {r.elapsed:5.1f}s recovered={bool(final.get('recovered'))} "
                  f"intr={final.get('interruptions', 0)} {final.get('error') or ''} {' '.join(r.notes)}")  # fmt: skip

        # ---- verdict
        problems: list[str] = []
        client = s3.client()
        uploaded: dict[str, Round] = {}
        for r in rounds:
            final = r.final
            if final is None:
                problems.append(f"round {r.index} ({r.fault}/{r.phase}) task {r.task} stuck: {chaos.latest(r)}")
                continue
            if final["status"] == "failed":
                if not final.get("error"):
                    problems.append(f"round {r.index} task {r.task} failed without an error: {final}")
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
            r.mp4_duration = info["duration"]
            if info["codec"] != "h264" or not info["duration"] > 0:
                problems.append(f"round {r.index} task {r.task}: bad media {info['codec']} {info['duration']}")
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
        table = _processes()
        orphan_dirs = {pid: table[pid].argv[-1] for pid in chaos.live_orphans() if pid in table}
        orphans = chaos.reap_orphans()

        report = tally(rounds)
        runtime = time.monotonic() - started
        report.update(seed=seed, rounds_run=len(rounds), runtime_seconds=round(runtime, 1),
                      orphaned_ffmpeg_alive_at_end=len(orphans),
        orphaned_ffmpeg_outputs=list(orphan_dirs.values()), problems=problems)  # fmt: skip
        print()
        print(format_table(report))
        print("\nper round: status, MP4 seconds, loss seconds")
        for r in rounds:
            dur = "-" if r.mp4_duration is None else f"{r.mp4_duration:.2f}"
            loss = "-" if r.loss is None else f"{r.loss:+.2f}"
            print(f"  {r.index:>3} {r.fault:<16} {r.phase:<10} {(r.final or {}).get('status', 'STUCK'):<8} "
                  f"mp4 {dur:>6} loss {loss:>6}")  # fmt: skip
        failed = [r for r in rounds if r.final is not None and r.final["status"] == "failed"]
        print(f"\nfailed tasks ({len(failed)}), each with its reason:")
        for r in failed:
            print(f"  round {r.index} {r.fault}/{r.phase}: {r.final['error'] if r.final else ''}")
        print(f"orphaned FFmpeg (from agent.kill) still alive at the end: {len(orphans)}")
        for pid, out in orphan_dirs.items():
            print(f"  pid {pid} still writing {out}")
        print(f"runtime {runtime:.0f} s, seed {seed}")
        if path := os.environ.get("EDGE_CHAOS_REPORT"):
            Path(path).write_text(json.dumps(report, indent=2))
        assert not problems, f"seed {seed}:\n" + "\n".join(problems)
    finally:
        chaos.reap_orphans()
        watch.close()
