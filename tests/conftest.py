"""Fixtures that start real parts (Mosquitto, SeaweedFS S3, RTSP camera simulator, the agent).

Every part is torn down even when a test fails, and a failing test's report gets a section with
the log tail of every part it used (``request.node.rep_call`` etc. are set for fixtures too).
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parts import (
    AgentProcess,
    CameraSim,
    Mosquitto,
    MqttProbe,
    SeaweedS3,
    tail,
)
from parts.docker import DockerPrep

CAMERA_MOUNTS = ("cam1", "cam2", "cam3", "cam4")

PARTS_KEY = pytest.StashKey[list[Any]]()
_SESSION_PARTS: dict[str, Any] = {}

P = TypeVar("P")


def register_part(request: pytest.FixtureRequest, part: P) -> P:
    """Lists ``part`` (anything with ``.log_path``) for the failure report of the current test."""
    request.node.stash.setdefault(PARTS_KEY, []).append(part)
    return part


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    if report.failed:
        registered: list[Any] = item.stash.get(PARTS_KEY, [])
        parts = list(registered)
        fixturenames: list[str] = getattr(item, "fixturenames", [])
        parts += [part for name, part in _SESSION_PARTS.items() if name in fixturenames]
        for part in parts:
            log_path = getattr(part, "log_path", None)
            if log_path is not None:
                report.sections.append(
                    (f"log tail: {type(part).__name__} ({log_path})", tail(Path(log_path), 60) or "(empty)")
                )
    return report


# ------------------------------------------------------------------------------ Docker image

DOCKER_TESTS = "test_docker.py"
_DOCKER_PREP: list[DockerPrep] = []


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When Docker tests are selected: they run last, and their image (engine, base image, build: 2-3
    minutes) is made in a background thread from now on, so it overlaps the rest of the suite."""
    docker_items = [item for item in items if item.path.name == DOCKER_TESTS]
    if not docker_items or config.option.collectonly:
        return
    items[:] = [item for item in items if item.path.name != DOCKER_TESTS] + docker_items
    factory = getattr(config, "_tmp_path_factory", None)
    workdir = factory.mktemp("docker") if factory is not None else Path(tempfile.mkdtemp(prefix="edge-docker-"))
    if os.geteuid() == 0 or os.access("/var/run/docker.sock", os.W_OK):
        _DOCKER_PREP.append(DockerPrep(workdir).start())


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _DOCKER_PREP:
        _DOCKER_PREP.pop().cleanup()


@pytest.fixture(scope="session")
def docker_prep() -> DockerPrep:
    """The background preparation started after collection: ``.wait()`` gives the image tag."""
    if not _DOCKER_PREP:
        pytest.skip("Docker tests need root (to start dockerd) or access to a running engine")
    return _DOCKER_PREP[0]


# ------------------------------------------------------------------------------ session parts


@pytest.fixture(scope="session")
def _camera_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CameraSim]:
    sim = CameraSim(tmp_path_factory.mktemp("camsim"), mounts=CAMERA_MOUNTS, width=1280, height=720, shared=False)
    _SESSION_PARTS["camera"] = sim
    try:
        sim.start()
        yield sim
    finally:
        sim.stop()
        _SESSION_PARTS.pop("camera", None)


@pytest.fixture
def camera(_camera_session: CameraSim) -> CameraSim:
    """One H.264 720p25 RTSP simulator with mounts cam1..cam4 shared by the whole session.

    Do not kill it in a test: start a private ``CameraSim`` for camera-outage tests. Should it have
    died anyway, it is restarted on the same port before the next test, so one failure stays one.
    """
    if not _camera_session.is_alive():
        _camera_session.restart()
    return _camera_session


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session (tests use their own buckets)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    _SESSION_PARTS["s3"] = server
    try:
        server.start()
        yield server
    finally:
        server.stop()
        _SESSION_PARTS.pop("s3", None)


# ----------------------------------------------------------------------------- per-test parts


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test (so a test may kill or restart it)."""
    mosq = register_part(request, Mosquitto(tmp_path / "mosquitto"))
    try:
        mosq.start()
        yield mosq
    finally:
        mosq.stop()


@pytest.fixture
def probe(broker: Mosquitto) -> Iterator[MqttProbe]:
    """The test's MQTT v5 client on ``broker``."""
    client = MqttProbe(broker.host, broker.port)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def bucket() -> str:
    """A unique bucket name, not created (the agent creates it)."""
    return f"rec-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def prefix() -> str:
    """A unique MQTT topic prefix for this test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_agent(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``make_agent(config_path, extra_env=None, start=True)`` -> AgentProcess.

    Every agent made is stopped (group killed, FFmpeg children included) at teardown and its log is
    attached to the report of a failing test.
    """
    agents: list[AgentProcess] = []

    def factory(
        config_path: Path, extra_env: Mapping[str, str] | None = None, *, start: bool = True
    ) -> AgentProcess:
        workdir = tmp_path / f"agent{len(agents) + 1}"
        agent = register_part(request, AgentProcess(config_path, workdir, extra_env=extra_env))
        agents.append(agent)
        return agent.start() if start else agent

    try:
        yield factory
    finally:
        for agent in agents:
            agent.stop(timeout=15)


@pytest.fixture
def track(request: pytest.FixtureRequest) -> Iterator[Callable[[P], P]]:
    """``track(part)`` for parts a test starts itself: stopped at teardown, logs on failure."""
    tracked: list[Any] = []

    def add(part: P) -> P:
        tracked.append(register_part(request, part))
        return part

    try:
        yield add
    finally:
        for part in reversed(tracked):
            part.stop()
