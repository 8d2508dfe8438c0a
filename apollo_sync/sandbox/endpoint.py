"""What the sandbox answers, as plain functions from a request to a :class:`Reply`: the Bulk Create endpoint on
both ways in, the admin routes, validation and the two error shapes. The HTTP plumbing is in :mod:`.server`.

- ``POST /apis/v1/apollo/contacts/bulk_create``: the AISA gateway (``Authorization: Bearer <key>``,
  ``{"error": {...}}`` error bodies, ``X-RateLimit-*`` headers).
- ``POST /api/v1/contacts/bulk_create``: Apollo direct (``X-Api-Key: <key>`` or Bearer,
  ``{"status": ..., "message": ...}`` error bodies, ``x-rate-limit-minute`` / ``x-minute-requests-left`` ...).
- ``GET /_sandbox/contacts``, ``GET /_sandbox/stats``, ``POST /_sandbox/reset``: admin, no auth.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apollo_sync import settings
from apollo_sync.sandbox.state import APOLLO, GATEWAY, SandboxState, Window

ADMIN_PREFIX = "/_sandbox"
MAX_BODY_BYTES = 16 * 1024 * 1024

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


@dataclass
class Reply:
    """One answer: status, JSON body and extra headers. ``body`` None: drop the connection without answering."""

    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(Exception):
    """A 422 with a message naming the field."""


def answer(state: SandboxState, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> Reply:
    """The reply to one request. ``path`` without its query; ``body`` None when it could not be read in step."""
    if path.startswith(ADMIN_PREFIX + "/"):
        return admin(state, method, path)
    family = family_of(path)
    if family is not None and path == bulk_path(family):
        if method != "POST":
            return error(family, 405, f"{method} is not allowed here: use POST")
        return bulk_create(state, family, headers, body)
    return error(family or GATEWAY, 404, f"no route for {method} {path}")


def family_of(path: str) -> str | None:
    """Which way in ``path`` belongs to, or None."""
    if path.startswith(settings.APOLLO_PATH_PREFIX + "/"):
        return APOLLO
    if path.startswith(settings.GATEWAY_PATH_PREFIX + "/"):
        return GATEWAY
    return None


def bulk_path(family: str) -> str:
    """The bulk_create path of a way in."""
    prefix = settings.APOLLO_PATH_PREFIX if family == APOLLO else settings.GATEWAY_PATH_PREFIX
    return prefix + settings.BULK_CREATE_PATH


def admin(state: SandboxState, method: str, path: str) -> Reply:
    """The admin routes: the stored contacts, the counters, a reset."""
    if (method, path) == ("GET", ADMIN_PREFIX + "/contacts"):
        return Reply(200, {"contacts": state.contacts()})
    if (method, path) == ("GET", ADMIN_PREFIX + "/stats"):
        return Reply(200, state.stats())
    if (method, path) == ("POST", ADMIN_PREFIX + "/reset"):
        state.reset()
        return Reply(200, {"reset": True})
    return error(GATEWAY, 404, f"no admin route for {method} {path}")


def bulk_create(state: SandboxState, family: str, headers: Mapping[str, str], raw: bytes | None) -> Reply:
    """Bulk Create Contacts: auth, validation, rate windows, one fault draw, then store (or match) and answer."""
    config = state.config
    if config.latency:
        time.sleep(config.latency)
    key = api_key(family, headers)
    if key != config.api_key:
        return _finish(state, family, error(family, 401, "Invalid access credentials."))
    if raw is None:
        message = f"send the body with a Content-Length header, at most {MAX_BODY_BYTES} bytes, not chunked"
        return _finish(state, family, error(family, 411, message))
    try:
        contacts, append, run_dedupe = parse_body(raw)
    except BadRequest as exc:
        _note_size(state, raw)
        return _finish(state, family, error(family, 422, str(exc)), key=key)
    with state.lock:
        state.note_size(len(contacts))
        now = state.clock()
        spent = state.over_limit(key, now)
        if spent is not None:
            window, reset_in = spent
            reply = _rate_limited(family, window, max(1, math.ceil(reset_in)))
            return _finish_locked(state, family, reply, key, now)
        fault = state.draw_fault()
        if fault == "burst_429":
            return _finish_locked(state, family, error(family, 429, "Too many requests, retry after 1 s"), key, now, retry=1)
        state.count_request(key, now)
        if fault == "drop":
            return _finish_locked(state, family, Reply(0, None), key, now)
        if fault == "fail_before_store":
            return _finish_locked(state, family, error(family, 503, "Service temporarily unavailable"), key, now)
        if fault != "slow":
            body = state.create_or_match(contacts, append, run_dedupe)
            status = 500 if fault == "fail_after_store" else 200
            reply = error(family, 500, "Internal server error") if status == 500 else Reply(200, body)
            return _finish_locked(state, family, reply, key, now)
    time.sleep(config.slow_seconds)  # slow: outside the lock, then store and answer late
    with state.lock:
        body = state.create_or_match(contacts, append, run_dedupe)
        return _finish_locked(state, family, Reply(200, body), key, state.clock())


def api_key(family: str, headers: Mapping[str, str]) -> str | None:
    """The key the request carries: Bearer on both ways in, ``X-Api-Key`` (first) on Apollo direct."""
    auth = headers.get("Authorization") or ""
    scheme, _, token = auth.partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else None
    if family == APOLLO:
        return (headers.get("X-Api-Key") or "").strip() or bearer
    return bearer


def parse_body(raw: bytes) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Validate a bulk_create body; return (contacts, append_label_names, run_dedupe) or raise BadRequest."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON: send a JSON object with a 'contacts' list") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with a 'contacts' list")
    contacts = body.get("contacts")
    if not isinstance(contacts, list):
        raise BadRequest("contacts must be a list of contact objects")
    if not contacts:
        raise BadRequest("contacts must hold at least 1 contact")
    if len(contacts) > settings.MAX_CONTACTS_PER_REQUEST:
        raise BadRequest(
            f"contacts may hold at most {settings.MAX_CONTACTS_PER_REQUEST} contacts per request; got {len(contacts)}"
        )
    append = body.get("append_label_names")
    if append is None:
        append = []
    elif not _is_str_list(append):
        raise BadRequest("append_label_names must be a list of strings")
    run_dedupe = body.get("run_dedupe", False)
    if run_dedupe is None:
        run_dedupe = False
    elif not isinstance(run_dedupe, bool):
        raise BadRequest("run_dedupe must be a boolean")
    return [_checked_contact(i, contact) for i, contact in enumerate(contacts)], append, run_dedupe


def error(family: str, status: int, message: str) -> Reply:
    """An error reply in the way in's shape (the gateway's carries a request id, also as ``X-Request-Id``)."""
    if family == APOLLO:
        return Reply(status, {"status": status, "message": message})
    kind, code = _GATEWAY_ERRORS.get(status, ("api_error", "error"))
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    return Reply(
        status,
        {"error": {"type": kind, "code": code, "message": message, "request_id": request_id}},
        {"X-Request-Id": request_id},
    )


def _checked_contact(i: int, contact: Any) -> dict[str, Any]:
    """The known fields of ``contacts[i]``, type-checked; unknown fields are dropped."""
    if not isinstance(contact, dict):
        raise BadRequest(f"contacts[{i}] must be a contact object")
    kept: dict[str, Any] = {}
    for name in settings.CONTACT_FIELDS:
        value = contact.get(name)
        if value is None:
            continue
        if name == "label_names":
            if not _is_str_list(value):
                raise BadRequest(f"contacts[{i}].label_names must be a list of strings")
        elif name == "typed_custom_fields":
            if not isinstance(value, dict):
                raise BadRequest(f"contacts[{i}].typed_custom_fields must be an object")
        elif not isinstance(value, str):
            raise BadRequest(f"contacts[{i}].{name} must be a string")
        kept[name] = value
    return kept


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _rate_limited(family: str, window: Window, retry_after: int) -> Reply:
    if family == APOLLO:
        message = f"{window.family} rate limit exceeded"
    else:
        message = f"Rate limit exceeded: {window.limit} requests per {window.length:g} s; retry after {retry_after} s"
    reply = error(family, 429, message)
    reply.headers[settings.RETRY_AFTER_HEADER] = str(retry_after)
    return reply


def _note_size(state: SandboxState, raw: bytes) -> None:
    """Record the size of an over-long contacts list too: tests use it to catch clients that overfill."""
    try:
        contacts = json.loads(raw).get("contacts")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return
    if isinstance(contacts, list):
        with state.lock:
            state.note_size(len(contacts))


def _finish(state: SandboxState, family: str, reply: Reply, key: str | None = None) -> Reply:
    with state.lock:
        return _finish_locked(state, family, reply, key, state.clock())


def _finish_locked(
    state: SandboxState, family: str, reply: Reply, key: str | None, now: float, retry: int | None = None
) -> Reply:
    """Count the answer, add the rate headers of an authenticated request (lock held)."""
    state.count_answer(str(reply.status) if reply.body is not None else "dropped")
    if key is not None and reply.body is not None:
        reply.headers.update(state.rate_headers(family, key, now))
    if retry is not None:
        reply.headers[settings.RETRY_AFTER_HEADER] = str(retry)
    return reply
