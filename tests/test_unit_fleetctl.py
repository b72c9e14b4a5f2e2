"""Unit tests of `edge-agent ctl` for fleets and the desired configuration, without a broker.

Argument combinations and their exit codes, the table and JSON rows and the exit code they give,
glob matching over retained availability, group membership from retained reports, the version a
`config set` chooses, what `reported` means for it, the local check of a desired document, its
redaction and the diff. The paths over a real broker are in tests/test_fleetctl.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent import configctl, ctl, fleetctl, remoteconfig
from edge_agent.cli import build_parser, main
from edge_agent.ctlconn import Msg
from edge_agent.messages import decode_command, decode_group_command
from edge_agent.topics import Topics

CAM_PASSWORD = "cam-pw-41x"
S3_SECRET = "s3-secret-77q"


# ---- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ctl", "--group", "g", "query", "cam1", "t"], "--group works with start, stop, status"),
        (["ctl", "--group", "g", "--device", "d", "status"], "exclude each other"),
        (["ctl", "--group", "g", "start", "cam1", "--cameras", "cam2"], "not both"),
        (["ctl", "--group", "g", "start", "--wait"], "--wait"),
        (["ctl", "--device", "a-*", "start", "cam1", "--wait"], "--wait"),
        (["ctl", "--device", "a-*", "watch"], "a --device pattern works with"),
        (["ctl", "--device", "a-*", "config", "get"], "a --device pattern works with"),
        (["ctl", "status", "cam1", "--cameras", "cam2"], "--cameras is for --group"),
        (["ctl", "status"], "status needs a CAMERA (or --group G)"),
        (["ctl", "export", "cam1", "t", "--from", "2026-12-06T16:00:00"], "give the zone"),
        (["ctl", "export", "cam1", "t", "--to", "2026-12-06T16:00:00Z"], "--from"),
        (["ctl", "config", "set"], "FILE"),
        (["ctl", "config", "set", "f.yaml", "--version", "0"], "must be >= 1"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_group_and_pattern_arguments_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["ctl", "--group", "site-a", "start", "--cameras", "cam1,cam2", "--json"])
    assert (args.group, args.action, args.camera, args.cameras, args.json) == ("site-a", "start", None,
                                                                               ["cam1", "cam2"], True)  # fmt: skip
    assert ctl.usage_problem(args) is None
    args = parser.parse_args(["ctl", "status", "cam1", "--device", "site-a-*"])
    assert ctl.is_pattern(args.device) and ctl.usage_problem(args) is None
    assert not ctl.is_pattern("edge-01") and not ctl.is_pattern(None)
    args = parser.parse_args(["ctl", "--group", "g", "stop", "cam1,cam2", "patrol"])
    payload = fleetctl.group_payload(args, ["cam1", "cam2"])
    assert payload["action"] == "stop" and payload["task_name"] == "patrol" and payload["cameras"] == ["cam1", "cam2"]
    assert payload["request_id"].startswith("ctl-")


def test_group_start_without_a_task_name_gets_one_for_every_member() -> None:
    args = build_parser().parse_args(["ctl", "--group", "g", "start", "--max-seconds", "30"])
    payload = fleetctl.group_payload(args, None)
    assert "cameras" not in payload and payload["task_name"].startswith("ctl-") and payload["max_seconds"] == 30
    status = fleetctl.group_payload(build_parser().parse_args(["ctl", "--group", "g", "status"]), None)
    assert set(status) == {"action", "request_id"}


def test_group_payloads_are_what_the_agent_accepts() -> None:
    parser = build_parser()
    for argv in (["start", "cam1,cam2", "patrol", "--max-seconds", "60"], ["stop"], ["status", "--cameras", "c"]):
        args = parser.parse_args(["ctl", "--group", "g", *argv])
        cameras = args.cameras or (args.camera.split(",") if args.camera else None)
        payload = fleetctl.group_payload(args, cameras)
        cmd, rid, error = decode_group_command(json.dumps(payload).encode(), 65536)
        assert cmd is not None and error is None and rid == payload["request_id"], (argv, error)
        assert cmd.action == argv[0] and cmd.cameras == cameras


def test_export_and_snapshot_payloads_are_what_the_agent_accepts() -> None:
    parser = build_parser()
    args = parser.parse_args(["ctl", "export", "cam1", "clip-1", "--from", "2026-12-06T16:00:00Z",
                              "--to", "2026-12-06T17:00:00+01:00"])  # fmt: skip
    assert args.range_to == datetime(2026, 12, 6, 16, 0, tzinfo=UTC)  # normalised to UTC
    cmd = {**ctl.command_payload(args, args.task), "request_id": "r"}
    assert cmd["action"] == "export" and cmd["task_name"] == "clip-1"
    decoded = decode_command(json.dumps(cmd).encode(), 65536)
    assert decoded.error == "export: to must be after from"  # the agent's own check (17:00+01:00 == 16:00Z)
    args = parser.parse_args(["ctl", "export", "cam1", "clip-1", "--from", "2026-12-06T16:00:00Z",
                              "--to", "2026-12-06T16:05:00Z"])  # fmt: skip
    decoded = decode_command(json.dumps({**ctl.command_payload(args, args.task), "request_id": "r"}).encode(), 65536)
    assert decoded.command is not None and decoded.command.task_name == "clip-1", decoded.error
    args = parser.parse_args(["ctl", "snapshot", "cam1", "--output", "x.jpg"])
    snap = {**ctl.command_payload(args, args.task), "request_id": "r"}
    assert snap == {"action": "snapshot", "request_id": "r"} and args.output == Path("x.jpg")
    assert decode_command(json.dumps(snap).encode(), 65536).command is not None


def test_human_line_shows_a_snapshot_s_frame_time() -> None:
    doc = {"camera_id": "cam1", "status": "snapshot", "ok": True, "frame_time": "2026-12-06T16:00:00.000Z",
           "bytes": 1234}  # fmt: skip
    assert ctl.human_line(doc) == "cam1: snapshot (frame_time: 2026-12-06T16:00:00.000Z, bytes: 1234)"


# ---- fleet rows -----------------------------------------------------------------------------------


def msg(topic: str, payload: bytes | dict[str, Any]) -> Msg:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return Msg(topic, data, None, True)


def test_online_devices_from_retained_availability_and_glob() -> None:
    msgs = [msg("p/x/site-a-1/status", b"online"), msg("p/x/site-a-2/status", b"offline"),
            msg("p/x/site-a-3/status", b"online"), msg("p/x/site-a-3/cam1/status", b"{}"),
            msg("p/x/site-b-1/status", b"online"), msg("other/site-a-9/status", b"online"),
            msg("p/x/site-a-2/status", b"online"), msg("p/x/site-a-3/status", b"offline")]  # fmt: skip
    seen = fleetctl.online(msgs, "p/x")
    assert seen == ["site-a-1", "site-a-2", "site-b-1"]  # the newest message per device counts
    assert fleetctl.matching(seen, "site-a-*") == ["site-a-1", "site-a-2"]
    assert fleetctl.matching(seen, "site-?-1") == ["site-a-1", "site-b-1"]
    assert fleetctl.matching(seen, "SITE-*") == []  # device ids are case-sensitive
    assert fleetctl.device_of("p/x/d1/groups/g/reply", "p/x") == "d1" and fleetctl.device_of("q/d1", "p/x") is None


def test_group_members_from_retained_reports() -> None:
    msgs = [msg("p/d1/config/reported", {"version": 1, "groups": ["g", "all"]}),
            msg("p/d2/config/reported", {"version": 1, "groups": ["all"]}),
            msg("p/d3/config/reported", {"version": None}),
            msg("p/d4/config/reported", b"not json"),
            msg("p/d5/config/reported", {"groups": ["g"]}), msg("p/d5/config/reported", b""),
            msg("p/d6/config/desired", {"groups": ["g"]})]  # fmt: skip
    assert fleetctl.members(msgs, "p", "g") == ["d1"]
    assert fleetctl.members(msgs, "p", "all") == ["d1", "d2"]


def test_table_and_exit_code() -> None:
    rows = [
        fleetctl.Row.of("d2", "cam1", {"ok": True, "status": "recording", "task_name": "t", "camera_id": "cam1"}),
        fleetctl.Row.missing("d3", "cam1"),
        fleetctl.Row.of("d1", "cam1", {"ok": False, "status": "task_mismatch", "running_task": "other"}),
    ]
    table = fleetctl.render_table(sorted(rows, key=lambda r: r.device)).splitlines()
    assert table[0].split() == ["DEVICE", "CAMERA", "OK", "STATUS", "TASK", "ERROR"]
    assert table[1].split() == ["d1", "cam1", "no", "task_mismatch", "-", "running_task:", "other"]
    assert table[2].split() == ["d2", "cam1", "yes", "recording", "t"]
    assert table[3].split() == ["d3", "cam1", "no", "no", "reply", "-"]
    assert len({line.index("CAMERA") for line in table[:1]} | {line.index("cam1") for line in table[1:]}) == 1
    assert fleetctl.summary(rows) == "1 of 3 ok on 3 devices, 1 without reply"
    assert fleetctl.report(rows, as_json=False) == ctl.EXIT_FAILED
    assert fleetctl.report([rows[0]], as_json=False) == ctl.EXIT_OK
    assert fleetctl.report([], as_json=False) == ctl.EXIT_FAILED


def test_json_rows_carry_device_and_camera(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [fleetctl.Row.of("d1", "cam1", {"ok": True, "status": "idle", "request_id": "r"}),
            fleetctl.Row.missing("d2", "cam1")]  # fmt: skip
    assert fleetctl.report(rows, as_json=True) == ctl.EXIT_FAILED
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"ok": True, "status": "idle", "request_id": "r", "device_id": "d1", "camera_id": "cam1"}
    assert lines[1] == {"device_id": "d2", "camera_id": "cam1", "ok": False, "status": "no reply"}


def test_group_reply_becomes_one_row_per_camera() -> None:
    doc = {"request_id": "r", "device_id": "d1", "ok": False, "results": {
        "cam2": {"ok": False, "status": "error", "error": "unknown camera"},
        "cam1": {"ok": True, "status": "recording", "task_name": "t"}}}  # fmt: skip
    rows = fleetctl.group_rows("d1", doc)
    assert [(r.camera, r.ok, r.status, r.task, r.error) for r in rows] == [
        ("cam1", True, "recording", "t", ""), ("cam2", False, "error", "", "unknown camera")]  # fmt: skip
    bare = fleetctl.group_rows("d2", {"ok": False, "error": "no cameras configured"})
    assert [(r.camera, r.ok, r.status, r.error) for r in bare] == [("-", False, "error", "no cameras configured")]


def test_request_matches_its_reply_only() -> None:
    req = ctl.Request("cam1", {"action": "status", "request_id": "r1"}, "p/d/cam1/cmd", "p/d/cam1/reply",
                      "p/d/_ctl/c/reply")  # fmt: skip
    assert req.answered_by(Msg("p/d/cam1/reply", b"", None), {"request_id": "r1"})
    assert not req.answered_by(Msg("p/d/cam1/reply", b"", None), {"request_id": "r2"})
    assert req.answered_by(Msg("p/d/_ctl/c/reply", b"", b"r1"), {})
    assert not req.answered_by(Msg("p/d/_ctl/c/reply", b"", b"r2"), {"request_id": "r1"})
    assert req.subscriptions == ["p/d/cam1/reply", "p/d/_ctl/c/reply"]


def test_topics_of_the_protocol() -> None:
    t = Topics("edge", "d1")
    assert (t.config_desired, t.config_reported) == ("edge/d1/config/desired", "edge/d1/config/reported")
    assert (t.group_command("g"), t.group_reply("g")) == ("edge/groups/g/cmd", "edge/d1/groups/g/reply")
    anyone = Topics("edge", "+")
    assert (anyone.availability, anyone.group_reply("g")) == ("edge/+/status", "edge/+/groups/g/reply")


# ---- desired configuration ------------------------------------------------------------------------


def test_next_version_is_above_every_version_seen() -> None:
    assert configctl.next_version(None, None) == 1
    assert configctl.next_version({"version": 4}, {"version": 3}) == 5
    assert configctl.next_version({"version": 2}, {"version": 3, "rejected": {"version": 7}}) == 8
    assert configctl.next_version({"version": "9"}, {"version": None, "rejected": None}) == 1
    assert configctl.next_version({"version": True}, None) == 1


def test_outcome_and_description_of_reported() -> None:
    reported = {"version": 7, "state": "pending", "applied_at": "2026-12-06T19:00:00.000Z",
                "pending": [{"path": "cameras.cam2", "reason": "task t-1 is recording; applied when it ends"}],
                "rejected": {"version": 8, "errors": [{"path": "cameras.cam1.url", "message": "field required"}]}}
    assert configctl.outcome(reported, 7) == "pending"
    assert configctl.outcome(reported, 8) == "rejected"
    assert configctl.outcome(reported, 9) is None
    assert configctl.outcome({"version": 7, "state": "applied"}, 7) == "applied"
    lines = configctl.describe("d1", reported, 8)
    assert lines == ["d1: version 8 rejected; version 7 keeps running", "  cameras.cam1.url: field required"]
    lines = configctl.describe("d1", reported, 7)
    assert lines[0] == "d1: version 7 pending at 2026-12-06T19:00:00.000Z"
    assert lines[1] == "  pending cameras.cam2: task t-1 is recording; applied when it ends"


def test_check_names_unknown_keys_and_bad_values_by_path() -> None:
    assert configctl.check({"cameras": {"cam1": {"url": "rtsp://h/s"}}, "recording": {"max_seconds": 60},
                            "groups": ["site-a"], "telemetry_seconds": 30, "log_level": "DEBUG"}) == []  # fmt: skip
    assert configctl.check({}) == []
    problems = configctl.check({"mqtt": {"host": "x"}, "device_id": "y", "frobnicate": 1, "cameras": {}})
    assert sorted(p.split(":")[0] for p in problems) == ["device_id", "frobnicate", "mqtt"], problems
    assert any(p.startswith("mqtt: stays local") for p in problems) and "unknown key" in " ".join(problems)
    problems = configctl.check({"cameras": {"cam1": {"url": ""}}, "recording": {"max_seconds": 0}})
    assert any(p.startswith("cameras.cam1.url:") for p in problems), problems
    assert any(p.startswith("recording.max_seconds:") for p in problems), problems
    assert configctl.check({"groups": "site-a"}) != []
    assert configctl.check({"groups": ["a/b"]}) != []
    # The agent's local-only rules: its paths, what it executes, its secret files.
    problems = configctl.check({"recording": {"output_dir": "/tmp/x", "ffmpeg_path": "/bin/sh"},
                                "storage": {"type": "minio", "access_key": "a", "secret_key_file": "/run/s"},
                                "cameras": {"cam1": {"url_file": "/run/cam1"}}})  # fmt: skip
    assert sorted(p.split(":")[0] for p in problems) == [
        "cameras.cam1.url_file", "recording.ffmpeg_path", "recording.output_dir", "storage.secret_key_file"]
    assert CAM_PASSWORD not in " ".join(configctl.check({"cameras": {"c": {"url": f"x{CAM_PASSWORD}"}}}))


def write(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc) if path.suffix == ".yaml" else json.dumps(doc))
    return path


def test_read_document_takes_a_wrapped_or_bare_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {"cameras": {"cam1": {"url": "rtsp://h/s"}}}
    assert configctl.read_document(write(tmp_path / "a.yaml", cfg)) == cfg
    assert configctl.read_document(write(tmp_path / "b.json", {"config": cfg})) == cfg
    assert configctl.read_document(write(tmp_path / "c.json", {"version": 3, "config": cfg})) == cfg
    assert "version" in capsys.readouterr().err
    assert configctl.read_document(write(tmp_path / "d.yaml", {"config": {}})) == {}
    with pytest.raises(ctl.CtlError, match="only 'version'"):
        configctl.read_document(write(tmp_path / "e.json", {"config": cfg, "cameras": {}}))
    (tmp_path / "f.yaml").write_text(f"cameras: {{cam1: {{url: 'rtsp://a:{CAM_PASSWORD}@h/s'\n")
    with pytest.raises(ctl.CtlError) as info:
        configctl.read_document(tmp_path / "f.yaml")
    assert info.value.code == ctl.EXIT_USAGE and CAM_PASSWORD not in str(info.value)
    with pytest.raises(ctl.CtlError, match="cannot read"):
        configctl.read_document(tmp_path / "missing.yaml")


def test_redaction_masks_secret_keys_and_url_credentials() -> None:
    doc = {"version": 3, "config": {
        "cameras": {"cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@10.0.0.5/s", "name": "Door"}},
        "storage": {"type": "minio", "access_key": "AK", "secret_key": S3_SECRET, "ca_file": None}}}  # fmt: skip
    out = configctl.redact_config(doc)
    text = json.dumps(out)
    assert CAM_PASSWORD not in text and S3_SECRET not in text and '"AK"' not in text
    assert out["config"]["cameras"]["cam1"]["url"] == "rtsp://***@10.0.0.5/s"
    assert out["config"]["cameras"]["cam1"]["name"] == "Door" and out["config"]["storage"]["ca_file"] is None
    assert doc["config"]["storage"]["secret_key"] == S3_SECRET  # a copy: the original is untouched


def test_diff_compares_meaning_over_the_desired_keys_without_secrets() -> None:
    desired = {"cameras": {"cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@10.0.0.5/s"}},
               "storage": {"type": "minio", "access_key": "AK", "secret_key": S3_SECRET}}  # fmt: skip
    # As an agent reports it: every default filled in, secrets redacted its own way, other keys too.
    reported = {"cameras": {"cam1": {"url": "rtsp://**********@10.0.0.5/s", "rtsp_transport": "tcp",
                                     "buffer_seconds": 0, "buffer_dir": "/dev/shm/x"}},
                "storage": {"type": "minio", "access_key": "**********", "secret_key": "**********",
                            "bucket": "recordings"},
                "recording": {"max_seconds": 600}, "telemetry_seconds": 60.0}  # fmt: skip
    assert configctl.diff_text(reported, desired, "reported", "desired") == ""
    # Exactly what the agent reports for it (remoteconfig.redacted): no difference either.
    as_reported = remoteconfig.redacted(remoteconfig.build(
        {"device_id": "d", "recording": {"output_dir": "/var/rec"}}, remoteconfig.Desired(1, desired), env={}))
    assert CAM_PASSWORD not in json.dumps(as_reported) and "output_dir" not in as_reported.get("recording", {})
    assert configctl.diff_text(as_reported, desired, "reported", "desired") == ""
    rec = {"recording": {"max_seconds": 60}}
    changes = [line for line in configctl.diff_text(as_reported, rec, "r", "d").splitlines()[2:]
               if line[:1] in "+-"]  # fmt: skip
    assert changes == ['-    "max_seconds": 3600,', '+    "max_seconds": 60,'], changes  # not output_dir
    changed = {**desired, "cameras": {"cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@10.0.0.6/s", "max_seconds": 60}}}
    text = configctl.diff_text(reported, changed, "reported (version 3)", "desired (version 4)")
    assert text.startswith("--- reported (version 3)\n+++ desired (version 4)")
    assert '-      "url": "rtsp://***@10.0.0.5/s"' in text and '+      "url": "rtsp://***@10.0.0.6/s"' in text
    assert '+      "max_seconds": 60' in text
    assert CAM_PASSWORD not in text and S3_SECRET not in text
    gone = configctl.diff_text(reported, {"cameras": {}}, "r", "d")
    assert '-    "cam1": {' in gone
