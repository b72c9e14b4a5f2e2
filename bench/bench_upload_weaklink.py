"""Uploads over a weak link: the agent's resumable upload path against a bare minio ``fput_object``.

One file of random bytes (default 100 MiB), one SeaweedFS S3 server, two links:

(1) clean: straight to the S3 server.
    - bare:  ``Minio(...)`` with minio-py's defaults, ``fput_object`` (parts of 5 MiB, 3 in parallel).
    - bare, one part at a time: the same with ``num_parallel_uploads=1`` and the agent's part size,
      which is how the agent sends (shows what the parallel parts are worth on this machine).
    - agent: what the agent does for a finished recording: ``sha256_file`` (at finalise), then
      ``MinioStore.put`` with the ``StorageConfig`` defaults (resumable multipart, 8 MiB parts,
      paced 64 KiB sends, verification ``stat_object``). Timed hash included.
    Goal: agent/bare throughput >= 0.9.
(2) cutting: through the tests' fault proxy (tests/faultproxy.py): the whole link limited to
    ``--rate`` bytes/s (default 12 MB/s) and every connection cut once it is ``--cut`` s old (6 s).
    Counted: the bytes that entered the link (client->server) and the time, within ``--timeout``.
    - bare:  minio-py's defaults; a failed ``fput_object`` is called again (it aborts its multipart
      upload on failure, so it starts over). Its own urllib3 retries (5 per request) re-send a cut part.
    - bare, agent's network settings: the same with the agent's urllib3 settings (connect 5 s, read
      30 s, ``Retry(total=1, connect=1, read=0)``): what the issue measured before resumable uploads.
    - agent: ``UploadPool`` + ``MinioStore`` with the ``StorageConfig`` defaults (retry backoff 1 s
      doubling up to 300 s), sha256 included: each retry resumes from the parts the server has.

Sides alternate order every round. Raw per-round results, the commit and machine facts go to
``docs/results/upload_weaklink_<date-time>.json`` and ``upload_weaklink_latest.json``; tables on stdout.

    .venv/bin/python bench/bench_upload_weaklink.py [--quick] [--mb 100] [--rounds 3] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import urllib3
from _common import fmt, loadavg, log, md_table, run_facts, summary, workdir, write_docs_results
from faultproxy import FaultProxy
from minio import Minio
from parts import LOCALHOST, SeaweedS3

from edge_agent.config import StorageConfig
from edge_agent.finalise import sha256_file
from edge_agent.uploads import MinioStore, UploadEvent, UploadFailed, UploadFinished, UploadJob, UploadPool, UploadState

MB = 1_000_000
MiB = 1024 * 1024


def make_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for offset in range(0, size, 4 * MiB):
            f.write(os.urandom(min(4 * MiB, size - offset)))
    return path


def agent_cfg(endpoint: str, s3: SeaweedS3, bucket: str) -> StorageConfig:
    """The shipped defaults, but for where the store is and keeping the local file."""
    return StorageConfig(type="minio", endpoint=endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                         bucket=bucket, delete_local_after_upload=False)  # fmt: skip


def bare_client(endpoint: str, s3: SeaweedS3, agent_net: bool = False) -> Minio:
    http = None
    if agent_net:
        d = StorageConfig()
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=d.connect_timeout_seconds, read=d.read_timeout_seconds),
            retries=urllib3.Retry(total=1, connect=1, read=0, backoff_factor=0.2),
        )
    return Minio(endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False, http_client=http)


# ---- (1) clean link -----------------------------------------------------------------------------


def clean_bare(s3: SeaweedS3, bucket: str, path: Path, key: str, sequential: bool = False) -> dict[str, Any]:
    client = bare_client(s3.endpoint, s3)
    opts: dict[str, Any] = {}
    if sequential:
        opts = {"num_parallel_uploads": 1, "part_size": StorageConfig().part_size_bytes}
    t0 = time.perf_counter()
    client.fput_object(bucket, key, str(path), content_type="video/mp4", **opts)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "mb_s": path.stat().st_size / MB / dt}


def clean_agent(store: MinioStore, path: Path, key: str) -> dict[str, Any]:
    size = path.stat().st_size
    t0 = time.perf_counter()
    digest = sha256_file(path)
    t_hash = time.perf_counter() - t0
    job = UploadJob(0.0, 0, "bench/clean", path, key, digest, size)
    store.put(job, threading.Event(), UploadState(), lambda _st: None)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "mb_s": size / MB / dt, "sha256_seconds": t_hash, "upload_seconds": dt - t_hash,
            "mb_s_upload_only": size / MB / (dt - t_hash)}  # fmt: skip


# ---- (2) cutting link ---------------------------------------------------------------------------


def cutting_proxy(s3: SeaweedS3, rate: float, cut: float, name: str) -> FaultProxy:
    return FaultProxy((LOCALHOST, s3.port), rate=rate, shared=True, cut_after=cut, name=name).start()


def cut_bare(s3: SeaweedS3, bucket: str, path: Path, key: str, rate: float, cut: float, timeout: float,
             agent_net: bool) -> dict[str, Any]:  # fmt: skip
    """fput_object again after every failure (a new multipart upload each time) until done or timeout."""
    proxy = cutting_proxy(s3, rate, cut, "bare-agentnet" if agent_net else "bare")
    attempts, errors, finished = 0, [], False
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < timeout:
            attempts += 1
            # A watchdog: a call that outlives the timeout is ended by stopping the proxy under it.
            client = bare_client(proxy.endpoint, s3, agent_net)
            done = threading.Event()
            box: list[BaseException] = []

            def run(client: Minio = client, done: threading.Event = done, box: list[BaseException] = box) -> None:
                try:
                    client.fput_object(bucket, key, str(path), content_type="video/mp4")
                except BaseException as exc:
                    box.append(exc)
                finally:
                    done.set()

            threading.Thread(target=run, name="bench.bare", daemon=True).start()
            if not done.wait(max(0.0, timeout - (time.perf_counter() - t0))):
                break
            if not box:
                finished = True
                break
            errors.append(f"{type(box[0]).__name__}: {str(box[0])[:120]}")
            time.sleep(1.0)  # what a caller's simple retry loop would wait
        dt = time.perf_counter() - t0
        sent, cuts = proxy.bytes_up, proxy.cuts
    finally:
        proxy.stop(timeout=10)
    return {"finished": finished, "seconds": dt, "bytes_up": sent, "cuts": cuts, "attempts": attempts,
            "first_errors": errors[:3]}  # fmt: skip


def cut_agent(s3: SeaweedS3, bucket: str, path: Path, key: str, rate: float, cut: float,
              timeout: float) -> dict[str, Any]:  # fmt: skip
    proxy = cutting_proxy(s3, rate, cut, "agent")
    cfg = agent_cfg(proxy.endpoint, s3, bucket)
    events: queue.SimpleQueue[UploadEvent] = queue.SimpleQueue()
    pool = UploadPool(MinioStore(cfg), cfg, events.put)
    finished, attempts, error = False, 0, None
    t0 = time.perf_counter()
    try:
        digest = sha256_file(path)
        pool.start()
        pool.submit("bench/cut", path, key, digest, path.stat().st_size, time.time())
        while True:
            left = timeout - (time.perf_counter() - t0)
            try:
                ev = events.get(timeout=max(0.01, left))
            except queue.Empty:
                break
            if isinstance(ev, UploadFinished):
                finished, attempts = True, ev.attempts
                break
            if isinstance(ev, UploadFailed):
                error, attempts = ev.error, ev.attempts
                break
            attempts = max(attempts, getattr(ev, "attempt", 0))
        dt = time.perf_counter() - t0
        sent, cuts = proxy.bytes_up, proxy.cuts
    finally:
        pool.stop(timeout=5)
        proxy.stop(timeout=10)
    return {"finished": finished, "seconds": dt, "bytes_up": sent, "cuts": cuts, "attempts": attempts,
            "error": error}  # fmt: skip


# ---- report ---------------------------------------------------------------------------------------


def outcome(r: dict[str, Any]) -> str:
    if r["finished"]:
        return f"done in {r['seconds']:.1f} s, {r['bytes_up'] / MB:.0f} MB sent"
    return f"did not finish in {r['seconds']:.0f} s, {r['bytes_up'] / MB:.0f} MB sent"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 MiB, 1 round, 60 s timeout")
    ap.add_argument("--mb", type=int, default=None, help="file size in MiB (100; quick 20)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of each side (3; quick 1)")
    ap.add_argument("--rate", type=float, default=12 * MB, help="cutting link: bytes/s for the whole link")
    ap.add_argument("--cut", type=float, default=6.0, help="cutting link: connection age at which it is cut (s)")
    ap.add_argument("--timeout", type=float, default=None, help="cutting link: give up after (s)")
    ap.add_argument("--results-dir", type=Path, default=None, help="where upload_weaklink_*.json go (docs/results)")
    args = ap.parse_args()
    size = (args.mb or (20 if args.quick else 100)) * MiB
    rounds = args.rounds or (1 if args.quick else 3)
    timeout = args.timeout or (60.0 if args.quick else max(120.0, 4 * size / args.rate))

    base = workdir("upload-weaklink")
    rows: list[dict[str, Any]] = []
    load_before = loadavg()
    try:
        log(f"writing {size / MiB:.0f} MiB of random bytes")
        path = make_file(base / "rec.mp4", size)
        with SeaweedS3(base / "s3") as s3:
            admin = s3.client()
            for b in ("wl-bare", "wl-agent"):
                admin.make_bucket(b)
            store = MinioStore(agent_cfg(s3.endpoint, s3, "wl-agent"))
            clean_bare(s3, "wl-bare", path, "warmup")  # not measured: first connections, volumes
            clean_agent(store, path, "warmup")
            for r in range(rounds):
                order = ("bare", "bare-sequential", "agent") if r % 2 == 0 else ("agent", "bare-sequential", "bare")
                for side in order:
                    key = f"clean/r{r}/{side}/rec.mp4"
                    if side == "agent":
                        res = clean_agent(store, path, key)
                    else:
                        res = clean_bare(s3, "wl-bare", path, key, sequential=side == "bare-sequential")
                    rows.append({"link": "clean", "side": side, "round": r, **res})
                    log(f"clean r{r} {side}: {res['mb_s']:.1f} MB/s")
            for r in range(rounds):
                sides = ["bare", "bare-agentnet", "agent"]
                for side in sides if r % 2 == 0 else sides[::-1]:
                    key = f"cut/r{r}/{side}/rec.mp4"
                    if side == "agent":
                        res = cut_agent(s3, "wl-agent", path, key, args.rate, args.cut, timeout)
                    else:
                        res = cut_bare(s3, "wl-bare", path, key, args.rate, args.cut, timeout,
                                       agent_net=side == "bare-agentnet")  # fmt: skip
                    rows.append({"link": "cutting", "side": side, "round": r, **res})
                    log(f"cutting r{r} {side}: {outcome(res)}, {res['bytes_up'] / size:.2f}x bytes, "
                        f"{res['attempts']} attempt(s), {res['cuts']} cuts")  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)

    # ---- (1) clean
    clean = {s: [r for r in rows if r["link"] == "clean" and r["side"] == s]
             for s in ("bare", "bare-sequential", "agent")}  # fmt: skip
    bare_s, agent_s = summary([r["mb_s"] for r in clean["bare"]]), summary([r["mb_s"] for r in clean["agent"]])
    seq_s = summary([r["mb_s"] for r in clean["bare-sequential"]])
    seq_ratio = agent_s["median"] / seq_s["median"]
    per_round = [a["mb_s"] / b["mb_s"] for a, b in zip(clean["agent"], clean["bare"], strict=True)]
    ratio = agent_s["median"] / bare_s["median"]
    upload_only = summary([r["mb_s_upload_only"] for r in clean["agent"]])
    print(f"\n### (1) Clean link: {size / MiB:.0f} MiB straight to the S3 server, {rounds} rounds "
          "(order alternating)\n")
    print(md_table(
        ["side", "MB/s median", "min", "max", "spread", "per round"],
        [[label, fmt(s["median"]), fmt(s["min"]), fmt(s["max"]), f"{s['spread']:.0%}",
          ", ".join(fmt(v, 1) for v in s["values"])]
         for label, s in (("bare fput_object (minio defaults)", bare_s),
                          (f"bare fput_object, one {StorageConfig().part_size_bytes // MiB} MiB part at a time",
                           seq_s),
                          ("agent: sha256 + MinioStore.put (defaults)", agent_s),
                          ("agent, upload only (hash excluded)", upload_only))],
    ))  # fmt: skip
    verdict = "PASS" if ratio >= 0.9 else "FAIL"
    if ratio > 1.0:
        verdict += "; agent faster than bare while also hashing: noise or bias, not a result"
    print(f"\nagent/bare (medians, hash included): **{ratio:.2f}** (goal >= 0.90: {verdict}); per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}; agent/bare one part at a time: {seq_ratio:.2f}")  # fmt: skip

    # ---- (2) cutting
    print(f"\n### (2) Cutting link: {args.rate / MB:g} MB/s for the whole link, every connection cut at "
          f"{args.cut:g} s, give up after {timeout:.0f} s\n")
    table = []
    cut_summary: dict[str, Any] = {}
    for side, label in (("bare", "bare fput_object (minio defaults), again on failure"),
                        ("bare-agentnet", "bare fput_object, agent's network settings, again on failure"),
                        ("agent", "agent: sha256 + UploadPool/MinioStore (defaults)")):  # fmt: skip
        rs = [r for r in rows if r["link"] == "cutting" and r["side"] == side]
        ratios = summary([r["bytes_up"] / size for r in rs])
        done = [r for r in rs if r["finished"]]
        secs = summary([r["seconds"] for r in done]) if done else {"n": 0}
        cut_summary[side] = {"finished": len(done), "of": len(rs), "bytes_ratio": ratios, "seconds_finished": secs}
        table.append([
            label, f"{len(done)}/{len(rs)}",
            fmt(secs["median"]) if done else "-",
            f"{fmt(ratios['median'])} ({fmt(ratios['min'])}-{fmt(ratios['max'])})",
            "; ".join(f"{outcome(r)}, {r['attempts']} att." for r in rs),
        ])  # fmt: skip
    print(md_table(["side", "finished", "s median (finished)", "bytes sent / file, median (min-max)", "per round"],
                   table))  # fmt: skip
    link_s = size / args.rate
    print(f"\nlink time for the file alone: {link_s:.1f} s; bound in the tests: bytes sent <= 1.10x")

    data = {
        "quick": args.quick,
        "settings": {"file_bytes": size, "rounds": rounds, "cut_rate_bytes_s": args.rate, "cut_after_s": args.cut,
                     "cut_timeout_s": timeout, "agent_part_size_bytes": StorageConfig().part_size_bytes},
        "facts": {**run_facts(load_before), "minio": version("minio"), "urllib3": version("urllib3")},
        "clean": {"bare_mb_s": bare_s, "bare_sequential_mb_s": seq_s, "agent_mb_s": agent_s,
                  "agent_upload_only_mb_s": upload_only, "ratio_agent_over_bare_sequential": seq_ratio,
                  "ratio_agent_over_bare": ratio, "per_round_ratio": per_round,
                  "median_per_round_ratio": statistics.median(per_round), "goal": 0.9},
        "cutting": cut_summary,
        "rounds": rows,
    }  # fmt: skip
    print(f"\nJSON: {write_docs_results('upload_weaklink', data, args.results_dir)}")


if __name__ == "__main__":
    main()
