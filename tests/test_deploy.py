"""Deployment files: docker compose + Dockerfile, the systemd unit, the Mosquitto config, the demo script.

The compose file and Dockerfile are checked for structure here; tests/test_docker.py builds the
image and runs it. Only the Mosquitto test starts a long-running process (a real broker), so only it
is marked ``integration``; the others run short checkers (``bash -n``, ``systemd-analyze verify``).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from parts import ManagedProcess, free_port, tcp_accepts

from edge_agent.config import RecordingConfig
from edge_agent.configload import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
UNIT = DEPLOY / "systemd" / "edge-agent.service"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
MOSQUITTO_DEV_CONF = DEPLOY / "mosquitto" / "mosquitto.dev.conf"
MOSQUITTO_ACL = DEPLOY / "mosquitto" / "acl"
DOCKER_MOSQUITTO_CONF = DEPLOY / "docker" / "mosquitto.conf"
# Mounted by compose.yaml but made by the operator (mosquitto_passwd), never committed.
OPERATOR_MADE = {"/mosquitto/config/passwd": DEPLOY / "docker" / "passwd"}
DEMO = ROOT / "scripts" / "demo.sh"

AGENT_ARGS = ["run", "--config", "/etc/edge-agent/agent.yaml"]


# ------------------------------------------------------------------------------------------ docker


def load_compose() -> dict[str, object]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


# `${NAME:-default}`: a compose variable with its default.
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*):-([^}]*)\}")
# The knobs compose.yaml offers (tests/test_docker.py sets them all): images and host ports.
COMPOSE_IMAGES = {
    "mosquitto": ("MOSQUITTO_IMAGE", "eclipse-mosquitto:2"),
    "minio": ("MINIO_IMAGE", "minio/minio:latest"),
    "agent": ("EDGE_AGENT_IMAGE", "edge-agent:local"),
}
COMPOSE_PORTS = {"mosquitto": {("MQTT_PORT", "1883"): "1883"},
                 "minio": {("MINIO_PORT", "9000"): "9000", ("MINIO_CONSOLE_PORT", "9001"): "9001"}}  # fmt: skip


def env_default(value: object) -> tuple[str, str]:
    match = COMPOSE_VARIABLE.fullmatch(str(value))
    assert match, f"{value!r} is not ${{NAME:-default}}"
    return match.group(1), match.group(2)


def test_compose_has_broker_minio_and_agent_built_from_the_dockerfile() -> None:
    services = load_compose()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"mosquitto", "minio", "agent"}
    assert env_default(services["mosquitto"]["image"])[1].startswith("eclipse-mosquitto:")
    minio = services["minio"]
    assert env_default(minio["image"])[1].startswith("minio/minio")
    assert "--console-address" in minio["command"]

    agent = services["agent"]
    build = agent["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert DOCKERFILE.is_file()
    assert set(agent["depends_on"]) == {"mosquitto", "minio"}
    # Longer than the agent's finalise-at-shutdown bound (Docker's default is 10 s).
    grace = str(agent["stop_grace_period"])
    assert grace.endswith("s") and int(grace[:-1]) > RecordingConfig().stop_timeout_seconds + 30


def test_compose_images_and_host_ports_can_be_overridden_with_the_documented_defaults() -> None:
    """Images and host ports are `${VAR:-default}` (defaults: the real images, the usual ports), the ports
    stay on the host's loopback, and every variable is documented in compose.yaml and the README."""
    services = load_compose()["services"]
    assert isinstance(services, dict)
    assert {name: env_default(service["image"]) for name, service in services.items()} == COMPOSE_IMAGES
    for name, service in services.items():
        published = {}
        for entry in service.get("ports", []):
            match = re.fullmatch(r"127\.0\.0\.1:(\$\{[^}]*\}):(\d+)", str(entry))  # loopback only
            assert match, entry
            published[env_default(match.group(1))] = match.group(2)
        assert published == COMPOSE_PORTS.get(name, {}), (name, service.get("ports"))
    text, readme = COMPOSE.read_text(), (ROOT / "README.md").read_text()
    variables = [var for var, _ in COMPOSE_IMAGES.values()]
    variables += [var for ports in COMPOSE_PORTS.values() for var, _ in ports]
    for var in variables:
        assert text.count(var) >= 2 and f"`{var}`" in readme, var  # used and explained; in the README


