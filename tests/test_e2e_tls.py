"""TLS on real parts: the agent against a mutual-TLS Mosquitto, and uploads to SeaweedFS over HTTPS.

The tests make their own CA and certificates (``tlsparts.Authority``). Mosquitto's TLS listener needs
a client certificate from that CA *and* a user name and password; a plaintext listener on the same
broker is the tests' observer port. Each failure (wrong CA, expired client certificate, wrong host
name, wrong password) must give one clear log line while the agent keeps retrying, and no crash.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from parts import AgentProcess, MqttProbe
from rig import Rig, make_rig, minio_storage, record_for
from tlsparts import Authority, CertFiles, TlsMosquitto, TlsSeaweedS3

pytestmark = pytest.mark.integration

USER = "agent"
PASSWORD = "tls-Pa55-q9x"  # a canary: must never appear in the agent's log
KEY_PASSWORD = "key-Pa55-q9x"
EDGE_AGENT = Path(sys.executable).with_name("edge-agent")


class Pki:
    """The certificates one test needs, all fresh."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory / "ca", "edge-test-ca")
        self.other_ca = Authority(directory / "other-ca", "unrelated-ca")
        self.server = self.ca.server("broker")
        self.server_other_name = self.ca.server("broker-other-name", hosts=("broker.example.net",))
        self.client = self.ca.issue("agent-client")
        self.client_encrypted = self.ca.issue("agent-client-enc", password=KEY_PASSWORD)
        self.client_expired = self.ca.issue("agent-client-expired", expired=True)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki, track: Callable[[Any], Any]) -> TlsMosquitto:
    broker: TlsMosquitto = track(TlsMosquitto(tmp_path / "mosquitto", pki.ca, pki.server, {USER: PASSWORD}))
    return broker.start()


@pytest.fixture
def tls_probe(tls_broker: TlsMosquitto) -> Iterator[MqttProbe]:
    """The test's observer on the broker's plaintext listener."""
    client = MqttProbe(tls_broker.host, tls_broker.port)
    try:
        yield client
    finally:
        client.close()


def tls_mqtt(broker: TlsMosquitto, pki: Pki, *, protocol: str = "5", client: CertFiles | None = None,
             ca: Path | None = None, password: str = PASSWORD, **tls: Any) -> dict[str, Any]:  # fmt: skip
    """The agent's ``mqtt:`` section for the broker's TLS listener."""
    cert = client or pki.client
    section: dict[str, Any] = {
        "enabled": True,
        "ca_file": str(ca or pki.ca.cert_path),
        "cert_file": str(cert.cert),
        "key_file": str(cert.key),
        **tls,
    }
    return {
        "port": broker.tls_port, "protocol": protocol, "username": USER, "password": password, "tls": section,
        "reconnect_min_seconds": 0.2, "reconnect_max_seconds": 0.4,
    }  # fmt: skip


# ------------------------------------------------------------------------------- mutual TLS works


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_mutual_tls_start_stop(tmp_path: Path, protocol: str, pki: Pki, tls_broker: TlsMosquitto,
                               tls_probe: MqttProbe, prefix: str, make_agent: Any, camera: Any) -> None:  # fmt: skip
    if protocol == "5":
        # An encrypted client key with its password inline, over MQTT 5 ...
        tls: dict[str, Any] = {"key_password": KEY_PASSWORD}
        client = pki.client_encrypted
    else:
        # ... and with the password from a file (Docker secrets, systemd LoadCredential=) over 3.1.1.
        secret = tmp_path / "key-password"
        secret.write_text(KEY_PASSWORD + "\n")
        tls, client = {"key_password_file": str(secret)}, pki.client_encrypted
    mqtt = tls_mqtt(tls_broker, pki, protocol=protocol, client=client, **tls)
    rig = make_rig(tmp_path, tls_broker, tls_probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage={"type": "local"}, mqtt=mqtt)  # fmt: skip
    rig.start_agent()  # waits for the retained `online` the agent published through the TLS listener

    log = tls_broker.log_since_start()
    proto = "p5" if protocol == "5" else "p2"  # Mosquitto numbers 3.1.1 as 2
    assert f"on port {tls_broker.tls_port}." in log
    assert f"({proto}, c0, k30, u'{USER}')" in log, log  # authenticated as the user, with the right protocol

    reply = rig.request("cam1", {"action": "start", "task_name": "tls-run"})
    assert reply["ok"] is True, reply
    rig.wait_status("cam1", "tls-run", "recording", timeout=30)
    record_for(3)
    assert rig.request("cam1", {"action": "stop", "task_name": "tls-run"})["ok"] is True
    final = rig.wait_status("cam1", "tls-run", {"completed", "failed"}, timeout=60)
    assert final["status"] == "completed", final
    assert Path(final["local_file"]).is_file()

    if protocol == "5":
        # `edge-agent ctl` builds its TLS context with the same function, from the same file.
        done = subprocess.run([str(EDGE_AGENT), "ctl", "--config", str(rig.config_path), "--json", "status", "cam1"],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "completed"

    assert rig.agent is not None
    agent_log = rig.agent.log_text()
    assert PASSWORD not in agent_log and KEY_PASSWORD not in agent_log


# --------------------------------------------------------------------- each failure: one clear line


def _failure_rig(tmp_path: Path, broker: TlsMosquitto, probe: MqttProbe, prefix: str, make_agent: Any,
                 mqtt: dict[str, Any]) -> Rig:  # fmt: skip
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={}, storage={"type": "local"}, mqtt=mqtt)
    doc = yaml.safe_load(rig.config_path.read_text())
    doc["log_level"] = "DEBUG"  # the repeats are DEBUG lines: they count the attempts
    rig.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    rig.start_agent(wait_online=False)
    return rig


