"""Keep secrets out of every log record, whichever logger or handler it goes through.

Prefect's log filter redacts only its own API key. Once the Apollo key is known, ``register_secret`` installs a
log-record factory that replaces the key (and its obvious carriers, such as ``Bearer <key>``) in the formatted
message of every record created after that point: console, Prefect's API log handler and files alike.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit, urlunsplit

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
    """Mask ``value`` in all log records from now on (idempotent; ignores empty or very short values)."""
    global _secrets, _installed
    if not value or len(value) < _MIN_SECRET_LENGTH:
        return
    with _lock:
        _secrets = _secrets | {value}
        if not _installed:
            logging.setLogRecordFactory(_redacting_factory)
            _installed = True


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