def test_compose_mounts_files_that_exist_and_a_valid_agent_config() -> None:
    services = load_compose()["services"]
    assert isinstance(services, dict)
    mounted: dict[str, Path] = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if source.startswith("."):
                host = (COMPOSE.parent / source).resolve()
                assert host.is_file() or target in OPERATOR_MADE, f"{volume}: {host} does not exist"
                mounted[target] = host
    config_path = mounted["/etc/edge-agent/agent.yaml"]
    cfg = load_config(config_path, env={})
    assert cfg.mqtt.host == "mosquitto"
    assert cfg.storage.type == "minio" and cfg.storage.endpoint == "minio:9000"
    assert str(cfg.recording.output_dir).startswith("/var/lib/edge-agent")
    assert mounted["/mosquitto/config/mosquitto.conf"] == DOCKER_MOSQUITTO_CONF.resolve()
    # The broker's password file and ACL are mounted where its config looks for them; the ACL is
    # the one template (deploy/mosquitto/acl), the password file is the operator's and git-ignored.
    options = dict(parse_mosquitto_conf(DOCKER_MOSQUITTO_CONF.read_text()))
    assert mounted[options["acl_file"]] == MOSQUITTO_ACL.resolve()
    assert mounted[options["password_file"]] == OPERATOR_MADE[options["password_file"]].resolve()
    assert "/passwd" in (COMPOSE.parent / ".gitignore").read_text().split()
    assert "mosquitto_passwd -c /work/passwd edge-01" in COMPOSE.read_text()
    assert cfg.mqtt.username == cfg.device_id  # the ACL's model: a device's username is its device_id
    agent_env = services["agent"]["environment"]
    assert "EDGE_AGENT_MQTT_PASSWORD" in agent_env
    # Anonymous clients are refused, so the health check counts a refusal as "the broker answers".
    health = " ".join(services["mosquitto"]["healthcheck"]["test"])
    assert "not authorised" in health and "-u " not in health


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_bookworm_non_root_with_tini_entrypoint_and_healthcheck() -> None:
    """Structure only; tests/test_docker.py builds and runs the image."""
    instructions = dockerfile_instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=debian:bookworm-slim")  # pullable; the tests pass a local one
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS ffmpeg", "${BASE_IMAGE}"]
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert "tini" in runs and "python3-venv" in runs
    # The shipped stage installs no Debian FFmpeg (it drags in X11, SDL, VA-API): it takes the two
    # binaries of the headless build stage, compiled from Debian's source package.
    final = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM"):]
    final_runs = " ".join(rest for kw, rest in final if kw == "RUN")
    installs = re.findall(r"apt-get install ([^&;]*)", final_runs)
    assert installs and not any(re.search(r"\bffmpeg\b|libav", packages) for packages in installs), installs
    assert ("COPY", "--from=ffmpeg /opt/ffmpeg/bin/ffmpeg /opt/ffmpeg/bin/ffprobe /usr/local/bin/") in final
    assert "apt-get source --only-source ffmpeg" in runs and "--disable-everything" in runs
    assert "--mount=type=secret,id=extra-ca" in runs  # CA certificates for pip, never in a layer
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert len(entrypoint) == 1
    assert yaml.safe_load(entrypoint[0]) == ["/usr/bin/tini", "--", "/usr/local/bin/docker-entrypoint"]
    assert [rest for kw, rest in instructions if kw == "CMD"] == ['["run"]']
    health = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(health) == 1 and "edge_agent.health" in health[0]
    for kw, rest in instructions:
        if kw == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} missing"
    assert "UNVERIFIED" not in DOCKERFILE.read_text()


