"""Command line: `edge-agent run`, `edge-agent check-config`, `edge-agent ctl` and `edge-agent health`. The one
place that wires concrete classes.

exit codes: run/check-config: 0 ok, 2 invalid configuration; health: 0 healthy, 1 not, 2 no health file;
ctl: see `edge-agent ctl --help` (0 ok, 1 answered ok:false or task failed, 2 usage/config error, 3 timeout or
broker unreachable)."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from edge_agent import __version__, ctl, durable, ffmpeg, health, notify, tls
from edge_agent.agent import Agent, Event, RemoteSetup, Shutdown
from edge_agent.config import AgentConfig, StorageConfig
from edge_agent.configload import load_config, parse_config, read_yaml, secret_values
from edge_agent.errors import ConfigError
from edge_agent.journal import Journal
from edge_agent.limits import InboundGate
from edge_agent.management import load_desired
from edge_agent.metrics import MetricsServer
from edge_agent.mqtt import MqttLink
from edge_agent.redact import redact
from edge_agent.topics import Topics
from edge_agent.uploads import MinioStore, UploadPool

log = logging.getLogger("edge_agent")

JOURNAL_NAME = ".edge-agent.sqlite3"
EXIT_CONFIG = 2


class RedactingFormatter(logging.Formatter):
    """Last line of defence: formats with `inner`, then strips URL credentials, query-string
    credentials and every known secret from the *whole* line, traceback text included (a filter
    sees only the message, not the exception text formatted after it)."""

    def __init__(self, inner: logging.Formatter, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record), self.secrets)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        camera = getattr(record, "camera", None) or getattr(record, "camera_id", None)
        if camera is None and record.threadName and record.threadName.startswith("recorder."):
            camera = record.threadName[len("recorder.") :]
        if camera is not None:
            doc["camera"] = str(camera)
        task = getattr(record, "task", None) or getattr(record, "task_name", None)
        if task is not None:
            doc["task"] = str(task)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str, fmt: str, secrets: tuple[str, ...] = ()) -> RedactingFormatter:
    handler = logging.StreamHandler(sys.stderr)
    inner = (
        JsonFormatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    )  # fmt: skip
    redactor = RedactingFormatter(inner, secrets)
    handler.setFormatter(redactor)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    return redactor


def cmd_check_config(path: Path) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    problems = []
    try:
        ffmpeg.resolve_executable(cfg.recording.ffmpeg_path, "ffmpeg")
    except Exception as exc:
        problems.append(f"recording.ffmpeg_path: {exc}")
    if cfg.mqtt.tls.enabled:
        try:
            tls.client_context(cfg.mqtt.tls)  # loads the CA, certificate and key as the agent will
        except ConfigError as exc:  # a warning: the files may live only on the device
            problems.append(str(exc))
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"{path}: OK (device {cfg.device_id}, {len(cfg.cameras)} camera(s), storage {cfg.storage.type})")
    return 0


class HeartbeatQueue(queue.SimpleQueue[Event]):
    """The agent's event queue; its `get` (called only by the agent loop) feeds a loop heartbeat."""

    heartbeat: notify.LoopHeartbeat | None = None

    def get(self, block: bool = True, timeout: float | None = None) -> Event:
        hb = self.heartbeat
        if hb is not None:
            hb.waiting()
        try:
            return super().get(block, timeout)
        finally:
            if hb is not None:
                hb.busy()


def start_watchdog(events: HeartbeatQueue, stopping: threading.Event) -> notify.Watchdog | None:
    """Pings systemd's watchdog (WatchdogSec/2) while the main thread lives and its loop is not stuck.

    The loop counts as stuck when it has been handling one event for longer than half of WatchdogSec;
    once shutdown has begun (bounded by the agent itself and TimeoutStopSec) it always pings.
    """
    seconds = notify.watchdog_seconds()
    if seconds is None:
        return None
    heartbeat = notify.LoopHeartbeat(max_busy=seconds / 2)
    events.heartbeat = heartbeat
    main = threading.main_thread()

    def alive() -> bool:
        return stopping.is_set() or (main.is_alive() and heartbeat.alive())

    log.info("systemd watchdog: pinging every %.1f s", seconds / 2)
    return notify.Watchdog(seconds / 2, alive).start()


HEALTH_MAX_BUSY = 30.0  # seconds one event may be in hand before the health file calls the loop stuck


def start_health_file(events: HeartbeatQueue, stopping: threading.Event, link: MqttLink) -> health.HealthFile | None:
    """Keeps `$EDGE_AGENT_HEALTH_FILE` current (loop alive, broker connected) for container health checks."""
    path = health.health_path()
    if path is None:
        return None
    heartbeat = events.heartbeat or notify.LoopHeartbeat(max_busy=HEALTH_MAX_BUSY)
    events.heartbeat = heartbeat  # shared with the systemd watchdog when both run
    main = threading.main_thread()
    log.info("health file: %s", path)
    return health.HealthFile(
        path, lambda: stopping.is_set() or (main.is_alive() and heartbeat.alive()), lambda: link.connected
    ).start()


