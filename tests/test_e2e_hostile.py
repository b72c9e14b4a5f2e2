"""Hostile input against ONE running agent on a real Mosquitto (issue 9, "Done when").

A property-based test (hypothesis) sends generated commands and MQTT v5 properties — random bytes,
deep JSON, huge integers, noncharacters, surrogates, `%`, traversal names, very long names, wrong
types, hostile Response Topics, unknown cameras, oversize payloads, bursts — through a real MQTT
client, after a fixed corpus of the attacks the issue measured. The agent is started once for the
whole run (not per example): what matters is that it survives the *sequence*.

The invariants: the agent never exits and is never disconnected (no retained ``offline``, one
broker connection in Mosquitto's log); every command gets exactly one reply on its camera's reply
topic or is counted in telemetry ``commands_unanswered``; nothing is published where the test did
not expect it (an independent subscriber on ``#`` sees every message); nothing is written outside
the output directory; and a normal task records and uploads afterwards.

Hypothesis generates; each reply is checked as it arrives and every breach is collected with the
payload that caused it, so one run reports them all (with the figures for the closing note). Reproduce
with ``EDGE_FUZZ_SEED`` (printed) and scale with ``EDGE_FUZZ_MESSAGES`` (default 2000).
``EDGE_FUZZ_FAIL_FAST=1`` stops at the first breach so hypothesis prints its falsifying example;
``EDGE_FUZZ_SHRINK=1`` also shrinks it (slow against a live agent: off by default).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import threading
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from parts import ROOT, AgentProcess, Mosquitto, write_config

pytestmark = pytest.mark.integration

FUZZ_MESSAGES = int(os.environ.get("EDGE_FUZZ_MESSAGES", "2000"))
FUZZ_SEED = int(os.environ.get("EDGE_FUZZ_SEED", "20269"))
FUZZ_SHRINK = os.environ.get("EDGE_FUZZ_SHRINK", "") == "1"
FUZZ_FAIL_FAST = FUZZ_SHRINK or os.environ.get("EDGE_FUZZ_FAIL_FAST", "") == "1"
REPLY_TIMEOUT = float(os.environ.get("EDGE_FUZZ_REPLY_TIMEOUT", "5"))

DEVICE = "edge-h"
CAMERAS = ("cam1", "cam2")  # cam1: the simulator; cam2: nothing listens (starts fail)
MAX_PAYLOAD = 65536  # the agent's default mqtt.max_payload_bytes
HA_PREFIX = "homeassistant"
SWITCH_WORDS = ("ON", "off", " Start ", "STOP\n", "on", "Off")
STAMP = r"_\d{8}T\d{9}Z"  # the agent's file-name stamp (tasks.stamp)


# ----------------------------------------------------------------------------- the MQTT clients


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes  # the first 256 bytes only on `/cmd` topics (the test's own, possibly 100 kB)
    size: int
    retain: bool
    properties: Properties | None


class V5Client:
    """A plain MQTT v5 client that records what it receives per topic, with O(1) counts to wait on.

    The tests' `MqttProbe` rescans its whole history on each wait; thousands of messages make that
    quadratic, so this run uses its own. Received replies are indexed by `request_id` as they arrive.
    """

    def __init__(self, host: str, port: int, name: str) -> None:
        self.client_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self._cond = threading.Condition()
        self._by_topic: dict[str, list[Seen]] = defaultdict(list)
        self._rids: Counter[str] = Counter()
        self._filters: list[str] = []
        self._subacks: set[int] = set()
        self.connects = 0
        self.disconnects = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(1000)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.connect(host, port, keepalive=60)
        self._client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.connects > 0, 10):
                raise AssertionError(f"{self.client_id} did not connect to {host}:{port}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            return
        with self._cond:
            self.connects += 1
            filters = list(self._filters)
            self._cond.notify_all()
        for f in filters:
            client.subscribe(f, qos=1)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.disconnects += 1
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self._subacks.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        rid = None
        if msg.topic.endswith("/reply") and msg.topic.count("/") == 3:  # P/D/C/reply, not a response topic
            with contextlib.suppress(ValueError, AttributeError):
                rid = json.loads(payload).get("request_id")
        seen = Seen(msg.topic, payload[:256] if msg.topic.endswith("/cmd") else payload, len(payload),
                    bool(msg.retain), getattr(msg, "properties", None))  # fmt: skip
        with self._cond:
            self._by_topic[msg.topic].append(seen)
            if isinstance(rid, str):
                self._rids[rid] += 1
            self._cond.notify_all()

    def subscribe(self, topic_filter: str, timeout: float = 10.0) -> None:
        with self._cond:
            self._filters.append(topic_filter)
        result, mid = self._client.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise AssertionError(f"no SUBACK for {topic_filter!r}")

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, properties: Properties | None = None, wait: bool = True
    ) -> mqtt.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise AssertionError(f"publish to {topic[:80]!r} failed locally: {mqtt.error_string(info.rc)}")
        if wait and qos > 0:
            info.wait_for_publish(15)
            if not info.is_published():
                raise AssertionError(f"publish to {topic[:80]!r} not acknowledged within 15 s")
        return info

    # -- what was received
    def count(self, topic: str) -> int:
        with self._cond:
            return len(self._by_topic.get(topic, ()))

    def messages(self, topic: str) -> list[Seen]:
        with self._cond:
            return list(self._by_topic.get(topic, ()))

    def topics(self) -> dict[str, list[Seen]]:
        with self._cond:
            return {t: list(ms) for t, ms in self._by_topic.items()}

    def rid_count(self, rid: str) -> int:
        with self._cond:
            return self._rids[rid]

    def rid_counts(self) -> Counter[str]:
        with self._cond:
            return Counter(self._rids)

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Waits (woken by each received message) until ``condition`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return True

    def wait_json(self, topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                  start: int = 0) -> dict[str, Any]:  # fmt: skip
        """The first JSON object on ``topic`` at index >= ``start`` for which ``predicate`` holds."""
        found: list[dict[str, Any]] = []

        def check() -> bool:
            for m in self._by_topic.get(topic, ())[start:]:
                with contextlib.suppress(ValueError):
                    doc = json.loads(m.payload)
                    if isinstance(doc, dict) and predicate(doc):
                        found.append(doc)
                        return True
            return False

        if not self.wait(check, timeout):
            last = [m.payload[:300] for m in self.messages(topic)[-5:]]
            raise AssertionError(f"no matching message on {topic!r} within {timeout} s; last: {last}")
        return found[0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


# ------------------------------------------------------------------------------ the oracle


def is_noncharacter(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def broker_valid_char(c: str) -> bool:
    """What Mosquitto accepts in a topic or string property (it disconnects the sender otherwise)."""
    cp = ord(c)
    return not (cp <= 0x1F or 0x7F <= cp <= 0x9F or 0xD800 <= cp <= 0xDFFF or is_noncharacter(cp))


def name_rule_broken(name: str) -> bool:
    """The contract's naming rule, violated for sure (the agent must answer `rejected`)."""
    if not name or name.startswith("."):
        return True
    if any(c in "/+#\\%" for c in name):
        return True
    for c in name:
        if is_noncharacter(ord(c)) or unicodedata.category(c) in ("Cc", "Cf", "Cs"):
            return True
    return len(name.encode("utf-8", "surrogatepass")) > 120


