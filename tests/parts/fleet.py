"""A fleet of K agent processes for the fleet test and benchmark: configs, parallel start/stop, tallies.

Every agent is a real ``python -m edge_agent run`` (:class:`parts.AgentProcess`) with its own
``agent.yaml`` and work dir under ``<workdir>/<device>/``. Devices are named ``<stem>NNN``.
:class:`Tally` reads what one :class:`parts.MqttProbe` (subscribed to the fleet's topics) received,
per device, so a wait can say exactly which devices are missing.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from parts.agent import AgentProcess, write_config
from parts.probe import Message, MqttProbe

LOCAL_RECORDING_KEYS = ("output_dir", "ffmpeg_path", "ffprobe_path")  # never in a desired document


class Fleet:
    """K agents, each with ``cameras`` (id -> RTSP URL) and in ``groups_for(i)``.

    ``mqtt_for(i)`` gives agent i's ``mqtt`` overrides (e.g. its rotated ``hosts``); ``extra``
    top-level keys (e.g. ``telemetry_seconds``) are merged into every config.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        k: int,
        prefix: str,
        mqtt_port: int,
        cameras: Mapping[str, str],
        groups_for: Callable[[int], Sequence[str]] = lambda _i: (),
        mqtt_for: Callable[[int], Mapping[str, Any]] = lambda _i: {},
        recording: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        stem: str = "dev",
    ) -> None:
        self.workdir = Path(workdir)
        self.prefix = prefix
        self.devices = [f"{stem}{i:03d}" for i in range(k)]
        self.agents: dict[str, AgentProcess] = {}
        self.recording = dict(recording or {})
        for i, device in enumerate(self.devices):
            home = self.workdir / device
            path = write_config(
                home / "agent.yaml", device_id=device, mqtt_port=mqtt_port, topic_prefix=prefix,
                cameras={cam: {"url": url, "video": "copy"} for cam, url in cameras.items()},
                output_dir=home / "rec", storage={"type": "local", "min_free_bytes": 0},
                recording=self.recording, mqtt={"reconnect_min_seconds": 1, **mqtt_for(i)},
            )  # fmt: skip
            doc = yaml.safe_load(path.read_text())
            for cam in doc["cameras"].values():
                cam.pop("max_seconds", None)  # recording.max_seconds rules (the rollout changes it)
            groups = list(groups_for(i))
            if groups:
                doc["groups"] = groups
            doc.update(extra or {})
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            self.agents[device] = AgentProcess(path, home)

    def __len__(self) -> int:
        return len(self.devices)

    def config(self, device: str) -> dict[str, Any]:
        """Agent ``device``'s local ``agent.yaml`` as a dict."""
        doc: dict[str, Any] = yaml.safe_load(self.agents[device].config_path.read_text())
        return doc

    def base(self, device: str) -> str:
        return f"{self.prefix}/{device}"

    def desired(self, device: str, version: int, **recording: Any) -> dict[str, Any]:
        """A desired document: the device's local ``recording`` with ``recording`` changed.

        The local-only keys (``output_dir``, ``ffmpeg_path``, ``ffprobe_path``) are left out: a
        desired document naming them is rejected (they stay in ``agent.yaml``).
        """
        local = self.config(device)["recording"]
        rec = {k: v for k, v in local.items() if k not in LOCAL_RECORDING_KEYS}
        return {"version": version, "config": {"recording": {**rec, **recording}}}

    def group_topic(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/cmd"

    def start(self) -> None:
        for agent in self.agents.values():
            agent.start()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every agent at once (each bounded by ``timeout``, then its group is killed)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(self.agents))) as pool:
            list(pool.map(lambda a: a.stop(timeout=timeout), self.agents.values()))

    def dead(self) -> list[str]:
        return [d for d, a in self.agents.items() if not a.is_alive()]

    def log_excerpts(self, devices: Sequence[str], count: int = 2, lines: int = 25) -> str:
        """The log tails of the first ``count`` of ``devices``."""
        return "\n".join(self.agents[d].log_excerpt(lines) for d in list(devices)[:count])

    def grep(self, device: str, text: str) -> list[str]:
        return [line for line in self.agents[device].log_text().splitlines() if text in line]


def describe(devices: Sequence[str], limit: int = 15) -> str:
    """``dev003, dev017 (+12 more)``."""
    shown = ", ".join(devices[:limit])
    return f"{shown} (+{len(devices) - limit} more)" if len(devices) > limit else shown


