"""Unit tests of command parsing (`edge_agent.messages`) and the topic layout (`edge_agent.topics`)."""

from __future__ import annotations

import json
import re

import pytest

from edge_agent.errors import CommandError
from edge_agent.messages import decode_command, dumps, parse_command, validate_task_name
from edge_agent.topics import Topics

LIMIT = 65536


def cmd_bytes(**fields: object) -> bytes:
    return json.dumps(fields).encode("utf-8")


def rejection(payload: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(CommandError) as info:
        parse_command(payload, limit)
    return str(info.value)


# ---- parse_command: valid ------------------------------------------------------------------------


def test_parse_start_with_all_fields() -> None:
    cmd = parse_command(cmd_bytes(action="start", task_name="夜间巡检", request_id="r-1", max_seconds=30), LIMIT)
    assert (cmd.action, cmd.task_name, cmd.request_id, cmd.max_seconds) == ("start", "夜间巡检", "r-1", 30)


def test_parse_stop_and_query() -> None:
    assert parse_command(cmd_bytes(action="stop", task_name="t1"), LIMIT).action == "stop"
    query = parse_command(cmd_bytes(action="query", task_name="t1"), LIMIT)
    assert query.action == "query"
    assert query.task_name == "t1"
    assert query.max_seconds is None


def test_parse_status_needs_no_task_name() -> None:
    cmd = parse_command(b'{"action":"status"}', LIMIT)
    assert cmd.action == "status"
    assert cmd.task_name is None
    assert cmd.request_id is None


@pytest.mark.parametrize("action", ["start", "stop", "query"])
def test_task_name_required(action: str) -> None:
    assert "needs a task_name" in rejection(cmd_bytes(action=action))


# ---- parse_command: rejections name the problem --------------------------------------------------


def test_malformed_json() -> None:
    assert "not valid JSON" in rejection(b'{"action": "start", ')


@pytest.mark.parametrize("payload", [b"[]", b'"start"', b"42", b"null"])
def test_non_object(payload: bytes) -> None:
    assert "JSON object" in rejection(payload)


def test_max_seconds_as_string_rejected() -> None:
    text = rejection(cmd_bytes(action="start", task_name="t", max_seconds="10"))
    assert "max_seconds" in text
    assert "integer" in text


@pytest.mark.parametrize("value", [0, -5, 1.5, True])
def test_max_seconds_other_bad_values(value: object) -> None:
    assert "max_seconds" in rejection(cmd_bytes(action="start", task_name="t", max_seconds=value))


def test_task_name_as_int_rejected() -> None:
    text = rejection(cmd_bytes(action="start", task_name=5))
    assert "task_name" in text
    assert "string" in text


def test_unknown_action() -> None:
    text = rejection(cmd_bytes(action="pause", task_name="t"))
    assert "action" in text
    assert "'start'" in text


def test_unknown_extra_key() -> None:
    text = rejection(cmd_bytes(action="start", task_name="t", priority=1))
    assert "priority" in text
    assert "Extra inputs" in text


def test_request_id_wrong_type() -> None:
    assert "request_id" in rejection(cmd_bytes(action="status", request_id=7))


def test_oversized_payload() -> None:
    payload = cmd_bytes(action="start", task_name="t", request_id="x" * 300)
    text = rejection(payload, limit=256)
    assert "exceeds" in text
    assert "256" in text


def test_payload_at_limit_accepted() -> None:
    payload = cmd_bytes(action="status")
    assert parse_command(payload, len(payload)).action == "status"


def test_non_utf8() -> None:
    assert "UTF-8" in rejection(b'{"action":"start","task_name":"\xff\xfe"}')


def test_bad_task_name_in_command_rejected() -> None:
    assert "'/'" in rejection(cmd_bytes(action="start", task_name="a/b"))


def test_bad_task_name_rejected_on_status_too() -> None:
    assert "'#'" in rejection(cmd_bytes(action="status", task_name="a#b"))


def test_pydantic_detail_not_leaked_as_url() -> None:
    text = rejection(cmd_bytes(action="start", task_name="t", max_seconds="10"))
    assert "errors.pydantic.dev" not in text


# ---- validate_task_name --------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["/", "+", "#", "\\", "%"])
def test_task_name_forbidden_topic_chars(char: str) -> None:
    with pytest.raises(CommandError, match="must not contain"):
        validate_task_name(f"a{char}b")


@pytest.mark.parametrize("name", ["a\nb", "a\u202eb", "a\tb", "a\u2028b", "\x7f"])
def test_task_name_control_chars(name: str) -> None:
    with pytest.raises(CommandError, match="control or format"):
        validate_task_name(name)


@pytest.mark.parametrize("name", [".", "..", ".hidden"])
def test_task_name_leading_dot(name: str) -> None:
    with pytest.raises(CommandError, match=r"start with '\.'"):
        validate_task_name(name)


@pytest.mark.parametrize("name", ["", "   "])
def test_task_name_empty(name: str) -> None:
    with pytest.raises(CommandError, match="empty"):
        validate_task_name(name)


def test_task_name_byte_limit_counts_utf8() -> None:
    assert validate_task_name("夜" * 40) == "夜" * 40  # exactly 120 bytes
    assert validate_task_name("a" * 120) == "a" * 120
    with pytest.raises(CommandError, match="120 bytes"):
        validate_task_name("夜" * 41)  # 41 characters, 123 bytes
    with pytest.raises(CommandError, match="120 bytes"):
        validate_task_name("a" * 121)


@pytest.mark.parametrize("name", ["夜间巡检", "café 1", "front-door_2026.11.28", "a.b"])
def test_task_name_accepted(name: str) -> None:
    assert validate_task_name(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("evil\ufdd0", "noncharacter U+FDD0"),  # Mosquitto drops the publishing client for this
        ("a\ufffe", "noncharacter U+FFFE"),
        ("a\U0001ffff", "noncharacter U+1FFFF"),
        ("a\ud800b", "surrogate U+D800"),
        ("a\x00b", "U+0000"),
        ("100%d", "'%'"),  # an FFmpeg filename template in the segment path
        (" padded", "whitespace"),
    ],
)
def test_task_name_mqtt_utf8_and_template_rules(name: str, rule: str) -> None:
    with pytest.raises(CommandError, match=re.escape(rule)):
        validate_task_name(name)


