"""Keep secrets out of every log record, whichever logger or handler it goes through.

Prefect's log filter redacts only its own API key. Once the Apollo key is known, ``register_secret`` installs a
log-record factory that replaces the key (and its obvious carriers, such as ``Bearer <key>``) in the formatted
message of every record created after that point: console, Prefect's API log handler and files alike.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from apollo_sync.errors import ConfigError

MASK = "***"
_MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_installed = False
_previous_factory = logging.getLogRecordFactory()


def redact(text: str) -> str:
    """Return ``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def register_secret(value: str | None) -> None:
    """Mask ``value`` in all log records from now on, and the forms it takes when echoed: JSON- or repr-escaped,
    percent-encoded (idempotent; ignores empty or very short values)."""
    global _secrets, _installed
    if not value or len(value) < _MIN_SECRET_LENGTH:
        return
    forms = {value, json.dumps(value)[1:-1], repr(value)[1:-1], quote(value, safe=""), value.strip()}
    with _lock:
        _secrets = _secrets | {form for form in forms if len(form) >= _MIN_SECRET_LENGTH}
        if not _installed:
            logging.setLogRecordFactory(_redacting_factory)
            _installed = True


def api_key_from(raw: str) -> str:
    """The key as it is sent: surrounding whitespace (a pasted or file-read key's newline) stripped. A key with a
    control character inside would go into a header verbatim (and be echoed back in the HTTP library's error):
    ``ConfigError`` instead, raised before anything is sent. Both forms are registered for masking."""
    register_secret(raw)
    key = raw.strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigError("the Apollo API key holds a control character (a line break or tab inside it): copy it again")
    register_secret(key)
    return key


def _redacting_factory(*args, **kwargs) -> logging.LogRecord:
    record = _previous_factory(*args, **kwargs)
    if _secrets:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business, not ours
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
    return record


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (where passwords and keys hide); plain paths unchanged."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc and "@" not in url:
        return url.split("?", 1)[0].split("#", 1)[0]
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


SECRET_QUERY_KEYS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "X-Goog-Signature", "X-Goog-Credential",
    "Signature", "sig", "token", "access_token", "api_key", "apikey", "key", "password", "secret",
)  # fmt: skip
"""Query parameters that carry a secret (signed S3/GCS URLs, tokens): a URL with one is refused as a setting."""


def secret_in_url(url: str) -> str | None:
    """What secret ``url`` carries, as words for an error message ("a password", "a signed query (X-Amz-Signature)"),
    or None. Only URLs are looked at (``scheme://``); a plain path carries none."""
    text = url.strip()
    if "://" not in text:
        return None
    parts = urlsplit(text)
    if parts.password:
        return "a password"
    secret_keys = {key.lower() for key in SECRET_QUERY_KEYS}
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in secret_keys:
            return f"a signed or secret query value ({key})"
    return None


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)


NO_SECRET_PATTERN = (
    r"^(?![A-Za-z][A-Za-z0-9+.\-]*://[^/?#@]*:[^/?#@]*@)"
    r"(?![^?#]*\?(?:[^#]*&)?(?:" + "|".join(_any_case(key) for key in SECRET_QUERY_KEYS) + r")=)"
)
"""The same refusal as :func:`secret_in_url`, as a JSON-schema ``pattern`` for the run form: a Prefect server checks
a deployment run's parameters against it before it stores them, so a URL with a secret never reaches its database."""
