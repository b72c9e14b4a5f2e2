"""`edge-agent ctl` end to end: the real CLI in a subprocess against a real Mosquitto, camera and agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parts import free_port, write_config
from rig import DEVICE, Rig, make_rig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def ctl_argv(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "edge_agent", "ctl", "--config", str(config), *args]


def ctl(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ctl_argv(config, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)  # fmt: skip


def local_rig(tmp_path: Path, broker, probe, prefix, make_agent, camera) -> Rig:  # type: ignore[no-untyped-def]
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage={"type": "local"})  # fmt: skip
    rig.start_agent()
    return rig


def test_ctl_status_idle_and_json(tmp_path: Path, broker, probe, prefix, make_agent, camera) -> None:
    rig = local_rig(tmp_path, broker, probe, prefix, make_agent, camera)
    proc = ctl(rig.config_path, "status", "cam1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cam1: idle"
    proc = ctl(rig.config_path, "status", "cam1", "--json")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["status"] == "idle" and reply["ok"] is True and reply["request_id"].startswith("ctl-")
    # Unknown camera: answered ok:false -> exit 1.
    proc = ctl(rig.config_path, "status", "nocam")
    assert proc.returncode == 1 and "error" in proc.stdout, (proc.stdout, proc.stderr)


def test_ctl_start_wait_follows_until_completed(tmp_path: Path, broker, probe, prefix, make_agent, camera) -> None:
    rig = local_rig(tmp_path, broker, probe, prefix, make_agent, camera)
    waiter = subprocess.Popen(ctl_argv(rig.config_path, "start", "cam1", "t", "--wait", "--wait-timeout", "90"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        rig.wait_status("cam1", "t", "recording", timeout=30)
        time.sleep(3)
        stop = ctl(rig.config_path, "stop", "cam1", "t")
        assert stop.returncode == 0, (stop.stdout, stop.stderr)
        assert stop.stdout.startswith("cam1 t: stopping") or stop.stdout.startswith("cam1 t: completed")
        out, err = waiter.communicate(timeout=90)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, (out, err)
    statuses = [line.split(": ", 1)[1].split(" ", 1)[0] for line in out.splitlines()]
    assert statuses == ["starting", "recording", "stopping", "completed"], out
    assert all(line.startswith("cam1 t: ") for line in out.splitlines()), out
    assert "stop_reason: stop command" in out.splitlines()[-1]

    # The task has ended: stopping it again answers its final status; a task that never ran is not running.
    again = ctl(rig.config_path, "query", "cam1", "t", "--wait")
    assert again.returncode == 0 and again.stdout.startswith("cam1 t: completed"), (again.stdout, again.stderr)
    missing = ctl(rig.config_path, "stop", "cam1", "nope")
    assert missing.returncode == 1, (missing.stdout, missing.stderr)
    assert "not_running" in missing.stdout and "ok: false" in missing.stdout


def test_ctl_start_generates_a_name_and_v311_works(tmp_path: Path, broker, probe, prefix, make_agent,
                                                   camera) -> None:  # fmt: skip
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam2": {"url": camera.url("cam2")}},
                   storage={"type": "local"}, mqtt={"protocol": "3.1.1"})  # fmt: skip
    rig.start_agent()
    proc = ctl(rig.config_path, "start", "cam2", "--json")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["task_name"].startswith("ctl-") and reply["ok"] is True
    rig.wait_status("cam2", reply["task_name"], "recording", timeout=30)
    stop = ctl(rig.config_path, "stop", "cam2", reply["task_name"], "--wait", "--json")
    assert stop.returncode == 0, (stop.stdout, stop.stderr)
    assert json.loads(stop.stdout.splitlines()[-1])["status"] == "completed"


def test_ctl_watch_prints_retained_status(tmp_path: Path, broker, probe, prefix, make_agent, camera) -> None:
    rig = local_rig(tmp_path, broker, probe, prefix, make_agent, camera)
    probe.wait_for(rig.status_topic("cam1"), lambda p: p["status"] == "idle")
    proc = ctl(rig.config_path, "watch", "--count", "1", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cam1: idle"


def test_ctl_without_a_broker_exits_3_in_time(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.yaml", device_id=DEVICE, mqtt_port=free_port(), topic_prefix="t", cameras={},
        output_dir=tmp_path / "rec", storage={"type": "local"}, recording={}, mqtt={},
    )  # fmt: skip
    began = time.monotonic()
    proc = ctl(config, "status", "cam1", "--timeout", "3", timeout=30)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert time.monotonic() - began < 3 + 5
    assert "broker" in proc.stderr
    # A broker that accepts TCP but never answers (a plain listening socket): still 3, within the timeout.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        config2 = write_config(
            tmp_path / "agent2.yaml", device_id=DEVICE, mqtt_port=port, topic_prefix="t", cameras={},
            output_dir=tmp_path / "rec", storage={"type": "local"}, recording={}, mqtt={},
        )  # fmt: skip
        began = time.monotonic()
        proc = ctl(config2, "status", "cam1", "--timeout", "2", timeout=30)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert time.monotonic() - began < 2 + 5


def test_ctl_usage_errors_exit_2(tmp_path: Path) -> None:
    assert ctl(tmp_path / "missing.yaml", "status", "cam1").returncode == 2
    assert ctl(tmp_path / "missing.yaml", "stop", "cam1").returncode == 2  # TASK is required
