"""Every MQTT topic string is built and parsed here; nothing else knows the layout.

    P/D/status              retained  online | offline (last will)
    P/D/C/cmd               commands (QoS 1)
    P/D/C/reply             one reply per command
    P/D/C/status            retained  the camera's current or latest task
    P/D/C/tasks/<task>      retained  one task's status (bounded per camera)
    P/D/uploads             retained  upload backlog summary
    P/D/C/events            flow events (started, stopped, uploaded, failed, completed)
    P/D/telemetry           retained  periodic health summary
    P/D/C/snapshot          retained  the newest snapshot, raw JPEG bytes
    P/D/config/desired      retained  the configuration the operator wants (docs/remote-management.md)
    P/D/config/reported     retained  the configuration running, its version, what waits
    P/groups/G/cmd          group commands, executed by every member of group G
    P/D/groups/G/reply      each member's one reply to a group command

Home Assistant (see `DiscoveryTopics`):

    H/status                HA's birth/last will (online | offline)
    H/device/<node>/config  retained  device-based discovery config
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_agent import names

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

CTL_LEVEL = "_ctl"  # P/D/_ctl/...: reply inboxes of `edge-agent ctl` (a reserved camera id)


@dataclass(frozen=True)
class Topics:
    """Topic layout of one device."""

    prefix: str
    device_id: str

    @classmethod
    def of(cls, cfg: AgentConfig, device_id: str | None = None) -> Topics:
        """The layout of the configured device (or of `device_id` under the same prefix: `ctl`)."""
        return cls(cfg.mqtt.topic_prefix, device_id or cfg.device_id)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def availability(self) -> str:
        return f"{self.base}/status"

    @property
    def uploads(self) -> str:
        return f"{self.base}/uploads"

    @property
    def command_filter(self) -> str:
        """Subscription that also catches commands for cameras that are not configured."""
        return f"{self.base}/+/cmd"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    def events(self, camera_id: str) -> str:
        return f"{self.base}/{camera_id}/events"

    def command(self, camera_id: str) -> str:
        return f"{self.base}/{camera_id}/cmd"

    def reply(self, camera_id: str) -> str:
        return f"{self.base}/{camera_id}/reply"

    def status(self, camera_id: str) -> str:
        return f"{self.base}/{camera_id}/status"

    def snapshot(self, camera_id: str) -> str:
        """P/D/C/snapshot: the newest snapshot as raw JPEG bytes (retained; Home Assistant's MQTT camera)."""
        return f"{self.base}/{camera_id}/snapshot"

    def task(self, camera_id: str, task_name: str) -> str:
        return f"{self.base}/{camera_id}/tasks/{task_name}"

    def ctl_inbox(self, client_id: str) -> str:
        """Where `edge-agent ctl` asks for v5 responses: under this device, never a command topic."""
        return f"{self.base}/{CTL_LEVEL}/{client_id}/reply"

    def response_topic_problem(self, topic: str, allowed: Sequence[str], discovery_prefix: str) -> str | None:
        """Why the agent must not publish a reply on a command's v5 Response Topic, or None.

        Never a wildcard, a `$` topic, anything under the agent prefix but this device's own ctl
        inbox (command, status, task topics of every device), a topic ending in `cmd`, or anything
        under the Home Assistant discovery prefix; otherwise it must match one of `allowed`.
        """
        problem = names.topic_problem(topic)
        if problem:
            return problem
        if topic.startswith("$"):
            return "a '$' topic is reserved for the broker"
        levels = topic.split("/")
        own = self.base.split("/")
        if levels[: len(own) + 1] == [*own, CTL_LEVEL] and len(levels) > len(own) + 1 and levels[-1] != "cmd":
            return None  # this device's own inbox space (edge-agent ctl); `_ctl` is no camera id
        head = self.prefix.split("/")
        if levels[: len(head)] == head:
            return f"topics under '{self.prefix}/' are device command and status topics"
        if levels[-1] == "cmd":
            return "a command topic"
        if levels[: len(discovery_prefix.split("/"))] == discovery_prefix.split("/"):
            return "the Home Assistant discovery prefix"
        if not any(names.filter_matches(f, topic) for f in allowed):
            return "not allowed by mqtt.response_topics"
        return None

    def camera_of_command(self, topic: str) -> str | None:
        """The camera id of a `P/D/C/cmd` topic, or None for any other topic."""
        head = self.base + "/"
        if not topic.startswith(head) or not topic.endswith("/cmd"):
            return None
        camera = topic[len(head) : -len("/cmd")]
        return camera if camera and "/" not in camera else None

    # ---- remote management (docs/remote-management.md) ------------------------------------------

    @property
    def config_desired(self) -> str:
        return f"{self.base}/config/desired"

    @property
    def config_reported(self) -> str:
        return f"{self.base}/config/reported"

    def group_command(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/cmd"

    def group_reply(self, group: str) -> str:
        return f"{self.base}/groups/{group}/reply"

    def group_of_command(self, topic: str) -> str | None:
        """The group of a `P/groups/G/cmd` topic, or None for any other topic."""
        head = f"{self.prefix}/groups/"
        if not topic.startswith(head) or not topic.endswith("/cmd"):
            return None
        group = topic[len(head) : -len("/cmd")]
        return group if group and "/" not in group else None


@dataclass(frozen=True)
class DiscoveryTopics:
    """Home Assistant's discovery topics under its `discovery_prefix`."""

    prefix: str

    @property
    def ha_status(self) -> str:
        """HA publishes `online` here when it (re)starts: the cue to publish discovery again."""
        return f"{self.prefix}/status"

    def device_config(self, node_id: str) -> str:
        return f"{self.prefix}/device/{node_id}/config"
