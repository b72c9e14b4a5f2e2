"""Unit tests of the TLS context builder, the `tls.*` config rules and the connection-failure log lines.

The handshakes are real (an in-process TLS server on 127.0.0.1 with certificates made by the test);
no broker is involved.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from tlsparts import Authority, CertFiles

from edge_agent import ctl
from edge_agent.config import MqttConfig, StorageConfig, TlsConfig
from edge_agent.configload import parse_config
from edge_agent.errors import ConfigError
from edge_agent.mqtt import MqttLink
from edge_agent.mqttclient import describe_connect_error
from edge_agent.s3store import MinioStore
from edge_agent.tls import client_context
from edge_agent.topics import Topics

KEY_PASSWORD = "k3y-Pa55-zq9"


@dataclass
class Certs:
    ca: Authority
    other_ca: Authority
    server: CertFiles
    server_other_name: CertFiles
    client: CertFiles
    client_encrypted: CertFiles


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("pki")
    ca = Authority(base / "ca", "unit-ca")
    return Certs(
        ca=ca,
        other_ca=Authority(base / "other", "other-ca"),
        server=ca.server("server"),
        server_other_name=ca.server("server-other", hosts=("broker.example.net",)),
        client=ca.issue("client"),
        client_encrypted=ca.issue("client-enc", password=KEY_PASSWORD),
    )


@dataclass
class Handshake:
    """What the server side saw of one TLS handshake."""

    alpn: str | None = None
    client_cn: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class TlsServer:
    """A one-thread TLS server on 127.0.0.1 that requires a client certificate from ``ca`` and offers ALPN."""

    def __init__(self, server: CertFiles, ca: Authority, alpn: list[str] | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(server.cert), str(server.key))
        self.ctx.load_verify_locations(str(ca.cert_path))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            self.ctx.set_alpn_protocols(alpn)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.seen: list[Handshake] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            shake = Handshake()
            self.seen.append(shake)
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    shake.alpn = tls.selected_alpn_protocol()
                    peer = tls.getpeercert() or {}
                    for rdn in peer.get("subject", ()):
                        for key, value in rdn:
                            if key == "commonName":
                                shake.client_cn = value
                    tls.recv(1)  # until the client closes
            except (OSError, ssl.SSLError) as exc:
                shake.error = exc
            finally:
                shake.done.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def make_server() -> Iterator[Any]:
    servers: list[TlsServer] = []

    def factory(*args: Any, **kwargs: Any) -> TlsServer:
        servers.append(TlsServer(*args, **kwargs))
        return servers[-1]

    yield factory
    for server in servers:
        server.close()


def handshake(ctx: ssl.SSLContext, port: int, host: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def tls(**values: Any) -> TlsConfig:
    return TlsConfig.model_validate({"enabled": True, **values})


# ---------------------------------------------------------------------------------- the context


def test_context_verifies_by_default_and_needs_tls12() -> None:
    ctx = client_context(tls())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is True
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    insecure = client_context(tls(insecure=True))
    # `insecure` skips only the host name: the chain is still verified.
    assert insecure.check_hostname is False and insecure.verify_mode == ssl.CERT_REQUIRED


def test_mutual_tls_with_encrypted_key_and_alpn(certs: Certs, make_server: Any) -> None:
    server = make_server(certs.server, certs.ca, alpn=["x-amzn-mqtt-ca"])
    ctx = client_context(tls(ca_file=str(certs.ca.cert_path), cert_file=str(certs.client_encrypted.cert),
                             key_file=str(certs.client_encrypted.key), key_password=KEY_PASSWORD,
                             alpn_protocols=["x-amzn-mqtt-ca"]))  # fmt: skip
    with handshake(ctx, server.port) as sock:
        assert sock.selected_alpn_protocol() == "x-amzn-mqtt-ca"
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
    server.seen[0].done.wait(5)
    assert server.seen[0].error is None
    assert server.seen[0].alpn == "x-amzn-mqtt-ca"
    assert server.seen[0].client_cn == "client-enc"  # the server saw our certificate


def test_wrong_ca_and_wrong_name_fail_with_clear_causes(certs: Certs, make_server: Any) -> None:
    server = make_server(certs.server, certs.ca)
    client = {"cert_file": str(certs.client.cert), "key_file": str(certs.client.key)}
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(client_context(tls(ca_file=str(certs.other_ca.cert_path), **client)), server.port)
    text = describe_connect_error(info.value, "127.0.0.1", server.port)
    assert text.startswith(f"TLS handshake with broker 127.0.0.1:{server.port} failed: certificate verify failed: ")
    assert "issuer" in text or "self-signed" in text

    other = make_server(certs.server_other_name, certs.ca)
    good_ca = {"ca_file": str(certs.ca.cert_path), **client}
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(client_context(tls(**good_ca)), other.port)
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in describe_connect_error(
        info.value, "127.0.0.1", other.port
    )
    # insecure: the same server is accepted (chain verified, name not).
    with handshake(client_context(tls(insecure=True, **good_ca)), other.port) as sock:
        assert sock.getpeercert() is not None


def test_key_and_file_problems_are_config_errors_naming_the_key(certs: Certs, tmp_path: Path) -> None:
    enc = certs.client_encrypted
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.key_file: .* is encrypted; set mqtt\.tls\.key_password"):
        client_context(tls(cert_file=str(enc.cert), key_file=str(enc.key)))
    with pytest.raises(ConfigError, match=r"wrong mqtt\.tls\.key_password") as info:
        client_context(tls(cert_file=str(enc.cert), key_file=str(enc.key), key_password="not-" + KEY_PASSWORD))
    assert KEY_PASSWORD not in str(info.value)
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.key_file: the private key does not match"):
        client_context(tls(cert_file=str(certs.client.cert), key_file=str(certs.server.key)))
    missing = tmp_path / "nope.pem"
    for key in ("ca_file", "cert_file", "key_file"):
        values = {"cert_file": str(certs.client.cert), "key_file": str(certs.client.key), key: str(missing)}
        with pytest.raises(ConfigError, match=rf"^mqtt\.tls\.{key}: cannot read .*nope\.pem: No such file"):
            client_context(tls(**values))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^mqtt\.tls\.ca_file: cannot load CA certificates"):
        client_context(tls(ca_file=str(garbage)))


def test_ctl_reports_an_unusable_key_as_a_usage_error(certs: Certs) -> None:
    enc = certs.client_encrypted
    section = {"enabled": True, "cert_file": str(enc.cert), "key_file": str(enc.key)}
    cfg = parse_config({"device_id": "d1", "mqtt": {"tls": section}}, env={})
    with pytest.raises(ctl.CtlError) as info:
        ctl._Conn(cfg, 1.0)
    assert info.value.code == ctl.EXIT_USAGE and "key_password" in str(info.value)


# ------------------------------------------------------------------------------------ the config


def _error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"device_id": "d1", **doc}, env={})
    return str(info.value)


@pytest.mark.parametrize(
    "settings",
    [{"ca_file": "/ca.pem"}, {"insecure": False}, {"alpn_protocols": ["x-amzn-mqtt-ca"]},
     {"enabled": False, "cert_file": "/c.pem", "key_file": "/k.pem"}],
)  # fmt: skip
def test_tls_settings_without_enabled_are_errors_naming_each_key(settings: dict[str, Any]) -> None:
    text = _error({"mqtt": {"tls": settings}})
    for key in settings:
        if key != "enabled":
            assert f"mqtt.tls.{key}: given while tls.enabled is false" in text, text
    assert "mqtt.tls.enabled" not in text


def test_key_password_never_appears_in_errors(tmp_path: Path) -> None:
    text = _error({"mqtt": {"tls": {"key_password": KEY_PASSWORD}}})
    assert "mqtt.tls.key_password: given while tls.enabled is false" in text
    assert KEY_PASSWORD not in text
    # The same when it comes from a file (`*_file` is resolved into key_password before validation).
    secret = tmp_path / "pw"
    secret.write_text(KEY_PASSWORD)
    text = _error({"mqtt": {"tls": {"key_password_file": str(secret)}}})
    assert "mqtt.tls.key_password: given while tls.enabled is false" in text and KEY_PASSWORD not in text


def test_tls_settings_with_enabled_are_accepted_and_checked() -> None:
    cfg = parse_config({"device_id": "d1", "mqtt": {"tls": {
        "enabled": True, "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
        "key_password": KEY_PASSWORD, "alpn_protocols": ["x-amzn-mqtt-ca"]}}}, env={})  # fmt: skip
    assert cfg.mqtt.tls.key_password is not None and cfg.mqtt.tls.key_password.get_secret_value() == KEY_PASSWORD
    assert KEY_PASSWORD not in repr(cfg)
    assert cfg.mqtt.tls.alpn_protocols == ["x-amzn-mqtt-ca"]
    assert parse_config({"device_id": "d1", "mqtt": {"tls": {"enabled": False}}}, env={}).mqtt.tls.enabled is False
    assert "key_file needs cert_file" in _error({"mqtt": {"tls": {"enabled": True, "key_file": "/k.pem"}}})
    assert "key_password needs cert_file" in _error({"mqtt": {"tls": {"enabled": True, "key_password": "x"}}})
    assert "mqtt.tls.alpn_protocols" in _error({"mqtt": {"tls": {"enabled": True, "alpn_protocols": [""]}}})


def test_storage_ca_file_needs_secure(tmp_path: Path) -> None:
    keys = {"type": "minio", "access_key": "a", "secret_key": "s"}
    assert "storage.ca_file needs storage.secure: true" in _error({"storage": {**keys, "ca_file": "/ca.pem"}})
    ca = tmp_path / "ca.pem"
    cfg = parse_config({"device_id": "d1", "storage": {**keys, "secure": True, "ca_file": str(ca)}}, env={})
    assert cfg.storage.ca_file == ca
    # The S3 client verifies the server against that CA (urllib3 pool settings).
    pool_kw = MinioStore(cfg.storage)._client._http.connection_pool_kw
    assert pool_kw["cert_reqs"] == "CERT_REQUIRED" and pool_kw["ca_certs"] == str(ca)
    plain = MinioStore(StorageConfig.model_validate(keys))._client._http.connection_pool_kw
    assert "ca_certs" not in plain


# ------------------------------------------------------------------------- failure log lines


def _link() -> MqttLink:
    cfg = MqttConfig.model_validate({"host": "127.0.0.1", "port": 8883, "tls": {"enabled": True}})
    return MqttLink(cfg, Topics("edge", "d1"), "edge-agent-d1", lambda e: None)


def _attempt(link: MqttLink, exc: OSError | None) -> None:
    """One failed connection attempt as paho reports it: reconnect() raised, then on_connect_fail."""
    link._client.attempt_address = ("127.0.0.1", 8883)
    link._client.attempt_reported = False
    link._client.attempt_error = exc
    link._on_connect_fail(link._client, None)


def _disconnect(link: MqttLink, code: int) -> None:
    """paho's on_disconnect after the socket closed (``code`` as a DISCONNECT reason code)."""
    reason = ReasonCode(PacketTypes.DISCONNECT, identifier=code)
    link._on_disconnect(link._client, None, paho.DisconnectFlags(False), reason, None)


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge_agent.mqtt" and r.levelno == level]


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_message = message
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    return exc


