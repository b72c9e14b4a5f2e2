"""sd_notify over a real unix datagram socket; the watchdog thread; JSON log fields."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import notify
from edge_agent.cli import HeartbeatQueue, JsonFormatter


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(notify_socket: socket.socket) -> None:
    assert notify.ready() is True
    assert recv(notify_socket) == "READY=1"
    assert notify.status("recording\n2 cameras") is True
    assert recv(notify_socket) == "STATUS=recording 2 cameras"
    assert notify.watchdog() is True
    assert recv(notify_socket) == "WATCHDOG=1"
    assert notify.stopping() is True
    assert recv(notify_socket) == "STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert recv(sock) == "READY=1"


def test_noop_without_socket_and_never_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False and notify.watchdog() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify.stopping() is False  # logged, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


def test_watchdog_seconds_from_env() -> None:
    assert notify.watchdog_seconds({}) is None
    assert notify.watchdog_seconds({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert notify.watchdog_seconds({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}) == 60.0
    assert notify.watchdog_seconds({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_seconds({"WATCHDOG_USEC": "junk"}) is None
    assert notify.Watchdog.from_env(lambda: True, {}) is None
    dog = notify.Watchdog.from_env(lambda: True, {"WATCHDOG_USEC": "200000"})
    assert dog is not None and dog.interval == pytest.approx(0.1)


def test_watchdog_pings_only_while_alive(notify_socket: socket.socket) -> None:
    alive = threading.Event()
    alive.set()
    dog = notify.Watchdog(0.05, alive.is_set).start()
    try:
        assert recv(notify_socket) == "WATCHDOG=1"
        assert recv(notify_socket) == "WATCHDOG=1"
        alive.clear()
        time.sleep(0.15)  # a ping already in flight may still land
        notify_socket.settimeout(0.05)
        while True:
            try:
                notify_socket.recv(4096)
            except TimeoutError:
                break
        notify_socket.settimeout(0.3)
        with pytest.raises(TimeoutError):
            notify_socket.recv(4096)
    finally:
        dog.stop()


def test_loop_heartbeat_through_the_event_queue() -> None:
    now = [100.0]
    hb = notify.LoopHeartbeat(max_busy=10, clock=lambda: now[0])
    q = HeartbeatQueue()
    q.heartbeat = hb
    q.put("x")  # type: ignore[arg-type]
    assert q.get(timeout=1) == "x"  # returned: the loop is busy with an event from now on
    now[0] += 9
    assert hb.alive()
    now[0] += 2
    assert not hb.alive()  # stuck handling one event for 11 s
    hb.waiting()  # blocked in get() for the next event: healthy however long it waits
    now[0] += 1000
    assert hb.alive()


def test_json_log_lines_carry_camera_and_task() -> None:
    fmt = JsonFormatter()
    rec = logging.LogRecord("edge_agent.recorder", logging.INFO, __file__, 1, "ffmpeg up", None, None)
    rec.threadName = "recorder.cam7"
    doc = json.loads(fmt.format(rec))
    assert doc["camera"] == "cam7" and "task" not in doc
    rec2 = logging.LogRecord("edge_agent.agent", logging.INFO, __file__, 1, "started", None, None)
    rec2.threadName = "MainThread"
    rec2.camera = "cam1"
    rec2.task = "patrol-7"
    doc2 = json.loads(fmt.format(rec2))
    assert doc2["camera"] == "cam1" and doc2["task"] == "patrol-7"
    rec3 = logging.LogRecord("edge_agent", logging.INFO, __file__, 1, "plain", None, None)
    rec3.threadName = "MainThread"
    assert "camera" not in json.loads(fmt.format(rec3))


@pytest.mark.integration
def test_agent_process_notifies_systemd(tmp_path: Path, broker, make_agent) -> None:  # type: ignore[no-untyped-def]
    """The real agent under a fake systemd: READY=1 + STATUS, watchdog pings, STOPPING=1 on SIGTERM."""
    from parts import write_config

    sock_path = tmp_path / "sd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        config = write_config(
            tmp_path / "agent.yaml", device_id="edge-sd", mqtt_port=broker.port, topic_prefix="sd", cameras={},
            output_dir=tmp_path / "rec", storage={"type": "local", "min_free_bytes": 0},
        )  # fmt: skip
        agent = make_agent(config, {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        got: list[str] = []
        while "READY=1" not in got or got.count("WATCHDOG=1") < 3:
            got.append(recv(sock))
        assert any(m.startswith("STATUS=device edge-sd") for m in got), got
        code, _ = agent.terminate(timeout=30)
        assert code == 0
        rest: list[str] = []
        sock.settimeout(0.5)
        while True:
            try:
                rest.append(recv(sock))
            except TimeoutError:
                break
        assert "STOPPING=1" in rest, rest
