"""Remote management on the agent thread: the desired configuration and group commands.

`Management` owns the remote side of the configuration (the accepted desired document, the target
it builds, what waits, the last rejection) and the group-command memory. It applies nothing itself:
the agent (`Managed`) swaps its configuration and runs camera commands. Called on the agent thread
only, like everything that changes state. See docs/remote-management.md.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Protocol

from edge_agent import remoteconfig
from edge_agent.config import AgentConfig
from edge_agent.journal import Journal
from edge_agent.limits import TokenBucket
from edge_agent.messages import Command, GroupCommand, decode_group_command, dumps
from edge_agent.remoteconfig import Desired, Problem, Rejected
from edge_agent.reporter import Publisher, Subscriber
from edge_agent.tasks import iso, stamp, utc_now
from edge_agent.topics import Topics

log = logging.getLogger(__name__)

GROUP_REPLIES_KEY = "group_replies"  # journal setting: the newest group replies (a restart answers again)
GROUP_REPLIES_KEPT = 200


class Managed(Protocol):
    """What remote management needs of the agent."""

    cfg: AgentConfig

    def busy_cameras(self) -> dict[str, str]: ...  # camera -> the task keeping it busy
    def reconfigure(self, cfg: AgentConfig) -> None: ...
    def camera_command(self, camera: str, cmd: Command) -> tuple[dict[str, Any], bool]: ...
    def running_task(self, camera: str) -> str | None: ...


class Management:
    """The desired configuration and group commands (see the module docstring)."""

    def __init__(self, agent: Managed, publisher: Publisher, topics: Topics, journal: Journal,
                 local_raw: dict[str, Any], desired: Desired | None, applied_at: str | None = None,
                 startup_problem: Rejected | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self._agent = agent
        self._pub = publisher
        self._topics = topics
        self._journal = journal
        self._local_raw = local_raw
        self._env = env
        self.desired = desired  # the accepted document (None: the local file alone)
        self.applied_at = applied_at
        self.target: AgentConfig = agent.cfg  # what the accepted document asks for
        self.pending: list[Problem] = []
        self.rejected: dict[str, Any] | None = None
        if startup_problem is not None:
            self._reject(startup_problem, "stored document no longer valid with the local file")
        self._groups: frozenset[str] = frozenset()
        self._buckets: dict[str, TokenBucket] = {}
        self._replied: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (group, request id) -> reply
        self._replied_here: set[tuple[str, str]] = set()  # answered by this process (paho re-sends those)
        self._load_replies()

    # ---- subscriptions --------------------------------------------------------------------------

    def subscribe(self) -> None:
        """Subscribe to the desired document and to this device's groups (before the link starts)."""
        if isinstance(self._pub, Subscriber):
            self._pub.add_subscription(self._topics.config_desired)
        self._sync_groups()

    def _sync_groups(self) -> None:
        wanted = frozenset(self._agent.cfg.groups)
        if isinstance(self._pub, Subscriber):
            for group in sorted(wanted - self._groups):
                self._pub.add_subscription(self._topics.group_command(group))
            for group in sorted(self._groups - wanted):
                self._pub.remove_subscription(self._topics.group_command(group))
        self._groups = wanted

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Handle `topic` if it is ours (True), else leave it to the caller (False)."""
        if topic == self._topics.config_desired:
            self.on_desired(payload)
            return True
        group = self._topics.group_of_command(topic)
        if group is not None and group in self._groups:
            self.on_group_command(group, payload)
            return True
        return False

    # ---- desired configuration ------------------------------------------------------------------

    def on_desired(self, payload: bytes) -> None:
        if not payload:  # the retained document was deleted: keep running what was applied
            log.info("desired configuration deleted on the broker; keeping version %s",
                     self.desired.version if self.desired else None)  # fmt: skip
            return
        max_bytes = max(self._agent.cfg.mqtt.max_payload_bytes, 65536)
        try:
            desired = remoteconfig.parse_desired(payload, max_bytes)
            applied = self.desired
            if applied is not None and desired.version == applied.version:
                if desired.config == applied.config:
                    self.publish_reported()  # a reconnect or restart hands it over again: nothing to do
                    return
                raise Rejected([Problem("version", f"version {desired.version} is already applied with other "
                                                   "content; publish a higher version")], desired.version)  # fmt: skip
            if applied is not None and desired.version < applied.version:
                raise Rejected([Problem("version", f"stale: version {applied.version} is applied")], desired.version)
            target = remoteconfig.build(self._local_raw, desired, self._env)
            if target.device_id != self._agent.cfg.device_id or target.mqtt != self._agent.cfg.mqtt:
                raise Rejected([Problem("(document)", "device_id and mqtt stay local")], desired.version)
        except Rejected as exc:
            self._reject(exc, "rejected")
            self.publish_reported()
            return
        now = iso(utc_now())
        self._journal.set_setting(remoteconfig.JOURNAL_KEY, json.dumps({**desired.doc(), "applied_at": now}))
        self.desired, self.target, self.applied_at = desired, target, now
        if self.rejected is not None and self.rejected["version"] is not None \
                and self.rejected["version"] <= desired.version:  # fmt: skip
            self.rejected = None
        log.info("desired configuration version %d accepted", desired.version)
        self.converge(force_report=True)

    def _reject(self, exc: Rejected, what: str) -> None:
        log.error("desired configuration version %s %s: %s", exc.version, what, exc)
        self.rejected = {"version": exc.version, "at": iso(utc_now()), "errors": [p.doc() for p in exc.problems]}

    def converge(self, force_report: bool = False) -> None:
        """Apply as much of the target as can run now; what waits is retried after later events."""
        agent = self._agent
        plan = remoteconfig.plan(agent.cfg, self.target, agent.busy_cameras())
        changed = plan.effective != agent.cfg
        if changed:
            agent.reconfigure(plan.effective)
            self._sync_groups()
        if changed or force_report or plan.pending != self.pending:
            self.pending = plan.pending
            if not plan.pending and changed:
                log.info("configuration applied (version %s)", self.desired.version if self.desired else None)
            self.publish_reported()

    def after_event(self) -> None:
        if self.pending:
            self.converge()

    def reported_doc(self) -> dict[str, Any]:
        return {
            "version": self.desired.version if self.desired else None,
            "applied_at": self.applied_at,
            "state": "pending" if self.pending else "applied",
            "pending": [{"path": p.path, "reason": p.message} for p in self.pending],
            "rejected": self.rejected,
            "groups": list(self._agent.cfg.groups),
            "config": remoteconfig.redacted(self._agent.cfg),
        }

    def publish_reported(self) -> None:
        """The retained report from live state (after every change, and after every (re)connect)."""
        self._pub.publish(self._topics.config_reported, dumps(self.reported_doc()), retain=True)

    # ---- group commands ---------------------------------------------------------------------------

    def on_group_command(self, group: str, payload: bytes) -> None:
        cfg = self._agent.cfg
        bucket = self._buckets.get(group)
        if bucket is None:
            bucket = self._buckets[group] = TokenBucket(cfg.mqtt.commands_per_second, cfg.mqtt.command_burst)
        if not bucket.take():
            log.warning("group %s: command dropped (rate limit)", group)
            return
        cmd, rid, error = decode_group_command(payload, cfg.mqtt.max_payload_bytes)
        key = (group, rid or "")
        if rid is not None and key in self._replied:
            if key in self._replied_here:
                log.info("group %s: request %r delivered again; already answered", group, rid)
            else:  # answered before a restart: the reply may not have reached the broker
                log.info("group %s: request %r answered again from the journal", group, rid)
                self._replied_here.add(key)
                self._pub.publish(self._topics.group_reply(group), self._replied[key])
            return
        doc: dict[str, Any] = {"request_id": rid, "device_id": cfg.device_id, "group": group}
        if cmd is None:
            doc.update(action=None, ok=False, error=error, results={})
        else:
            doc.update(self._execute(cmd))
        reply = dumps(doc)
        if rid is not None:
            self._remember(key, reply)
        self._pub.publish(self._topics.group_reply(group), reply)

    def _execute(self, cmd: GroupCommand) -> dict[str, Any]:
        cameras = list(self._agent.cfg.cameras) if cmd.cameras is None else cmd.cameras
        results: dict[str, Any] = {}
        task_name = cmd.task_name or f"{self._agent.cfg.device_id}-{stamp(utc_now())}"
        log.info("group command %s for %d camera(s) (request %r)", cmd.action, len(cameras), cmd.request_id)
        for camera in cameras:
            if camera not in self._agent.cfg.cameras:
                results[camera] = {"ok": False, "status": "error", "error": f"camera {camera!r} is not configured"}
                continue
            name: str | None = task_name
            if cmd.action == "stop":
                name = cmd.task_name or self._agent.running_task(camera)
                if name is None:
                    results[camera] = {"ok": True, "status": "not_running"}
                    continue
            elif cmd.action == "status":
                name = None
            doc, ok = self._agent.camera_command(camera, cmd.for_camera(name))
            results[camera] = {"ok": ok, **doc}
        ok_all = bool(results) and all(r["ok"] for r in results.values())
        return {"action": cmd.action, "ok": ok_all, "results": results}

    def _remember(self, key: tuple[str, str], reply: bytes) -> None:
        self._replied[key] = reply
        self._replied_here.add(key)
        while len(self._replied) > GROUP_REPLIES_KEPT:
            old, _ = self._replied.popitem(last=False)
            self._replied_here.discard(old)
        rows = [[g, r, p.decode("utf-8")] for (g, r), p in self._replied.items()]
        self._journal.set_setting(GROUP_REPLIES_KEY, json.dumps(rows))

    def _load_replies(self) -> None:
        text = self._journal.setting(GROUP_REPLIES_KEY)
        try:
            rows = json.loads(text) if text else []
            for group, rid, reply in rows[-GROUP_REPLIES_KEPT:]:
                self._replied[(str(group), str(rid))] = str(reply).encode("utf-8")
        except (ValueError, TypeError) as exc:
            log.warning("journal: group replies unreadable (%s); starting without them", exc)


def load_desired(journal: Journal, local_raw: dict[str, Any], env: dict[str, str] | None = None,
                 ) -> tuple[AgentConfig | None, Desired | None, str | None, Rejected | None]:  # fmt: skip
    """At start: the stored desired document and the configuration it builds on the local file.

    (config, desired, applied_at, problem). No stored document: (None, None, None, None). A stored
    document that no longer builds (the local file changed) is reported, and the local file runs.
    """
    text = journal.setting(remoteconfig.JOURNAL_KEY)
    if not text:
        return None, None, None, None
    try:
        doc = json.loads(text)
        desired = remoteconfig.parse_desired(json.dumps({"version": doc["version"], "config": doc["config"]})
                                             .encode(), 2**24)  # fmt: skip
        return remoteconfig.build(local_raw, desired, env), desired, doc.get("applied_at"), None
    except Rejected as exc:
        return None, None, None, exc
    except (ValueError, KeyError, TypeError) as exc:
        return None, None, None, Rejected([Problem("(stored document)", f"unreadable: {exc}")])


