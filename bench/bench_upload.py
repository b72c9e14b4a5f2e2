"""Upload throughput: the agent's durable upload path against a bare minio client, plus end to end.

(a) bare:  ``Minio(...).fput_object`` of K files, one after another, to bucket A.
(b) agent: what the agent does for each finished recording, one file after another: the sha256
    the agent computes at finalise (``edge_agent.finalise.sha256_file``), then the upload through
    ``edge_agent.uploads.UploadPool`` + ``MinioStore`` with the StorageConfig defaults (bucket B,
    delete_local_after_upload false, upload_workers 1: one recording is one job) until its
    ``UploadFinished`` (the verification ``stat_object`` and the presign included). The hash is
    inside the timed path; "upload only" (hash time taken out) is printed beside it.
a and b alternate order over the rounds; the ratio agent (with the hash) / bare of the median MB/s
is the headline (goal >= 0.9), with the per-round ratios.
(c) end to end: the real agent process records a clip of a 1080p25 simulated camera with storage
    minio; time from publishing ``stop`` to the retained ``uploaded`` status.

    .venv/bin/python bench/bench_upload.py [--quick] [--rounds 3] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from _common import fmt, loadavg, log, md_table, run_facts, summary, workdir, write_docs_results
from minio import Minio
from parts import AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, write_config

from edge_agent.config import StorageConfig
from edge_agent.finalise import sha256_file
from edge_agent.uploads import MinioStore, UploadEvent, UploadFailed, UploadFinished, UploadPool

MB = 1_000_000


def make_files(directory: Path, count: int, size: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    chunk = 4 * 1024 * 1024
    for i in range(count):
        path = directory / f"clip{i}.bin"
        with path.open("wb") as f:
            left = size
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n
        files.append(path)
    return files


def run_bare(s3: SeaweedS3, bucket: str, files: list[Path], round_no: int, part_size: int = 0) -> dict[str, Any]:
    """A plain client; part_size 0 is minio-py's default (5 MiB parts for these sizes)."""
    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
    total = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    for f in files:
        client.fput_object(bucket, f"r{round_no}/{f.name}", str(f), content_type="video/mp4", part_size=part_size)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "bytes": total, "mb_s": total / MB / dt}


def run_agent_path(s3: SeaweedS3, bucket: str, files: list[Path], round_no: int) -> dict[str, Any]:
    """Per file, as the agent finalises and ships one recording: sha256, then the upload to its end."""
    cfg = StorageConfig(
        type="minio", endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
        bucket=bucket, delete_local_after_upload=False, upload_workers=1,
    )  # fmt: skip
    total = sum(f.stat().st_size for f in files)
    events: queue.SimpleQueue[UploadEvent] = queue.SimpleQueue()
    store = MinioStore(cfg)
    pool = UploadPool(store, cfg, events.put)
    pool.start()
    hash_s = 0.0
    attempts = 0
    t0 = time.perf_counter()
    try:
        for i, f in enumerate(files):
            t_hash = time.perf_counter()
            digest = sha256_file(f)
            hash_s += time.perf_counter() - t_hash
            task_id = f"t{round_no}-{i}"
            pool.submit(task_id, f, f"r{round_no}/{f.name}", digest, f.stat().st_size, time.time())
            while True:
                ev = events.get(timeout=600)
                if isinstance(ev, UploadFinished) and ev.task_id == task_id:
                    attempts += ev.attempts
                    break
                if isinstance(ev, UploadFailed):
                    raise RuntimeError(f"agent upload failed: {ev.error}")
        dt = time.perf_counter() - t0
    finally:
        pool.stop(timeout=5)
    return {
        "seconds": dt, "bytes": total, "mb_s": total / MB / dt, "sha256_seconds": hash_s,
        "sha256_mb_s": total / MB / hash_s, "upload_only_seconds": dt - hash_s,
        "mb_s_upload_only": total / MB / (dt - hash_s), "attempts": attempts,
    }  # fmt: skip


