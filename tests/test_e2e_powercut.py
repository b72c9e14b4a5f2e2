"""A real power cut of the real agent: mid-recording, mid-join and mid-upload (issue 11).

The agent's recordings directory and its journal live on the power-cut file system
(`tests/powercutfs.py`), which loses every write that was not fsynced, as a real disk does; the
kill -9 tests keep the page cache and so cannot show that. One cut: SIGSTOP the agent and every
process it started (the instant the power goes), cut the file system (its disk keeps only what
was durable), SIGKILL them all, unmount; then mount what survived and start the agent on it.
Some cuts are armed on the file system instead, just before an exact operation (the recorder's
fsync of a just-closed segment; each step of the join), and every later change is held from then.

Asserted at every cut:
- the journal on the disk passes SQLite's integrity check, every earlier task in it is still
  finished, and it is not behind any status the agent had published before the cut;
- no process of the dead agent is left (FFmpeg included);
- the cut hit what it aimed at: a recording task, a join not yet journaled as done, an upload not
  yet finished;
- recording cuts: the file system's report of lost writes names at most two segments (the one
  being written, and the one FFmpeg closed in the milliseconds before the recorder's fsync of
  it), never one the agent had reported durable (its `segment` events); every reported segment
  is in the MP4, and what was not yet durable is at most about one segment; join and upload cuts
  lose no segment at all;
- after the restart the task ends `uploaded`; the object's bytes hash to the sha256 the agent
  recorded and to its `x-amz-meta-sha256`; it is a playable H.264 MP4 whose duration covers the
  recording window by the agent's own timestamps (`recording` -> `stopping`, or -> the cut) minus
  what was not yet durable (recording cuts) or a timing margin (join and upload cuts), and holds
  nothing twice;
- nothing of the task is left in the recordings directory.

`EDGE_POWERCUT_ROUNDS` (default 1) rounds of the three cuts; `EDGE_POWERCUT_SEED` replays the
random recording lengths and delays and which variant each round uses. The loss per cut point is
printed and written to `powercut-summary.json` in the test's tmp dir (and to `EDGE_POWERCUT_REPORT`, if set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, ffprobe_info, write_config
from powercutfs import PowerCutFS
from rig import DEVICE, Rig, minio_storage

from edge_agent.cli import JOURNAL_NAME
from edge_agent.tasks import parse_iso

CAM = "cam1"
SEGMENT_SECONDS = 2
# Timing slack of the window, from measurements: the `recording` status follows the first frame by
# up to one progress period (0.5 s) and FFmpeg's stop is not instantaneous either way.
MARGIN_SECONDS = 1.0
ROUNDS = int(os.environ.get("EDGE_POWERCUT_ROUNDS", "1"))
# About 65 s a round here; the suite's 300 s default would cut a long run short.
pytestmark = [pytest.mark.integration, pytest.mark.serial, pytest.mark.timeout(120 + 120 * ROUNDS)]
SEED = int(os.environ.get("EDGE_POWERCUT_SEED", str(random.randrange(1 << 30))))
RANK = {"starting": 0, "recording": 1, "stopping": 2, "uploading": 3, "upload_pending": 3,
        "uploaded": 4, "completed": 4, "failed": 4}  # fmt: skip
PART_SIZE = 5 * 1024 * 1024
# The camera: a static 640x360 picture that x264 still fills to its 2 Mbit/s rate (about 280 kB/s),
# so a 22 s recording makes a 2-part upload, at 1 MB/s about 5 s for the first part.
CAMERA = {"width": 640, "height": 360, "pattern": "smpte"}
UPLOAD_BYTES_PER_SECOND = 1_000_000
# The steps of the join a cut aims at: (name, None = the concat FFmpeg seen running, or the file
# system operation and path the cut is armed on, just before it).
JOIN_STEPS: list[tuple[str, tuple[str, str]]] = [
    ("join: writing the MP4", ("write", "*/{task}_*.mp4.part")),
    ("join: before the MP4's fsync", ("fsync", "*/{task}_*.mp4.part")),
    ("join: before the MP4's rename", ("rename", "*/{task}_*.mp4.part")),
    ("join: MP4 durable, before retiring segments", ("rename", "*/.{task}_*.segments")),
    ("join: segments deleted, before the rmdir", ("rmdir", "*/.{task}_*.segments.done")),
]


@dataclass
class CutResult:
    point: str
    round: int
    task: str
    phase: str  # what was going on at the instant of the cut
    recorded_seconds: float  # the recording window by the agent's timestamps (or up to the cut)
    mp4_seconds: float
    loss_seconds: float
    bound_seconds: float
    segments_lost: int  # segments whose data the file system dropped at the cut
    durable_segment_seconds: float  # of the segments the agent had reported durable before the cut
    durable_status: str  # the task's status in the journal that survived
    published_status: str  # the last status published before the cut
    fs_lost_bytes: int
    uploaded_bytes_on_disk: int | None  # the journal's bytes_uploaded after the cut (upload cuts)
    cut_ms: float
    recovered_in_seconds: float  # restart of the agent -> `uploaded`


# ----------------------------------------------------------------------------------- the cut


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _freeze(agent: AgentProcess) -> dict[int, list[bytes]]:
    """SIGSTOP the agent first (it can start nothing more), then everything it started."""
    frozen: dict[int, list[bytes]] = {}
    for _ in range(3):
        pids = [agent.pid, *agent.descendant_pids(), *agent.group_pids()]
        new = [pid for pid in dict.fromkeys(pids) if pid not in frozen]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            frozen[pid] = _argv(pid)
    return frozen


def _processes_using(path: Path, exclude: set[int]) -> list[int]:
    needle = str(path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        if any(needle in a for a in _argv(int(entry.name))):
            with contextlib.suppress(OSError):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
    return found


def power_cut(agent: AgentProcess, fs: PowerCutFS, armed: bool) -> tuple[dict[str, Any], dict[int, list[bytes]]]:
    """Cut the power under the running agent (now, or wait for the cut armed on the file system).

    Returns the file system's report of the cut and the argv of every process frozen at it.
    """
    if armed:  # the file system cut first and holds every later change: nothing more gets out
        report = fs.wait_cut(timeout=60)
        frozen = _freeze(agent)
    else:
        frozen = _freeze(agent)
        report = fs.cut()
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    fs.release()  # changes held since an armed cut fail now, so the killed processes can exit
    agent.kill_group()
    # A killed process may take a moment to exit (closing its files on the mount): bounded wait.
    deadline = time.monotonic() + 10
    while left := sorted(set(agent.group_pids()) | set(_processes_using(fs.mountpoint, {os.getpid(), fs.pid or 0}))):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    fs.stop()
    assert not left, f"processes of the dead agent still alive after the cut: {[(p, _argv(p)) for p in left]}"
    return report, frozen


def durable_journal(fs: PowerCutFS, dest: Path) -> dict[str, dict[str, Any]]:
    """The journal the disk holds after a cut (a copy, so the check changes nothing): task name -> record."""
    dest.mkdir(parents=True)
    source = fs.backing / "recordings"
    for suffix in ("", "-wal"):  # -shm is rebuilt by SQLite from the WAL
        if (source / (JOURNAL_NAME + suffix)).exists():
            shutil.copy2(source / (JOURNAL_NAME + suffix), dest / (JOURNAL_NAME + suffix))
    assert (dest / JOURNAL_NAME).exists(), f"the journal did not survive the cut: {sorted(os.listdir(source))}"
    db = sqlite3.connect(str(dest / JOURNAL_NAME))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = [json.loads(record) for (record,) in db.execute("SELECT record FROM tasks")]
    finally:
        db.close()
    return {row["task_name"]: row for row in rows}


# ------------------------------------------------------------------------------------ checks


def check_uploaded(s3: SeaweedS3, bucket: str, final: dict[str, Any], dest: Path) -> float:
    """The object is what the agent recorded: sha256 of its bytes, its metadata, a playable MP4."""
    assert final["status"] == "uploaded", final
    client = s3.client()
    resp = client.get_object(bucket, final["object_name"])
    try:
        data = resp.read()
    finally:
        resp.close()
        resp.release_conn()
    meta = client.stat_object(bucket, final["object_name"]).metadata
    assert hashlib.sha256(data).hexdigest() == final["sha256"] == meta.get("x-amz-meta-sha256"), final
    assert len(data) == final["size_bytes"]
    dest.write_bytes(data)
    info = ffprobe_info(dest)
    assert info["codec"] == "h264", info
    return float(info["duration"])


def leftovers(output_dir: Path, task_file: str) -> list[str]:
    """Anything of a finished, uploaded task still in the recordings directory (live view)."""
    stem = Path(task_file).stem
    return sorted(p.name for p in (output_dir / CAM).iterdir() if stem in p.name) if (output_dir / CAM).is_dir() else []


def status_at(rig: Rig, task: str, status: str) -> float:
    doc = next(m for m in rig.probe.messages(rig.task_topic(CAM, task)) if m["status"] == status)
    return parse_iso(doc["updated_at"]).timestamp()


# ------------------------------------------------------------------------------------- the test


def test_power_cuts_lose_at_most_the_segment_being_written(
    tmp_path: Path, broker: Mosquitto, probe: MqttProbe, prefix: str, make_agent: Callable[..., AgentProcess],
    s3: SeaweedS3, bucket: str, track: Callable[[Any], Any],
) -> None:  # fmt: skip
    rng = random.Random(SEED)
    print(f"\npower-cut test: EDGE_POWERCUT_SEED={SEED} EDGE_POWERCUT_ROUNDS={ROUNDS}")
    camera = track(CameraSim(tmp_path / "camera", mounts=(CAM,), shared=False, **CAMERA)).start()  # type: ignore[arg-type]
    fs = track(PowerCutFS(tmp_path / "pcfs")).start()
    output_dir = fs.mountpoint / "recordings"
    storage = minio_storage(s3, bucket, part_size_bytes=PART_SIZE, min_free_bytes=0, retry_initial_seconds=0.5,
                            retry_max_seconds=2, bandwidth_limit_bytes_per_second=UPLOAD_BYTES_PER_SECOND)  # fmt: skip
    recording = {"segment_seconds": SEGMENT_SECONDS, "first_frame_timeout_seconds": 15, "stall_timeout_seconds": 6,
                 "stop_timeout_seconds": 8, "restart_backoff_max_seconds": 2}  # fmt: skip
    config = write_config(tmp_path / "rig" / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix,
                          cameras={CAM: {"url": camera.url(CAM)}}, output_dir=output_dir, storage=storage,
                          recording=recording)  # fmt: skip
    probe.subscribe(f"{prefix}/#")
    rig = Rig(broker, probe, prefix, tmp_path / "rig", output_dir, config, _make=make_agent)
    rig.start_agent()
    results: list[CutResult] = []
    finished: dict[str, str] = {}  # task name -> final status: must stay so across later cuts
    cuts = 0

    def cut_and_recover(point: str, rnd: int, task: str, phase: str, window_start: float,
                        window_end: float | None, armed: bool = False) -> None:  # fmt: skip
        nonlocal cuts
        assert rig.agent is not None
        started = time.monotonic()
        report, _frozen = power_cut(rig.agent, fs, armed)
        cut_ms = 1000 * (time.monotonic() - started)
        published = [m["status"] for m in probe.messages(rig.task_topic(CAM, task))]  # all out before the freeze
        cuts += 1
        journal = durable_journal(fs, tmp_path / f"journal-after-cut-{cuts}")
        durable = journal[task]["status"]
        if point == "upload":
            phase = "upload: a part journaled" if journal[task].get("bytes_uploaded") else "upload: no part done"
        assert RANK[durable] >= RANK[published[-1]], (
            f"the journal lost a status the agent had published: {published} -> {durable} on disk"
        )
        for name, status in finished.items():
            assert journal[name]["status"] == status, (name, journal[name])
        lost_files = report["lost"]["files"]
        segment_dir_name = Path(journal[task]["local_file"]).stem + ".segments"
        lost_segments = sorted(f["path"] for f in lost_files
                               if segment_dir_name in f["path"] and f["path"].endswith(".mp4")
                               and f["size"] > f["durable_size"])  # fmt: skip
        # Aimed at what it says: the task was in the state this cut point is about.
        expected_durable = {"recording": {"recording"}, "join": {"stopping"},
                            "upload": {"uploading", "upload_pending"}}[point]  # fmt: skip
        assert durable in expected_durable, (point, durable, published, phase)
        # The agent publishes a `segment` event only after the segment's fsync: these were durable.
        reported = {m["path"]: float(m["seconds"]) for m in probe.messages(f"{rig.base}/{CAM}/events")
                    if m.get("event") == "segment" and m.get("task_name") == task}  # fmt: skip
        durable_seconds = sum(reported.values())
        if point == "recording":
            # The segment being written, and the one FFmpeg closed in the very instant of the cut
            # (before the recorder's fsync of it) at worst.
            assert len(lost_segments) <= 2, lost_segments
            assert not {Path(p).name for p in lost_segments} & {Path(p).name for p in reported}, lost_segments
        else:
            assert not lost_segments, lost_segments  # every closed segment was durable
        fs.start()
        probe.clear()
        restarted = time.monotonic()
        rig.start_agent()
        final = rig.wait_status(CAM, task, {"uploaded", "failed"}, timeout=120)
        recovered_in = time.monotonic() - restarted
        mp4_seconds = check_uploaded(s3, bucket, final, tmp_path / f"{task}.mp4")
        if point in ("recording", "join"):
            assert final["recovered"] is True, final
        end = float(report["at"]) if window_end is None else window_end
        recorded = end - window_start
        loss = recorded - mp4_seconds
        if point == "recording":
            # What was not yet durable at the cut: the segment being written (the first one spans
            # two GOPs, 4 s, as FFmpeg cuts at the keyframe after 2 s of stream time), plus in the
            # race the one just closed. Every segment reported durable is in the MP4.
            not_durable = recorded - durable_seconds
            assert not_durable <= 2 * SEGMENT_SECONDS + MARGIN_SECONDS, (recorded, reported)
            assert mp4_seconds >= durable_seconds - 0.5, (mp4_seconds, reported)
            bound = round(not_durable + MARGIN_SECONDS, 2)
        else:
            bound = MARGIN_SECONDS
        results.append(CutResult(
            point=point, round=rnd, task=task, phase=phase, recorded_seconds=round(recorded, 3),
            mp4_seconds=round(mp4_seconds, 3), loss_seconds=round(loss, 3), bound_seconds=bound,
            segments_lost=len(lost_segments), durable_segment_seconds=round(durable_seconds, 3),
            durable_status=durable, published_status=published[-1],
            fs_lost_bytes=int(report["lost"]["bytes_beyond_durable_size"]), cut_ms=round(cut_ms, 1),
            uploaded_bytes_on_disk=journal[task].get("bytes_uploaded"),
            recovered_in_seconds=round(recovered_in, 2),
        ))  # fmt: skip
        print(f"  cut {cuts} {point:9s} {phase:44s} recorded {recorded:6.2f} s, MP4 {mp4_seconds:6.2f} s, loss "
              f"{loss:+.2f} s (bound {bound:.1f}), lost segments {len(lost_segments)}, journal {durable}"
              + (f" ({journal[task].get('bytes_uploaded')} B up)" if point == "upload" else ""))  # fmt: skip
        assert loss <= bound, asdict(results[-1])
        # Nothing in it twice (a segment is 2 s): the MP4 starts with the first frame, up to one
        # progress period (0.5 s) before the `recording` status, and FFmpeg takes a moment to stop.
        assert mp4_seconds <= recorded + 1.5, asdict(results[-1])
        assert not leftovers(output_dir, final["local_file"]), leftovers(output_dir, final["local_file"])
        finished[task] = "uploaded"

    def start(task: str) -> float:
        assert rig.request(CAM, {"action": "start", "task_name": task})["ok"]
        rig.wait_status(CAM, task, "recording", timeout=30)
        return status_at(rig, task, "recording")

    def stop(task: str) -> float:
        assert rig.request(CAM, {"action": "stop", "task_name": task})["ok"]
        return status_at(rig, task, "stopping")

    try:
        for rnd in range(ROUNDS):
            # 1. Mid-recording: at a random instant, or (the worst case) just before the recorder's
            # fsync of a segment FFmpeg has just closed, which then is lost with the one being written.
            task = f"rec{rnd}"
            began = start(task)
            if (rnd + SEED) % 2 == 0:
                time.sleep(rng.uniform(4.0, 8.0))
                cut_and_recover("recording", rnd, task, "recording: random instant", began, None)
            else:
                # Not the first segment: with it the task would have no durable media at all and end
                # `failed` ("no media was recorded"), the honest limit while FFmpeg cannot fsync.
                time.sleep(rng.uniform(3.0, 6.0))
                fs.arm("fsync", f"*/.{task}_*.segments/seg_00000[1-9].mp4")
                cut_and_recover("recording", rnd, task, "recording: before a segment fsync", began, None, armed=True)

            # 2. Mid-join, each round at another step: the concat FFmpeg running (polled), or just
            # before an exact operation of the join (armed on the file system).
            task = f"join{rnd}"
            began = start(task)
            time.sleep(rng.uniform(6.0, 9.0))
            phase, arm = JOIN_STEPS[(rnd + SEED) % len(JOIN_STEPS)]
            fs.arm(arm[0], arm[1].format(task=task))
            ended = stop(task)
            cut_and_recover("join", rnd, task, phase, began, ended, armed=True)

            # 3. Mid-upload: long enough for a multipart upload of 2 parts, cut while it runs: in
            # even rounds before any part is done, in odd ones once one is journaled done (the
            # restart must resume, not start over). The delays hold whether the parts go one after
            # the other or share the bandwidth cap in flight together.
            task = f"up{rnd}"
            began = start(task)
            time.sleep(rng.uniform(22.0, 25.0))
            ended = stop(task)
            uploading = rig.wait_status(CAM, task, "uploading", timeout=60)
            size = uploading["size_bytes"]
            assert size - PART_SIZE >= 500_000, f"too small for a 2-part upload that takes a while: {uploading}"
            if rnd % 2 == 0:  # no part can be done before (size - PART_SIZE) / rate
                time.sleep(rng.uniform(0.2, 0.8 * (size - PART_SIZE) / UPLOAD_BYTES_PER_SECOND))
            else:
                done = rig.probe.wait_for(rig.task_topic(CAM, task),
                                          lambda p, size=size: 0 < p.get("bytes_uploaded", 0) < size, 60)  # fmt: skip
                time.sleep(rng.uniform(0.0, 0.4 * (size - done["bytes_uploaded"]) / UPLOAD_BYTES_PER_SECOND))
            cut_and_recover("upload", rnd, task, "upload", began, ended)
    finally:
        summary = summarise(results)
        text = json.dumps({"seed": SEED, "rounds": ROUNDS, "segment_seconds": SEGMENT_SECONDS,
                           "margin_seconds": MARGIN_SECONDS, "per_point": summary,
                           "cuts": [asdict(r) for r in results]}, indent=2)  # fmt: skip
        (tmp_path / "powercut-summary.json").write_text(text)
        if os.environ.get("EDGE_POWERCUT_REPORT"):  # a copy that outlives pytest's tmp dirs
            Path(os.environ["EDGE_POWERCUT_REPORT"]).write_text(text)
        print(f"power-cut summary ({len(results)} cuts, seed {SEED}): {tmp_path / 'powercut-summary.json'}")
        for point, row in summary.items():
            print(f"  {point:9s} cuts {row['cuts']:3d}  loss s: min {row['loss_min']:+.2f} median "
                  f"{row['loss_median']:+.2f} max {row['loss_max']:+.2f}  segments lost max "
                  f"{row['segments_lost_max']}")  # fmt: skip
    assert cuts == 3 * ROUNDS


def summarise(results: list[CutResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for point in ("recording", "join", "upload"):
        rows = [r for r in results if r.point == point]
        if not rows:
            continue
        losses = [r.loss_seconds for r in rows]
        out[point] = {
            "cuts": len(rows), "loss_min": min(losses), "loss_median": statistics.median(losses),
            "loss_max": max(losses), "bound": max(r.bound_seconds for r in rows),
            "segments_lost_max": max(r.segments_lost for r in rows),
            "phases": sorted({r.phase for r in rows}),
        }  # fmt: skip
    return out
