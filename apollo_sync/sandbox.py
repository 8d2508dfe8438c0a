"""A real HTTP server on 127.0.0.1 that behaves like Apollo's Bulk Create Contacts endpoint.

It serves the demo, the tests and the benchmarks: real sockets, real headers, real faults, so the
production client never needs test switches. Both ways in are served from one port:

- ``POST /apis/v1/apollo/contacts/bulk_create``: the AISA gateway (``Authorization: Bearer <key>``,
  ``{"error": {...}}`` error bodies, ``X-RateLimit-*`` headers).
- ``POST /api/v1/contacts/bulk_create``: Apollo direct (``X-Api-Key: <key>`` or Bearer,
  ``{"status": ..., "message": ...}`` error bodies, ``x-rate-limit-minute`` / ``x-minute-requests-left`` ...).

Contacts live in memory. ``run_dedupe`` matches by case-insensitive email, or for a contact without
email by first name + last name + organization (all three present); a match comes back in
``existing_contacts`` unchanged. Rate limits are fixed windows aligned to multiples of their length
since the epoch, counted per API key. Faults (drop, 503, burst 429, slow, 500 after store) are drawn
per request from one seeded ``random.Random``.

Admin endpoints (no auth, loopback only): ``GET /_sandbox/contacts``, ``GET /_sandbox/stats``,
``POST /_sandbox/reset``.

Use :class:`SandboxServer` (in-process thread) or :class:`SandboxProcess` (child process, same API), or
run ``python -m apollo_sync.sandbox --port 8765 --rate 60``. This module imports the standard library only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from apollo_sync import settings
from apollo_sync.errors import InputError

LOOPBACK_HOST = "127.0.0.1"
_LOOPBACK_ALIASES = (LOOPBACK_HOST, "localhost")
ADMIN_PREFIX = "/_sandbox"
ANNOUNCE_PREFIX = "sandbox listening on "
"""First stdout line of ``python -m apollo_sync.sandbox``, followed by the base URL."""

MAX_BODY_BYTES = 16 * 1024 * 1024
FAULT_KINDS = ("drop", "fail_before_store", "burst_429", "slow", "fail_after_store")
"""Fault kinds in the order they are checked for each bulk_create request."""

_STRING_FIELDS = tuple(f for f in settings.CONTACT_FIELDS if f not in ("label_names", "typed_custom_fields"))
_RESPONSE_FIELDS = (
    "id",
    "first_name",
    "last_name",
    "organization_name",
    "title",
    "owner_id",
    "account_id",
    "email",
    "phone_numbers",
    "label_names",
    "typed_custom_fields",
    "updated_at",
)
_GATEWAY = "gateway"
_APOLLO = "apollo"


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves. Probabilities are per bulk_create request, in [0, 1].

    ``rate`` requests per ``window`` seconds is the primary window (reported as Apollo's minute family);
    ``hourly_limit`` and ``daily_limit`` add 3600 s and 86400 s windows. ``None`` means no limit.
    ``latency`` seconds are slept on every bulk_create request. ``seed`` makes faults, ids and shuffles
    repeatable. ``shuffle`` returns each contact list in a random order, as the real API promises none.
    """

    api_key: str = field(default="sandbox-key", repr=False)
    rate: int | None = None
    window: float = 60.0
    hourly_limit: int | None = None
    daily_limit: int | None = None
    latency: float = 0.0
    fail_before_store: float = 0.0
    fail_after_store: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 2.0
    drop: float = 0.0
    burst_429: float = 0.0
    seed: int | None = None
    shuffle: bool = True

    def __post_init__(self) -> None:
        if not self.api_key:
            raise InputError("sandbox api_key is empty: give a non-empty key (default 'sandbox-key')")
        for name in ("rate", "hourly_limit", "daily_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"sandbox {name} must be a whole number >= 1 or unset; got {value!r}")
        if not self.window > 0:
            raise InputError(f"sandbox window must be > 0 seconds; got {self.window!r}")
        for name in ("latency", "slow_seconds"):
            if getattr(self, name) < 0:
                raise InputError(f"sandbox {name} must be >= 0 seconds; got {getattr(self, name)!r}")
        for name in FAULT_KINDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"sandbox {name} is a probability: give a value in [0, 1]; got {value!r}")


