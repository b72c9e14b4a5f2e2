"""Unit tests of the defences against hostile input (issue 9): naming rule, response-topic policy,
rate limits, journal quarantine, redaction, secret files, child environment, the link's outbox.
Fakes at the agent's seams (from test_unit_agent); the outbox test uses a real paho client object
that never connects."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_unit_agent import CAM_PASSWORD, FakePublisher, Harness, make_config, make_harness

from edge_agent import names
from edge_agent.configload import load_config, parse_config, secret_values
from edge_agent.errors import ConfigError
from edge_agent.ffmpeg import child_env
from edge_agent.journal import Journal
from edge_agent.limits import InboundGate, TokenBucket
from edge_agent.mqtt import CommandReceived, MqttLink, OutboxReady
from edge_agent.redact import redact, url_secrets
from edge_agent.tasks import Task, utc_now
from edge_agent.topics import Topics

P_D = "edge/edge-01"


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    journals: list[Journal] = []

    def factory(storage: dict[str, Any] | None = None, **sections: Any) -> Harness:
        cfg = make_config(tmp_path, storage, **sections)
        return make_harness(tmp_path, cfg, FakePublisher(), journals)

    yield factory
    for j in journals:
        j.close()


def send(h: Harness, payload: bytes | dict[str, Any], camera: str = "cam1", response_topic: str | None = None) -> None:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.agent.handle(CommandReceived(camera, raw, response_topic, b"c" if response_topic else None))


# ---- response topics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("edge/edge-01/cam1/cmd", "device command and status"),
        ("edge/other-device/cam1/status", "device command and status"),
        ("edge/edge-01/cam1/tasks/x", "device command and status"),
        ("homeassistant/device/x/config", "Home Assistant"),
        ("$SYS/broker/x", "'$'"),
        ("nodered/#", "wildcards"),
        ("zigbee2mqtt/lamp/cmd", "command topic"),
        ("zigbee2mqtt/lamp/set", "not allowed by mqtt.response_topics"),
        ("nodered/\ufdd0", "noncharacter"),
    ],
)
def test_refused_response_topic_is_answered_on_the_reply_topic_and_not_executed(
    build: Callable[..., Harness], topic: str, why: str
) -> None:
    h = build()
    send(h, {"action": "start", "task_name": "t", "request_id": "r1"}, response_topic=topic)
    assert len(h.pub.replies) == 1
    reply_topic, payload, response_topic, _ = h.pub.replies[0]
    assert reply_topic == f"{P_D}/cam1/reply" and response_topic is None
    doc = json.loads(payload)
    assert doc["ok"] is False and doc["request_id"] == "r1"
    assert "response topic refused" in doc["error"] and why in doc["error"]
    assert h.recorders == []  # not executed


@pytest.mark.parametrize(
    "topic", ["nodered/responses", "responses/abc", "app/responses/x/y", f"{P_D}/_ctl/edge-ctl-1/reply"]
)
def test_allowed_response_topics(build: Callable[..., Harness], topic: str) -> None:
    h = build()
    send(h, {"action": "status"}, response_topic=topic)
    assert h.pub.replies[-1][2] == topic
    assert json.loads(h.pub.replies[-1][1])["ok"] is True


def test_response_topic_filters_are_configurable(build: Callable[..., Harness]) -> None:
    h = build(mqtt={"response_topics": ["plant/+/answers"]})
    send(h, {"action": "status"}, response_topic="plant/7/answers")
    assert h.pub.replies[-1][2] == "plant/7/answers"
    send(h, {"action": "status"}, response_topic="nodered/responses")
    assert h.pub.replies[-1][2] is None


@pytest.mark.parametrize("bad", ["#", "#/x", "$SYS/#", "a/#/b", "a+/b"])
def test_response_topic_filter_config_is_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.response_topics"):
        make_config(tmp_path, mqtt={"response_topics": [bad]})


# ---- limits -----------------------------------------------------------------------------------------


def test_rate_limit_answers_then_counts_and_recovers(build: Callable[..., Harness]) -> None:
    h = build(mqtt={"commands_per_second": 0.001, "command_burst": 3})
    for i in range(10):
        send(h, {"action": "status", "request_id": f"r{i}"})
    docs = [json.loads(p) for (_t, p, _r, _c) in h.pub.replies]
    assert [d["status"] for d in docs] == ["idle"] * 3 + ["rate_limited"] * 3
    assert all(d["ok"] is False and "retry_after_seconds" in d for d in docs[3:])
    tele = h.agent.report.telemetry_doc()
    assert tele["commands_received"] == 10
    assert tele["commands_rate_limited"] == 3
    assert tele["commands_unanswered"] == 4
    assert tele["commands_received"] == len(docs) + tele["commands_unanswered"]


def test_unknown_cameras_share_one_bucket(build: Callable[..., Harness]) -> None:
    h = build(mqtt={"commands_per_second": 0.001, "command_burst": 2})
    for i in range(6):
        send(h, {"action": "status"}, camera=f"x{i}")
    statuses = [json.loads(p)["status"] for (_t, p, _r, _c) in h.pub.replies]
    assert statuses == ["error", "error", "rate_limited", "rate_limited"]
    send(h, {"action": "status"}, camera="cam1")  # a configured camera has its own budget
    assert json.loads(h.pub.replies[-1][1])["status"] == "idle"


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    assert bucket.seconds_to_next() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() is True and bucket.take() is False


def test_inbound_gate_sheds_beyond_its_bound_and_agent_counts_it(build: Callable[..., Harness]) -> None:
    gate = InboundGate(2)
    assert [gate.admit() for _ in range(4)] == [True, True, False, False]
    assert gate.shed == 2 and gate.waiting == 2
    gate.done()
    assert gate.admit() is True


def test_a_flood_on_extra_topics_leaves_room_for_camera_commands() -> None:
    gate = InboundGate(4)
    assert [gate.admit(extra=True) for _ in range(5)] == [True, True, False, False, False]  # half the bound
    assert [gate.admit() for _ in range(3)] == [True, True, False]  # the rest stays for the cameras
    assert gate.shed == 4 and gate.waiting == 4
    gate.done(extra=True)
    assert gate.admit(extra=True) is True


def test_parser_failures_get_a_reply_not_a_traceback(build: Callable[..., Harness]) -> None:
    h = build()
    for payload in (b"[" * 60000, b'{"action":"start","task_name":"t","max_seconds":' + b"9" * 5000 + b"}",
                    b"\xff\xfe", b'{"action":"start","task_name":"evil\\ufdd0"}',
                    b'{"action":"start","task_name":"100%d"}', b'{"action":"start","task_name":"..\\/x"}'):
        send(h, payload)
    docs = [json.loads(p) for (_t, p, _r, _c) in h.pub.replies]
    assert len(docs) == 6 and all(d["ok"] is False and d["status"] == "rejected" for d in docs)
    assert "noncharacter U+FDD0" in docs[3]["error"] and "'%'" in docs[4]["error"]
    assert h.recorders == []


# ---- journal quarantine -----------------------------------------------------------------------------


def test_journal_entries_breaking_the_rule_are_quarantined_not_republished(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    journal = Journal(tmp_path / "rec" / ".edge-agent.sqlite3")
    bad = Task(task_id="cam1/evil\ufdd0_1", camera_id="cam1", task_name="evil\ufdd0", device_id="edge-01",
               started=utc_now(), storage_type="local", local_file=str(tmp_path / "x.mp4"), max_seconds=5,
               status="completed")  # fmt: skip
    good = Task(task_id="cam1/fine_1", camera_id="cam1", task_name="fine", device_id="edge-01",
                started=utc_now(), storage_type="local", local_file=str(tmp_path / "y.mp4"), max_seconds=5,
                status="completed")  # fmt: skip
    journal.save(bad)
    journal.save(good)
    pub = FakePublisher()
    h = make_harness(tmp_path, cfg, pub, [journal])
    h.agent.recover()
    h.agent.report.republish_all()
    topics = [t for (t, _p, _r) in pub.published]
    assert f"{P_D}/cam1/tasks/fine" in topics
    assert not any("\ufdd0" in t for t in topics)
    assert h.journal.find("cam1", "evil\ufdd0") is None
    rows = sqlite3.connect(str(journal.path)).execute("SELECT task_id, reason FROM quarantine").fetchall()
    assert len(rows) == 1 and rows[0][0] == "cam1/evil\ufdd0_1" and "noncharacter U+FDD0" in rows[0][1]
    h.journal.close()


# ---- redaction and secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("rtsp://admin:p@ssw0rd!@10.0.0.5:554/s", "ssw0rd"),  # '@' in the password
        ("http://cam/snap?user=a&password=hunter22&x=1", "hunter22"),
        ("https://s3/b/o?X-Amz-Credential=AK%2F1&X-Amz-Signature=deadbeef", "deadbeef"),
        ("ConnectionError: rtsp://u:zz9@h failed", "zz9"),
    ],
)
def test_redact_masks_credentials(text: str, secret: str) -> None:
    assert secret not in redact(text)


def test_redact_masks_known_secrets_in_any_form() -> None:
    secrets = ("p@ss/w rd",)
    for form in ("p@ss/w rd", "p%40ss%2Fw%20rd", "p%40ss%2Fw+rd"):
        assert "p@ss" not in redact(f"error near {form} here", secrets)
        assert "ss%2F" not in redact(f"error near {form} here", secrets)


def test_url_secrets_handles_at_in_password_and_query_credentials() -> None:
    assert url_secrets("rtsp://admin:p@ss@h:554/x?token=t0k") == ["p@ss", "t0k"]


def test_secret_values_cover_every_configured_secret(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {**{"type": "minio", "access_key": "ak", "secret_key": "s3-secret"}},
                      mqtt={"username": "u", "password": "mq-secret"})  # fmt: skip
    values = secret_values(cfg)
    assert {CAM_PASSWORD, "s3-secret", "mq-secret"} <= set(values)


def test_secrets_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mq").write_text("from-file-pw\n")
    (tmp_path / "cam").write_text("rtsp://u:c@m-pw@192.0.2.1/s\n")
    (tmp_path / "s3").write_text("s3-from-file")
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(
        "device_id: d1\n"
        "mqtt: {username: u, password_file: '${CREDENTIALS_DIRECTORY}/mq'}\n"
        f"cameras: {{cam1: {{url_file: {tmp_path / 'cam'}}}}}\n"
        f"storage: {{type: minio, access_key: ak, secret_key_file: {tmp_path / 's3'}}}\n"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # systemd LoadCredential= sets it
    cfg = load_config(cfg_file, env={})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "from-file-pw"
    assert cfg.cameras["cam1"].url.get_secret_value() == "rtsp://u:c@m-pw@192.0.2.1/s"
    assert cfg.storage.secret_key is not None and cfg.storage.secret_key.get_secret_value() == "s3-from-file"


def test_secret_file_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read .*nope"):
        parse_config({"device_id": "d", "mqtt": {"password_file": str(tmp_path / "nope")}}, env={})
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ConfigError, match=r"either mqtt\.password or mqtt\.password_file"):
        parse_config({"device_id": "d", "mqtt": {"password": "a", "password_file": str(tmp_path / "pw")}}, env={})


def test_children_get_a_minimal_environment() -> None:
    parent = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "EDGE_AGENT_MQTT_PASSWORD": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    env = child_env(parent)
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8"}


def test_qos_2_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.qos"):
        make_config(tmp_path, mqtt={"qos": 2})


# ---- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "topic", "match"),
    [("a/#", "a/b/c", True), ("a/+/c", "a/b/c", True), ("a/+", "a/b/c", False), ("#", "$SYS/x", False),
     ("a/b", "a/b", True), ("+/responses/#", "x/responses", True)],
)
def test_filter_matches(flt: str, topic: str, match: bool) -> None:
    assert names.filter_matches(flt, topic) is match


# ---- the link's outbox (real paho client object, never connected) ---------------------------------


def test_retained_values_that_do_not_fit_are_coalesced_and_flushed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, mqtt={"outbound_queue": 100, "qos": 0})
    posted: list[Any] = []
    link = MqttLink(cfg.mqtt, Topics("edge", "edge-01"), "t", posted.append)
    # QoS 0 while not connected: paho cannot take it. Replies are counted as dropped; retained
    # statuses are kept, newest per topic, for when there is room.
    link.reply(f"{P_D}/cam1/reply", b"r", None, None)
    for i in range(5):
        link.publish(f"{P_D}/cam1/status", f"s{i}".encode(), retain=True)
    link.publish(f"{P_D}/cam2/status", b"other", retain=True)
    stats = link.publish_stats()
    assert stats["publishes_dropped"] == 1
    assert stats["retained_waiting"] == 2 and stats["retained_coalesced"] == 4
    held = link._outbox.take_held(10)
    assert held == [(f"{P_D}/cam1/status", b"s4"), (f"{P_D}/cam2/status", b"other")]
    assert OutboxReady not in [type(p) for p in posted]


def test_link_refuses_invalid_topics_instead_of_getting_disconnected(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    link = MqttLink(cfg.mqtt, Topics("edge", "edge-01"), "t", lambda e: None)
    link.publish(f"{P_D}/cam1/tasks/evil\ufdd0", b"x", retain=True)
    link.publish(f"{P_D}/cam1/tasks/a#b", b"x", retain=True)
    assert link.publish_stats()["publishes_refused"] == 2
    assert link.publish_stats()["retained_waiting"] == 0


def test_own_ctl_inbox_space_is_allowed_but_not_a_cmd_topic(build: Callable[..., Harness]) -> None:
    h = build()
    send(h, {"action": "status"}, response_topic=f"{P_D}/_ctl/inbox")
    assert h.pub.replies[-1][2] == f"{P_D}/_ctl/inbox"
    send(h, {"action": "status"}, response_topic=f"{P_D}/_ctl/x/cmd")
    assert h.pub.replies[-1][2] is None and json.loads(h.pub.replies[-1][1])["ok"] is False


def test_ctl_is_a_reserved_camera_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        parse_config({"device_id": "d", "cameras": {"_ctl": {"url": "rtsp://h/s"}}}, env={})


def test_a_command_whose_reply_topic_cannot_exist_is_counted_unanswered(build: Callable[..., Harness]) -> None:
    h = build()
    send(h, {"action": "status"}, camera="g" * 70000)
    assert h.pub.replies == []
    tele = h.agent.report.telemetry_doc()
    assert tele["commands_received"] == 1 and tele["commands_unanswered"] == 1
