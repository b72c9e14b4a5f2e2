"""Models of `agent.yaml`, validated by pydantic: unknown keys are rejected, every bad key is named.

Secrets can be kept out of the file: environment variables override them (see `ENV_OVERRIDES`
and `EDGE_AGENT_CAMERA_<ID>_URL`), so a systemd `EnvironmentFile=` or a Docker secret can carry them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from edge_agent import names
from edge_agent.ffmpeg import StreamInput

CAMERA_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEVICE_ID_RE = CAMERA_ID_RE
TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")

VideoMode = Literal["auto", "copy", "transcode"]
# Node-RED's and common request/response conventions; never another application's command topics.
DEFAULT_RESPONSE_TOPICS = ("nodered/#", "responses/#", "+/responses/#")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Model):
    """TLS to the broker; off by default (LAN brokers), on for anything crossing the internet.

    Any other `tls.*` key given while `enabled` is false is an error: a half-written TLS section must
    not quietly connect in plaintext.
    """

    enabled: bool = False
    ca_file: Path | None = Field(None, description="CA bundle; the system store when null")
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS; may hold the key")
    key_file: Path | None = Field(None, description="the client certificate's private key (PEM)")
    key_password: SecretStr | None = Field(None, description="password of an encrypted key_file")
    alpn_protocols: list[str] = Field(
        default_factory=list, description='ALPN protocols, e.g. ["x-amzn-mqtt-ca"] for AWS IoT Core on port 443'
    )
    insecure: bool = Field(False, description="skip hostname verification (testing only)")

    @field_validator("alpn_protocols")
    @classmethod
    def _alpn(cls, v: list[str]) -> list[str]:
        for proto in v:
            if not proto or len(proto.encode()) > 255 or not proto.isascii():
                raise ValueError(f"{proto!r} is not an ALPN protocol name (1-255 ASCII bytes)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        if not self.enabled:
            given = sorted(self.model_fields_set - {"enabled"})
            if given:
                # One error per key, located at the key itself (`mqtt.tls.ca_file: ...`); the value is
                # left out of the error (key_password is a secret).
                raise ValidationError.from_exception_data(
                    "TlsConfig",
                    [
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "tls_disabled",
                                "given while tls.enabled is false; set enabled: true or remove it "
                                "(no silent plaintext fallback)",
                            ),
                            loc=(key,),
                            input=key,
                        )
                        for key in given
                    ],
                )
            return self
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate)")
        if self.key_password is not None and self.cert_file is None:
            raise ValueError("key_password needs cert_file and key_file")
        return self


class MqttConfig(_Model):
    """The broker the agent dials out to."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    hosts: list[str] = Field(
        default_factory=list,
        description="broker cluster nodes as host:port, tried in turn on each reconnect; overrides host/port",
    )
    username: str | None = None
    password: SecretStr | None = None
    topic_prefix: str = "edge"
    client_id: str | None = Field(
        None,
        description="must be stable; default: the username when one is set (brokers with "
        "use_username_as_clientid tie the session to the credentials), else edge-agent-<device_id>",
    )
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    keepalive: int = Field(30, ge=5, le=3600)
    qos: Literal[0, 1] = Field(
        1, description="QoS of commands, replies and statuses (AWS IoT Core, Azure Event Grid and NATS refuse QoS 2)"
    )
    session_expiry_seconds: int = Field(
        86400, ge=0, description="how long the broker keeps commands queued while the agent is offline"
    )
    reconnect_min_seconds: float = Field(1.0, gt=0)
    reconnect_max_seconds: float = Field(60.0, gt=0)
    retained_tasks_per_camera: int = Field(
        20, ge=1, le=1000, description="retained P/D/C/tasks/<name> topics kept per camera"
    )
    max_payload_bytes: int = Field(
        65536, ge=256, le=1048576, description="larger commands are rejected before they are parsed"
    )
    response_topics: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RESPONSE_TOPICS),
        description="MQTT filters a v5 Response Topic must match (the agent's own <prefix>/<device>/_ctl/# "
        "is always allowed); command, status, task, Home Assistant, '$' and wildcard topics never are",
    )
    commands_per_second: float = Field(5.0, gt=0, description="per-camera command rate; more get rate_limited")
    command_burst: int = Field(20, ge=1, description="commands a camera may receive at once before the rate applies")
    inbound_queue: int = Field(
        1000, ge=10, description="commands waiting for the agent at most; more are shed (telemetry counts them)"
    )
    outbound_queue: int = Field(
        10000, ge=100,
        description="messages waiting for the broker at most; retained statuses are coalesced, never lost",
    )
    tls: TlsConfig = TlsConfig()

    @field_validator("response_topics")
    @classmethod
    def _response_topics(cls, v: list[str]) -> list[str]:
        for item in v:
            problem = names.valid_filter(item)
            if problem:
                raise ValueError(f"{item!r}: {problem}")
            if item.startswith("$") or item.split("/")[0] == "#":
                raise ValueError(f"{item!r}: must not be '#' or a '$' topic")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for item in v:
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{item!r} is not host:port")
        return v

    def endpoints(self) -> list[tuple[str, int]]:
        """The broker addresses to try, in order."""
        if not self.hosts:
            return [(self.host, self.port)]
        return [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in self.hosts]

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not TOPIC_PREFIX_RE.match(v):
            raise ValueError("must be topic levels of letters, digits, '_' or '-' separated by '/'")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> MqttConfig:
        if self.reconnect_max_seconds < self.reconnect_min_seconds:
            raise ValueError("reconnect_max_seconds must be >= reconnect_min_seconds")
        return self


