"""Unit tests of the command line (`edge_agent.cli`) and of `edge-agent ctl` without a broker.

What is checked here is what a user meets before any MQTT traffic: argument parsing and its exit
codes, configuration errors, the human and JSON output of a status, a broker that cannot be reached
(the exit code and one line saying why, with no password in it), and the log formatters (secrets
removed from the whole line, traceback included; JSON lines with camera and task). The paths that
talk to a real broker are in tests/test_ctl.py.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
import yaml

from edge_agent import ctl
from edge_agent.cli import EXIT_CONFIG, HeartbeatQueue, JsonFormatter, RedactingFormatter, build_parser, main
from edge_agent.redact import redact

PASSWORD = "Mqtt-pw-9d7"
CAM_PASSWORD = "cam-pw-41x"


def write_config(tmp: Path, port: int, **mqtt: object) -> Path:
    doc = {
        "device_id": "edge-ctl-unit",
        "mqtt": {"host": "127.0.0.1", "port": port, "username": "u", "password": PASSWORD, **mqtt},
        "cameras": {"cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@192.0.2.1/s"}},
        "recording": {"output_dir": str(tmp / "rec")},
    }
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


# ---- ctl ---------------------------------------------------------------------------------------


def test_human_line_names_what_matters() -> None:
    doc = {"camera_id": "cam1", "task_name": "patrol", "status": "failed", "ok": False, "error": "no media",
           "size_bytes": 10}  # fmt: skip
    assert ctl.human_line(doc) == "cam1 patrol: failed (ok: false, error: no media)"
    assert ctl.human_line({"camera_id": "cam2", "status": "idle"}) == "cam2: idle"


def test_emit_prints_one_json_line_or_one_text_line(capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"camera_id": "cam1", "task_name": "t", "status": "recording", "ok": True}
    ctl.emit(doc, as_json=True)
    ctl.emit(doc, as_json=False)
    out = capsys.readouterr().out.splitlines()
    assert json.loads(out[0]) == doc
    assert out[1] == "cam1 t: recording"


def test_generated_task_names_pass_the_naming_rule() -> None:
    from edge_agent import names

    generated = {ctl.generate_task_name() for _ in range(20)}
    assert len(generated) == 20  # random suffix: two ctl runs in the same second do not collide
    for name in generated:
        assert names.check_name(name) == name and name.startswith("ctl-")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ctl", "stop", "cam1"], "TASK"),  # stop needs a task name: argparse refuses it
        (["ctl", "start"], "CAMERA"),
        (["ctl", "--timeout", "0", "status", "cam1"], "must be > 0"),
        (["ctl", "frobnicate", "cam1"], "invalid choice"),
    ],
)
def test_ctl_usage_errors_exit_2_with_the_reason(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_options_go_before_or_after_the_action() -> None:
    parser = build_parser()
    a = parser.parse_args(["ctl", "--json", "--timeout", "3", "status", "cam1"])
    b = parser.parse_args(["ctl", "status", "cam1", "--json", "--timeout", "3"])
    for args in (a, b):
        assert (args.action, args.camera, args.json, args.timeout) == ("status", "cam1", True, 3.0)


def test_ctl_with_a_broken_config_exits_2_and_names_the_key(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = write_config(tmp_path, 1883)
    doc = yaml.safe_load(path.read_text())
    doc["mqtt"]["port"] = "not-a-port"
    path.write_text(yaml.safe_dump(doc))
    assert main(["ctl", "--config", str(path), "status", "cam1"]) == ctl.EXIT_USAGE
    err = capsys.readouterr().err
    assert "mqtt.port" in err and PASSWORD not in err and CAM_PASSWORD not in err


def test_ctl_without_a_broker_fails_in_time_with_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    path = write_config(tmp_path, port)
    code = main(["ctl", "--config", str(path), "--timeout", "2", "status", "cam1"])
    assert code not in (ctl.EXIT_OK, ctl.EXIT_FAILED)  # not an answer: the broker was never reached
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "refused" in err
    assert PASSWORD not in err


def test_ctl_tls_file_problem_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, 8883, tls={"enabled": True, "ca_file": str(tmp_path / "missing-ca.pem")})
    assert main(["ctl", "--config", str(path), "--timeout", "2", "status", "cam1"]) == ctl.EXIT_USAGE
    assert "missing-ca.pem" in capsys.readouterr().err


# ---- cli -------------------------------------------------------------------------------------------


def test_run_with_an_invalid_config_exits_with_the_config_code(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = tmp_path / "agent.yaml"
    bad.write_text("device_id: [not, a, name]\n")
    assert main(["run", "--config", str(bad)]) == EXIT_CONFIG
    assert "device_id" in capsys.readouterr().err


def record(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("edge_agent.recorder", logging.WARNING, __file__, 1, msg, args,
                            (type(exc), exc, exc.__traceback__) if exc else None)  # fmt: skip
    rec.threadName = "recorder.cam1"
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_redacting_formatter_cleans_the_whole_line_traceback_included() -> None:
    url = f"rtsp://admin:{CAM_PASSWORD}@192.0.2.1/s"
    try:
        raise RuntimeError(f"cannot open {url} with {PASSWORD}")
    except RuntimeError as exc:
        caught = exc
    for inner in (logging.Formatter("%(message)s"), JsonFormatter()):
        line = RedactingFormatter(inner, (PASSWORD, CAM_PASSWORD)).format(record("probe of %s failed", url,
                                                                                  exc=caught))  # fmt: skip
        assert CAM_PASSWORD not in line and PASSWORD not in line
        assert "192.0.2.1" in line and "RuntimeError" in line  # what is needed to debug stays
    assert redact(url, ()) != url  # URL credentials go even when the secret is not known


def test_json_log_lines_carry_camera_and_task() -> None:
    doc = json.loads(JsonFormatter().format(record("segment %d closed", 3, task="patrol")))
    assert doc["msg"] == "segment 3 closed" and doc["camera"] == "cam1" and doc["task"] == "patrol"
    assert doc["level"] == "WARNING" and doc["logger"] == "edge_agent.recorder"


def test_heartbeat_queue_marks_the_loop_waiting_then_busy() -> None:
    calls: list[str] = []

    class Beat:
        def waiting(self) -> None:
            calls.append("waiting")

        def busy(self) -> None:
            calls.append("busy")

    q = HeartbeatQueue()
    q.heartbeat = Beat()  # type: ignore[assignment]
    q.put("event")  # type: ignore[arg-type]
    assert q.get(timeout=1) == "event"
    assert calls == ["waiting", "busy"]


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("edge-agent ")
