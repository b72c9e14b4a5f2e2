"""Every MQTT topic string is built and parsed here; nothing else knows the layout.

    P/D/status              retained  online | offline (last will)
    P/D/C/cmd               commands (QoS 1)
    P/D/C/reply             one reply per command
    P/D/C/status            retained  the camera's current or latest task
    P/D/C/tasks/<task>      retained  one task's status (bounded per camera)
    P/D/uploads             retained  upload backlog summary
    P/D/C/events            flow events (started, stopped, uploaded, failed, completed)
    P/D/telemetry           retained  periodic health summary

Home Assistant (see `DiscoveryTopics`):

    H/status                HA's birth/last will (online | offline)
    H/device/<node>/config  retained  device-based discovery config
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """Topic layout of one device."""

    prefix: str
    device_id: str

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

    def task(self, camera_id: str, task_name: str) -> str:
        return f"{self.base}/{camera_id}/tasks/{task_name}"

    def camera_of_command(self, topic: str) -> str | None:
        """The camera id of a `P/D/C/cmd` topic, or None for any other topic."""
        head = self.base + "/"
        if not topic.startswith(head) or not topic.endswith("/cmd"):
            return None
        camera = topic[len(head) : -len("/cmd")]
        return camera if camera and "/" not in camera else None


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
