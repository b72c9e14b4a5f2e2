"""paho clients as the agent and `edge-agent ctl` both make them, and why a connection failed.

`new_client` is the one place that turns `mqtt:` settings into a paho client: protocol (5 or
3.1.1), a persistent or clean session, the login and TLS (`edge_agent.tls`), so the agent and `ctl`
can never log in or verify the broker differently. `DiagnosingClient` keeps the first socket error of
each connection attempt, which `describe_connect_error` turns into one line naming the cause.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edge_agent.config import MqttConfig
from edge_agent.tls import client_context

log = logging.getLogger("edge_agent.mqtt")  # the link's messages, whichever module writes them

C = TypeVar("C", bound=paho.Client)


def new_client(cfg: MqttConfig, client_id: str, *, persistent: bool, cls: type[C]) -> C:
    """A paho client for `cfg`: its protocol, session, login and TLS (ConfigError naming a bad TLS key).

    `persistent`: a 3.1.1 session the broker keeps while we are away (clean_session False; for v5
    the session expiry is a CONNECT property, set by whoever connects).
    """
    v5 = cfg.protocol == "5"
    kwargs: dict[str, Any] = {} if v5 else {"clean_session": not persistent}
    client = cls(CallbackAPIVersion.VERSION2, client_id=client_id,
                 protocol=paho.MQTTv5 if v5 else paho.MQTTv311, **kwargs)  # fmt: skip
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
    if cfg.tls.enabled:
        client.tls_set_context(client_context(cfg.tls))
    return client


class DiagnosingClient(paho.Client):
    """paho's Client that remembers why the current connection attempt failed.

    paho 2.x calls `on_connect_fail(client, userdata)` without the exception: `loop_forever
    (retry_first_connection=True)` catches the OSError from `reconnect()` and logs only "Connection
    failed, retrying" at DEBUG. And under TLS 1.3 a broker that rejects our client certificate (expired,
    unknown CA) says so with an alert *after* the handshake, so it surfaces as a failed socket read that
    paho turns into a plain lost connection. The first OSError of each attempt is kept here (with the
    address dialled) so the link can say which it was: wrong CA, expired certificate, wrong host name...
    """

    attempt_error: OSError | None = None
    attempt_address: tuple[str, int] = ("", 0)
    attempt_reported = False

    drop_before_reconnect: set[int] | None = None  # mids of poison messages (see MqttLink._check_poison)

    def reconnect(self) -> MQTTErrorCode:
        if self.drop_before_reconnect:
            # Here, not in on_disconnect: paho may be iterating its queue when it calls that.
            with self._out_message_mutex:
                for mid in self.drop_before_reconnect:
                    self._out_messages.pop(mid, None)
            self.drop_before_reconnect = set()
        self.attempt_error = None
        self.attempt_reported = False
        self.attempt_address = (self.host, self.port)
        try:
            return super().reconnect()
        except OSError as exc:
            self.attempt_error = exc
            raise

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except BlockingIOError:
            raise
        except OSError as exc:
            self.attempt_error = self.attempt_error or exc
            raise

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except BlockingIOError:
            raise
        except OSError as exc:
            self.attempt_error = self.attempt_error or self._pending_alert() or exc
            raise

    def _pending_alert(self) -> ssl.SSLError | None:
        """The TLS alert the broker sent before it closed, if it is still unread.

        When the alert (e.g. "certificate expired") arrives before we write CONNECT, OpenSSL reports
        the write as a bare "EOF occurred in violation of protocol"; the alert itself is still in the
        socket and a (non-blocking) read returns it. Measured on Mosquitto 2.0 + OpenSSL 3.0 with an
        expired client certificate: about one attempt in ten, depending on timing.
        """
        sock = self._sock
        if not isinstance(sock, ssl.SSLSocket):
            return None
        try:
            sock.recv(1)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return None
        except ssl.SSLError as alert:
            return alert
        except (OSError, ValueError):
            return None
        return None


# Failures that tell only that the broker went away, not why.
UNINFORMATIVE_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)


def describe_connect_error(exc: OSError | None, host: str, port: int) -> str:
    """One line saying why a connection attempt to the broker failed (no secrets: only the address).

    e.g. "TLS handshake with broker 127.0.0.1:8883 failed: certificate verify failed: unable to get
    local issuer certificate".
    """
    where = f"broker {host}:{port}"
    if exc is None:
        return f"{where} closed the connection before accepting it (no CONNACK)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        # getattr: only errors raised by the ssl module itself carry these attributes.
        detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or "unknown reason"
        return f"TLS handshake with {where} failed: certificate verify failed: {detail}"
    if isinstance(exc, ssl.SSLError):
        text = str(exc)
        if "(_ssl.c:" in text:
            text = text[: text.rindex("(_ssl.c:")].rstrip()
        if text.startswith("[") and "] " in text:
            text = text.split("] ", 1)[1]  # "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert ..."
        reason = getattr(exc, "reason", None) or ""
        if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
            text += " (the broker rejected our client certificate: check mqtt.tls.cert_file)"
        return f"TLS handshake with {where} failed: {text or type(exc).__name__}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve broker host {host}: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused"
    if isinstance(exc, TimeoutError):
        return f"cannot connect to {where}: timed out"
    return f"connection to {where} failed: {exc.strerror or exc or type(exc).__name__}"


class FailureLog:
    """Why connection attempts fail, logged once per cause and broker address (DEBUG while it repeats).

    A device retries forever with backoff; one line per attempt would bury the cause (and fill a
    small disk), no line at all would leave a wrong CA or an expired certificate a mystery.
    """

    def __init__(self, tls_enabled: bool) -> None:
        self._tls = tls_enabled
        self._causes: dict[tuple[str, int], str] = {}  # broker address -> the last cause logged

    def clear(self) -> None:
        """After a successful connection: the next failure is news again."""
        self._causes.clear()

    def failed_with(self, client: DiagnosingClient, exc: OSError | None) -> None:
        """An attempt ended by `exc` (None: closed before CONNACK)."""
        host, port = client.attempt_address
        known = self._causes.get((host, port))
        if known is not None and (exc is None or isinstance(exc, UNINFORMATIVE_ERRORS)):
            # A bare EOF or reset after a known cause says nothing new (seen under load with an expired
            # client certificate: now and then the broker's alert is lost to the TCP reset); keep the cause.
            client.attempt_reported = True
            log.debug("connection attempt failed again: %s (last reported: %s)",
                      describe_connect_error(exc, host, port), known)  # fmt: skip
            return
        # TLS problems need a person (certificates, CA); a broker that is down or restarting does not.
        tls_problem = isinstance(exc, ssl.SSLError) or (exc is None and self._tls)
        self.failed(client, logging.ERROR if tls_problem else logging.WARNING, describe_connect_error(exc, host, port))

    def failed(self, client: DiagnosingClient, level: int, cause: str) -> None:
        client.attempt_reported = True
        address = client.attempt_address
        if self._causes.get(address) == cause:
            log.debug("connection attempt failed again: %s", cause)
            return
        self._causes[address] = cause
        log.log(level, "%s; retrying with backoff", cause)
