"""Canary secrets (issue 9, "Done when"): run the whole agent with distinctive secrets and find none
of them where they must never be.

The secrets are real and in use: the MQTT password is checked by a Mosquitto password file (the
agent's listener refuses anonymous clients), the S3 secret is SeaweedFS's own credential, and the
camera password (with an `@` in it) is the simulator's RTSP basic-auth password. Some come by
environment variable, some by `*_file` keys. The agent then records and uploads, fails on a second
camera with a wrong password (also a canary), survives an S3 outage (upload errors logged), and
answers commands — at DEBUG log level. Afterwards every canary, URL-quoted, after its `@`, and as the
Basic-auth token it would make, is searched for in: the agent's log, every message an independent
subscriber on `#` received, the journal and every other file in the output directory, and the
environment of every FFmpeg/ffprobe child caught while it ran.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from parts import LOCALHOST, AgentProcess, CameraSim, Mosquitto, MqttProbe, SeaweedS3, free_port, tcp_accepts
from parts import write_config as write_agent_config

pytestmark = pytest.mark.integration

DEVICE = "edge-c"
MQTT_USER = "edge-canary"
MQTT_PASSWORD = "mqttCanaryPw-4c21e"
S3_ACCESS = "canaryAccessKey"
S3_SECRET = "canaryS3secret-7f3a9"
CAM_USER = "camuser"
CAM_PASSWORD = "p@ss-canary-91"
CAM_WRONG_PASSWORD = "p@ss-wrong-canary-57"
SECRETS = {"mqtt password": MQTT_PASSWORD, "S3 secret": S3_SECRET, "camera password": CAM_PASSWORD,
           "wrong camera password": CAM_WRONG_PASSWORD}  # fmt: skip


def needles(secret: str) -> list[bytes]:
    """Every form in which ``secret`` could leak: raw, URL-quoted, what follows an `@` (a redaction
    that stops at the first `@`), and the RTSP/HTTP Basic token of the camera user with it."""
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    if "@" in secret:
        forms.add(secret.rsplit("@", 1)[1])
        forms.add(base64.b64encode(f"{CAM_USER}:{secret}".encode()).decode())
    return sorted(f.encode() for f in forms)


def find_canaries(data: bytes) -> list[str]:
    """The names of the secrets any of whose forms occur in ``data``."""
    return [name for name, secret in SECRETS.items() if any(n in data for n in needles(secret))]


class PasswordMosquitto(Mosquitto):
    """Mosquitto with two listeners: ``auth_port`` takes only users of a password file made by
    ``mosquitto_passwd -b`` (the agent's), ``port`` is anonymous (the test's own clients). Messages
    cross between listeners: it is one broker."""

    def __init__(self, workdir: Path, username: str, password: str) -> None:
        super().__init__(workdir)
        self.auth_port = free_port()
        self.username, self.password = username, password
        self.passwd_path = self.workdir / "passwd"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.passwd_path.unlink(missing_ok=True)
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(self.passwd_path), self.username, self.password],
                       check=True, timeout=10, capture_output=True)  # fmt: skip
        lines = [
            "per_listener_settings true",
            f"listener {self.port} {LOCALHOST}",
            "allow_anonymous true",
            f"listener {self.auth_port} {LOCALHOST}",
            "allow_anonymous false",
            f"password_file {self.passwd_path}",
            "set_tcp_nodelay true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "max_queued_messages 10000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    def is_ready(self) -> bool:
        return tcp_accepts(self.host, self.port) and tcp_accepts(self.host, self.auth_port)


def connect_result(host: str, port: int, username: str | None = None, password: str | None = None) -> str:
    """The CONNACK reason of one MQTT v5 connection attempt ('Success' or why not)."""
    result: list[str] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"try-{os.getpid()}-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)  # fmt: skip
    if username is not None:
        client.username_pw_set(username, password)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        result.append(str(rc))
        done.set()

    client.on_connect = on_connect
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        done.wait(10)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()
    return result[0] if result else "no CONNACK"


class ChildEnvSampler:
    """Polls the agent's descendants and keeps the environment of each FFmpeg/ffprobe process.

    Only after exec (argv[0] is ffmpeg/ffprobe): between fork and exec a child still shows the
    agent's own environment, which is not what the child runs with.
    """

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.envs: dict[int, tuple[str, bytes, bytes]] = {}  # pid -> (program, environ, cmdline)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="env-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.agent.descendant_pids():
                if pid in self.envs:
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    program = Path(cmdline.split(b"\0", 1)[0].decode(errors="replace")).name
                    if program not in ("ffmpeg", "ffprobe"):
                        continue
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                    if Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()).name != program:
                        continue  # the pid was reused in between
                except (OSError, UnicodeDecodeError):
                    continue
                with self._lock:
                    self.envs[pid] = (program, environ, cmdline)
            self._stop.wait(0.01)

    def programs(self) -> list[str]:
        with self._lock:
            return [p for p, _, _ in self.envs.values()]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("arrangement", ["mqtt-env+s3-file", "mqtt-file+s3-env"])
def test_canary_secrets_never_leak(arrangement: str, tmp_path: Path, prefix: str, make_agent, track) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)

    def secret_file(name: str, value: str) -> str:
        path = secrets_dir / name
        path.write_text(value + "\n")
        path.chmod(0o600)
        return str(path)

    broker = track(PasswordMosquitto(tmp_path / "mosquitto", MQTT_USER, MQTT_PASSWORD)).start()
    s3 = track(SeaweedS3(tmp_path / "s3", access_key=S3_ACCESS, secret_key=S3_SECRET)).start()
    camsim = track(CameraSim(tmp_path / "camsim", mounts=("cam1", "cam2"), user=CAM_USER, password=CAM_PASSWORD))
    camsim.start()
    assert connect_result(broker.host, broker.auth_port) != "Success", "the agent's listener takes anonymous clients"
    assert connect_result(broker.host, broker.auth_port, MQTT_USER, "wrong") != "Success"

    env = {"EDGE_AGENT_CAMERA_CAM2_URL": camsim.url("cam2", password=CAM_WRONG_PASSWORD)}
    mqtt_cfg: dict[str, Any] = {"port": broker.auth_port, "username": MQTT_USER}
    storage: dict[str, Any] = {"type": "minio", "endpoint": s3.endpoint, "access_key": S3_ACCESS,
                               "bucket": f"canary-{prefix}", "secure": False, "min_free_bytes": 0,
                               "retry_initial_seconds": 0.5, "retry_max_seconds": 2}  # fmt: skip
    if arrangement == "mqtt-env+s3-file":
        env["EDGE_AGENT_MQTT_PASSWORD"] = MQTT_PASSWORD
        storage["secret_key_file"] = secret_file("s3_secret", S3_SECRET)
    else:
        mqtt_cfg["password_file"] = secret_file("mqtt_password", MQTT_PASSWORD)
        env["EDGE_AGENT_STORAGE_SECRET_KEY"] = S3_SECRET
    output_dir = tmp_path / "rig" / "recordings"
    config = write_agent_config(
        tmp_path / "rig" / "agent.yaml", device_id=DEVICE, mqtt_port=broker.auth_port, topic_prefix=prefix,
        cameras={"cam1": {"url_file": secret_file("cam1_url", camsim.url("cam1"))}, "cam2": {}},
        output_dir=output_dir, storage=storage, mqtt=mqtt_cfg,
        recording={"segment_seconds": 2, "first_frame_timeout_seconds": 6, "stall_timeout_seconds": 6,
                   "stop_timeout_seconds": 8, "restart_backoff_max_seconds": 2, "probe_timeout_seconds": 5},
    )  # fmt: skip
    raw = yaml.safe_load(config.read_text())
    raw.update(log_level="DEBUG", telemetry_seconds=1)
    raw["storage"].pop("secret_key", None)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert not find_canaries(config.read_bytes()), "the test put a secret into agent.yaml itself"

    base = f"{prefix}/{DEVICE}"
    probe = MqttProbe(broker.host, broker.port)  # anonymous, on the test's listener
    agent = make_agent(config, env, start=False)
    sampler = ChildEnvSampler(agent)
    sampler.start()
    try:
        probe.subscribe("#")
        agent.start()
        probe.wait_for_raw(f"{base}/status", lambda p: p == b"online", timeout=30)

        def request(cam: str, payload: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
            return probe.request(f"{base}/{cam}/cmd", payload, f"{base}/{cam}/reply", timeout)

        def wait_task(cam: str, name: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
            return probe.wait_for(f"{base}/{cam}/tasks/{name}", lambda p: p["status"] in statuses, timeout)

        # A normal recording, and a camera with the wrong password failing at the same time.
        assert request("cam1", {"action": "start", "task_name": "canary-a"})["ok"] is True
        assert request("cam2", {"action": "start", "task_name": "canary-bad"})["ok"] is True
        wait_task("cam1", "canary-a", {"recording"}, 30)
        agent_ffmpeg = agent.ffmpeg_pids("cam1")
        assert agent_ffmpeg, "no FFmpeg recorder for cam1 while it is recording"
        deadline = time.monotonic() + 10
        while not all(pid in sampler.envs for pid in agent_ffmpeg) and time.monotonic() < deadline:
            time.sleep(0.05)  # the sampler polls /proc every 10 ms
        assert all(pid in sampler.envs for pid in agent_ffmpeg), "the recorder's environment was not read"
        time.sleep(2)  # record for a while: the duration is what is being made, not a synchronisation
        request("cam1", {"action": "stop", "task_name": "canary-a"})
        done = wait_task("cam1", "canary-a", {"uploaded", "failed"})
        assert done["status"] == "uploaded", done
        bad = wait_task("cam2", "canary-bad", {"failed", "completed", "uploaded"}, 60)
        assert bad["status"] == "failed" and bad.get("error"), bad

        # An S3 outage: the upload fails (errors logged and published), then resumes.
        assert request("cam1", {"action": "start", "task_name": "canary-b"})["ok"] is True
        wait_task("cam1", "canary-b", {"recording"}, 30)
        s3.kill()
        time.sleep(1)  # a little more media while the store is down
        request("cam1", {"action": "stop", "task_name": "canary-b"})
        pending = wait_task("cam1", "canary-b", {"upload_pending", "failed"}, 60)
        assert pending["status"] == "upload_pending" and pending.get("last_upload_error"), pending
        s3.start()
        done_b = wait_task("cam1", "canary-b", {"uploaded", "failed"}, 90)
        assert done_b["status"] == "uploaded", done_b

        # Commands, good and bad, whose replies carry task documents and errors.
        for cam in ("cam1", "cam2"):
            request(cam, {"action": "status"})
            request(cam, {"action": "query", "task_name": "canary-a"})
        probe.publish(f"{base}/cam1/cmd", b"{not json")
        request("cam1", {"action": "start", "task_name": "bad%name"})
        request("nocam", {"action": "status"})
        # The agent's own environment does hold the env-given secrets: the search can see them.
        agent_env = Path(f"/proc/{agent.pid}/environ").read_bytes()
        code, _ = agent.terminate(30)
        assert code == 0, agent.log_excerpt()
    finally:
        sampler.stop()
        probe.close()

    given_by_env = ["wrong camera password", "mqtt password" if arrangement.startswith("mqtt-env") else "S3 secret"]
    assert sorted(find_canaries(agent_env)) == sorted(given_by_env), "the search does not find what is there"

    leaks: list[str] = []
    log = agent.log_path.read_bytes()
    leaks += [f"agent log: {name}" for name in find_canaries(log)]
    lines = [line for line in log.splitlines() if find_canaries(line)]
    for m in probe.raw():
        props = repr(vars(m.properties)) if m.properties is not None else ""
        found = find_canaries(m.topic.encode() + b"\0" + m.payload + b"\0" + props.encode())
        leaks += [f"MQTT {m.topic}: {name}" for name in found]
    journal = sorted(output_dir.glob(".edge-agent.sqlite3*"))
    assert journal, f"no journal in {output_dir}"
    for path in sorted(p for p in output_dir.rglob("*") if p.is_file()):
        leaks += [f"{path.relative_to(output_dir)}: {name}" for name in find_canaries(path.read_bytes())]
    programs = sampler.programs()
    for pid, (program, environ, _) in sorted(sampler.envs.items()):
        leaks += [f"{program} {pid} environment: {name}" for name in find_canaries(environ)]
        names = [kv.split(b"=", 1)[0].decode(errors="replace") for kv in environ.split(b"\0") if kv]
        leaks += [f"{program} {pid} environment has {n}" for n in names if n.startswith("EDGE_AGENT_")]
    argv_leaks = sorted({n for _, _, cmdline in sampler.envs.values() for n in find_canaries(cmdline)})
    print(f"\n[canary] {arrangement}: {len(log)} log bytes, {len(probe.raw())} MQTT messages, "
          f"{len(journal)} journal files, children sampled: {sorted(set(programs))} x{len(programs)}; "
          f"in FFmpeg argv (not checked here): {argv_leaks}")  # fmt: skip

    assert "ffmpeg" in programs and "ffprobe" in programs, f"children sampled: {programs}"
    assert not leaks, "canaries found:\n" + "\n".join(leaks) + "\n" + b"\n".join(lines[:20]).decode(errors="replace")