class CameraConfig(_Model):
    """One camera: where its stream is and how to record it."""

    url: SecretStr = Field(description="rtsp:// (or any FFmpeg input) URL; may hold credentials")
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    max_seconds: int | None = Field(None, ge=1, description="overrides recording.max_seconds")
    video: VideoMode | None = Field(None, description="overrides recording.video")
    name: str | None = Field(None, description="human name (Home Assistant device name)")
    buffer_seconds: int = Field(
        0, ge=0, le=3600, description="keep this many seconds of the camera in a ring buffer (0: off) for pre-roll"
    )
    buffer_max_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024, description="cap of the ring buffer on disk")
    buffer_dir: Path | None = Field(
        None, description="where the ring lives (default: /dev/shm/edge-agent/<device>/<camera>, RAM, no flash wear)"
    )
    pre_roll_seconds: float = Field(0.0, ge=0, description="default pre-roll of a start (needs buffer_seconds)")

    @model_validator(mode="after")
    def _pre_roll_needs_buffer(self) -> CameraConfig:
        if self.pre_roll_seconds > self.buffer_seconds:
            raise ValueError(
                f"pre_roll_seconds ({self.pre_roll_seconds:g}) is more than buffer_seconds ({self.buffer_seconds}) "
                "can hold: set buffer_seconds at least as long"
            )
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value().strip()
        if not raw:
            raise ValueError("must not be empty")
        if "://" not in raw and not raw.startswith("/"):
            raise ValueError("must be a URL such as rtsp://host:554/stream")
        return SecretStr(raw)