def _wait_attempts(agent: AgentProcess, broker: TlsMosquitto, repeats: int, timeout: float = 40.0) -> None:
    """Waits until the agent has logged ``repeats`` repeated failures and the broker saw as many connections."""
    deadline = time.monotonic() + timeout
    while agent.log_text().count("connection attempt failed again:") < repeats or (
        broker.tls_connections() < repeats + 1
    ):
        if not agent.is_alive():
            raise AssertionError(f"agent exited ({agent.returncode})\n{agent.log_excerpt()}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"fewer than {repeats} retries within {timeout} s "
                f"(broker saw {broker.tls_connections()} TLS connections)\n{agent.log_excerpt()}"
            )
        time.sleep(0.1)


def _lines(agent: AgentProcess, pattern: str, *, repeats: bool = False) -> list[str]:
    """Log lines matching ``pattern``: the first reports, or (``repeats``) the DEBUG repeats."""
    return [line for line in agent.log_text().splitlines()
            if re.search(pattern, line) and ("connection attempt failed again:" in line) == repeats]  # fmt: skip


CASES = {
    # case: the cause the one clear line must give. With an unknown CA OpenSSL says "self-signed
    # certificate in certificate chain" when the broker sends its CA along, else "unable to get local
    # issuer certificate".
    "wrong_ca": r"failed: certificate verify failed: "
    r"(unable to get local issuer certificate|self-signed certificate in certificate chain)",
    "wrong_hostname": r"failed: certificate verify failed: IP address mismatch, certificate is not valid for "
    r"'127\.0\.0\.1'",
    "expired_client_cert": r"alert certificate expired \(the broker rejected our client certificate",
    "wrong_password": r"refused the connection: (Not authorized|Bad user name or password)",  # Mosquitto 2.0: former
}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_failure_gives_one_clear_line_and_retries(tmp_path: Path, case: str, protocol: str, pki: Pki,
                                                  tls_broker: TlsMosquitto, prefix: str,
                                                  make_agent: Any) -> None:  # fmt: skip
    kwargs: dict[str, Any] = {"protocol": protocol}
    if case == "wrong_ca":
        kwargs["ca"] = pki.other_ca.cert_path
    elif case == "expired_client_cert":
        kwargs["client"] = pki.client_expired
    elif case == "wrong_password":
        kwargs["password"] = "not-" + PASSWORD
    elif case == "wrong_hostname":
        tls_broker.server = pki.server_other_name  # valid, from the right CA, but for broker.example.net
        tls_broker.restart()
    with MqttProbe(tls_broker.host, tls_broker.port) as probe:
        _failure_case(tmp_path, case, pki, tls_broker, probe, prefix, make_agent, tls_mqtt(tls_broker, pki, **kwargs))