@dataclass(frozen=True)
class _Window:
    family: str  # "minute" | "hourly" | "daily"
    limit: int
    length: float


@dataclass
class _Reply:
    status: int
    body: dict[str, Any] | None  # None: drop the connection without answering
    headers: dict[str, str] = field(default_factory=dict)


class _BadRequest(Exception):
    """A 422 with a message naming the field."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _merge_labels(*lists: list[str]) -> list[str]:
    """Union of label lists, first occurrence order kept, no repeats."""
    return list(dict.fromkeys(itertools.chain.from_iterable(lists)))


def _parse_body(raw: bytes) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Validate a bulk_create body; return (contacts, append_label_names, run_dedupe) or raise _BadRequest."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("request body is not valid JSON: send a JSON object with a 'contacts' list") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object with a 'contacts' list")
    contacts = body.get("contacts")
    if not isinstance(contacts, list):
        raise _BadRequest("contacts must be a list of contact objects")
    if not contacts:
        raise _BadRequest("contacts must hold at least 1 contact")
    if len(contacts) > settings.MAX_CONTACTS_PER_REQUEST:
        raise _BadRequest(
            f"contacts may hold at most {settings.MAX_CONTACTS_PER_REQUEST} contacts per request; got {len(contacts)}"
        )
    append = body.get("append_label_names")
    if append is None:
        append = []
    elif not _is_str_list(append):
        raise _BadRequest("append_label_names must be a list of strings")
    run_dedupe = body.get("run_dedupe", False)
    if run_dedupe is None:
        run_dedupe = False
    elif not isinstance(run_dedupe, bool):
        raise _BadRequest("run_dedupe must be a boolean")
    cleaned = []
    for i, contact in enumerate(contacts):
        if not isinstance(contact, dict):
            raise _BadRequest(f"contacts[{i}] must be a contact object")
        kept: dict[str, Any] = {}
        for name in settings.CONTACT_FIELDS:
            value = contact.get(name)
            if value is None:
                continue
            if name == "label_names":
                if not _is_str_list(value):
                    raise _BadRequest(f"contacts[{i}].label_names must be a list of strings")
            elif name == "typed_custom_fields":
                if not isinstance(value, dict):
                    raise _BadRequest(f"contacts[{i}].typed_custom_fields must be an object")
            elif not isinstance(value, str):
                raise _BadRequest(f"contacts[{i}].{name} must be a string")
            kept[name] = value
        cleaned.append(kept)
    return cleaned, append, run_dedupe


def _email_key(contact: dict[str, Any]) -> str | None:
    email = (contact.get("email") or "").strip().lower()
    return email or None


def _name_key(contact: dict[str, Any]) -> tuple[str, str, str] | None:
    parts = tuple((contact.get(f) or "").strip().lower() for f in ("first_name", "last_name", "organization_name"))
    return parts if all(parts) else None  # type: ignore[return-value]


def _public(contact: dict[str, Any]) -> dict[str, Any]:
    """The contact as the endpoint returns it."""
    return {name: contact.get(name) for name in _RESPONSE_FIELDS}


class _SandboxState:
    """Store, dedupe indexes, rate windows, fault draws and counters, behind one lock. No HTTP here."""

    def __init__(self, config: SandboxConfig):
        self.config = config
        self.lock = threading.Lock()
        self.windows = [
            _Window(family, limit, length)
            for family, limit, length in (
                ("minute", config.rate, config.window),
                ("hourly", config.hourly_limit, settings.APOLLO_WINDOWS["hourly"]),
                ("daily", config.daily_limit, settings.APOLLO_WINDOWS["daily"]),
            )
            if limit is not None
        ]
        self.reset()

    def reset(self) -> None:
        """Clear store, counters and windows; restart the random stream from the seed."""
        with self.lock:
            self.rng = random.Random(self.config.seed)
            self.store: list[dict[str, Any]] = []
            self.by_email: dict[str, dict[str, Any]] = {}
            self.by_name: dict[tuple[str, str, str], dict[str, Any]] = {}
            self.usage: dict[tuple[str, str], tuple[int, int]] = {}  # (key, family) -> (window index, count)
            self.id_counter = itertools.count(1)
            self.requests = 0
            self.status_counts: dict[str, int] = {}
            self.faults = {kind: 0 for kind in FAULT_KINDS}
            self.max_contacts_in_request = 0
            self.created = 0
            self.existing = 0

    # --- rate windows (call with the lock held) ----------------------------------------------
    def _window_state(self, key: str, now: float) -> list[tuple[_Window, int, float]]:
        """(window, used in the current window, seconds until it resets) for each configured window."""
        out = []
        for w in self.windows:
            index = math.floor(now / w.length)
            seen_index, count = self.usage.get((key, w.family), (index, 0))
            used = count if seen_index == index else 0
            out.append((w, used, (index + 1) * w.length - now))
        return out

    def _count(self, key: str, now: float) -> None:
        for w in self.windows:
            index = math.floor(now / w.length)
            seen_index, count = self.usage.get((key, w.family), (index, 0))
            self.usage[(key, w.family)] = (index, count + 1 if seen_index == index else 1)

    def rate_headers(self, family: str, key: str, now: float) -> dict[str, str]:
        """The rate headers of the way in, from the current usage; none when no limit is configured."""
        state = self._window_state(key, now)
        if not state:
            return {}
        if family == _APOLLO:
            headers = {}
            for w, used, _ in state:
                headers[f"x-rate-limit-{w.family}"] = str(w.limit)
                headers[f"x-{w.family}-requests-left"] = str(max(w.limit - used, 0))
                headers[f"x-{w.family}-usage"] = str(used)
            return headers
        # Gateway: the tightest window (fewest left; on a tie the one that resets last).
        w, used, reset_in = min(state, key=lambda s: (s[0].limit - s[1], -s[2]))
        return {
            settings.GATEWAY_LIMIT_HEADER: str(w.limit),
            settings.GATEWAY_REMAINING_HEADER: str(max(w.limit - used, 0)),
            settings.GATEWAY_RESET_HEADER: f"{max(reset_in, 0.0):.3f}",
        }

    def over_limit(self, key: str, now: float) -> tuple[_Window, float] | None:
        """The spent window that frees up last, with seconds until it does; None when all have room."""
        spent = [(w, reset_in) for w, used, reset_in in self._window_state(key, now) if used >= w.limit]
        return max(spent, key=lambda s: s[1]) if spent else None

    # --- store (call with the lock held) -----------------------------------------------------
    def _new_id(self) -> str:
        # ObjectId-like: 8 hex of seconds, 8 random hex, 8 hex counter (unique within a server).
        return f"{int(time.time()) & 0xFFFFFFFF:08x}{self.rng.getrandbits(32):08x}{next(self.id_counter) & 0xFFFFFFFF:08x}"

    def create_or_match(
        self, contacts: list[dict[str, Any]], append: list[str], run_dedupe: bool
    ) -> dict[str, list[dict[str, Any]]]:
        """Store the contacts (or match them when run_dedupe) and return the response body."""
        created, existing = [], []
        for contact in contacts:
            email, name = _email_key(contact), _name_key(contact)
            if run_dedupe:
                match = self.by_email.get(email) if email else (self.by_name.get(name) if name else None)
                if match is not None:
                    existing.append(_public(match))
                    continue
            stamp = _now_iso()
            record = dict(contact)
            record["id"] = self._new_id()
            record["label_names"] = _merge_labels(contact.get("label_names", []), append)
            record["typed_custom_fields"] = dict(contact.get("typed_custom_fields", {}))
            record["phone_numbers"] = [{"raw_number": contact[p]} for p in settings.PHONE_FIELDS if contact.get(p)]
            record["created_at"] = record["updated_at"] = stamp
            self.store.append(record)
            if email:
                self.by_email.setdefault(email, record)
            if name:
                self.by_name.setdefault(name, record)
            created.append(_public(record))
        self.created += len(created)
        self.existing += len(existing)
        if self.config.shuffle:
            self.rng.shuffle(created)
            self.rng.shuffle(existing)
        return {"created_contacts": created, "existing_contacts": existing}

    def draw_fault(self) -> str | None:
        """One draw per configured fault kind, in order; the first that fires wins (lock held)."""
        for kind in FAULT_KINDS:
            p = getattr(self.config, kind)
            if p > 0 and self.rng.random() < p:
                self.faults[kind] += 1
                return kind
        return None

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters."""
        with self.lock:
            return {
                "requests": self.requests,
                "status_counts": dict(self.status_counts),
                "faults": dict(self.faults),
                "contacts_stored": len(self.store),
                "max_contacts_in_request": self.max_contacts_in_request,
                "created": self.created,
                "existing": self.existing,
            }

    def contacts(self) -> list[dict[str, Any]]:
        """Copies of every stored contact, in creation order."""
        with self.lock:
            return json.loads(json.dumps(self.store))