class RecordingConfig(_Model):
    """How FFmpeg records: where, for how long at most, and its timeouts."""

    output_dir: Path = Path("./recordings")
    ffmpeg_path: str = "ffmpeg"
    ffprobe_path: str | None = Field(None, description="default: ffprobe next to ffmpeg_path")
    max_seconds: int = Field(3600, ge=1, description="hard cap on every task")
    video: VideoMode = Field("auto", description="auto: copy H.264 yuv420p, transcode anything else")
    transcode_preset: str = "veryfast"
    segment_seconds: int = Field(4, ge=1, le=60, description="crash-safe segment length")
    first_frame_timeout_seconds: float = Field(20.0, gt=0, description="no media by then: task fails")
    stall_timeout_seconds: float = Field(15.0, gt=0, description="no progress this long: restart FFmpeg")
    stop_timeout_seconds: float = Field(10.0, gt=0, description="graceful stop wait before SIGKILL")
    rtsp_timeout_seconds: float = Field(10.0, gt=0, description="FFmpeg RTSP socket timeout")
    restart_backoff_max_seconds: float = Field(10.0, gt=0)
    max_restarts: int = Field(1000, ge=0, description="FFmpeg restarts per task before it fails")
    probe_timeout_seconds: float = Field(15.0, gt=0)
    analyzeduration_us: int = Field(500000, ge=0, description="FFmpeg -analyzeduration (faster start)")
    probesize: int = Field(500000, ge=32)
    # FFmpeg prints its first report with the first frame whatever the period (so `recording` is not
    # delayed); later reports only feed the stall watchdog. 2 s instead of 0.5 s: about 7 % less
    # recording CPU for FFmpeg and the agent (bench/bench_forms.py, bench/bench_cpu.py).
    stats_period_seconds: float = Field(2.0, gt=0, description="FFmpeg -stats_period (progress reports)")
    segment_events: bool = Field(
        True, description="publish a `segment` event per closed segment (the largest message source in a fleet)"
    )

    @model_validator(mode="after")
    def _watchdog_sees_progress(self) -> RecordingConfig:
        if self.stall_timeout_seconds <= 2 * self.stats_period_seconds:
            raise ValueError(
                f"recording.stall_timeout_seconds ({self.stall_timeout_seconds:g}) must be more than twice "
                f"recording.stats_period_seconds ({self.stats_period_seconds:g}): FFmpeg reports progress only "
                "that often, so the watchdog would restart every healthy recording"
            )
        return self


