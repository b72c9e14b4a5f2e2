"""The TLS client context for the broker link, built in one place from `mqtt.tls`.

The agent (`edge_agent.mqtt`) and `edge-agent ctl` must verify the broker the same way, so both hand
paho a context from `client_context` (`Client.tls_set_context`) instead of each calling `tls_set`
with its own idea of the options. paho's `tls_set` has no ALPN and no key password, both of which
real deployments need (AWS IoT Core serves MQTT on port 443 only with ALPN `x-amzn-mqtt-ca`; a
client key kept on disk is often encrypted).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from edge_agent.config import TlsConfig
from edge_agent.errors import ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2


class _NoKeyPassword(Exception):
    """Raised by the password callback: the key is encrypted but `key_password` is not set."""


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal (and hang a service) for an encrypted key.
    raise _NoKeyPassword


def _check_readable(key: str, path: Path | None) -> None:
    """OpenSSL's "No such file" does not say which file; name the key and the path instead."""
    if path is None:
        return
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"mqtt.tls.{key}: cannot read {path}: {exc.strerror or exc}") from None


def _reason(exc: BaseException) -> str:
    """The useful part of an ssl/OS error, without `(_ssl.c:1234)` noise."""
    text = str(exc)
    if text.endswith(")") and "(_ssl.c:" in text:
        text = text[: text.rindex("(_ssl.c:")].rstrip()
    return text or type(exc).__name__


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """An `ssl.SSLContext` that authenticates the broker (and us, with a client certificate).

    CA: `ca_file`, or the system store when unset. Certificate chain and host name are always checked,
    except the host name when `insecure` (testing only). TLS 1.2 at least. Client certificate and key
    with `key_password` for an encrypted key; ALPN protocols when given.

    Raises ConfigError naming the key when a file cannot be read or the key cannot be used; the
    message never contains the key password.
    """
    for name in ("ca_file", "cert_file", "key_file"):
        _check_readable(name, getattr(cfg, name))
    cafile = str(cfg.ca_file) if cfg.ca_file is not None else None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt.tls.ca_file: cannot load CA certificates from {cfg.ca_file}: {_reason(exc)}") from None
    ctx.minimum_version = MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not cfg.insecure
    if cfg.cert_file is not None:
        key = str(cfg.key_file) if cfg.key_file is not None else None
        password = cfg.key_password.get_secret_value() if cfg.key_password is not None else _no_password
        try:
            ctx.load_cert_chain(str(cfg.cert_file), key, password=password)
        except _NoKeyPassword:
            raise ConfigError(
                f"mqtt.tls.key_file: the private key in {cfg.key_file or cfg.cert_file} is encrypted; "
                "set mqtt.tls.key_password"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
                raise ConfigError("mqtt.tls.key_file: the private key does not match mqtt.tls.cert_file") from None
            hint = "wrong mqtt.tls.key_password, or not PEM" if cfg.key_password is not None else "not PEM"
            raise ConfigError(
                f"mqtt.tls.cert_file/key_file: cannot load the client certificate and key ({hint}): {_reason(exc)}"
            ) from None
    if cfg.alpn_protocols:
        ctx.set_alpn_protocols(list(cfg.alpn_protocols))
    return ctx