# --- error bodies ----------------------------------------------------------------------------
_GATEWAY_ERRORS = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    411: ("invalid_request_error", "length_required"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("api_error", "internal_error"),
    503: ("api_error", "service_unavailable"),
}


def _error(family: str, status: int, message: str) -> _Reply:
    if family == _APOLLO:
        return _Reply(status, {"status": status, "message": message})
    kind, code = _GATEWAY_ERRORS.get(status, ("api_error", "error"))
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    return _Reply(
        status,
        {"error": {"type": kind, "code": code, "message": message, "request_id": request_id}},
        {"X-Request-Id": request_id},
    )


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP adapter over :class:`_SandboxState`."""

    protocol_version = "HTTP/1.1"
    server_version = "apollo-sync-sandbox"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: no request log (and so never a header value)."""

    # --- plumbing ----------------------------------------------------------------------------
    def _send(self, reply: _Reply) -> None:
        if reply.body is None:
            self.close_connection = True
            return
        payload = json.dumps(reply.body, separators=(",", ":")).encode()
        try:
            phrase = HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = ""
        head = [
            f"HTTP/1.1 {reply.status} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        head.extend(f"{k}: {v}" for k, v in reply.headers.items())
        if self.close_connection:
            head.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        except OSError:  # the client gave up (a timed-out slow request): nothing to tell anyone
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        """The request body, or None (and the connection marked to close) when it cannot be read in step."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _family(self, path: str) -> str | None:
        if path.startswith(settings.APOLLO_PATH_PREFIX + "/"):
            return _APOLLO
        if path.startswith(settings.GATEWAY_PATH_PREFIX + "/"):
            return _GATEWAY
        return None

    # --- routing -----------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith(ADMIN_PREFIX + "/"):
            self._send(self._admin(method, path))
            return
        family = self._family(path)
        if family is not None and path == self._bulk_path(family):
            if method != "POST":
                self._send(_error(family, 405, f"{method} is not allowed here: use POST"))
                return
            self._send(self._bulk_create(family))
            return
        self._send(_error(family or _GATEWAY, 404, f"no route for {method} {path}"))

    @staticmethod
    def _bulk_path(family: str) -> str:
        prefix = settings.APOLLO_PATH_PREFIX if family == _APOLLO else settings.GATEWAY_PATH_PREFIX
        return prefix + settings.BULK_CREATE_PATH

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._body = b""
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._body = self._read_body()  # always read it, so a keep-alive connection stays in step
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._body = self._read_body()
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._body = self._read_body()
        self._route("DELETE")

    # --- admin -------------------------------------------------------------------------------
    def _admin(self, method: str, path: str) -> _Reply:
        state = self.server.state
        if (method, path) == ("GET", ADMIN_PREFIX + "/contacts"):
            return _Reply(200, {"contacts": state.contacts()})
        if (method, path) == ("GET", ADMIN_PREFIX + "/stats"):
            return _Reply(200, state.stats())
        if (method, path) == ("POST", ADMIN_PREFIX + "/reset"):
            state.reset()
            return _Reply(200, {"reset": True})
        return _error(_GATEWAY, 404, f"no admin route for {method} {path}")

    # --- the endpoint ------------------------------------------------------------------------
    def _api_key(self, family: str) -> str | None:
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else None
        if family == _APOLLO:
            return (self.headers.get("X-Api-Key") or "").strip() or bearer
        return bearer

    def _bulk_create(self, family: str) -> _Reply:
        state = self.server.state
        config = state.config
        raw = self._body
        if config.latency:
            time.sleep(config.latency)
        key = self._api_key(family)
        if key != config.api_key:
            return self._finish(_error(family, 401, "Invalid access credentials."))
        if raw is None:
            message = f"send the body with a Content-Length header, at most {MAX_BODY_BYTES} bytes, not chunked"
            return self._finish(_error(family, 411, message))
        try:
            contacts, append, run_dedupe = _parse_body(raw)
        except _BadRequest as exc:
            self._note_size(raw)
            return self._finish(_error(family, 422, str(exc)), key=key)
        with state.lock:
            state.max_contacts_in_request = max(state.max_contacts_in_request, len(contacts))
            now = time.time()
            spent = state.over_limit(key, now)
            if spent is not None:
                window, reset_in = spent
                reply = self._rate_limited(family, window, max(1, math.ceil(reset_in)))
                return self._finish_locked(reply, key, now)
            fault = state.draw_fault()
            if fault == "burst_429":
                return self._finish_locked(_error(family, 429, "Too many requests, retry after 1 s"), key, now, retry=1)
            state._count(key, now)
            if fault == "drop":
                return self._finish_locked(_Reply(0, None), key, now)
            if fault == "fail_before_store":
                return self._finish_locked(_error(family, 503, "Service temporarily unavailable"), key, now)
            if fault != "slow":
                body = state.create_or_match(contacts, append, run_dedupe)
                status = 500 if fault == "fail_after_store" else 200
                reply = _error(family, 500, "Internal server error") if status == 500 else _Reply(200, body)
                return self._finish_locked(reply, key, now)
        time.sleep(config.slow_seconds)  # slow: outside the lock, then store and answer late
        with state.lock:
            body = state.create_or_match(contacts, append, run_dedupe)
            return self._finish_locked(_Reply(200, body), key, time.time())

    def _rate_limited(self, family: str, window: _Window, retry_after: int) -> _Reply:
        if family == _APOLLO:
            message = f"{window.family} rate limit exceeded"
        else:
            message = f"Rate limit exceeded: {window.limit} requests per {window.length:g} s; retry after {retry_after} s"
        reply = _error(family, 429, message)
        reply.headers[settings.RETRY_AFTER_HEADER] = str(retry_after)
        return reply

    def _note_size(self, raw: bytes) -> None:
        """Record the size of an over-long contacts list too: tests use it to catch clients that overfill."""
        try:
            contacts = json.loads(raw).get("contacts")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return
        if isinstance(contacts, list):
            with self.server.state.lock:
                self.server.state.max_contacts_in_request = max(self.server.state.max_contacts_in_request, len(contacts))

    def _finish(self, reply: _Reply, key: str | None = None) -> _Reply:
        with self.server.state.lock:
            return self._finish_locked(reply, key, time.time())

    def _finish_locked(self, reply: _Reply, key: str | None, now: float, retry: int | None = None) -> _Reply:
        """Count the answer, add the rate headers of an authenticated request (lock held)."""
        state = self.server.state
        state.requests += 1
        label = str(reply.status) if reply.body is not None else "dropped"
        state.status_counts[label] = state.status_counts.get(label, 0) + 1
        if key is not None and reply.body is not None:
            reply.headers.update(state.rate_headers(self._family(self.path) or _GATEWAY, key, now))
        if retry is not None:
            reply.headers[settings.RETRY_AFTER_HEADER] = str(retry)
        return reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: _SandboxState):
        self.state = state
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open keep-alive connection so no handler thread outlives the server."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away is not news
        super().handle_error(request, client_address)


def _check_host(host: str) -> str:
    if host not in _LOOPBACK_ALIASES:
        raise InputError(f"the sandbox binds {LOOPBACK_HOST} only; got host {host!r}: leave the host out or use {LOOPBACK_HOST}")
    return LOOPBACK_HOST


def _make_server(config: SandboxConfig, port: int, host: str) -> _Server:
    bind = _check_host(host)
    if not 0 <= port <= 65535:
        raise InputError(f"port must be in 0..65535 (0 = any free port); got {port}")
    try:
        return _Server((bind, port), _SandboxState(config))
    except OSError as exc:
        raise InputError(f"cannot listen on {bind}:{port} ({exc.strerror}): pick another port or 0 for a free one") from None


class _UrlsMixin:
    url: str

    @property
    def gateway_base_url(self) -> str:
        """Base URL to give the client for the gateway way in."""
        return self.url + settings.GATEWAY_PATH_PREFIX

    @property
    def apollo_base_url(self) -> str:
        """Base URL to give the client for the Apollo-direct way in."""
        return self.url + settings.APOLLO_PATH_PREFIX


class SandboxServer(_UrlsMixin):
    """The sandbox in a background thread of this process. Use as a context manager.

    >>> with SandboxServer(SandboxConfig(rate=60)) as sb:
    ...     client = ApolloClient(base_url=sb.gateway_base_url, api_key="sandbox-key")
    """

    def __init__(self, config: SandboxConfig | None = None, *, port: int = 0, host: str = LOOPBACK_HOST):
        self.config = config or SandboxConfig()
        self._port = port
        self._host = host
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> SandboxServer:
        """Bind and start serving; ``.url`` is set on return."""
        if self._server is not None:
            return self
        self._server = _make_server(self.config, self._port, self._host)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="apollo-sync-sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _state(self) -> _SandboxState:
        if self._server is None:
            raise RuntimeError("the sandbox is not running: use it inside 'with SandboxServer(...)'")
        return self._server.state

    def contacts(self) -> list[dict[str, Any]]:
        """Every stored contact (copies), in creation order, with id, created_at and all stored fields."""
        return self._state().contacts()

    def stats(self) -> dict[str, Any]:
        """requests, status_counts, faults, contacts_stored, max_contacts_in_request, created, existing.

        ``requests`` counts bulk_create requests answered (or dropped); ``status_counts`` maps
        ``"200"``, ``"429"``... to counts, with ``"dropped"`` for connections closed without an answer;
        ``max_contacts_in_request`` includes requests refused for holding more than 100.
        """
        return self._state().stats()

    def reset(self) -> None:
        """Clear the store, counters and rate windows."""
        self._state().reset()


def config_to_argv(config: SandboxConfig) -> list[str]:
    """The ``python -m apollo_sync.sandbox`` flags that reproduce ``config`` (defaults left out)."""
    argv: list[str] = []
    defaults = SandboxConfig()
    for f in fields(SandboxConfig):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name == "shuffle":
            argv.append("--no-shuffle")
        else:
            argv += ["--" + f.name.replace("_", "-"), str(value)]
    return argv


class SandboxProcess(_UrlsMixin):
    """The sandbox in a child process (``python -m apollo_sync.sandbox``), same API as SandboxServer.

    For benchmarks (the server gets its own interpreter) and kill -9 tests (``.process``).
    ``contacts()``/``stats()``/``reset()`` go over the admin endpoints.
    """

    def __init__(self, config: SandboxConfig | None = None, *, port: int = 0, startup_timeout: float = 30.0):
        self.config = config or SandboxConfig()
        self._port = port
        self._startup_timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> SandboxProcess:
        """Start the child and wait for its announce line; ``.url`` is set on return."""
        if self.process is not None:
            return self
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, "-m", "apollo_sync.sandbox", "--port", str(self._port), *config_to_argv(self.config)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(self._startup_timeout)
        first = line[0].strip() if line else ""
        if not first.startswith(ANNOUNCE_PREFIX):
            self.stop()
            raise RuntimeError(f"sandbox child did not announce its URL within {self._startup_timeout:g} s (got {first!r})")
        self.url = first[len(ANNOUNCE_PREFIX) :]
        return self

    def stop(self) -> None:
        """Terminate the child (kill it if it does not exit within 5 s)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self.process.pid if self.process is not None else None

    def _admin(self, method: str, name: str) -> dict[str, Any]:
        if not self.url:
            raise RuntimeError("the sandbox process is not running: use it inside 'with SandboxProcess(...)'")
        request = urllib.request.Request(f"{self.url}{ADMIN_PREFIX}/{name}", method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback URL we bound
            return json.loads(response.read())

    def contacts(self) -> list[dict[str, Any]]:
        """Every stored contact, via ``GET /_sandbox/contacts``."""
        return self._admin("GET", "contacts")["contacts"]

    def stats(self) -> dict[str, Any]:
        """The counters, via ``GET /_sandbox/stats``."""
        return self._admin("GET", "stats")

    def reset(self) -> None:
        """Clear store, counters and windows, via ``POST /_sandbox/reset``."""
        self._admin("POST", "reset")


def serve_forever(
    config: SandboxConfig, port: int, host: str = LOOPBACK_HOST, announce: Callable[[str], Any] = print
) -> None:
    """Serve in the foreground until interrupted (Ctrl-C or SIGTERM).

    ``announce`` receives ``"sandbox listening on http://127.0.0.1:PORT"`` once the socket is bound.
    Raises InputError for a non-loopback host or a port that cannot be bound.
    """
    server = _make_server(config, port, host)
    bound_host, bound_port = server.server_address[:2]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        announce(f"{ANNOUNCE_PREFIX}http://{bound_host}:{bound_port}")
        sys.stdout.flush()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close_connections()
        server.server_close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability in [0, 1]; got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m apollo_sync.sandbox`` flags, mirroring SandboxConfig."""
    p = argparse.ArgumentParser(prog="python -m apollo_sync.sandbox", description=__doc__.split("\n\n")[0])
    d = SandboxConfig()
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = any free port; default 8765)")
    p.add_argument("--host", default=LOOPBACK_HOST, help="only 127.0.0.1 (or localhost) is accepted")
    p.add_argument("--api-key", default=d.api_key, help="the key clients must send (default: sandbox-key)")
    p.add_argument("--rate", type=int, default=None, help="requests per --window per key (default: no limit)")
    p.add_argument("--window", type=float, default=d.window, help="primary window length in seconds (default 60)")
    p.add_argument("--hourly-limit", type=int, default=None, help="requests per hour per key")
    p.add_argument("--daily-limit", type=int, default=None, help="requests per day per key")
    p.add_argument("--latency", type=float, default=0.0, help="seconds slept on every bulk_create request")
    p.add_argument("--fail-before-store", type=_probability, default=0.0, help="probability of a 503, nothing stored")
    p.add_argument("--fail-after-store", type=_probability, default=0.0, help="probability of a 500 after storing")
    p.add_argument("--slow", type=_probability, default=0.0, help="probability of answering --slow-seconds late")
    p.add_argument("--slow-seconds", type=float, default=d.slow_seconds, help="delay of a slow answer (default 2)")
    p.add_argument("--drop", type=_probability, default=0.0, help="probability of closing without an answer")
    p.add_argument("--burst-429", type=_probability, default=0.0, help="probability of a spurious 429 (Retry-After: 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for faults, ids and shuffles")
    p.add_argument("--no-shuffle", action="store_true", help="return contacts in request order")
    return p


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """SandboxConfig from parsed ``build_parser()`` arguments (each flag is named after its field)."""
    values = {f.name: getattr(args, f.name) for f in fields(SandboxConfig) if f.name != "shuffle"}
    return SandboxConfig(**values, shuffle=not args.no_shuffle)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m apollo_sync.sandbox``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        serve_forever(config_from_args(args), args.port, args.host, announce=lambda line: print(line, flush=True))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