def test_a_cause_is_logged_once_and_again_only_when_it_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt")
    link = _link()
    wrong_ca = _verify_error("unable to get local issuer certificate")
    for _ in range(4):
        _attempt(link, wrong_ca)
    errors = _records(caplog, logging.ERROR)
    assert errors == ["TLS handshake with broker 127.0.0.1:8883 failed: certificate verify failed: "
                      "unable to get local issuer certificate; retrying with backoff"]  # fmt: skip
    assert len([m for m in _records(caplog, logging.DEBUG) if m.startswith("connection attempt failed again")]) == 3

    _attempt(link, ConnectionRefusedError(111, "Connection refused"))  # the cause changed: logged
    assert _records(caplog, logging.WARNING) == [
        "cannot connect to broker 127.0.0.1:8883: connection refused; retrying with backoff"
    ]
    _attempt(link, wrong_ca)  # and changed back: logged again
    assert len(_records(caplog, logging.ERROR)) == 2

    # After a successful connection the same cause is a new incident: logged again.
    link._connected.set()
    _disconnect(link, 0)
    _attempt(link, wrong_ca)
    assert len(_records(caplog, logging.ERROR)) == 3


def test_refused_connack_is_one_line_and_the_disconnect_adds_none(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt")
    link = _link()
    for _ in range(3):
        link._client.attempt_address = ("127.0.0.1", 8883)
        link._client.attempt_reported = False
        link._client.attempt_error = None
        link._on_connect(link._client, None, paho.ConnectFlags(False), ReasonCode(PacketTypes.CONNACK, identifier=135),
                         None)  # fmt: skip
        _disconnect(link, 0)
    assert _records(caplog, logging.ERROR) == [
        "broker 127.0.0.1:8883 refused the connection: Not authorized (check mqtt.username and mqtt.password, "
        "or the broker's ACL); retrying with backoff"
    ]
    assert not _records(caplog, logging.WARNING)
    assert len([m for m in _records(caplog, logging.DEBUG) if "refused the connection" in m]) == 2


def test_closed_before_connack_names_the_tls_alert(caplog: pytest.LogCaptureFixture) -> None:
    """TLS 1.3: the broker rejects our certificate after the handshake, seen as a failed read."""
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt")
    link = _link()
    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired (_ssl.c:2580)")
    alert.reason = "SSLV3_ALERT_CERTIFICATE_EXPIRED"
    link._client.attempt_address = ("127.0.0.1", 8883)
    link._client.attempt_reported = False
    link._client.attempt_error = alert
    _disconnect(link, 128)
    assert _records(caplog, logging.ERROR) == [
        "TLS handshake with broker 127.0.0.1:8883 failed: sslv3 alert certificate expired (the broker rejected our "
        "client certificate: check mqtt.tls.cert_file); retrying with backoff"
    ]


def test_describe_connect_error_plain_causes() -> None:
    assert describe_connect_error(None, "h", 1) == "broker h:1 closed the connection before accepting it (no CONNACK)"
    assert describe_connect_error(TimeoutError("timed out"), "h", 1) == "cannot connect to broker h:1: timed out"
    gai = socket.gaierror(-2, "Name or service not known")
    assert describe_connect_error(gai, "nohost", 1) == "cannot resolve broker host nohost: Name or service not known"


def test_a_bare_eof_after_a_known_cause_does_not_replace_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent.mqtt")
    link = _link()
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)")
    _attempt(link, eof)  # the first cause ever is reported, even if it is only an EOF
    assert len(_records(caplog, logging.ERROR)) == 1
    caplog.clear()
    _attempt(link, _verify_error("unable to get local issuer certificate"))
    _attempt(link, eof)
    _attempt(link, ConnectionResetError(104, "Connection reset by peer"))
    assert len(_records(caplog, logging.ERROR)) == 1 and not _records(caplog, logging.WARNING)
    repeats = [m for m in _records(caplog, logging.DEBUG) if m.startswith("connection attempt failed again")]
    assert len(repeats) == 2 and all("(last reported: TLS handshake" in m for m in repeats), repeats