class StorageConfig(_Model):
    """Where finished recordings go: MinIO/S3 (with a durable queue) or local disk only."""

    type: Literal["minio", "local"] = "local"
    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    bucket: str = "recordings"
    secure: bool = False
    ca_file: Path | None = Field(
        None, description="CA bundle (PEM) to verify the S3 server with secure: true; the system store when null"
    )
    region: str = Field("us-east-1", description="set so presigning needs no network round trip")
    delete_local_after_upload: bool = True
    presign_seconds: int = Field(3600, ge=1, le=604800, description="lifetime of a presigned download_url")
    download_url: Literal["retained", "replies", "none"] = Field(
        "replies",
        description="where the presigned URL is published: retained status/task topics, events and replies "
        "(anyone who can read them can download), replies to status/query commands only, or nowhere",
    )
    upload_workers: int = Field(2, ge=1, le=16)
    upload_order: Literal["oldest", "newest"] = "oldest"
    bandwidth_limit_bytes_per_second: int | None = Field(None, ge=1024)
    retry_initial_seconds: float = Field(1.0, gt=0)
    retry_max_seconds: float = Field(300.0, gt=0, description="cap of the exponential backoff")
    connect_timeout_seconds: float = Field(5.0, gt=0)
    read_timeout_seconds: float = Field(30.0, gt=0)
    part_size_bytes: int = Field(
        8 * 1024 * 1024, ge=5 * 1024 * 1024,
        description="multipart part size: at most this much is sent again after a dropped link",
    )
    stall_timeout_seconds: float = Field(
        30.0, gt=0, description="an upload that moves no bytes this long is a dead link (retried)"
    )
    min_free_bytes: int = Field(
        512 * 1024 * 1024, ge=0, description="refuse new starts below this much free disk"
    )
    retention_days: float | None = Field(
        None, gt=0, description="delete kept local copies of *uploaded* recordings after this age"
    )

    @model_validator(mode="after")
    def _ca_file(self) -> StorageConfig:
        if self.ca_file is not None and not self.secure:
            raise ValueError("storage.ca_file needs storage.secure: true (no silent plaintext fallback)")
        return self

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$", v):
            raise ValueError("must be a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        return v

    @model_validator(mode="after")
    def _keys(self) -> StorageConfig:
        if self.type == "minio" and (self.access_key is None or self.secret_key is None):
            raise ValueError("storage.type minio needs access_key and secret_key")
        return self


class HomeAssistantConfig(_Model):
    """Home Assistant MQTT discovery (device-based); off by default so nothing appears uninvited."""

    enabled: bool = False
    discovery_prefix: str = Field("homeassistant", description="HA's discovery prefix; HA's birth topic is <it>/status")

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not TOPIC_PREFIX_RE.match(v):
            raise ValueError("must be topic levels of letters, digits, '_' or '-' separated by '/'")
        return v


class MetricsConfig(_Model):
    """Optional Prometheus text endpoint for scrapes on the LAN (off by default: the agent dials out)."""

    enabled: bool = False
    host: str = Field("127.0.0.1", description="bind address; 0.0.0.0 to let a LAN Prometheus scrape it")
    port: int = Field(9108, ge=1, le=65535)


class AgentConfig(_Model):
    """The whole `agent.yaml`."""

    device_id: str
    mqtt: MqttConfig = MqttConfig()
    cameras: dict[str, CameraConfig] = Field(default_factory=dict)
    recording: RecordingConfig = RecordingConfig()
    storage: StorageConfig = StorageConfig()
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()
    metrics: MetricsConfig = MetricsConfig()
    telemetry_seconds: float = Field(60.0, ge=0, description="retained P/D/telemetry period; 0 disables")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    groups: list[str] = Field(
        default_factory=list, max_length=32,
        description="groups this device belongs to: it executes commands sent on P/groups/<group>/cmd",
    )  # fmt: skip

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_ID_RE.match(v):
            raise ValueError("must be 1-64 of letters, digits, '_' or '-'")
        if v == "groups":
            raise ValueError("device id 'groups' is reserved (P/groups/<group>/cmd carries group commands)")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        bad = [g for g in v if not CAMERA_ID_RE.match(g)]
        if bad:
            raise ValueError(f"group names must be 1-64 of letters, digits, '_' or '-': {bad}")
        return list(dict.fromkeys(v))

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: dict[str, CameraConfig]) -> dict[str, CameraConfig]:
        bad = [k for k in v if not CAMERA_ID_RE.match(k)]
        if bad:
            raise ValueError(f"camera ids must be 1-64 of letters, digits, '_' or '-': {bad}")
        if "_ctl" in v:
            raise ValueError("camera id '_ctl' is reserved (P/D/_ctl/ holds edge-agent ctl's reply inboxes)")
        return v

    def camera_max_seconds(self, camera_id: str) -> int:
        cam = self.cameras[camera_id]
        return cam.max_seconds if cam.max_seconds is not None else self.recording.max_seconds

    def camera_video_mode(self, camera_id: str) -> VideoMode:
        cam = self.cameras[camera_id]
        return cam.video if cam.video is not None else self.recording.video

    def buffer_dir(self, camera_id: str) -> Path:
        """The camera's ring buffer directory: configured, else RAM (`/dev/shm`) when there is one."""
        cam = self.cameras[camera_id]
        if cam.buffer_dir is not None:
            return cam.buffer_dir
        shm = Path("/dev/shm")  # noqa: S108  # shared: the buffer makes its directory private (buffer.py)
        base = shm / "edge-agent" if shm.is_dir() else self.recording.output_dir / ".buffer"
        return base / self.device_id / camera_id

    def stream_input(self, camera_id: str) -> StreamInput:
        """How every FFmpeg and ffprobe reads this camera (the one place the settings are gathered)."""
        cam, rec = self.cameras[camera_id], self.recording
        return StreamInput(url=cam.url.get_secret_value(), transport=cam.rtsp_transport,
                           timeout_s=rec.rtsp_timeout_seconds, analyzeduration_us=rec.analyzeduration_us,
                           probesize=rec.probesize)  # fmt: skip

    def mqtt_client_id(self) -> str:
        """The agent's MQTT client id: `mqtt.client_id`, else the username, else `edge-agent-<device_id>`.

        The username is the default because a broker with `use_username_as_clientid true` replaces the
        client id with it anyway, and a client id tied to the credentials is what stops another client
        from taking over the agent's persistent session and its queued commands. Only the agent uses
        this: `edge-agent ctl` has its own random id, or it would disconnect the agent it commands.
        """
        if self.mqtt.client_id:
            return self.mqtt.client_id
        if self.mqtt.username:
            return self.mqtt.username
        return f"edge-agent-{self.device_id}"
