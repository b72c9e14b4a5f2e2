"""Credential redaction for everything the agent says: logs (text and tracebacks), replies, statuses.

Three layers, each for a way a secret can slip through:
- `user:password@` in any URL, where the password itself may hold `@` (the userinfo runs to the
  *last* `@` before the host);
- credentials in a query string (`?password=...`, `&token=...`, presigned `X-Amz-Signature=...`);
- the configured secret values themselves, raw and URL-encoded, wherever they appear (exception
  text, FFmpeg's stderr, a URL with an unusual shape).
"""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET_CHARS = 3  # shorter values would mask ordinary text everywhere

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s\"'<>]*@")
_QUERY_CREDENTIAL = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|pass|user_?pass|secret|token|access_token|auth|api_?key|key|"
    r"signature|sig|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s\"'<>]*",
    re.IGNORECASE,
)


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` without URL credentials, query-string credentials and any of `secrets`."""
    text = _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _QUERY_CREDENTIAL.sub(rf"\g<key>{MASK}", text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) < MIN_SECRET_CHARS:
            continue
        for form in {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)}:
            if form in text:
                text = text.replace(form, MASK)
    return text


def url_secrets(url: str) -> list[str]:
    """The password and query-string credentials inside a URL, to mask them wherever they reappear."""
    out: list[str] = []
    if "://" in url:
        rest = url.split("://", 1)[1]
        authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
        if "@" in authority:
            userinfo = authority.rsplit("@", 1)[0]
            if ":" in userinfo:
                out.append(userinfo.split(":", 1)[1])
    for match in _QUERY_CREDENTIAL.finditer(url):
        value = url[match.end("key") : match.end()]
        if value:
            out.append(value)
    return [s for s in out if s]