def test_the_alert_behind_a_failed_write_is_the_cause(certs: Certs, make_server: Any) -> None:
    """TLS 1.3: our handshake completes, then the server rejects our certificate with an alert; a
    write after that fails as a bare EOF, but the alert is still there to be read."""
    server = make_server(certs.server, certs.ca)
    stranger = certs.other_ca.issue("stranger")  # a client certificate the server does not trust
    ctx = client_context(tls(ca_file=str(certs.ca.cert_path), cert_file=str(stranger.cert),
                             key_file=str(stranger.key)))  # fmt: skip
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sock = handshake(ctx, server.port)
    assert server.seen and server.seen[0].done.wait(5) and server.seen[0].error is not None
    sock.setblocking(False)
    client = _link()._client
    client._sock = sock
    try:
        with pytest.raises(OSError):
            for _ in range(50):  # the first write may still be accepted by the kernel
                client._sock_send(b"\x10\x00")
                time.sleep(0.02)
    finally:
        client._sock = None
        sock.close()
    assert isinstance(client.attempt_error, ssl.SSLError)
    assert "ALERT" in (client.attempt_error.reason or ""), client.attempt_error
    text = describe_connect_error(client.attempt_error, "127.0.0.1", server.port)
    assert "alert" in text and "(the broker rejected our client certificate" in text, text
