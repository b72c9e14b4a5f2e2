"""The health file behind the Docker HEALTHCHECK (edge_agent/health.py) and `edge-agent health`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent import cli, health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, clock: Clock, *, loop_alive: bool = True, connected: bool = True) -> health.HealthFile:
    hf = health.HealthFile(path, lambda: loop_alive, lambda: connected, interval=5.0, clock=clock)
    hf.write()
    return hf


def test_fresh_file_with_live_loop_and_broker_is_healthy(tmp_path: Path) -> None:
    clock, path = Clock(), tmp_path / "h.json"
    write(path, clock)
    doc = json.loads(path.read_text())
    assert doc == {**doc, "loop_alive": True, "connected": True, "interval": 5.0, "pid": os.getpid()}
    clock.now += 14.9  # within 3 intervals
    healthy, reason = health.check(path, clock)
    assert healthy, reason


@pytest.mark.parametrize(
    ("loop_alive", "connected", "needle"),
    [(False, True, "event loop stuck"), (True, False, "not connected"), (False, False, "event loop stuck")],
)
def test_stuck_loop_or_lost_broker_is_unhealthy(tmp_path: Path, loop_alive: bool, connected: bool, needle: str) -> None:
    clock, path = Clock(), tmp_path / "h.json"
    write(path, clock, loop_alive=loop_alive, connected=connected)
    healthy, reason = health.check(path, clock)
    assert not healthy and needle in reason


def test_stale_missing_or_corrupt_file_is_unhealthy(tmp_path: Path) -> None:
    clock, path = Clock(), tmp_path / "h.json"
    write(path, clock)
    clock.now += 15.1  # the writer stopped (frozen agent)
    healthy, reason = health.check(path, clock)
    assert not healthy and "not updated for 15 s" in reason
    path.write_text("{not json")
    assert health.check(path, clock)[0] is False
    path.write_text(json.dumps({"monotonic": 1}))
    assert "unreadable" in health.check(path, clock)[1]
    path.unlink()
    healthy, reason = health.check(path, clock)
    assert not healthy and "not running" in reason


def test_a_failing_probe_counts_as_unhealthy_and_never_kills_the_writer(tmp_path: Path) -> None:
    def boom() -> bool:
        raise RuntimeError("probe bug")

    hf = health.HealthFile(tmp_path / "h.json", boom, lambda: True, interval=5.0)
    hf.write()
    assert health.check(hf.path)[1].startswith("event loop stuck")


def test_thread_rewrites_the_file_and_stop_removes_it(tmp_path: Path) -> None:
    state = {"connected": True}
    hf = health.HealthFile(tmp_path / "h.json", lambda: True, lambda: state["connected"], interval=0.05).start()
    try:
        assert health.check(hf.path)[0]
        state["connected"] = False
        deadline = time.monotonic() + 5
        while health.check(hf.path)[0]:
            assert time.monotonic() < deadline, "the writer did not pick up the disconnect"
            time.sleep(0.02)
        assert hf.writes >= 2
    finally:
        hf.stop()
    assert not hf.path.exists()


def test_an_unwritable_path_is_logged_not_raised(tmp_path: Path) -> None:
    hf = health.HealthFile(tmp_path / "missing-dir" / "h.json", lambda: True, lambda: True)
    hf.write()
    assert hf.writes == 0


def test_health_path_comes_from_the_environment() -> None:
    assert health.health_path({}) is None
    assert health.health_path({health.ENV_FILE: " "}) is None
    assert health.health_path({health.ENV_FILE: "/dev/shm/h.json"}) == Path("/dev/shm/h.json")


def test_cli_health_exit_codes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "h.json"
    monkeypatch.delenv(health.ENV_FILE, raising=False)
    assert cli.main(["health"]) == 2
    assert cli.main(["health", "--file", str(path)]) == 1
    assert "not running" in capsys.readouterr().out
    health.HealthFile(path, lambda: True, lambda: True).write()
    monkeypatch.setenv(health.ENV_FILE, str(path))
    assert cli.main(["health"]) == 0
    assert "healthy" in capsys.readouterr().out
    health.HealthFile(path, lambda: True, lambda: False).write()
    assert cli.main(["health"]) == 1


def test_module_entry_point_is_cheap_and_answers(tmp_path: Path) -> None:
    """The image's HEALTHCHECK runs `python -m edge_agent.health`: stdlib only, no agent imports."""
    path = tmp_path / "h.json"
    health.HealthFile(path, lambda: True, lambda: True).write()
    probe = (
        "import sys, runpy; sys.argv = ['x', sys.argv[1]];"
        "runpy.run_module('edge_agent.health', run_name='__main__')"
    )
    code = (
        "import sys; from edge_agent import health; rc = health.main([sys.argv[1]]);"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('paho', 'minio', 'pydantic', 'yaml'));"
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done
    assert "HEAVY []" in done.stdout
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "healthy" in done.stdout, done