SAFE_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-" + "夜间巡检東京")


def name_is_safe(name: str) -> bool:
    """Certainly valid under the rule (the agent must not answer `rejected`)."""
    return (bool(name) and set(name) <= SAFE_NAME_CHARS and not name.startswith(".")
            and len(name.encode()) <= 120)  # fmt: skip


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+`, `#`; wildcards first do not match `$` topics)."""
    f, t = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def response_topic_refused(rt: str, prefix: str) -> bool | None:
    """The contract's verdict on a v5 Response Topic (None: the contract does not say).

    A topic whose last level is `cmd` anywhere is left to the agent: the issue says "never onto any
    command topic", and that is this project's shape of one.
    """
    if rt == "":
        return None
    if rt.split("/")[-1] == "cmd" and not topic_matches(f"{prefix}/+/+/cmd", rt):
        return None
    if rt.startswith("$") or "+" in rt or "#" in rt:
        return True
    protected = (f"{prefix}/+/+/cmd", f"{prefix}/+/status", f"{prefix}/+/+/status", f"{prefix}/+/+/tasks/#",
                 f"{prefix}/+/telemetry", f"{prefix}/+/uploads", f"{HA_PREFIX}/#")  # fmt: skip
    if any(topic_matches(f, rt) for f in protected):
        return True
    allowed = ("nodered/#", "responses/#", "+/responses/#", f"{prefix}/{DEVICE}/_ctl/#")
    return not any(topic_matches(f, rt) for f in allowed)


def hostile_response_topics(prefix: str) -> list[str]:
    """Response Topics that must be refused (Mosquitto passes every one of them to the agent)."""
    p, d = prefix, DEVICE
    return [
        "$SYS/x", "$SYS/responses/x", "$share/g/responses/x", "#", "+/x", "nodered/#", "responses/+",
        f"{p}/{d}/cam1/cmd", f"{p}/{d}/nocam/cmd", f"{p}/other/cam1/cmd", f"{p}/other/cam1/status",
        f"{p}/other/status", f"{p}/{d}/status", f"{p}/{d}/telemetry", f"{p}/{d}/uploads", f"{p}/{d}/cam1/status",
        f"{p}/{d}/cam1/tasks/x", f"{p}/{d}/_ctl/#", f"{HA_PREFIX}/device/x/config", f"{HA_PREFIX}/responses/x",
        f"{HA_PREFIX}/status", f"{p}/responses/cam1/cmd", f"{p}/responses/status", f"{p}/responses/cam1/status",
        f"{p}/responses/telemetry", f"{p}/responses/uploads", f"{p}/responses/cam1/tasks/t", "other/inbox",
        f"{p}/{d}/cam1/reply",
    ]  # fmt: skip


def allowed_response_topics(prefix: str) -> list[str]:
    return ["nodered/responses", "responses/fz/1", "app1/responses/x", f"{prefix}/{DEVICE}/_ctl/inbox",
            f"{prefix}/{DEVICE}/_ctl/edge-ctl-1/reply", "nodered/夜/\u200b"]  # fmt: skip


def padded(doc: dict[str, Any], size: int) -> bytes:
    """``doc`` as JSON of exactly ``size`` bytes: a valid command padded with insignificant whitespace."""
    text = json.dumps(doc).encode()
    return text + b" " * (size - len(text))


def classify_payload(payload: bytes) -> str | None:
    """What any payload (not built by the test) must get: `rejected`, `fail`, or None (unknown)."""
    if len(payload) > MAX_PAYLOAD:
        return "fail"
    with contextlib.suppress(UnicodeDecodeError):
        if payload.decode("ascii").strip().lower() in ("on", "off", "start", "stop"):
            return None  # a switch word
    try:
        doc = json.loads(payload.decode("utf-8"))
    except Exception:  # bad UTF-8, bad JSON, RecursionError, ValueError for huge integers
        return "rejected"
    return None if isinstance(doc, dict) else "fail"


# --------------------------------------------------------------------------- one run's ledger


@dataclass
class Send:
    """One command message and what the contract says its reply must be."""

    camera: str
    payload: bytes
    expect: str | None = None  # "rejected" | "fail" | "not_rejected" | None
    rid: str | None = None  # must be echoed
    response_topic: str | None = None
    correlation: bytes | None = None
    user_props: list[tuple[str, str]] = field(default_factory=list)
    qos: int = 1
    start_name: str | None = None  # a start that must not run (refused response topic)
    why: str = ""


@dataclass
class Ledger:
    sent: int = 0
    sent_per_topic: Counter[str] = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)
    rt_expected: dict[str, list[bytes | None]] = field(default_factory=lambda: defaultdict(list))
    rt_refused: set[str] = field(default_factory=set)
    rt_undetermined: Counter[str] = field(default_factory=Counter)
    not_started: set[str] = field(default_factory=set)
    fresh_rids: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


