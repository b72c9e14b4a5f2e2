"""Command intake: what happens to a command before its handler runs, and every reply after.

In order, for each command message: the per-camera rate (a flood is answered `rate_limited` while
a reply budget lasts, then only counted), a reply topic that can exist, one size-capped decode, the
response topic (never one that would make the agent speak for someone else), the camera, plain
ON/OFF turned into the command it means, and a redelivered request answered again from the cache
instead of executed twice. Runs on the agent thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Literal

from edge_agent import names
from edge_agent.config import AgentConfig
from edge_agent.events import CommandReceived
from edge_agent.limits import InboundGate, TokenBucket
from edge_agent.messages import Command, decode_command, dumps
from edge_agent.reporter import Publisher
from edge_agent.taskbook import BUSY_STATUSES, TaskBook
from edge_agent.tasks import ACTIVE_STATUSES, stamp, utc_now
from edge_agent.topics import Topics

log = logging.getLogger(__name__)

DEDUP_REQUESTS = 1000


class CommandIntake:
    """Admits commands (limits, decode, checks) and sends every reply (remembered by request id)."""

    def __init__(self, cfg: AgentConfig, publisher: Publisher, topics: Topics, book: TaskBook,
                 counters: dict[str, int], gate: InboundGate | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self._pub = publisher
        self._topics = topics
        self._book = book
        self._counters = counters
        self._gate = gate
        self._buckets: dict[str, TokenBucket] = {}  # camera ("" for unknown ones) -> command rate
        self._limited_replies: dict[str, TokenBucket] = {}  # camera -> budget of rate_limited replies
        self._replies: OrderedDict[tuple[str, str], tuple[bytes, str]] = OrderedDict()

    def admit(self, ev: CommandReceived) -> Command | None:
        """The command to execute, or None when it was refused (and answered, or counted)."""
        if self._gate is not None:
            self._gate.done()
        camera = ev.camera_id
        self._counters["commands_received"] += 1
        known = camera if camera in self.cfg.cameras else ""  # unknown ones share a bucket
        bucket = self._buckets.get(known)
        if bucket is None:
            bucket = self._buckets[known] = self._new_bucket()
        limited = not bucket.take()
        if names.topic_problem(self._topics.reply(camera)):  # e.g. a camera level too long to answer on
            self._counters["commands_unanswered"] += 1
            return None
        if limited:
            self._rate_limited(camera, known, bucket, ev)
            return None
        decoded = decode_command(ev.payload, self.cfg.mqtt.max_payload_bytes)
        rid = decoded.request_id  # set whenever one could be read, valid command or not
        problem = self.response_topic_problem(ev)
        if problem:
            log.warning("command on %s refused: response topic %r: %s", camera, ev.response_topic, problem)
            doc = {"status": "rejected", "camera_id": camera,
                   "error": f"response topic refused ({problem}); the command was not executed"}  # fmt: skip
            self.reply(camera, doc, False, rid, ev, respond=False)
            return None
        if not known:
            self.reply(camera, {"status": "error", "camera_id": camera,
                                "error": f"camera {camera!r} is not configured"}, False, rid, ev)  # fmt: skip
            return None
        if decoded.switch is not None:
            return self._switch_command(camera, decoded.switch)
        if decoded.command is None:
            doc = {"status": "rejected", "camera_id": camera, "error": decoded.error or "invalid command"}
            self.reply(camera, doc, False, rid, ev)
            return None
        cmd = decoded.command
        if cmd.request_id is not None:
            seen = self._replies.get((camera, cmd.request_id))
            if seen is not None:
                # Redelivered (QoS 1 / persistent session): answer again, execute once.
                log.info("duplicate request %r on %s: replying without re-executing", cmd.request_id, camera)
                self._pub.reply(seen[1], seen[0], ev.response_topic, ev.correlation_data)
                return None
        return cmd

    def reply(self, camera: str, doc: dict[str, Any], ok: bool, request_id: str | None, ev: CommandReceived,
              respond: bool = True) -> None:  # fmt: skip
        """Answer on the camera's reply topic (and the v5 response topic when `respond`)."""
        body = dict(doc)
        body["ok"] = ok
        if request_id is not None:
            body["request_id"] = request_id
        payload = dumps(body)
        topic = self._topics.reply(camera)
        if request_id is not None:
            self._replies[(camera, request_id)] = (payload, topic)
            while len(self._replies) > DEDUP_REQUESTS:
                self._replies.popitem(last=False)
        self._pub.reply(topic, payload, ev.response_topic if respond else None, ev.correlation_data)

    def response_topic_problem(self, ev: CommandReceived) -> str | None:
        if ev.response_topic is None:
            return None
        return self._topics.response_topic_problem(
            ev.response_topic, self.cfg.mqtt.response_topics, self.cfg.homeassistant.discovery_prefix
        )

    def _new_bucket(self) -> TokenBucket:
        return TokenBucket(self.cfg.mqtt.commands_per_second, self.cfg.mqtt.command_burst)

    def _rate_limited(self, camera: str, known: str, bucket: TokenBucket, ev: CommandReceived) -> None:
        """Over the camera's command rate: answer `rate_limited` while the reply budget (a second
        bucket of the same size) lasts, then only count, so a flood cannot become a reply flood."""
        replies = self._limited_replies.get(known)
        if replies is None:
            replies = self._limited_replies[known] = self._new_bucket()
        if not replies.take():
            self._counters["commands_unanswered"] += 1
            return
        self._counters["commands_rate_limited"] += 1
        doc = {"status": "rate_limited", "camera_id": camera,
               "error": f"more than {self.cfg.mqtt.commands_per_second:g} commands per second for this camera "
               f"(burst {self.cfg.mqtt.command_burst}); the command was not executed",
               "retry_after_seconds": round(max(bucket.seconds_to_next(), 0.001), 3)}  # fmt: skip
        # Decoded only for its request_id (size-capped), so the sender can match the refusal.
        rid = decode_command(ev.payload, self.cfg.mqtt.max_payload_bytes).request_id
        self.reply(camera, doc, False, rid, ev, respond=self.response_topic_problem(ev) is None)

    def _switch_command(self, camera: str, action: Literal["start", "stop"]) -> Command:
        """A plain ON/OFF (start/stop) acts on whatever the camera runs: ON while busy is the
        running task's idempotent start; ON when free starts `switch_<UTC stamp>`; OFF stops the
        running task whatever its name (or answers `not_running`)."""
        busy = self._book.holder(camera)
        if action == "start":
            if busy is not None and busy.status in BUSY_STATUSES:
                return Command(action="start", task_name=busy.task_name)
            return Command(action="start", task_name=f"switch_{stamp(utc_now())}")
        running = busy.task_name if busy is not None and busy.status in ACTIVE_STATUSES else ""
        return Command(action="stop", task_name=running)
