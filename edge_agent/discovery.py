"""Home Assistant MQTT discovery, device-based: one retained config per device, built by pure functions.

Each camera is a device `<device_id>_<camera>` (start/stop buttons, a `recording` binary sensor and a
`status` sensor); the agent itself is a device `<device_id>_agent` (upload backlog, and with telemetry
on, free disk and recordings running). HA's requirements (MQTT discovery docs, device-based
discovery): the payload needs `dev` with `identifiers`, `o` with `name`, and `cmps` whose entries each
carry `p` (the platform) and a `unique_id`; a `button` needs `command_topic`; a `binary_sensor` and a
`sensor` need `state_topic`. Availability is the agent's `P/D/status` (online/offline, its last will).

Cameras removed from `agent.yaml` are remembered in a small state file (`.ha-discovery.json` in the
output directory): their node ids get an empty retained config, which removes the device from HA.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from edge_agent.messages import ACTIVE_STATUSES
from edge_agent.topics import DiscoveryTopics, Topics

MANUFACTURER = "edge-agent"
ORIGIN = "edge-agent"
STATE_FILE = ".ha-discovery.json"
START_PAYLOAD = "ON"
SNAPSHOT_PAYLOAD = '{"action":"snapshot"}'
STOP_PAYLOAD = "OFF"


def camera_node_id(device_id: str, camera_id: str) -> str:
    return f"{device_id}_{camera_id}"


def agent_node_id(device_id: str) -> str:
    return f"{device_id}_agent"


def _recording_template() -> str:
    busy = ", ".join(f"'{s}'" for s in sorted(ACTIVE_STATUSES))
    return f"{{{{ 'ON' if value_json.status in [{busy}] else 'OFF' }}}}"


def _common(topics: Topics, version: str) -> dict[str, Any]:
    return {
        "o": {"name": ORIGIN, "sw_version": version},
        "avty_t": topics.availability,
        "pl_avail": "online",
        "pl_not_avail": "offline",
        "qos": 1,
    }


def camera_config(cfg: AgentConfig, camera_id: str, version: str) -> dict[str, Any]:
    """The device config of one camera."""
    topics = Topics.of(cfg)
    node = camera_node_id(cfg.device_id, camera_id)
    cam = cfg.cameras[camera_id]
    status = topics.status(camera_id)
    return {
        "dev": {
            "identifiers": [node],
            "name": cam.name or f"{cfg.device_id} {camera_id}",
            "manufacturer": MANUFACTURER,
            "model": "RTSP camera recorder",
            "sw_version": version,
            "via_device": agent_node_id(cfg.device_id),
        },
        **_common(topics, version),
        "cmps": {
            "start": {
                "p": "button", "unique_id": f"{node}_start", "name": "Start recording", "icon": "mdi:record-rec",
                "command_topic": topics.command(camera_id), "payload_press": START_PAYLOAD,
            },
            "stop": {
                "p": "button", "unique_id": f"{node}_stop", "name": "Stop recording", "icon": "mdi:stop",
                "command_topic": topics.command(camera_id), "payload_press": STOP_PAYLOAD,
            },
            "recording": {
                "p": "binary_sensor", "unique_id": f"{node}_recording", "name": "Recording", "device_class": "running",
                "state_topic": status, "value_template": _recording_template(),
                "payload_on": "ON", "payload_off": "OFF",
            },
            "status": {
                "p": "sensor", "unique_id": f"{node}_status", "name": "Task status", "icon": "mdi:cctv",
                "state_topic": status, "value_template": "{{ value_json.status }}", "json_attributes_topic": status,
            },
            "snapshot": {
                "p": "camera", "unique_id": f"{node}_snapshot", "name": "Snapshot", "topic": topics.snapshot(camera_id),
            },
            "take_snapshot": {
                "p": "button", "unique_id": f"{node}_take_snapshot", "name": "Take snapshot", "icon": "mdi:camera",
                "command_topic": topics.command(camera_id), "payload_press": SNAPSHOT_PAYLOAD,
            },
        },
    }  # fmt: skip


def agent_config(cfg: AgentConfig, version: str) -> dict[str, Any]:
    """The device config of the agent itself (its upload backlog, and telemetry when enabled)."""
    topics = Topics.of(cfg)
    node = agent_node_id(cfg.device_id)
    cmps: dict[str, Any] = {
        "upload_backlog": {
            "p": "sensor", "unique_id": f"{node}_upload_backlog", "name": "Upload backlog", "icon": "mdi:cloud-upload",
            "state_topic": topics.uploads, "value_template": "{{ value_json.queue_length }}",
            "json_attributes_topic": topics.uploads, "unit_of_measurement": "recordings", "state_class": "measurement",
            "entity_category": "diagnostic",
        },
    }  # fmt: skip
    if cfg.telemetry_seconds > 0:
        cmps["disk_free"] = {
            "p": "sensor", "unique_id": f"{node}_disk_free", "name": "Disk free", "state_topic": topics.telemetry,
            "value_template": "{{ value_json.disk_free_bytes }}", "unit_of_measurement": "B",
            "device_class": "data_size", "state_class": "measurement", "entity_category": "diagnostic",
        }  # fmt: skip
        cmps["cameras_recording"] = {
            "p": "sensor", "unique_id": f"{node}_cameras_recording", "name": "Cameras recording",
            "state_topic": topics.telemetry, "value_template": "{{ value_json.cameras_recording }}",
            "json_attributes_topic": topics.telemetry, "state_class": "measurement",
        }  # fmt: skip
    return {
        "dev": {
            "identifiers": [node],
            "name": f"edge-agent {cfg.device_id}",
            "manufacturer": MANUFACTURER,
            "model": "edge-agent",
            "sw_version": version,
        },
        **_common(topics, version),
        "cmps": cmps,
    }


def discovery_configs(cfg: AgentConfig, version: str) -> dict[str, dict[str, Any]]:
    """node id -> device config, for every configured camera and the agent."""
    out = {camera_node_id(cfg.device_id, cam): camera_config(cfg, cam, version) for cam in cfg.cameras}
    out[agent_node_id(cfg.device_id)] = agent_config(cfg, version)
    return out


def stale_topics(previous: dict[str, Any], prefix: str, current_nodes: set[str]) -> list[str]:
    """Config topics published before (per the state file) that are not current: clear them."""
    old_prefix = previous.get("discovery_prefix")
    nodes = previous.get("nodes")
    if not isinstance(old_prefix, str) or not isinstance(nodes, list):
        return []
    old = DiscoveryTopics(old_prefix)
    keep = current_nodes if old_prefix == prefix else set()
    return [old.device_config(n) for n in sorted({n for n in nodes if isinstance(n, str)}) if n not in keep]


def state_doc(prefix: str, nodes: set[str]) -> dict[str, Any]:
    return {"discovery_prefix": prefix, "nodes": sorted(nodes)}


def read_state(path: Path) -> dict[str, Any]:
    """The state file, or {} when missing or unreadable (then nothing is cleared)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_state(path: Path, doc: dict[str, Any]) -> None:
    """Atomic replace, so a crash leaves the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)
