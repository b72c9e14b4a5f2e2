"""Unit tests of `edge_agent.config` and `edge_agent.cli check-config` (no network)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.cli import EXIT_CONFIG, main
from edge_agent.configload import load_config, parse_config
from edge_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_YAML = ROOT / "agent.yaml"

MQTT_PASSWORD = "mqtt-Pa55-zq7"
ACCESS_KEY = "AKIA-access-zq7"
SECRET_KEY = "S3cr3t-key-zq7"
CAM_PASSWORD = "camPa55zq7"
ALL_SECRETS = (MQTT_PASSWORD, ACCESS_KEY, SECRET_KEY, CAM_PASSWORD)


def base_doc() -> dict[str, Any]:
    return {
        "device_id": "edge-01",
        "mqtt": {"host": "broker.local", "port": 1883, "username": "agent", "password": MQTT_PASSWORD},
        "cameras": {
            "cam1": {"url": f"rtsp://admin:{CAM_PASSWORD}@192.0.2.10:554/stream1", "max_seconds": 600},
            "cam-2": {"url": "rtsp://192.0.2.11/s", "video": "transcode"},
        },
        "recording": {"max_seconds": 3600, "video": "copy"},
        "storage": {"type": "minio", "access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "bucket": "recordings"},
    }


def config_error(doc: object, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={} if env is None else env)
    return str(info.value)


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text, f"secret {secret!r} leaked into: {text!r}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(var)


# ---- the documented file ---------------------------------------------------------------------


def test_shipped_agent_yaml_loads() -> None:
    cfg = load_config(SHIPPED_YAML, env={})
    assert cfg.device_id == "edge-01"
    assert cfg.mqtt.port == 1883
    assert cfg.mqtt.protocol == "5"
    assert set(cfg.cameras) == {"cam1"}
    assert cfg.cameras["cam1"].url.get_secret_value().startswith("rtsp://")
    assert cfg.storage.type == "minio"
    assert cfg.storage.min_free_bytes == 536870912
    assert cfg.recording.segment_seconds == 4


def test_valid_document_parses_with_defaults() -> None:
    cfg = parse_config(base_doc(), env={})
    assert cfg.mqtt.password is not None
    assert cfg.mqtt.password.get_secret_value() == MQTT_PASSWORD
    assert cfg.storage.upload_order == "oldest"
    assert cfg.mqtt.retained_tasks_per_camera == 20
    # SecretStr keeps secrets out of reprs that might get logged.
    assert_no_secret(repr(cfg))


def test_top_level_must_be_mapping() -> None:
    assert "mapping" in config_error(["device_id", "x"])


# ---- rejections name the key -------------------------------------------------------------------


def test_unknown_key_is_named_with_its_path() -> None:
    doc = base_doc()
    doc["mqtt"]["prot"] = 1884
    text = config_error(doc)
    assert "mqtt.prot" in text
    assert "Extra inputs are not permitted" in text


def test_unknown_nested_camera_key_is_named() -> None:
    doc = base_doc()
    doc["cameras"]["cam1"]["urll"] = "rtsp://x/y"
    assert "cameras.cam1.urll" in config_error(doc)


def test_pre_roll_needs_a_buffer_long_enough() -> None:
    doc = base_doc()
    doc["cameras"]["cam1"]["pre_roll_seconds"] = 10
    text = config_error(doc)
    assert "cameras.cam1" in text and "pre_roll_seconds (10)" in text and "buffer_seconds (0)" in text
    doc["cameras"]["cam1"]["buffer_seconds"] = 30
    cfg = parse_config(doc, env={})
    assert cfg.cameras["cam1"].pre_roll_seconds == 10
    assert cfg.buffer_dir("cam1").name == "cam1" and "edge-01" in str(cfg.buffer_dir("cam1"))


def test_stall_timeout_must_outlast_progress_reports() -> None:
    doc = base_doc()
    doc["recording"].update(stall_timeout_seconds=3, stats_period_seconds=2)
    text = config_error(doc)
    assert "recording.stall_timeout_seconds (3)" in text and "stats_period_seconds (2)" in text
    doc["recording"]["stall_timeout_seconds"] = 5
    assert parse_config(doc, env={}).recording.stall_timeout_seconds == 5


@pytest.mark.parametrize("port", [0, 65536, "http"])
def test_bad_port_is_named(port: object) -> None:
    doc = base_doc()
    doc["mqtt"]["port"] = port
    assert "mqtt.port" in config_error(doc)


def test_bad_storage_type_is_named() -> None:
    doc = base_doc()
    doc["storage"]["type"] = "s3"
    text = config_error(doc)
    assert "storage.type" in text
    assert "minio" in text


@pytest.mark.parametrize("bucket", ["Recordings", "ab", "under_score", "-lead"])
def test_bad_bucket_is_named(bucket: str) -> None:
    doc = base_doc()
    doc["storage"]["bucket"] = bucket
    text = config_error(doc)
    assert "storage.bucket" in text
    assert "bucket name" in text


@pytest.mark.parametrize("cam_id", ["cam 1", "cam/1", "cam+1", "x" * 65])
def test_bad_camera_id_is_named(cam_id: str) -> None:
    doc = base_doc()
    doc["cameras"][cam_id] = {"url": "rtsp://192.0.2.1/s"}
    text = config_error(doc)
    assert "cameras" in text
    assert repr(cam_id) in text


def test_minio_without_keys_is_rejected() -> None:
    doc = base_doc()
    del doc["storage"]["secret_key"]
    assert "access_key and secret_key" in config_error(doc)


def test_every_bad_key_reported_at_once() -> None:
    doc = base_doc()
    doc["mqtt"]["prot"] = 1
    doc["mqtt"]["port"] = 0
    doc["storage"]["bucket"] = "BAD"
    doc["log_level"] = "LOUD"
    text = config_error(doc)
    for key in ("mqtt.prot", "mqtt.port", "storage.bucket", "log_level"):
        assert key in text


# ---- secrets never appear in error text --------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["mqtt"].update(port="not-a-port"), id="bad-port"),
        pytest.param(lambda d: d["mqtt"].update(password=["list", MQTT_PASSWORD]), id="password-wrong-type"),
        pytest.param(lambda d: d["storage"].update(secret_key={"k": SECRET_KEY}), id="secret-key-wrong-type"),
        pytest.param(lambda d: d["storage"].update(access_key=[ACCESS_KEY]), id="access-key-wrong-type"),
        pytest.param(lambda d: d["cameras"]["cam1"].update(url=f"{CAM_PASSWORD}"), id="bad-url"),
        pytest.param(lambda d: d["cameras"]["cam1"].update(rtsp_transport=CAM_PASSWORD), id="bad-transport"),
        pytest.param(lambda d: d["mqtt"].update(extra=MQTT_PASSWORD), id="unknown-key"),
    ],
)
def test_error_text_never_contains_secret_values(mutate: Any) -> None:
    doc = base_doc()
    doc["mqtt"]["port"] = 0  # guarantee at least one error in every case
    mutate(doc)
    text = config_error(doc)
    assert "mqtt.port" in text
    assert_no_secret(text)


def test_env_secret_with_bad_value_not_echoed() -> None:
    text = config_error(base_doc(), env={"EDGE_AGENT_MQTT_PORT": f"x{MQTT_PASSWORD}"})
    assert "mqtt.port" in text
    assert_no_secret(text)


def test_yaml_syntax_error_does_not_echo_secret(tmp_path: Path) -> None:
    """A password YAML cannot parse (it starts with '@') must not be printed back in the error."""
    path = tmp_path / "agent.yaml"
    path.write_text(
        "device_id: edge-01\nmqtt:\n  username: agent\n  password: @" + MQTT_PASSWORD + "\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert "YAML" in text
    assert_no_secret(text)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", env={})


# ---- environment overrides ----------------------------------------------------------------------


def test_env_overrides_secrets_and_camera_url() -> None:
    doc = base_doc()
    env = {
        "EDGE_AGENT_MQTT_PASSWORD": "from-env-mqtt",
        "EDGE_AGENT_STORAGE_SECRET_KEY": "from-env-secret",
        "EDGE_AGENT_STORAGE_ACCESS_KEY": "from-env-access",
        "EDGE_AGENT_CAMERA_CAM1_URL": "rtsp://u:envpw@198.51.100.7/live",
        "EDGE_AGENT_CAMERA_CAM_2_URL": "rtsp://198.51.100.8/live",
        "EDGE_AGENT_MQTT_PORT": "8883",
    }
    cfg = parse_config(doc, env=env)
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "from-env-mqtt"
    assert cfg.storage.secret_key is not None and cfg.storage.secret_key.get_secret_value() == "from-env-secret"
    assert cfg.storage.access_key is not None and cfg.storage.access_key.get_secret_value() == "from-env-access"
    assert cfg.cameras["cam1"].url.get_secret_value() == "rtsp://u:envpw@198.51.100.7/live"
    assert cfg.cameras["cam-2"].url.get_secret_value() == "rtsp://198.51.100.8/live"
    assert cfg.mqtt.port == 8883


def test_env_supplies_missing_minio_keys() -> None:
    doc = base_doc()
    del doc["storage"]["access_key"]
    del doc["storage"]["secret_key"]
    cfg = parse_config(doc, env={"EDGE_AGENT_STORAGE_ACCESS_KEY": "a1", "EDGE_AGENT_STORAGE_SECRET_KEY": "s1"})
    assert cfg.storage.secret_key is not None and cfg.storage.secret_key.get_secret_value() == "s1"


def test_env_applied_to_shipped_yaml() -> None:
    cfg = load_config(SHIPPED_YAML, env={"EDGE_AGENT_CAMERA_CAM1_URL": "rtsp://192.0.2.99/other"})
    assert cfg.cameras["cam1"].url.get_secret_value() == "rtsp://192.0.2.99/other"


def test_env_absent_leaves_file_values() -> None:
    doc = base_doc()
    cfg = parse_config(copy.deepcopy(doc), env={"UNRELATED": "1"})
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == MQTT_PASSWORD


# ---- per-camera overrides ---------------------------------------------------------------------


def test_camera_max_seconds_and_video_mode_overrides() -> None:
    cfg = parse_config(base_doc(), env={})
    assert cfg.camera_max_seconds("cam1") == 600  # camera's own
    assert cfg.camera_max_seconds("cam-2") == 3600  # recording default
    assert cfg.camera_video_mode("cam1") == "copy"  # recording default
    assert cfg.camera_video_mode("cam-2") == "transcode"  # camera's own


# ---- check-config --------------------------------------------------------------------------------


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.mark.usefixtures("clean_env")
def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path / "agent.yaml", base_doc())
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert "OK" in out.out
    assert "edge-01" in out.out
    assert_no_secret(out.out + out.err)


@pytest.mark.usefixtures("clean_env")
def test_check_config_bad_prints_each_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = base_doc()
    doc["mqtt"]["prot"] = 1
    doc["mqtt"]["port"] = 70000
    doc["storage"]["bucket"] = "NO"
    doc["cameras"]["bad id"] = {"url": "rtsp://192.0.2.1/s"}
    path = write_yaml(tmp_path / "agent.yaml", doc)
    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG == 2
    err = capsys.readouterr().err
    for key in ("mqtt.prot", "mqtt.port", "storage.bucket", "'bad id'"):
        assert key in err
    assert_no_secret(err)


@pytest.mark.usefixtures("clean_env")
def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_python_m_check_config_shipped_yaml() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", "--config", "agent.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