def run_e2e(base: Path, s3: SeaweedS3, clip_seconds: float) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    device = "edge-bench"
    with Mosquitto(base / "mosquitto") as broker, CameraSim(
        base / "camsim", width=1920, height=1080, fps=25, pattern="smpte"
    ) as cam:
        cfg_path = write_config(
            base / "agent.yaml", device_id=device, mqtt_port=broker.port, topic_prefix=prefix,
            cameras={"cam1": {"url": cam.url("cam1")}}, output_dir=base / "recordings",
            storage=s3.storage_config("e2e"),
        )  # fmt: skip
        probe = MqttProbe(broker.host, broker.port)
        agent = AgentProcess(cfg_path, base / "agent")
        try:
            probe.subscribe(f"{prefix}/#")
            agent.start()
            probe.wait_for_raw(f"{prefix}/{device}/status", lambda p: b"online" in p, timeout=30)
            status_topic = f"{prefix}/{device}/cam1/status"
            cmd_topic = f"{prefix}/{device}/cam1/cmd"
            probe.publish(cmd_topic, {"action": "start", "task_name": "e2e", "request_id": "s1"})
            rec = probe.wait_for_message(status_topic, lambda p: p["status"] == "recording", timeout=60)
            time.sleep(max(0.0, clip_seconds - (time.monotonic() - rec.received_at)))
            t_stop = time.monotonic()
            probe.publish(cmd_topic, {"action": "stop", "task_name": "e2e", "request_id": "s2"})
            up = probe.wait_for_message(
                status_topic, lambda p: p["status"] in ("uploaded", "failed"), timeout=300 + clip_seconds
            )
            doc = up.json()
            if doc["status"] != "uploaded":
                raise RuntimeError(f"end-to-end task failed: {doc}")
            phases: dict[str, float] = {}
            for m in probe.raw(status_topic):
                if m.received_at >= t_stop and m.payload:
                    st = m.json().get("status")
                    phases.setdefault(st, m.received_at - t_stop)
            return {
                "clip_seconds_requested": clip_seconds,
                "stop_to_uploaded_s": up.received_at - t_stop,
                "phases_after_stop_s": phases,
                "size_bytes": doc.get("size_bytes"),
                "duration_seconds": doc.get("duration_seconds"),
                "download_url_present": bool(doc.get("download_url")),
            }
        finally:
            agent.stop()
            probe.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 x 20 MB, 10 s clip (< 2 min)")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--mb", type=int, default=None, help="size of each file in MB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clip", type=float, default=None, help="end-to-end clip seconds (60; quick 10)")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=None, help="where upload_*.json go (docs/results)")
    args = ap.parse_args()
    count = args.files or (3 if args.quick else 5)
    size_mb = args.mb or (20 if args.quick else 50)
    clip = args.clip or (10.0 if args.quick else 60.0)

    load_before = loadavg()
    base = workdir("upload")
    rows: list[dict[str, Any]] = []
    try:
        log(f"writing {count} x {size_mb} MB of random bytes")
        files = make_files(base / "files", count, size_mb * MB)
        with SeaweedS3(base / "s3") as s3:
            admin = s3.client()
            for b in ("bench-bare", "bench-agent"):
                if not admin.bucket_exists(b):
                    admin.make_bucket(b)
            # warm-up (not measured): first connections, volume allocation
            run_bare(s3, "bench-bare", files[:1], 99)
            run_agent_path(s3, "bench-agent", files[:1], 99)
            agent_part = StorageConfig().part_size_bytes
            for r in range(args.rounds):
                order = ("bare", "bare-agent-part", "agent") if r % 2 == 0 else ("agent", "bare-agent-part", "bare")
                for which in order:
                    if which == "bare":
                        res = run_bare(s3, "bench-bare", files, r)
                    elif which == "bare-agent-part":
                        res = run_bare(s3, "bench-bare", files, r, part_size=agent_part)
                    else:
                        res = run_agent_path(s3, "bench-agent", files, r)
                    res.update(round=r, path=which)
                    rows.append(res)
                    log(f"round {r} {which}: {res['mb_s']:.1f} MB/s")
            e2e = None if args.no_e2e else run_e2e(base / "e2e", s3, clip)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    bare = summary([r["mb_s"] for r in rows if r["path"] == "bare"])
    bare16 = summary([r["mb_s"] for r in rows if r["path"] == "bare-agent-part"])
    part_mib = StorageConfig().part_size_bytes // 2**20
    agent = summary([r["mb_s"] for r in rows if r["path"] == "agent"])
    hashing = summary([r["sha256_mb_s"] for r in rows if r["path"] == "agent"])
    upload_only = summary([r["mb_s_upload_only"] for r in rows if r["path"] == "agent"])
    per_round = []
    for r in range(args.rounds):
        a = next(x for x in rows if x["round"] == r and x["path"] == "agent")
        b = next(x for x in rows if x["round"] == r and x["path"] == "bare")
        per_round.append(a["mb_s"] / b["mb_s"])
    ratio = agent["median"] / bare["median"]

    print(f"\n### Upload throughput: {count} x {size_mb} MB, {args.rounds} rounds "
          "(order alternating: a, a', b / b, a', a)\n")
    print(md_table(
        ["path", "MB/s median", "min", "max", "spread", "per-round MB/s"],
        [
            ["(a) bare fput_object", fmt(bare["median"]), fmt(bare["min"]), fmt(bare["max"]),
             f"{bare['spread']:.0%}", ", ".join(fmt(v, 1) for v in bare["values"])],
            [f"(a') bare fput_object, part_size {part_mib} MiB (the agent's)", fmt(bare16["median"]),
             fmt(bare16["min"]), fmt(bare16["max"]), f"{bare16['spread']:.0%}",
             ", ".join(fmt(v, 1) for v in bare16["values"])],
            ["(b) agent: sha256 + UploadPool/MinioStore", fmt(agent["median"]), fmt(agent["min"]),
             fmt(agent["max"]), f"{agent['spread']:.0%}", ", ".join(fmt(v, 1) for v in agent["values"])],
            ["(b) of which upload only (hash time taken out)", fmt(upload_only["median"]), fmt(upload_only["min"]),
             fmt(upload_only["max"]), f"{upload_only['spread']:.0%}",
             ", ".join(fmt(v, 1) for v in upload_only["values"])],
            ["sha256_file alone", fmt(hashing["median"]), fmt(hashing["min"]), fmt(hashing["max"]),
             f"{hashing['spread']:.0%}", ", ".join(fmt(v, 1) for v in hashing["values"])],
        ],
    ))  # fmt: skip
    goal = "PASS" if ratio >= 0.9 else "FAIL"
    if max(per_round) > 1.0:
        goal += "; a round above 1.0 (the agent faster than the bare client while hashing too): noise"
    print(f"\nratio agent (with its sha256) / bare (medians): **{ratio:.2f}** (goal >= 0.90: {goal}); "
          f"per-round ratios: {', '.join(f'{x:.2f}' for x in per_round)} "
          f"(median {statistics.median(per_round):.2f}); agent/bare with the same part size: "
          f"{agent['median'] / bare16['median']:.2f}")  # fmt: skip
    if e2e is not None:
        print("\n### End to end (agent process, 1080p25 smpte camera, storage minio)\n")
        ph = e2e["phases_after_stop_s"]
        print(md_table(
            ["clip requested s", "recorded s", "size MB", "stop->stopping s", "stop->uploading s",
             "stop->uploaded s"],
            [[fmt(clip, 1), fmt(e2e["duration_seconds"]), fmt((e2e["size_bytes"] or 0) / MB),
              fmt(ph.get("stopping")), fmt(ph.get("uploading")), f"**{fmt(e2e['stop_to_uploaded_s'])}**"]],
        ))  # fmt: skip
    path = write_docs_results("upload", {
        "quick": args.quick, "settings": {"files": count, "file_mb": size_mb, "rounds": args.rounds, "clip_s": clip,
                                          "agent_part_size_mib": part_mib, "upload_workers": 1},
        "facts": run_facts(load_before),
        "rounds": rows, "bare_mb_s": bare, "bare_agent_part_mb_s": bare16,
        "agent_incl_hash_mb_s": agent, "agent_upload_only_mb_s": upload_only, "sha256_mb_s": hashing,
        "ratio_agent_over_bare": ratio, "per_round_ratio": per_round, "goal_ratio": 0.9, "e2e": e2e,
    }, args.results_dir)  # fmt: skip
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