def test_noncharacter_in_json_command_is_rejected_naming_the_rule() -> None:
    decoded = decode_command(b'{"action":"start","task_name":"evil\\ufdd0","request_id":"r1"}', 65536)
    assert decoded.command is None and decoded.request_id == "r1"
    assert decoded.error is not None and "noncharacter U+FDD0" in decoded.error


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"action":"start","task_name":"t","max_seconds":' + b"9" * 5000 + b"}", "cannot be decoded"),
        (b'{"action":"status","request_id":"a\\nb"}', "request_id"),
    ],
)
def test_parser_limits_are_answered_not_raised(payload: bytes, problem: str) -> None:
    decoded = decode_command(payload, 1 << 20)
    assert decoded.command is None and decoded.error is not None and problem in decoded.error


def test_size_is_checked_before_parsing() -> None:
    decoded = decode_command(b'{"request_id":"r"' + b" " * 1000 + b"}", 256)
    assert decoded.request_id is None  # never parsed
    assert decoded.error is not None and "exceeds the 256-byte limit" in decoded.error


# ---- request_id_of / dumps -----------------------------------------------------------------------


def request_id_of(payload: bytes) -> str | None:
    return decode_command(payload, 65536).request_id


def test_request_id_of_a_rejected_payload() -> None:
    assert request_id_of(b'{"action":"nope","request_id":"abc"}') == "abc"
    assert request_id_of(b'{"request_id":5}') is None
    assert request_id_of(b"[1]") is None
    assert request_id_of(b"{broken") is None
    assert request_id_of(b"\xff") is None
    assert request_id_of(json.dumps({"request_id": "x" * 201}).encode()) is None
    assert request_id_of(json.dumps({"action": "status", "request_id": "a\nforged"}).encode()) is None


def test_dumps_keeps_non_ascii_readable() -> None:
    out = dumps({"task_name": "夜间巡检", "n": 1})
    assert out == '{"task_name":"夜间巡检","n":1}'.encode()


# ---- topics ---------------------------------------------------------------------------------------


TOPICS = Topics("site/a", "edge-01")