class Fuzzer:
    """Sends commands one at a time (bursts excepted) and checks each reply against the contract."""

    def __init__(self, prefix: str, sender: V5Client, tap: V5Client, agent: AgentProcess) -> None:
        self.prefix = prefix
        self.base = f"{prefix}/{DEVICE}"
        self.sender, self.tap, self.agent = sender, tap, agent
        self.ledger = Ledger()
        self._rid = 0
        self._name = 0

    def cmd_topic(self, cam: str) -> str:
        return f"{self.base}/{cam}/cmd"

    def reply_topic(self, cam: str) -> str:
        return f"{self.base}/{cam}/reply"

    def fresh_rid(self) -> str:
        self._rid += 1
        return f"fz-{self._rid:06d}-{uuid.uuid4().hex[:6]}"

    def fresh_name(self, stem: str = "fz") -> str:
        self._name += 1
        return f"{stem}-{self._name:05d}"

    def _alive(self) -> None:
        if not self.agent.is_alive():
            raise AssertionError(f"the agent exited ({self.agent.returncode})\n{self.agent.log_excerpt()}")

    def _props(self, s: Send) -> Properties | None:
        if s.response_topic is None and s.correlation is None and not s.user_props:
            return None
        props = Properties(PacketTypes.PUBLISH)
        if s.response_topic is not None:
            props.ResponseTopic = s.response_topic
        if s.correlation is not None:
            props.CorrelationData = s.correlation
        if s.user_props:
            props.UserProperty = s.user_props
        return props

    def _fail(self, text: str) -> None:
        self.ledger.failures.append(text)
        if FUZZ_FAIL_FAST:
            raise AssertionError(text)

    def send(self, s: Send, kind: str) -> None:
        """Publish one command, wait for its one reply, and check it; a missing reply is recorded."""
        self._alive()
        led = self.ledger
        led.kinds[kind] += 1
        topic, reply_topic = self.cmd_topic(s.camera), self.reply_topic(s.camera)
        refused = response_topic_refused(s.response_topic, self.prefix) if s.response_topic is not None else None
        if s.response_topic is not None and refused is None:
            led.rt_undetermined[s.response_topic] += 1
        if s.response_topic is not None and refused:
            led.rt_refused.add(s.response_topic)
            if s.start_name is not None:
                led.not_started.add(s.start_name)
        if s.rid is not None:
            led.fresh_rids.add(s.rid)
        before = self.tap.count(reply_topic)
        self.sender.publish(topic, s.payload, qos=s.qos, properties=self._props(s))
        led.sent += 1
        led.sent_per_topic[topic] += 1
        if not self.tap.wait(lambda: self.tap.count(reply_topic) > before, REPLY_TIMEOUT):
            self._alive()
            led.missing.append(f"{kind}: {s.why or s.payload[:80]!r} on {s.camera[:40]!r}")
            return
        msg = self.tap.messages(reply_topic)[before]
        where = f"[{kind}] {s.why or repr(s.payload[:120])} on {s.camera[:40]!r} -> {msg.payload[:400]!r}"
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            self._fail(f"reply is not JSON: {where}")
            return
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool) or "status" not in reply:
            self._fail(f"reply lacks ok/status: {where}")
            return
        expect = s.expect
        if refused and expect in ("rejected", "not_rejected"):
            expect = "fail"  # which of the two checks answers first is the agent's choice
        if refused is None and s.response_topic is not None:
            expect = None  # an empty one, or one ending in `cmd`: the contract does not say
        if expect == "rejected" and (reply["ok"] is not False or reply["status"] != "rejected"):
            self._fail(f"expected status rejected/ok false: {where}")
        elif expect == "fail" and reply["ok"] is not False:
            self._fail(f"expected ok false: {where}")
        elif expect == "not_rejected" and reply["status"] == "rejected":
            self._fail(f"a valid command was rejected: {where}")
        if s.rid is not None and reply.get("request_id") != s.rid:
            self._fail(f"request_id {s.rid} not echoed: {where}")
        if refused:
            if reply["ok"] is not False:
                self._fail(f"refused response topic {s.response_topic!r} but ok: {where}")
            elif s.expect == "not_rejected" and "response" not in json.dumps(reply).lower():
                self._fail(f"refusal of {s.response_topic!r} does not say why: {where}")
            if reply.get("status") == "starting":
                self._fail(f"a start with refused response topic ran: {where}")
        elif refused is False and s.response_topic is not None:
            # Counted exactly at the end; here only paced, so the next example does not overlap it.
            led.rt_expected[s.response_topic].append(s.correlation)
            rt = s.response_topic
            wanted = len(led.rt_expected[rt])
            if reply["ok"] or "response" not in json.dumps(reply).lower():
                self.tap.wait(lambda: self.tap.count(rt) >= wanted, 1.0)

    def burst(self, camera: str, k: int, qos: int) -> None:
        """``k`` status commands as fast as the client can publish them; each must be answered once."""
        self._alive()
        self.ledger.kinds["burst"] += 1
        topic = self.cmd_topic(camera)
        rids = [self.fresh_rid() for _ in range(k)]
        infos = [self.sender.publish(topic, json.dumps({"action": "status", "request_id": r}).encode(), qos=qos,
                                     wait=False) for r in rids]  # fmt: skip
        for info in infos:
            if qos > 0:
                info.wait_for_publish(15)
        self.ledger.sent += k
        self.ledger.sent_per_topic[topic] += k
        self.ledger.fresh_rids.update(rids)
        self.tap.wait(lambda: all(self.tap.rid_count(r) > 0 for r in rids), REPLY_TIMEOUT + k * 0.05)
        self.ledger.missing += [f"burst status {r} on {camera}" for r in rids if self.tap.rid_count(r) == 0]

    def request(self, cam: str, payload: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        """A well-formed command (set-up and the final task), sent again while it is rate-limited or shed."""
        deadline = time.monotonic() + timeout
        while True:
            rid = self.fresh_rid()
            start = self.tap.count(self.reply_topic(cam))
            self.sender.publish(self.cmd_topic(cam), json.dumps({**payload, "request_id": rid}).encode())
            self.ledger.sent += 1
            self.ledger.sent_per_topic[self.cmd_topic(cam)] += 1
            self.ledger.fresh_rids.add(rid)
            wait = max(0.1, min(3.0, deadline - time.monotonic()))
            try:
                doc = self.tap.wait_json(self.reply_topic(cam), lambda p, r=rid: p.get("request_id") == r, wait, start)
            except AssertionError:
                doc = None
            if doc is not None and doc.get("status") != "rate_limited":
                return doc
            if time.monotonic() >= deadline:
                raise AssertionError(f"{payload} on {cam}: no reply but rate_limited within {timeout} s")
            time.sleep(0.5)  # the limiter's bucket refills with time (5 tokens/s by default)


# ------------------------------------------------------------------------------ strategies


BAD_NAME_CHARS = ["\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001fffe", "\U0010ffff", "\ud800", "\udfff",
                  "\x00", "\x01", "\x1f", "\x7f", "\x85", "\u200b", "\u200e", "\ufeff", "\u2066",
                  "/", "+", "#", "\\", "%"]  # fmt: skip
HOSTILE_NAMES = ["evil\ufdd0", "%", "%s", "%d%n", "50%", "a%03d", "../../etc/passwd", "..", ".", ".hidden", "../x",
                 "..\\x", "a/b", "a\\b", "a+b", "a#b", "\x00x", "x\x00", "a\u200bb", "\u202eexe.mp4", "x" * 121,
                 "é" * 61, "夜" * 41, "", "\ud800", "\udc00x", "x\U0001fffe"]  # fmt: skip
SAFE_NAMES = st.text(alphabet=sorted(SAFE_NAME_CHARS), min_size=1, max_size=40)
BROKER_TEXT = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")).filter(broker_valid_char)
TOPIC_LEVEL = st.text(BROKER_TEXT.filter(lambda c: c not in "/+#"), min_size=1, max_size=24)


@st.composite
def task_names(draw: st.DrawFn) -> str:
    how = draw(st.sampled_from(["safe", "safe", "hostile", "inject", "dot", "long", "wild", "boundary"]))
    if how == "safe":
        return draw(SAFE_NAMES)
    if how == "hostile":
        return draw(st.sampled_from(HOSTILE_NAMES))
    if how == "inject":
        name = draw(SAFE_NAMES)
        at = draw(st.integers(0, len(name)))
        return name[:at] + draw(st.sampled_from(BAD_NAME_CHARS)) + name[at:]
    if how == "dot":
        return "." + draw(SAFE_NAMES)
    if how == "long":
        return draw(st.sampled_from(["x", "é", "夜", "\U0001f600"])) * draw(st.integers(31, 400))
    if how == "boundary":
        return draw(st.sampled_from(["x" * 120, "夜" * 40, "\U0001f600" * 30, "x" * 119 + "é"]))
    return draw(st.text(max_size=60))


HUGE = "<huge integer>"
HOSTILE_TYPES: list[Any] = [0, -1, 1.5, True, [], {}, [1], {"a": 1}, 10**30, -(10**30)]  # null means "absent"


def build_command(draw: st.DrawFn, fz: Fuzzer) -> Send:
    """A JSON command whose fields are valid or broken on purpose, with its expected verdict."""
    invalid = False
    undecided = False
    huge_digits = 0
    doc: dict[str, Any] = {}
    valid_action = draw(st.booleans()) or draw(st.booleans())
    if valid_action:
        action = draw(st.sampled_from(["start", "stop", "status", "query"]))
        doc["action"] = action
    else:
        action = None
        doc["action"] = draw(st.sampled_from(["START", "dance", "", "start ", "start\x00", 1, None, ["start"]]))
        invalid = True
    name_rejected = False
    if action in ("start", "stop", "query") or draw(st.integers(0, 3)) == 0:
        if draw(st.integers(0, 9)) == 0:
            doc["task_name"] = draw(st.sampled_from(HOSTILE_TYPES))
            invalid = True
        else:
            name = draw(task_names())
            doc["task_name"] = name
            if name_rule_broken(name):
                name_rejected = True
            elif not name_is_safe(name):
                undecided = True
    if action == "start" and draw(st.booleans()):
        how = draw(st.sampled_from(["ok", "ok", "big", "bad", "huge"]))
        if how == "ok":
            doc["max_seconds"] = draw(st.integers(1, 5))
        elif how == "big":
            doc["max_seconds"] = draw(st.integers(6, 10**9))
        elif how == "bad":
            doc["max_seconds"] = draw(st.sampled_from([0, -1, 1.5, "ten", True, [], "5"]))  # null means "absent"
            invalid = True
        else:
            doc["max_seconds"] = HUGE  # replaced by the digits in the JSON text (Python cannot make them)
            huge_digits = draw(st.integers(4301, 6000))
    rid: str | None = None
    rid_how = draw(st.sampled_from(["fresh", "fresh", "fresh", "fresh", "none", "hostile"]))
    if rid_how == "fresh":
        rid = fz.fresh_rid()
        doc["request_id"] = rid
    elif rid_how == "hostile":
        doc["request_id"] = draw(st.sampled_from(["a\nb", "x" * 201, "y" * 5000, 123, None, "\u2028", "%s%n", "\r\n",
                                                  "\ud800", ["r"], "r\u0000"]))  # fmt: skip
        undecided = True
    ensure_ascii = draw(st.booleans())
    payload = json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    if doc.get("max_seconds") == HUGE:
        payload = payload.replace(json.dumps(HUGE).encode(), b"9" * huge_digits)
    if classify_payload(payload) == "rejected":
        expect: str | None = "rejected"  # bad UTF-8 (a raw surrogate) or an integer over 4,300 digits
        rid = None  # the parser failed: the id cannot be read back
    elif invalid:
        expect = "fail"
    elif name_rejected:
        expect = "rejected"
    elif undecided:
        expect = None
    else:
        expect = "not_rejected"
    return Send(camera="", payload=payload, expect=expect, rid=rid, why=f"command {doc!r:.200}")


@st.composite
def response_properties(draw: st.DrawFn, prefix: str) -> tuple[str | None, bytes | None, list[tuple[str, str]]]:
    how = draw(st.sampled_from(["hostile", "hostile", "allowed", "allowed-gen", "random", "empty"]))
    if how == "hostile":
        rt: str | None = draw(st.sampled_from(hostile_response_topics(prefix)))
    elif how == "allowed":
        rt = draw(st.sampled_from(allowed_response_topics(prefix)))
    elif how == "allowed-gen":
        root = draw(st.sampled_from(["nodered", "responses", "app2/responses", f"{prefix}/{DEVICE}/_ctl"]))
        rt = root + "/" + "/".join(draw(st.lists(TOPIC_LEVEL, min_size=1, max_size=3)))
    elif how == "random":
        levels = draw(st.lists(st.text(BROKER_TEXT.filter(lambda c: c != "/"), max_size=12), min_size=1, max_size=5))
        rt = "/".join(levels)
        if rt.startswith("$"):
            rt = "x" + rt  # `$` topics come from the fixed list (the tap subscribes to those)
    else:
        rt = ""
    corr = draw(st.none() | st.binary(max_size=64))
    users = draw(st.lists(st.tuples(TOPIC_LEVEL, st.text(BROKER_TEXT, max_size=40)), max_size=3))
    return rt, corr, users


# ------------------------------------------------------------------------------ the fixed corpus


def corpus(fz: Fuzzer) -> Iterator[tuple[str, Send]]:
    """The attacks the issue measured, each sent once before the generated ones."""
    p = fz.prefix

    def start(name: str, **extra: Any) -> bytes:
        return json.dumps({"action": "start", "task_name": name, **extra}).encode()

    for name in HOSTILE_NAMES:
        for ensure_ascii in (True, False):
            rid = fz.fresh_rid()
            payload = json.dumps({"action": "start", "task_name": name, "request_id": rid},
                                 ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")  # fmt: skip
            bad_utf8 = classify_payload(payload) == "rejected"
            yield "corpus-name", Send("cam1", payload, "rejected", None if bad_utf8 else rid, why=f"name {name!r:.60}")
    rid = fz.fresh_rid()
    yield "corpus-name", Send("cam2", start("夜" * 40, request_id=rid), "not_rejected", rid, why="120-byte name")
    yield "corpus-deep", Send("cam1", b"[" * 100_000, "fail", why="100,000 nested [ (oversize)")
    yield "corpus-deep", Send("cam1", b"[" * 60_000, "rejected", why="60,000 nested [")
    yield "corpus-deep", Send("cam1", b'{"a":' * 12_000 + b"1" + b"}" * 12_000, "rejected", why="12,000 nested {")
    deep_cmd = b'{"action":"status","x":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    yield "corpus-deep", Send("cam1", deep_cmd, "rejected", why="status with 30,000-deep field")
    huge = "9" * 5000
    yield "corpus-huge", Send("cam1", f'{{"action":"start","task_name":"h","max_seconds":{huge}}}'.encode(),
                              "rejected", why="5,000-digit max_seconds")  # fmt: skip
    yield "corpus-huge", Send("cam1", f'{{"action":"status","request_id":{huge}}}'.encode(), "rejected",
                              why="5,000-digit request_id")  # fmt: skip
    yield "corpus-huge", Send("nocam", f"[{huge}]".encode(), "fail", why="5,000-digit number, unknown camera")
    for size in (MAX_PAYLOAD, MAX_PAYLOAD + 1, MAX_PAYLOAD + 4096):
        rid = fz.fresh_rid()
        payload = padded({"action": "status", "request_id": rid}, size)
        echoed = rid if len(payload) <= MAX_PAYLOAD else None
        yield "corpus-size", Send("cam1", payload, classify_payload(payload) or "not_rejected", echoed,
                                  why=f"{len(payload)}-byte payload")  # fmt: skip
    for payload in (b"", b"\xff\xfe", b"\xed\xa0\x80", b"null", b"[]", b'"start"', b"1e999", b"{", b"\x00" * 10):
        yield "corpus-bytes", Send("cam1", payload, classify_payload(payload) or "fail", why=f"bytes {payload!r}")
    for rt in hostile_response_topics(p):
        rid = fz.fresh_rid()
        status = json.dumps({"action": "status", "request_id": rid}).encode()
        yield "corpus-rt", Send("cam1", status, "not_rejected", rid, response_topic=rt,
                                correlation=b"c-" + rid.encode(), why=f"status, rt {rt!r}")  # fmt: skip
        name, rid = fz.fresh_name("rt"), fz.fresh_rid()
        yield "corpus-rt", Send("cam2", start(name, request_id=rid), "not_rejected", rid, response_topic=rt,
                                start_name=name, why=f"start, rt {rt!r}")  # fmt: skip
    for rt in [*allowed_response_topics(p), ""]:
        rid = fz.fresh_rid()
        yield "corpus-rt", Send("cam1", json.dumps({"action": "status", "request_id": rid}).encode(), "not_rejected",
                                rid, response_topic=rt, correlation=b"\x00\xffc", why=f"status, rt {rt!r}")  # fmt: skip
    for cam in ["nocam", "CAM1", "cam1 ", "..", "%s", "夜", "\u200b", "_ctl", "x" * 300]:
        rid = fz.fresh_rid()
        yield "corpus-camera", Send(cam, json.dumps({"action": "status", "request_id": rid}).encode(), "fail", rid,
                                    why=f"unknown camera {cam[:20]!r}")  # fmt: skip
    # A camera level so long that its reply topic cannot exist (over 65,535 bytes): the agent must
    # survive it and count it unanswered, or answer it some other way.
    giant = "g" * (65535 - len(fz.cmd_topic("")) - 1)
    yield "corpus-camera", Send(giant, b'{"action":"status"}', "fail", why="reply topic longer than 65,535 bytes")
    for word in SWITCH_WORDS:
        yield "corpus-switch", Send("nocam", word.encode(), "fail", why=f"switch {word!r} on unknown camera")
    yield "corpus-props", Send("cam1", b'{"action":"status"}', "not_rejected", user_props=[("k\u00e9", "v" * 2000)],
                               correlation=bytes(range(256)), why="v5 user property and correlation only")  # fmt: skip


# ------------------------------------------------------------------------------ helpers


def tree(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` outside ``skip`` with (size, mtime_ns)."""
    out: dict[str, tuple[int, int]] = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        with contextlib.suppress(OSError):
            st_ = path.lstat()
            out[str(path.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


def stray_recordings(names: set[str], since: float, output_dir: Path) -> list[str]:
    """Files named like a recording of one of ``names`` outside ``output_dir``: in the agent's
    working directory (the repository) or the top of /tmp, made during the run."""
    if not names:
        return []
    pattern = re.compile("(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + ")" + STAMP)
    found: list[str] = []
    skip = {".git", ".venv", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".node-red"}
    roots = [ROOT, Path("/tmp")]
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            dirnames[:] = [d for d in dirnames if d not in skip and (root == ROOT or depth < 1)]
            for entry in [*dirnames, *filenames]:
                path = Path(dirpath) / entry
                if output_dir in path.parents or not pattern.search(entry):
                    continue
                with contextlib.suppress(OSError):
                    if path.lstat().st_mtime >= since:
                        found.append(str(path))
    return found


def broker_agent_lines(broker: Mosquitto, own_ids: set[str]) -> tuple[list[str], list[str], int]:
    """(agent client ids, lines about them other than connect/oversize drops, oversize drops)."""
    log = broker.log_since_start().splitlines()
    ids = []
    for line in log:
        m = re.search(r"New client connected from \S+ as (\S+) \(", line)
        if m and m.group(1) not in own_ids:
            ids.append(m.group(1))
    other: list[str] = []
    dropped = 0
    for agent_id in set(ids):
        for line in log:
            if agent_id not in line or "New client connected" in line:
                continue
            if f"Dropping too large outgoing PUBLISH for {agent_id}" in line:
                dropped += 1
            else:
                other.append(line)
    return ids, other, dropped


def agent_config(
    tmp_path: Path, broker: Mosquitto, prefix: str, cameras: dict[str, Any], storage: dict[str, Any],
    mqtt_extra: dict[str, Any] | None = None, default_limits: bool = False,
) -> tuple[Path, Path]:  # fmt: skip
    """The agent's YAML with telemetry every second; ``default_limits`` drops the harness's raised
    command burst so the agent's own defaults apply."""
    workdir = tmp_path / "rig"
    output_dir = workdir / "recordings"
    rec = {"segment_seconds": 2, "first_frame_timeout_seconds": 8, "stall_timeout_seconds": 6,
           "stop_timeout_seconds": 8, "restart_backoff_max_seconds": 2, "probe_timeout_seconds": 5}  # fmt: skip
    path = write_config(
        workdir / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix, cameras=cameras,
        output_dir=output_dir, storage={"min_free_bytes": 0, "retry_initial_seconds": 0.5, "retry_max_seconds": 2,
                                        **storage}, recording=rec, mqtt=mqtt_extra,
    )  # fmt: skip
    raw = yaml.safe_load(path.read_text())
    raw["telemetry_seconds"] = 1
    if default_limits:
        for key in ("commands_per_second", "command_burst"):
            raw["mqtt"].pop(key, None)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, output_dir


def latest_telemetry(tap: V5Client, base: str) -> dict[str, Any] | None:
    msgs = tap.messages(f"{base}/telemetry")
    for m in reversed(msgs):
        with contextlib.suppress(ValueError):
            doc = json.loads(m.payload)
            if isinstance(doc, dict):
                return doc
    return None


def wait_camera_free(fz: Fuzzer, cam: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = fz.request(cam, {"action": "status"})["status"]
        if status not in ("starting", "recording", "stopping", "uploading", "rate_limited"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{cam} still {status} after {timeout} s")
        time.sleep(0.3)  # polling the agent's state (there is no event for "free"), bounded above


def final_task(fz: Fuzzer, cam: str, name: str, finals: set[str]) -> dict[str, Any]:
    """A normal start/stop after the abuse; returns the task's final status document."""
    wait_camera_free(fz, cam)
    started = fz.request(cam, {"action": "start", "task_name": name})
    assert started["ok"] is True and started["status"] == "starting", started
    task_topic = f"{fz.base}/{cam}/tasks/{name}"
    fz.tap.wait_json(task_topic, lambda p: p.get("status") == "recording", 30)
    time.sleep(2)  # record for a while: the duration is what is being made, not a synchronisation
    fz.request(cam, {"action": "stop", "task_name": name})
    return fz.tap.wait_json(task_topic, lambda p: p.get("status") in finals | {"failed"}, 90)


# ------------------------------------------------------------------------------------ the tests


FUZZ_TIMEOUT = 300 + FUZZ_MESSAGES // 20


@pytest.mark.timeout(FUZZ_TIMEOUT)
def test_hostile_input_never_takes_the_agent_off_the_air(
    tmp_path: Path, broker: Mosquitto, prefix: str, make_agent, camera, s3, bucket, capsys: pytest.CaptureFixture[str]
) -> None:
    base = f"{prefix}/{DEVICE}"
    with capsys.disabled():
        print(f"\n[fuzz] EDGE_FUZZ_SEED={FUZZ_SEED} EDGE_FUZZ_MESSAGES={FUZZ_MESSAGES} shrink={FUZZ_SHRINK}")
    config, output_dir = agent_config(
        tmp_path, broker, prefix,
        cameras={"cam1": {"url": camera.url("cam1"), "max_seconds": 3}, "cam2": {"url": "rtsp://127.0.0.1:9/none"}},
        storage=s3.storage_config(bucket), mqtt_extra={"commands_per_second": 100000, "command_burst": 100000},
    )  # fmt: skip
    tap = V5Client(broker.host, broker.port, "tap")
    sender = V5Client(broker.host, broker.port, "fuzzer")
    try:
        tap.subscribe("#")
        for rt in hostile_response_topics(prefix):
            if rt.startswith("$") and not rt.startswith("$share") and "+" not in rt and "#" not in rt:
                tap.subscribe(rt)  # `#` does not match `$` topics
        agent = make_agent(config)
        tap.wait(lambda: any(m.payload == b"online" for m in tap.messages(f"{base}/status")), 30)
        assert any(m.payload == b"online" for m in tap.messages(f"{base}/status")), agent.log_excerpt()
        skip = (output_dir, tmp_path / "mosquitto", agent.workdir)
        before_tree = tree(tmp_path, skip)
        t0 = time.time()
        fz = Fuzzer(prefix, sender, tap, agent)
        fuzz_began = time.monotonic()
        for kind, s in corpus(fz):
            fz.send(s, kind)

        budget_end = time.monotonic() + FUZZ_TIMEOUT - 120  # room left for the final task and the report

        def hyp_test(data: st.DataObject) -> None:
            if time.monotonic() > budget_end:
                return  # out of time: `sent >= EDGE_FUZZ_MESSAGES` fails below and says so
            kind = data.draw(st.sampled_from(
                ["command"] * 8 + ["bytes"] * 3 + ["rt"] * 4 + ["deep", "huge", "oversize", "camera", "switch", "burst"]
            ), label="kind")  # fmt: skip
            cam = data.draw(st.sampled_from(["cam1", "cam1", "cam2"]), label="camera")
            qos = data.draw(st.sampled_from([1, 1, 0]), label="qos")
            if kind == "burst":
                fz.burst(cam, data.draw(st.integers(2, 40), label="burst size"), qos)
                return
            if kind == "command":
                s = build_command(data.draw, fz)
            elif kind == "bytes":
                payload = data.draw(st.binary(max_size=600), label="bytes")
                s = Send("", payload, classify_payload(payload), why=f"bytes {payload[:60]!r}")
            elif kind == "deep":
                n = data.draw(st.integers(2000, 60_000), label="depth")
                opener, closer = data.draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]), label="nesting")
                closed = data.draw(st.booleans(), label="closed")
                payload = opener * n + ((b"0" + closer * n) if closed else b"")
                s = Send("", payload, classify_payload(payload), why=f"{n} nested {opener!r}")
            elif kind == "huge":
                digits = data.draw(st.integers(4301, 8000), label="digits")
                field_ = data.draw(st.sampled_from(["max_seconds", "request_id", "task_name", "x"]), label="field")
                payload = f'{{"action":"start","task_name":"h1","{field_}":{"7" * digits}}}'.encode()
                if field_ == "task_name":
                    payload = f'{{"action":"start","task_name":{"7" * digits}}}'.encode()
                s = Send("", payload, classify_payload(payload), why=f"{digits}-digit {field_}")
            elif kind == "oversize":
                size = data.draw(st.integers(MAX_PAYLOAD + 1, MAX_PAYLOAD + 20_000), label="size")
                payload = padded({"action": "status", "request_id": fz.fresh_rid()}, size)
                s = Send("", payload, "fail", why=f"{size}-byte payload")
            elif kind == "camera":
                name = data.draw(st.sampled_from(["nocam", "CAM2", "..", "%n"]) | TOPIC_LEVEL, label="unknown camera")
                if name in CAMERAS:
                    name = "x" + name
                s = build_command(data.draw, fz)
                s.camera = name
                s.expect = "fail"
            elif kind == "switch":
                s = Send("", data.draw(st.sampled_from(SWITCH_WORDS), label="switch").encode(), None, why="switch")
            else:  # "rt": a well-formed command with a hostile, allowed or random Response Topic
                rt, corr, users = data.draw(response_properties(prefix), label="v5 properties")
                action = data.draw(st.sampled_from(["status", "query", "start"]), label="action")
                rid = fz.fresh_rid()
                doc: dict[str, Any] = {"action": action, "request_id": rid}
                name = None
                if action != "status":
                    name = fz.fresh_name("rt")
                    doc["task_name"] = name
                s = Send("", json.dumps(doc).encode(), "not_rejected", rid, response_topic=rt, correlation=corr,
                         user_props=users, start_name=name if action == "start" else None,
                         why=f"{action} with response topic {rt!r}")  # fmt: skip
                if action == "start":
                    cam = "cam2"  # a start that does run must not hold cam1 for the whole run
            if not s.camera:
                s.camera = cam
            s.qos = qos
            fz.send(s, kind)

        phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if FUZZ_SHRINK else [])
        # The number of examples is bounded so the messages sent reach EDGE_FUZZ_MESSAGES (bursts add more).
        run = settings(max_examples=max(1, FUZZ_MESSAGES - fz.ledger.sent), deadline=None, database=None,
                       phases=phases, suppress_health_check=list(HealthCheck),
                       report_multiple_bugs=False)(seed(FUZZ_SEED)(given(data=st.data())(hyp_test)))  # fmt: skip
        run()
        fuzz_seconds = time.monotonic() - fuzz_began

        # -- a normal task after the abuse, then quiesce: every command is answered or counted
        finals = final_task(fz, "cam1", fz.fresh_name("final"), {"uploaded", "completed"})
        led = fz.ledger
        ids, other_lines, dropped = broker_agent_lines(broker, {tap.client_id, sender.client_id})
        to_agent = led.sent - dropped

        def replies_now() -> int:
            return sum(tap.count(t[: -len("cmd")] + "reply") for t in led.sent_per_topic)

        def accounted() -> bool:
            tel = latest_telemetry(tap, base) or {}
            return replies_now() + int(tel.get("commands_unanswered", 0)) >= to_agent

        tap.wait(accounted, 30)
        n_tel = tap.count(f"{base}/telemetry")
        tap.wait(lambda: tap.count(f"{base}/telemetry") >= n_tel + 2, 10)  # late duplicates would show by now

        # -- the ledger
        ids, other_lines, dropped = broker_agent_lines(broker, {tap.client_id, sender.client_id})
        telemetry = latest_telemetry(tap, base) or {}
        unanswered = telemetry.get("commands_unanswered")
        seen = tap.topics()
        replies = replies_now()
        violations: list[str] = []
        cmd_topics = set(led.sent_per_topic)
        rt_used = set(led.rt_expected)
        accepted: set[str] = set()
        for topic, msgs in seen.items():
            if topic in cmd_topics:
                if len(msgs) != led.sent_per_topic[topic]:
                    sent = led.sent_per_topic[topic]
                    violations.append(f"{len(msgs)} messages on {topic[:80]!r}, the test sent {sent}")
                continue
            if topic in rt_used:
                continue
            if topic in led.rt_undetermined and len(msgs) <= led.rt_undetermined[topic]:
                continue  # the contract leaves these to the agent
            if topic == f"{base}/status":
                violations += [f"availability {m.payload!r}" for m in msgs if m.payload != b"online"]
                continue
            docs = []
            for m in msgs:
                try:
                    docs.append(json.loads(m.payload) if m.payload else {})
                except ValueError:
                    violations.append(f"non-JSON on {topic[:80]!r}: {m.payload[:100]!r}")
            if topic in (f"{base}/telemetry", f"{base}/uploads", f"{base}/config/reported"):
                violations += [f"reply-like doc on {topic}" for d in docs if isinstance(d, dict) and "ok" in d]
                continue
            rest = topic[len(base) + 1 :] if topic.startswith(base + "/") else None
            cam, _, tail = (rest or "").partition("/")
            if rest is not None and tail == "reply":
                if f"{base}/{cam}/cmd" not in cmd_topics:
                    violations.append(f"reply on {topic[:80]!r} for a camera the test never commanded")
            elif rest is not None and cam in CAMERAS and tail in ("status", "events"):
                violations += [f"reply-like doc on {topic}: {d}" for d in docs if isinstance(d, dict) and "ok" in d]
            elif rest is not None and cam in CAMERAS and tail.startswith("tasks/"):
                name = tail[len("tasks/") :]
                for d in docs:
                    if d and (not isinstance(d, dict) or "ok" in d or d.get("task_name") != name):
                        violations.append(f"foreign doc on {topic[:80]!r}: {str(d)[:200]}")
                    accepted.add(name)
            else:
                violations.append(f"{len(msgs)} unexpected message(s) on {topic[:100]!r}: {msgs[0].payload[:150]!r}")
        for rt, corrs in led.rt_expected.items():
            got = seen.get(rt, [])
            got_corr = sorted((m.properties.CorrelationData if m.properties is not None and
                               hasattr(m.properties, "CorrelationData") else None) or b"" for m in got)  # fmt: skip
            if len(got) != len(corrs) or got_corr != sorted(c or b"" for c in corrs):
                violations.append(f"allowed response topic {rt!r}: {len(got)} messages for {len(corrs)} commands")
        for rt in led.rt_refused:
            if seen.get(rt) and not rt.startswith(base + "/"):  # the agent's own topics are checked above
                violations.append(f"{len(seen[rt])} message(s) on refused response topic {rt!r}")
        for topic, sent in led.sent_per_topic.items():
            answered = len(seen.get(topic[: -len("cmd")] + "reply", []))
            if answered > sent:
                violations.append(f"{answered} replies for {sent} commands on {topic[:80]!r}")
        ran = sorted(n for n in led.not_started if any(t.endswith(f"/tasks/{n}") for t in seen))
        rid_counts = tap.rid_counts()
        duplicated = sorted(r for r in led.fresh_rids if rid_counts[r] > 1)
        after_tree = tree(tmp_path, skip)
        changed = sorted(k for k in set(before_tree) | set(after_tree) if before_tree.get(k) != after_tree.get(k))
        strays = stray_recordings(accepted, t0, output_dir)
        escaped = [str(p) for p in output_dir.rglob("*") if not p.resolve().is_relative_to(output_dir.resolve())]
        outside = changed + strays + escaped
        crashed = 0 if agent.is_alive() else 1
        offline = sum(1 for m in seen.get(f"{base}/status", []) if m.payload == b"offline")
        disconnects = len(other_lines) + offline + max(0, len(ids) - 1)
        report = tmp_path / "fuzz-report.txt"
        report.write_text("\n".join(["# contract failures", *led.failures, "# publish violations", *violations,
                                      "# no reply seen by the test", *led.missing]) + "\n")  # fmt: skip
        with capsys.disabled():
            print(f"[fuzz] full report: {report}")
            print(
                f"[fuzz] seed={FUZZ_SEED} messages sent={led.sent} in {fuzz_seconds:.0f} s, replies={replies} "
                f"unanswered={unanswered} (no reply seen by the test: {len(led.missing)}, "
                f"dropped by the broker as too large: {dropped}) agent crashes={crashed} "
                f"disconnects={disconnects} files outside output dir={len(outside)} "
                f"contract violations={len(led.failures) + len(violations)} final task={finals.get('status')} "
                f"kinds={dict(led.kinds)}"
            )

        # -- the assertions
        assert crashed == 0, f"the agent exited with {agent.returncode}\n{agent.log_excerpt()}"
        assert len(ids) == 1, f"the agent connected {len(ids)} times ({ids}): input-caused reconnects"
        assert not other_lines, "broker log lines about the agent:\n" + "\n".join(other_lines[:20])
        assert offline == 0, "P/D/status went offline during the run"
        assert sender.connects == 1 and tap.connects == 1, "the broker dropped a test client: a test bug"
        assert led.sent >= FUZZ_MESSAGES, f"only {led.sent} of {FUZZ_MESSAGES} messages sent in the time budget"
        assert not led.failures, f"{len(led.failures)} replies break the contract:\n" + "\n".join(led.failures[:25])
        assert not violations, f"{len(violations)} publish violations:\n" + "\n".join(violations[:25])
        assert not ran, f"commands with a refused response topic were executed: {ran[:10]}"
        assert not duplicated, f"request ids answered more than once: {duplicated[:10]}"
        assert isinstance(unanswered, int), f"telemetry has no commands_unanswered: {telemetry}"
        assert telemetry.get("commands_received", -1) >= to_agent - unanswered, (telemetry, to_agent)
        assert replies + unanswered == to_agent, (
            f"{replies} replies + {unanswered} unanswered != {to_agent} commands reached the agent "
            f"({led.sent} sent, {dropped} dropped by the broker); missing replies: {led.missing[:10]}"
        )
        assert not outside, f"written outside the output directory: {outside[:20]}"
        assert finals["status"] == "uploaded", finals
    finally:
        sender.close()
        tap.close()