def test_docker_entrypoint_passes_subcommands_through(tmp_path: Path) -> None:
    """`docker run IMAGE check-config` is `edge-agent check-config --config /etc/edge-agent/agent.yaml`."""
    fake = tmp_path / "edge-agent"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    env.pop("EDGE_AGENT_CONFIG", None)

    def entry(*args: str) -> str:
        done = subprocess.run(["sh", str(DEPLOY / "docker" / "entrypoint.sh"), *args], capture_output=True,
                              text=True, env=env, timeout=10, check=True)  # fmt: skip
        return done.stdout.strip()

    cfg = "--config /etc/edge-agent/agent.yaml"
    assert entry() == f"run {cfg}"
    assert entry("run") == f"run {cfg}"
    assert entry("--log-format", "json") == f"run {cfg} --log-format json"
    assert entry("check-config") == f"check-config {cfg}"
    assert entry("check-config", "--config", "/x.yaml") == "check-config --config /x.yaml"
    assert entry("ctl", "status", "cam1") == f"ctl {cfg} status cam1"
    assert entry("health") == "health"
    assert entry("--version") == "--version"
    assert entry("echo", "hi") == "hi"


# ----------------------------------------------------------------------------------------- systemd


def load_unit(path: Path = UNIT) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_systemd_unit_has_the_required_keys() -> None:
    unit = load_unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "60",
        "ExecStart": "/opt/edge-agent/.venv/bin/edge-agent " + " ".join(AGENT_ARGS),
        "User": "edge-agent",
        "StateDirectory": "edge-agent",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "60",
        "ProtectProc": "invisible",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "EnvironmentFile": "-/etc/edge-agent/secrets.env",
    }
    for key, value in expected.items():
        assert service.get(key) == value, f"[Service] {key}={service.get(key)!r}, expected {value!r}"
    # The watchdog interval leaves room for the agent's ping period (WatchdogSec/2) and a busy loop.
    assert int(service["WatchdogSec"]) >= 30
    assert int(service["TimeoutStopSec"]) > RecordingConfig().stop_timeout_seconds + 30
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "/var/lib/edge-agent" in UNIT.read_text()  # the output_dir hint for agent.yaml


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` of the unit (scripts/install-deps.sh installs Debian's `systemd`).

    A copy of the unit with the agent's path replaced by an existing binary (verify rejects a missing
    ExecStart binary) must verify with no complaint about the unit; verify exits 0 even for unknown
    keys, so its output is checked too. The unit must also parse as INI with absolute commands.
    """
    unit = load_unit()
    for key in ("ExecStart", "ExecStartPre"):
        argv = shlex.split(unit["Service"][key])
        assert Path(argv[0]).is_absolute(), f"{key} must be an absolute path"
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: run scripts/install-deps.sh (Debian package systemd)"
    agent_bin = Path(sys.executable).with_name("edge-agent")
    existing = str(agent_bin) if agent_bin.exists() else "/bin/true"
    copy = tmp_path / "edge-agent.service"
    copy.write_text(UNIT.read_text().replace("/opt/edge-agent/.venv/bin/edge-agent", existing))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    complaints = [line for line in output.splitlines() if "edge-agent.service" in line]
    assert not complaints, output


# --------------------------------------------------------------------------------------- mosquitto


def parse_mosquitto_conf(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def test_mosquitto_conf_is_local_authenticated_and_persistent() -> None:
    entries = parse_mosquitto_conf(MOSQUITTO_CONF.read_text())
    options = dict(entries)
    assert [v for k, v in entries if k == "listener"] == ["1883 127.0.0.1"]
    assert options["persistence"] == "true"
    assert options["persistence_location"].startswith("/")
    assert 1 <= int(options["autosave_interval"]) <= 300
    assert int(options["max_queued_messages"]) >= 1000
    assert options["password_file"] == "/etc/mosquitto/passwd"
    assert options["acl_file"] == "/etc/mosquitto/acl"


@pytest.mark.parametrize("conf", [MOSQUITTO_CONF, DOCKER_MOSQUITTO_CONF], ids=["local", "docker"])
def test_shipped_mosquitto_confs_refuse_anonymous_and_tie_the_client_id_to_the_user(conf: Path) -> None:
    entries = parse_mosquitto_conf(conf.read_text())
    options = dict(entries)
    assert options["allow_anonymous"] == "false"
    assert options["password_file"].startswith("/") and options["acl_file"].startswith("/")
    # A listener option: it must follow the (only) listener it protects.
    keys = [k for k, _ in entries]
    assert keys.count("listener") == 1 and keys.count("use_username_as_clientid") == 1
    assert keys.index("listener") < keys.index("use_username_as_clientid")
    assert options["use_username_as_clientid"] == "true"


def test_mosquitto_dev_conf_is_loopback_only_and_says_never_expose() -> None:
    text = MOSQUITTO_DEV_CONF.read_text()
    assert "NEVER EXPOSE" in text.splitlines()[0]
    entries = parse_mosquitto_conf(text)
    options = dict(entries)
    assert [v for k, v in entries if k == "listener"] == ["1883 127.0.0.1"]
    assert options["allow_anonymous"] == "true"
    assert "password_file" not in options and "acl_file" not in options


def test_mosquitto_acl_template_gives_anonymous_clients_nothing() -> None:
    """Mosquitto applies `topic` lines before the first `user` line to anonymous clients."""
    lines = [line.split() for line in MOSQUITTO_ACL.read_text().splitlines() if line and not line.startswith("#")]
    first_user = next(i for i, words in enumerate(lines) if words[0] == "user")
    assert [w for w in lines[:first_user] if w[0] == "topic"] == []
    assert ["pattern", "read", "edge/%u/+/cmd"] in lines and ["pattern", "write", "edge/%u/#"] in lines


class ConfMosquitto(ManagedProcess):
    """A shipped Mosquitto config with only the port, data directory, password file and ACL paths swapped.

    The ACL is deploy/mosquitto/acl itself; the password file holds one user made by mosquitto_passwd.
    """

    name = "mosquitto-deploy-conf"
    start_timeout = 15.0

    def __init__(self, workdir: Path, conf: Path = MOSQUITTO_CONF) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.conf = conf
        self.config_path = self.workdir / "mosquitto.conf"

    def prepare(self) -> None:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        passwd = self.workdir / "passwd"
        if not passwd.exists():
            subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "edge-01", "example-only"],
                           check=True, capture_output=True, timeout=30)  # fmt: skip
        text = self.conf.read_text()
        text = re.sub(r"(?m)^listener 1883 ", f"listener {self.port} ", text)
        text = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {data}/", text)
        text = re.sub(r"(?m)^password_file .*$", f"password_file {passwd}", text)
        text = re.sub(r"(?m)^acl_file .*$", f"acl_file {MOSQUITTO_ACL}", text)
        if os.geteuid() == 0:
            text += "user root\n"  # else it drops to 'mosquitto', which cannot write tmp_path
        self.config_path.write_text(text)

    def command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        return tcp_accepts("127.0.0.1", self.port)


@pytest.mark.integration
def test_mosquitto_accepts_the_deploy_config(tmp_path: Path) -> None:
    """Mosquitto rejects unknown or misplaced options at startup, so starting it validates the file."""
    with ConfMosquitto(tmp_path) as broker:
        assert broker.is_alive()
        log = broker.log_text()
    assert "Error" not in log, log
    assert (tmp_path / "data" / "mosquitto.db").exists()  # saved at shutdown: persistence is on


@pytest.mark.integration
def test_mosquitto_dev_conf_starts_and_takes_anonymous_clients(tmp_path: Path) -> None:
    with ConfMosquitto(tmp_path, MOSQUITTO_DEV_CONF) as broker:
        pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                              "-t", "edge/edge-01/cam1/cmd", "-m", "ON"],
                             capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        log = broker.log_text()
    assert pub.returncode == 0, pub.stderr
    assert "Error" not in log, log


# -------------------------------------------------------------------------------------------- demo


def test_demo_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(DEMO)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
