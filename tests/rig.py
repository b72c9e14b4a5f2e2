"""A test rig around one agent process: its config, its topics, and a probe watching them."""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parts import AgentProcess, Mosquitto, MqttProbe, write_config

DEVICE = "edge-t"


@dataclass
class Rig:
    """Topics and helpers for one agent under test."""

    broker: Mosquitto
    probe: MqttProbe
    prefix: str
    workdir: Path
    output_dir: Path
    config_path: Path
    agent: AgentProcess | None = None
    device: str = DEVICE
    _make: Callable[..., AgentProcess] | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    def status_topic(self, cam: str) -> str:
        return f"{self.base}/{cam}/status"

    def task_topic(self, cam: str, task: str) -> str:
        return f"{self.base}/{cam}/tasks/{task}"

    def cmd_topic(self, cam: str) -> str:
        return f"{self.base}/{cam}/cmd"

    def reply_topic(self, cam: str) -> str:
        return f"{self.base}/{cam}/reply"

    def start_agent(self, extra_env: dict[str, str] | None = None, wait_online: bool = True) -> AgentProcess:
        assert self._make is not None
        if wait_online:
            self.probe.clear()
        self.agent = self._make(self.config_path, extra_env)
        if wait_online:
            self.wait_online()
        return self.agent

    def wait_online(self, timeout: float = 30) -> None:
        self.probe.wait_for_raw(f"{self.base}/status", lambda p: p == b"online", timeout=timeout)

    def request(self, cam: str, payload: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """Send a command with a fresh request_id and return its reply (the rig already subscribes P/#)."""
        rid = uuid.uuid4().hex
        self.probe.publish(self.cmd_topic(cam), {**payload, "request_id": rid})
        return self.probe.wait_for(self.reply_topic(cam), lambda p: p.get("request_id") == rid, timeout)

    def wait_status(self, cam: str, task: str, status: str | set[str], timeout: float = 60) -> dict[str, Any]:
        wanted = {status} if isinstance(status, str) else status
        return self.probe.wait_for(
            self.task_topic(cam, task), lambda p: p["status"] in wanted and p["task_name"] == task, timeout
        )

    def statuses(self, cam: str, task: str) -> list[str]:
        return [m["status"] for m in self.probe.messages(self.task_topic(cam, task))]


def make_rig(
    tmp_path: Path,
    broker: Mosquitto,
    probe: MqttProbe,
    prefix: str,
    make_agent: Callable[..., AgentProcess],
    *,
    cameras: dict[str, dict[str, Any]],
    storage: dict[str, Any],
    recording: dict[str, Any] | None = None,
    mqtt: dict[str, Any] | None = None,
    name: str = "rig",
) -> Rig:
    workdir = tmp_path / name
    output_dir = workdir / "recordings"
    rec = {"segment_seconds": 2, "first_frame_timeout_seconds": 15, "stall_timeout_seconds": 6,
           "stop_timeout_seconds": 8, "restart_backoff_max_seconds": 2, **(recording or {})}  # fmt: skip
    stor = {"min_free_bytes": 0, "retry_initial_seconds": 0.5, "retry_max_seconds": 2, **storage}
    config_path = write_config(
        workdir / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix, cameras=cameras,
        output_dir=output_dir, storage=stor, recording=rec, mqtt=mqtt,
    )  # fmt: skip
    probe.subscribe(f"{prefix}/#")
    return Rig(broker, probe, prefix, workdir, output_dir, config_path, _make=make_agent)


def minio_storage(s3: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    # download_url retained: these tests download what was uploaded through the status's URL.
    return {"type": "minio", "endpoint": s3.endpoint, "access_key": s3.access_key, "secret_key": s3.secret_key,
            "bucket": bucket, "download_url": "retained", **extra}  # fmt: skip


def download(url: str, dest: Path, timeout: float = 30) -> Path:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        dest.write_bytes(resp.read())
    return dest


def mosquitto_pub(port: int, topic: str, payload: str) -> None:
    """Publish with Mosquitto's own client: a client that is not this project."""
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-m", payload],
        check=True, timeout=10,
    )  # fmt: skip


def record_for(seconds: float) -> None:
    time.sleep(seconds)