def test_command_flood_is_rate_limited_and_accounted(
    tmp_path: Path, broker: Mosquitto, prefix: str, make_agent, camera, capsys: pytest.CaptureFixture[str]
) -> None:
    """3,000 commands as fast as possible on one camera with the default limits (5/s, burst 20)."""
    base = f"{prefix}/{DEVICE}"
    flood = 3000
    config, _ = agent_config(tmp_path, broker, prefix, cameras={"cam1": {"url": camera.url("cam1")}},
                             storage={"type": "local"}, default_limits=True)  # fmt: skip
    tap = V5Client(broker.host, broker.port, "tap")
    sender = V5Client(broker.host, broker.port, "flooder")
    try:
        tap.subscribe("#")
        agent = make_agent(config)
        assert tap.wait(lambda: any(m.payload == b"online" for m in tap.messages(f"{base}/status")), 30), (
            agent.log_excerpt()
        )
        fz = Fuzzer(prefix, sender, tap, agent)
        cmd, reply = fz.cmd_topic("cam1"), fz.reply_topic("cam1")
        rids = [f"fl-{i:05d}" for i in range(flood)]
        began = time.monotonic()
        infos = [sender.publish(cmd, json.dumps({"action": "status", "request_id": r}).encode(), wait=False)
                 for r in rids]  # fmt: skip
        for info in infos:
            info.wait_for_publish(30)
        assert all(i.is_published() for i in infos), "the broker did not acknowledge the flood"
        published = time.monotonic() - began
        _, _, dropped = broker_agent_lines(broker, {tap.client_id, sender.client_id})

        def accounted() -> bool:
            tel = latest_telemetry(tap, base) or {}
            return tap.count(reply) + int(tel.get("commands_unanswered", 0)) >= flood - dropped

        settled = tap.wait(accounted, 120)
        elapsed = time.monotonic() - began
        # One more telemetry period: nothing else may arrive (exactly once, not late duplicates).
        n_tel = tap.count(f"{base}/telemetry")
        tap.wait(lambda: tap.count(f"{base}/telemetry") >= n_tel + 2, 10)
        telemetry = latest_telemetry(tap, base) or {}
        docs = [json.loads(m.payload) for m in tap.messages(reply)]
        limited = [d for d in docs if d.get("status") == "rate_limited"]
        executed = [d for d in docs if d.get("status") != "rate_limited"]
        unanswered = telemetry.get("commands_unanswered")
        ids, other_lines, dropped = broker_agent_lines(broker, {tap.client_id, sender.client_id})
        rid_counts = tap.rid_counts()
        with capsys.disabled():
            print(f"\n[flood] sent={flood} published in {published:.1f} s, accounted after {elapsed:.1f} s: "
                  f"replies={len(docs)} (rate_limited={len(limited)}, executed={len(executed)}) "
                  f"unanswered={unanswered} rate_limited_total={telemetry.get('commands_rate_limited')} "
                  f"broker drops={dropped} agent connections={len(ids)}")  # fmt: skip
        assert agent.is_alive(), agent.log_excerpt()
        assert len(ids) == 1 and not other_lines, (ids, other_lines[:10])
        assert all(m.payload == b"online" for m in tap.messages(f"{base}/status"))
        assert settled, f"replies {len(docs)} + unanswered {unanswered} never reached {flood - dropped}"
        assert isinstance(unanswered, int), telemetry
        assert len(docs) + unanswered == flood - dropped, (len(docs), unanswered, dropped)
        assert not [r for r in rids if rid_counts[r] > 1], "a request id was answered twice"
        assert all(d.get("ok") is False for d in limited), "a rate_limited reply says ok"
        # The limiter lets the burst through, then 5/s: everything else is refused or shed.
        budget = 20 + 5 * (elapsed + 1) + 5
        assert 20 <= len(executed) <= budget, (len(executed), budget)
        assert len(limited) + unanswered >= flood - dropped - budget
        assert int(telemetry.get("commands_rate_limited", -1)) >= len(limited), telemetry

        # Afterwards a normal task runs (commands are refused only while the bucket is empty).
        finals = final_task(fz, "cam1", "after-flood", {"completed"})
        assert finals["status"] == "completed", finals
        assert agent.is_alive() and len(broker_agent_lines(broker, {tap.client_id, sender.client_id})[0]) == 1
    finally:
        sender.close()
        tap.close()
