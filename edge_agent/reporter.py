"""The reporter: everything the agent tells the world, from live state, in one place.

Retained task and camera statuses (journaled first: what is published is never ahead of what a
restart recovers), flow events, the device's upload summary, telemetry and its metrics snapshot,
Home Assistant discovery. It reads the task book and never changes a task; it runs on the agent
thread (so it needs no locks) and talks to a `Publisher`, never to paho.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from edge_agent import __version__, discovery
from edge_agent.config import AgentConfig
from edge_agent.journal import Journal
from edge_agent.limits import InboundGate
from edge_agent.messages import dumps, event_doc, transition_events
from edge_agent.taskbook import TaskBook
from edge_agent.tasks import ACTIVE_STATUSES, TERMINAL_STATUSES, UPLOAD_STATUSES, Status, Task, iso, utc_now
from edge_agent.topics import DiscoveryTopics, Topics

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """What the agent needs of MQTT (a fake records calls in unit tests)."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...
    def reply(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None: ...


@runtime_checkable
class Subscriber(Protocol):
    """Optional: a publisher that can also subscribe to extra topics (the MQTT link can)."""

    def add_subscription(self, topic: str) -> None: ...
    def remove_subscription(self, topic: str) -> None: ...


@runtime_checkable
class PublishStats(Protocol):
    """Optional: a publisher that counts what it could not deliver and holds retained values that
    did not fit its queue until there is room (the MQTT link does)."""

    def publish_stats(self) -> dict[str, int]: ...
    def flush_held(self) -> int: ...


class Reporter:
    """Publishes the agent's state: statuses, events, the upload summary, telemetry, discovery."""

    def __init__(self, cfg: AgentConfig, publisher: Publisher, journal: Journal, book: TaskBook,
                 topics: Topics, gate: InboundGate | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self.pub = publisher
        self._journal = journal
        self._book = book
        self.topics = topics
        self.ha_topics = DiscoveryTopics(cfg.homeassistant.discovery_prefix)
        self._gate = gate
        self.counters = {"commands_received": 0, "commands_rate_limited": 0, "commands_unanswered": 0}
        self.ffmpeg_restarts = 0  # watchdog restarts of FFmpeg since the agent started
        self.uploads_paused = False
        self.last_upload_error: str | None = None
        self.metrics_snapshot: dict[str, Any] = {}  # read by the metrics HTTP thread
        self._last_uploads_doc: bytes | None = None
        self._born = time.monotonic()

    # ---- tasks ----------------------------------------------------------------------------------

    def task(self, task: Task) -> None:
        """Journal, then publish the task topic and (if newest) the camera's status topic."""
        self._journal.save(task)
        payload = dumps(task.status_doc())
        self.pub.publish(self.topics.task(task.camera_id, task.task_name), payload, retain=True)
        if self._book.is_latest(task):
            self.pub.publish(self.topics.status(task.camera_id), payload, retain=True)
        if task.storage_type == "minio":
            self.uploads()
        if task.status in TERMINAL_STATUSES:
            log.info("%s ended %s%s", task.task_id, task.status, f": {task.error}" if task.error else "")

    def transition(self, task: Task, old_status: Status) -> None:
        """After a published change: the metrics snapshot and the flow events it announces."""
        if self.cfg.metrics.enabled and task.status != old_status:
            self.refresh_metrics()
        for event in transition_events(old_status, task.status_doc(), iso(task.updated)):
            self.event(event)

    def event(self, event: dict[str, Any]) -> None:
        """A flow event on `P/D/C/events` (not retained: the retained status is the state)."""
        self.pub.publish(self.topics.events(event["camera_id"]), dumps(event), retain=False)

    def segment(self, task: Task, path: Path, seconds: float) -> None:
        if self.cfg.recording.segment_events:
            self.event(event_doc("segment", task.camera_id, task.task_name, task.device_id, iso(utc_now()),
                                 path=str(path), seconds=round(seconds, 3)))  # fmt: skip

    def forget(self, camera: str, names: list[str]) -> None:
        """Clear the retained topics of tasks dropped from the remembered set."""
        for name in names:
            self.pub.publish(self.topics.task(camera, name), b"", retain=True)

    def republish_all(self, tasks: bool = True) -> None:
        """After every (re)connect: retained state from live state, never from a stale copy."""
        for camera in self.cfg.cameras:
            latest = self._book.latest(camera)
            doc = latest.status_doc() if latest else {"status": "idle", "camera_id": camera,
                                                       "device_id": self.cfg.device_id}  # fmt: skip
            self.pub.publish(self.topics.status(camera), dumps(doc), retain=True)
            for task in self._book.retained(camera) if tasks else ():
                self.pub.publish(self.topics.task(camera, task.task_name), dumps(task.status_doc()), retain=True)
        if self.cfg.storage.type == "minio":
            self.uploads(force=True)

    # ---- the device -----------------------------------------------------------------------------

    def uploads_doc(self) -> dict[str, Any]:
        pending = [t for t in self._book.in_flight() if t.status in UPLOAD_STATUSES]
        doc: dict[str, Any] = {
            "device_id": self.cfg.device_id,
            "queue_length": len(pending),
            "bytes_pending": sum(t.size_bytes or 0 for t in pending),
            "bytes_uploaded": sum(t.bytes_uploaded or 0 for t in pending),  # of those, already on the server
            "paused": self.uploads_paused,
        }
        if pending:
            oldest = min(t.started for t in pending)
            doc["oldest_pending_age_seconds"] = round((utc_now() - oldest).total_seconds(), 1)
        if self.last_upload_error:
            doc["last_error"] = self.last_upload_error
        return doc

    def uploads(self, force: bool = False) -> None:
        doc = self.uploads_doc()
        # Publish on change of the queue, not of the age (which changes every second).
        key = dumps({k: v for k, v in doc.items() if k != "oldest_pending_age_seconds"})
        if force or key != self._last_uploads_doc:
            self._last_uploads_doc = key
            doc["updated_at"] = iso(utc_now())
            self.pub.publish(self.topics.uploads, dumps(doc), retain=True)

    def discovery(self) -> None:
        """Home Assistant device configs (retained), and empty ones for cameras no longer configured."""
        ha = self.cfg.homeassistant
        if not ha.enabled:
            return
        configs = discovery.discovery_configs(self.cfg, __version__)
        state_path = self.cfg.recording.output_dir.resolve() / discovery.STATE_FILE
        for topic in discovery.stale_topics(discovery.read_state(state_path), ha.discovery_prefix, set(configs)):
            log.info("Home Assistant: removing %s (no longer configured)", topic)
            self.pub.publish(topic, b"", retain=True)
        for node, doc in configs.items():
            self.pub.publish(self.ha_topics.device_config(node), dumps(doc), retain=True)
        try:
            discovery.write_state(state_path, discovery.state_doc(ha.discovery_prefix, set(configs)))
        except OSError as exc:
            log.warning("cannot write %s: %s (removed cameras will not be cleared from HA)", state_path, exc)

    def telemetry_doc(self) -> dict[str, Any]:
        backlog = self.uploads_doc()
        try:
            disk_free: int | None = free_bytes(self.cfg.recording.output_dir)
        except OSError:
            disk_free = None
        return {
            "device_id": self.cfg.device_id,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._born, 1),
            "cameras_configured": len(self.cfg.cameras),
            "cameras_recording": sum(1 for t in self._book.holders() if t.status in ACTIVE_STATUSES),
            "queue_length": backlog["queue_length"],
            "bytes_pending": backlog["bytes_pending"],
            "disk_free_bytes": disk_free,
            # Below the floor new starts are refused (`rejected`); operators see it here first.
            "disk_below_floor": disk_free is not None and disk_free < self.cfg.storage.min_free_bytes,
            "ffmpeg_restarts": self.ffmpeg_restarts,
            **self.command_counters(),
            "updated_at": iso(utc_now()),
        }

    def command_counters(self) -> dict[str, int]:
        """What hostile or excessive traffic cost: commands received, rate-limited, left unanswered
        (over the reply budget or shed by the inbound gate), publishes the link had to drop."""
        out = dict(self.counters)
        if self._gate is not None:
            out["commands_unanswered"] += self._gate.shed
        if isinstance(self.pub, PublishStats):
            out.update(self.pub.publish_stats())
        return out

    def telemetry(self) -> None:
        doc = self.telemetry_doc()
        self.refresh_metrics(doc)
        self.pub.publish(self.topics.telemetry, dumps(doc), retain=True)

    def refresh_metrics(self, doc: dict[str, Any] | None = None) -> None:
        """Replace the snapshot the metrics endpoint reads (one reference assignment: no lock)."""
        snap = dict(doc or self.telemetry_doc())
        snap["camera_status"] = {}
        for cam in self.cfg.cameras:
            latest = self._book.latest(cam)
            snap["camera_status"][cam] = latest.status if latest is not None else "idle"
        self.metrics_snapshot = snap


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