class Tally:
    """Per-device view of what a probe received on ``<prefix>/<device>/<suffix>`` topics."""

    def __init__(self, probe: MqttProbe, fleet: Fleet) -> None:
        self.probe = probe
        self.fleet = fleet

    def on(self, suffix: str, predicate: Callable[[Message], bool] | None = None) -> dict[str, list[Message]]:
        """Messages per device on ``<prefix>/<device>/<suffix>`` (matching ``predicate``), oldest first."""
        wanted = {f"{self.fleet.base(d)}/{suffix}": d for d in self.fleet.devices}
        out: dict[str, list[Message]] = {d: [] for d in self.fleet.devices}
        for m in self.probe.raw():
            device = wanted.get(m.topic)
            if device is not None and (predicate is None or predicate(m)):
                out[device].append(m)
        return out

    def json_on(
        self, suffix: str, predicate: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """Like :meth:`on` with the JSON payloads (empty and non-JSON payloads skipped)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for device, messages in self.on(suffix).items():
            docs = []
            for m in messages:
                try:
                    doc = m.json()
                except ValueError:
                    continue
                if isinstance(doc, dict) and (predicate is None or _holds(predicate, doc)):
                    docs.append(doc)
            out[device] = docs
        return out

    def wait_each(
        self,
        suffix: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
        devices: Sequence[str] | None = None,
    ) -> float:
        """Waits until every device (of ``devices``) has a JSON message on its topic matching.

        Returns the monotonic time the last one was received. On timeout the AssertionError names
        the devices still missing, says which agents died, and shows two of their log tails.
        """
        wanted = list(devices if devices is not None else self.fleet.devices)
        deadline = time.monotonic() + timeout
        while True:
            found = self.json_on(suffix, predicate)
            missing = [d for d in wanted if not found[d]]
            if not missing:
                return self.last_received(suffix, predicate, wanted)
            if time.monotonic() >= deadline:
                raise self._missing(what, missing, len(wanted), timeout)
            time.sleep(0.1)

    def _missing(self, what: str, missing: list[str], total: int, timeout: float) -> AssertionError:
        """The failure of a wait: which devices are missing, which of their agents died, their logs."""
        dead = [d for d in missing if not self.fleet.agents[d].is_alive()]
        return AssertionError(
            f"{what}: {len(missing)} of {total} device(s) missing after {timeout:.0f} s: "
            f"{describe(missing)}; dead agents: {describe(dead) or 'none'}\n"
            f"{self.fleet.log_excerpts(missing)}"
        )

    def wait_raw_each(self, suffix: str, payload: bytes, timeout: float, what: str) -> float:
        """Waits until every device has a message with exactly ``payload`` on its topic."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.on(suffix, lambda m: m.payload == payload)
            missing = [d for d in self.fleet.devices if not found[d]]
            if not missing:
                return max(found[d][0].received_at for d in self.fleet.devices)
            if time.monotonic() >= deadline:
                raise self._missing(what, missing, len(self.fleet), timeout)
            time.sleep(0.1)

    def last_received(self, suffix: str, predicate: Callable[[dict[str, Any]], bool], devices: Sequence[str]) -> float:
        """The monotonic receive time of the latest first-match among ``devices``."""
        firsts = []
        for device, messages in self.on(suffix).items():
            if device not in devices:
                continue
            for m in messages:
                try:
                    doc = m.json()
                except ValueError:
                    continue
                if isinstance(doc, dict) and _holds(predicate, doc):
                    firsts.append(m.received_at)
                    break
        return max(firsts) if firsts else time.monotonic()


def publish_all(probe: MqttProbe, items: Sequence[tuple[str, bytes]], *, retain: bool = False,
                timeout: float = 30.0) -> None:  # fmt: skip
    """Publishes every (topic, payload) with QoS 1 back to back, then waits for all the acks
    (pipelined, as an operator's tool would, instead of one broker round trip per message)."""
    client = probe._client  # the probe's paho client; its publish() waits for each ack in turn
    infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload in items]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        if not info.is_published():
            raise AssertionError(f"{len(infos)} publishes not all acknowledged within {timeout} s")


def _holds(predicate: Callable[[dict[str, Any]], bool], doc: dict[str, Any]) -> bool:
    try:
        return bool(predicate(doc))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return False


def wait_quiet(probe: MqttProbe, topic_test: Callable[[str], bool], quiet: float, timeout: float) -> float:
    """Waits until no message on a topic passing ``topic_test`` arrived for ``quiet`` seconds.

    Returns the seconds waited. Used as the settle period after the last reply: a duplicate that
    arrives later than this is not seen, so ``quiet`` must exceed any redelivery the test provokes.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        times = [m.received_at for m in probe.raw() if topic_test(m.topic)]
        last = max(times, default=started)
        now = time.monotonic()
        if now - last >= quiet and now - started >= quiet:
            return now - started
        if now >= deadline:
            raise AssertionError(f"messages kept coming for {timeout:.0f} s (wanted {quiet:.1f} s of quiet)")
        time.sleep(0.1)