def run_agent(cfg: AgentConfig, redactor: RedactingFormatter, local_raw: dict[str, Any] | None = None) -> int:
    events = HeartbeatQueue()
    stopping = threading.Event()
    output_dir = cfg.recording.output_dir.resolve()
    durable.make_dirs(output_dir)  # its name too must survive a power cut, or the journal is lost
    journal = Journal(output_dir / JOURNAL_NAME)
    remote = None
    if local_raw is not None:
        # The last desired configuration accepted over MQTT runs before the broker is reachable.
        remote_cfg, desired, applied_at, problem = load_desired(journal, local_raw)
        if problem is not None:
            log.error("stored desired configuration not applied: %s; running the local file", problem)
        if remote_cfg is not None and desired is not None:
            log.info("running desired configuration version %d (applied %s)", desired.version, applied_at)
            cfg = remote_cfg
            redactor.secrets = secret_values(cfg)
            logging.getLogger().setLevel(cfg.log_level)

        def new_uploads(storage: StorageConfig) -> UploadPool | None:
            if storage.type != "minio":
                return None
            new_pool = UploadPool(MinioStore(storage), storage, events.put)
            new_pool.start()
            return new_pool

        remote = RemoteSetup(local_raw, desired, applied_at, problem, new_uploads)
    pool = None
    if cfg.storage.type == "minio":
        pool = UploadPool(MinioStore(cfg.storage), cfg.storage, events.put)
    gate = InboundGate(cfg.mqtt.inbound_queue)
    link = MqttLink(cfg.mqtt, Topics.of(cfg), cfg.mqtt_client_id(), events.put, gate)
    agent = Agent(cfg, link, journal, pool, events, gate=gate, remote=remote)
    redactor.secrets = agent.secrets

    def set_secrets(secrets: tuple[str, ...]) -> None:
        redactor.secrets = secrets

    agent.on_secrets = set_secrets
    err = agent.resolve_ffmpeg()
    if err:
        log.error("%s; start commands will be answered with this error", err)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        events.put(Shutdown(signal.Signals(signum).name))  # SimpleQueue.put is signal-safe
        if not stopping.is_set():
            stopping.set()
            notify.stopping()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("edge-agent %s starting: device %s, %d camera(s), storage %s, output %s",
             __version__, cfg.device_id, len(cfg.cameras), cfg.storage.type, output_dir)  # fmt: skip
    agent.recover()
    agent.prewarm_probes()
    agent.tasks.start_buffers()
    metrics = None
    if cfg.metrics.enabled:
        agent.report.refresh_metrics()
        metrics = MetricsServer(cfg.metrics.host, cfg.metrics.port, lambda: agent.metrics_snapshot).start()
        log.info("Prometheus metrics on http://%s:%d/metrics", cfg.metrics.host, metrics.port)
    if pool is not None:
        pool.start()
    link.start()
    started = time.monotonic()
    watchdog = start_watchdog(events, stopping)
    health_file = start_health_file(events, stopping, link)
    # Everything made so far (modules, models, the configuration) lives as long as the agent: move it
    # out of the cycle collector's reach, so its collections walk only what was made since (in a 15 s
    # perf profile of an agent with 16 buffered cameras, the collector was half of its CPU).
    gc.freeze()
    notify.ready()
    notify.status(f"device {cfg.device_id}: {len(cfg.cameras)} camera(s), storage {cfg.storage.type}")
    try:
        agent.run()
    finally:
        if not stopping.is_set():
            stopping.set()
            notify.stopping()
        link.stop(timeout=3.0)
        journal.close()
        if metrics is not None:
            metrics.stop()
        if watchdog is not None:
            watchdog.stop()
        if health_file is not None:
            health_file.stop()
    log.info("edge-agent stopped after %.0f s", time.monotonic() - started)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, default=Path("agent.yaml"))
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default=None)
    check = sub.add_parser("check-config", help="validate agent.yaml and exit")
    check.add_argument("--config", type=Path, default=Path("agent.yaml"))
    ctl.add_parser(sub)
    check_health = sub.add_parser("health", help="exit 0 if the running agent is healthy (its health file)")
    check_health.add_argument("--file", type=Path, default=None, help=f"default: ${health.ENV_FILE}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return cmd_check_config(args.config)
    if args.command == "ctl":
        return ctl.run(args)
    if args.command == "health":
        return health.main([str(args.file)] if args.file else [])
    try:
        local_raw = read_yaml(args.config)
        cfg = parse_config(copy.deepcopy(local_raw))
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    redactor = setup_logging(args.log_level or cfg.log_level, args.log_format, secret_values(cfg))
    try:
        return run_agent(cfg, redactor, local_raw)
    except ConfigError as exc:  # found only when used, e.g. a TLS key that its key_password does not open
        log.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