def test_topic_builders() -> None:
    assert TOPICS.base == "site/a/edge-01"
    assert TOPICS.availability == "site/a/edge-01/status"
    assert TOPICS.uploads == "site/a/edge-01/uploads"
    assert TOPICS.command_filter == "site/a/edge-01/+/cmd"
    assert TOPICS.command("cam1") == "site/a/edge-01/cam1/cmd"
    assert TOPICS.reply("cam1") == "site/a/edge-01/cam1/reply"
    assert TOPICS.status("cam1") == "site/a/edge-01/cam1/status"
    assert TOPICS.task("cam1", "夜间巡检") == "site/a/edge-01/cam1/tasks/夜间巡检"


def test_camera_of_command_round_trip() -> None:
    assert TOPICS.camera_of_command(TOPICS.command("cam-2")) == "cam-2"


@pytest.mark.parametrize(
    "topic",
    [
        "site/a/edge-01/cam1/reply",
        "site/a/edge-01/cam1/status",
        "site/a/edge-01/a/b/cmd",  # multi-level camera
        "site/a/edge-01//cmd",
        "site/a/edge-01/cmd",
        "site/a/edge-02/cam1/cmd",  # another device
        "site/a/edge-01x/cam1/cmd",  # device id that only starts the same
        "other/edge-01/cam1/cmd",
        "site/a/edge-01/cam1/cmd/extra",
        "site/a/edge-01/cam1/tasks/cmd",
    ],
)
def test_camera_of_command_rejects_other_topics(topic: str) -> None:
    assert TOPICS.camera_of_command(topic) is None


# ---- pre-roll and export ----------------------------------------------------------------------------


def test_start_with_pre_roll_and_export_with_a_range() -> None:
    start = decode_command(b'{"action":"start","task_name":"door","pre_roll_seconds":7.5}', 4096).command
    assert start is not None and start.pre_roll_seconds == 7.5
    export = decode_command(b'{"action":"export","task_name":"x","from":"2026-12-06T16:00:00Z",'
                            b'"to":"2026-12-06T16:00:10.5Z"}', 4096).command  # fmt: skip
    assert export is not None and export.range_from is not None and export.range_to is not None
    assert (export.range_to - export.range_from).total_seconds() == 10.5


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"action": "export", "task_name": "x", "from": "2026-12-06T16:00:00Z"}, "needs from and to"),
        ({"action": "export", "task_name": "x", "from": "2026-12-06T16:00:10Z", "to": "2026-12-06T16:00:00Z"},
         "to must be after from"),
        ({"action": "export", "task_name": "x", "from": "2026-12-06T16:00:00", "to": "2026-12-06T16:00:10Z"},
         "UTC time with its zone"),
        ({"action": "export", "from": "2026-12-06T16:00:00Z", "to": "2026-12-06T16:00:10Z"}, "needs a task_name"),
        ({"action": "start", "task_name": "x", "to": "2026-12-06T16:00:10Z"}, "for export, not start"),
        ({"action": "start", "task_name": "x", "pre_roll_seconds": -1}, "pre_roll_seconds"),
        ({"action": "start", "task_name": "x", "pre_roll_seconds": "10"}, "pre_roll_seconds"),
    ],
)
def test_bad_pre_roll_and_ranges_are_named(payload: dict[str, object], problem: str) -> None:
    decoded = decode_command(json.dumps(payload).encode(), 4096)
    assert decoded.command is None and decoded.error is not None and problem in decoded.error, decoded


def test_snapshot_upload_is_a_boolean_for_snapshot_only() -> None:
    for value in (True, False):
        cmd = decode_command(json.dumps({"action": "snapshot", "upload": value}).encode(), 4096).command
        assert cmd is not None and cmd.upload is value
    plain = decode_command(b'{"action":"snapshot"}', 4096).command
    assert plain is not None and plain.upload is None


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"action": "snapshot", "upload": "yes"}, "upload: Input should be a valid boolean"),
        ({"action": "snapshot", "upload": 1}, "upload: Input should be a valid boolean"),
        ({"action": "start", "task_name": "x", "upload": True}, "upload is for snapshot, not start"),
    ],
)
def test_bad_snapshot_upload_is_named(payload: dict[str, object], problem: str) -> None:
    decoded = decode_command(json.dumps(payload).encode(), 4096)
    assert decoded.command is None and decoded.error is not None and problem in decoded.error, decoded
