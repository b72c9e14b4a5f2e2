"""TLS test parts: a certificate authority the tests generate, and Mosquitto / SeaweedFS serving TLS.

Everything is made fresh per test with the `cryptography` package (EC P-256 keys, so generation takes
milliseconds): a CA, server certificates for 127.0.0.1/localhost (or for another name), client
certificates (valid, expired, encrypted key) and a second, unrelated CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from minio import Minio
from parts import LOCALHOST, Mosquitto, SeaweedS3, free_port, tcp_accepts

UTC = dt.UTC
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one issued certificate (``key`` is encrypted when ``password`` is set)."""

    cert: Path
    key: Path
    password: str | None = None


class Authority:
    """A certificate authority that writes its certificate and everything it issues into ``directory``."""

    def __init__(self, directory: Path, name: str = "edge-test-ca") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.directory / f"{name}.crt"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        server: bool = False,
        hosts: Sequence[str] = (),
        days: float = 30,
        expired: bool = False,
        password: str | None = None,
    ) -> CertFiles:
        """A leaf certificate for ``name`` (CN) with ``hosts`` as SANs (IPs or DNS names).

        ``expired``: valid from 10 days ago until yesterday. ``password``: the key is PEM-encrypted.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(UTC)
        if expired:
            not_before, not_after = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
        else:
            not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=days)
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
        )
        cert_path = self.directory / f"{name}.crt"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
        key_path.chmod(0o600)
        return CertFiles(cert_path, key_path, password)

    def server(self, name: str = "broker", hosts: Sequence[str] = (LOCALHOST, "localhost")) -> CertFiles:
        return self.issue(name, server=True, hosts=hosts)


def password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file made by Mosquitto's own ``mosquitto_passwd`` (hashed entries)."""
    path.write_text("".join(f"{user}:{pw}\n" for user, pw in users.items()))
    path.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True, timeout=30, capture_output=True)
    return path


class TlsMosquitto(Mosquitto):
    """Mosquitto with a mutual-TLS listener on ``tls_port`` and a plaintext one on ``port``.

    The TLS listener (the agent's) requires a client certificate from ``ca`` *and* a user name and
    password from ``users``. The plaintext listener on 127.0.0.1 takes anonymous clients: it is the
    test's own observer port (``MqttProbe``, ``mosquitto_pub``), so the tests watch the agent without
    TLS in the way. ``per_listener_settings`` keeps the two listeners' authentication apart.
    """

    def __init__(self, workdir: Path, ca: Authority, server: CertFiles, users: dict[str, str]) -> None:
        super().__init__(workdir)
        self.ca = ca
        self.server = server
        self.users = dict(users)
        self.tls_port = free_port()

    def prepare(self) -> None:
        super().prepare()
        passwd = password_file(self.workdir / "passwd", self.users)
        base = self.config_path.read_text().splitlines()
        # Drop the base listener and its auth line; re-declare them per listener.
        kept = [line for line in base if not line.startswith(("listener ", "allow_anonymous "))]
        lines = [
            "per_listener_settings true",
            *kept,
            f"listener {self.port} {LOCALHOST}",
            "allow_anonymous true",
            f"listener {self.tls_port} {LOCALHOST}",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"cafile {self.ca.cert_path}",
            f"certfile {self.server.cert}",
            f"keyfile {self.server.key}",
            "require_certificate true",
            "use_identity_as_username false",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def is_ready(self) -> bool:
        return tcp_accepts(self.host, self.port) and tcp_accepts(self.host, self.tls_port)

    def tls_connections(self) -> int:
        """Connection attempts on the TLS listener since the broker started.

        Mosquitto logs a handshake that fails as it accepts as "Client connection from ... failed"
        (no "New connection" line), and one that fails later after a "New connection ... on port";
        the readiness probe (connect, then close without a handshake) is the "unexpected eof" one.
        """
        log = self.log_since_start().splitlines()
        accepted = sum(1 for line in log if line.endswith(f"on port {self.tls_port}."))
        failed = sum(1 for line in log if "Client connection from" in line and "unexpected eof" not in line)
        return accepted + failed


class TlsSeaweedS3(SeaweedS3):
    """SeaweedFS whose S3 gateway also serves HTTPS on ``https_port`` with ``server``'s certificate."""

    def __init__(self, workdir: Path, ca: Authority, server: CertFiles) -> None:
        super().__init__(workdir)
        self.ca = ca
        self.server = server
        self.https_port = free_port()

    @property
    def https_endpoint(self) -> str:
        return f"{self.host}:{self.https_port}"

    def command(self) -> list[str]:
        return [
            *super().command(),
            f"-s3.cert.file={self.server.cert}",
            f"-s3.key.file={self.server.key}",
            f"-s3.port.https={self.https_port}",
        ]

    def is_ready(self) -> bool:
        return super().is_ready() and tcp_accepts(self.host, self.https_port)

    def tls_client(self) -> Minio:
        """A minio client over HTTPS that trusts only the test CA."""
        return Minio(
            self.https_endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=True,
            region="us-east-1",
            http_client=urllib3.PoolManager(
                cert_reqs="CERT_REQUIRED",
                ca_certs=str(self.ca.cert_path),
                timeout=urllib3.Timeout(connect=3, read=20),
                retries=urllib3.Retry(total=1, backoff_factor=0.1),
            ),
        )