def _failure_case(tmp_path: Path, case: str, pki: Pki, tls_broker: TlsMosquitto, tls_probe: MqttProbe, prefix: str,
                  make_agent: Any, mqtt: dict[str, Any]) -> None:  # fmt: skip
    rig = _failure_rig(tmp_path, tls_broker, tls_probe, prefix, make_agent, mqtt)
    assert rig.agent is not None
    _wait_attempts(rig.agent, tls_broker, repeats=3)

    address = f"broker 127.0.0.1:{tls_broker.tls_port}"
    expected = CASES[case]
    clear = _lines(rig.agent, expected)
    assert len(clear) == 1, f"expected one line with {expected!r}:\n{rig.agent.log_excerpt(40)}"
    line = clear[0]
    assert " ERROR " in line and address in line and "retrying with backoff" in line, line
    if case == "wrong_password":
        assert "check mqtt.username and mqtt.password" in line
    else:
        assert f"TLS handshake with {address} failed" in line
    # Every later attempt failed the same way and said so at DEBUG only; nothing else was logged as an error.
    cause = line.split("edge_agent.mqtt: ", 1)[1].removesuffix("; retrying with backoff")
    again = _lines(rig.agent, expected, repeats=True)
    assert len(again) >= 3 and all(" DEBUG " in x and cause in x for x in again), again
    errors = [x for x in rig.agent.log_text().splitlines() if " ERROR " in x or " WARNING " in x]
    assert errors == [line], errors
    assert "Traceback" not in rig.agent.log_text()
    assert PASSWORD not in rig.agent.log_text()
    assert rig.agent.is_alive()
    assert not tls_probe.raw(f"{rig.base}/status"), "the agent must not have come online"

    if case == "expired_client_cert":
        return  # nothing on the broker side can make an expired certificate acceptable
    # Fix the broker side: the agent, still retrying, comes online by itself.
    if case == "wrong_ca":
        tls_broker.server = pki.other_ca.server("broker-by-other-ca")
    elif case == "wrong_hostname":
        tls_broker.server = pki.server
    elif case == "wrong_password":
        tls_broker.users = {USER: "not-" + PASSWORD}
    tls_broker.restart()
    rig.wait_online(timeout=30)
    assert rig.agent.is_alive()


def test_check_config_rejects_tls_settings_without_enabled(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "device_id: d1\n"
        "mqtt:\n  host: broker.example.net\n  port: 8883\n"
        "  tls:\n    ca_file: /etc/edge-agent/ca.pem\n    cert_file: /etc/edge-agent/agent.crt\n"
        "    key_file: /etc/edge-agent/agent.key\n    key_password: " + KEY_PASSWORD + "\n"
    )
    done = subprocess.run([str(EDGE_AGENT), "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "mqtt.tls.ca_file: given while tls.enabled is false" in done.stderr, done.stderr
    for key in ("cert_file", "key_file", "key_password"):
        assert f"mqtt.tls.{key}: given while tls.enabled is false" in done.stderr, done.stderr
    assert KEY_PASSWORD not in done.stderr + done.stdout
    config.write_text(config.read_text().replace("  tls:\n", "  tls:\n    enabled: true\n"))
    ok = subprocess.run([str(EDGE_AGENT), "check-config", "--config", str(config)],
                        capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------------------- S3 over TLS


def test_upload_to_s3_over_tls_with_custom_ca(tmp_path: Path, pki: Pki, track: Callable[[Any], Any], broker: Any,
                                              probe: MqttProbe, prefix: str, make_agent: Any, camera: Any,
                                              bucket: str) -> None:  # fmt: skip
    """SeaweedFS serves S3 over HTTPS with a certificate from the test CA (its plain port is never used).

    First without `storage.ca_file`: the system store does not know the CA, so the upload is held back
    (verification is on, not skipped). Then the operator adds the CA and restarts: the journal's
    pending upload goes out over TLS.
    """
    s3: TlsSeaweedS3 = track(TlsSeaweedS3(tmp_path / "seaweedfs", pki.ca, pki.ca.server("s3")))
    s3.start()
    storage = minio_storage(s3, bucket, endpoint=s3.https_endpoint, secure=True)
    rig = make_rig(tmp_path, broker, probe, prefix, make_agent, cameras={"cam1": {"url": camera.url("cam1")}},
                   storage=storage)  # fmt: skip
    agent = rig.start_agent()
    assert rig.request("cam1", {"action": "start", "task_name": "over-https"})["ok"] is True
    rig.wait_status("cam1", "over-https", "recording", timeout=30)
    record_for(3)
    rig.request("cam1", {"action": "stop", "task_name": "over-https"})
    held = rig.wait_status("cam1", "over-https", {"upload_pending", "uploaded", "failed"}, timeout=60)
    assert held["status"] == "upload_pending", held
    assert "certificate verify failed" in held["last_upload_error"].lower(), held
    assert agent.terminate(timeout=30)[0] == 0

    doc = yaml.safe_load(rig.config_path.read_text())
    doc["storage"]["ca_file"] = str(pki.ca.cert_path)
    rig.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    rig.start_agent()
    final = rig.wait_status("cam1", "over-https", {"uploaded", "failed"}, timeout=90)
    assert final["status"] == "uploaded", final
    stat = s3.tls_client().stat_object(bucket, final["object_name"])
    assert stat.size == final["size_bytes"] > 0
    # The presigned URL points at the HTTPS endpoint and serves the same bytes to a client trusting the CA.
    url = final["download_url"]
    assert url.startswith(f"https://{s3.https_endpoint}/"), url
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(pki.ca.cert_path))
    got = http.request("GET", url, timeout=urllib3.Timeout(connect=5, read=30), retries=False)
    assert got.status == 200 and hashlib.sha256(got.data).hexdigest() == final["sha256"]
