"""What the sandbox answers, as plain functions from a request to a :class:`~.wire.Reply`: the routes of both ways
in, the pipeline every rate-counted request runs through, Bulk Create's body, and the admin routes. Bulk Update's
bodies are in :mod:`.update`, the shared reply and error shapes in :mod:`.wire`, the HTTP plumbing in :mod:`.server`.

Ways in (``<prefix>`` is ``/apis/v1/apollo`` for the AISA gateway: ``Authorization: Bearer <key>``,
``{"error": {...}}`` error bodies, ``X-RateLimit-*`` headers; or ``/api/v1`` for Apollo direct: ``X-Api-Key: <key>``
or Bearer, ``{"status": ..., "message": ...}`` error bodies, ``x-rate-limit-minute`` / ``x-minute-requests-left``
...):

- ``POST <prefix>/contacts/bulk_create``: store (or with ``run_dedupe`` match) up to 100 contacts.
- ``POST <prefix>/contacts/bulk_update``: update up to 1,000 contacts by id (see :mod:`.update`).
- ``PATCH <prefix>/contacts/{id}``: update one contact; 404 for an unknown id.

All three share one budget of rate windows per key, the latency and the fault draws. Any other method on these
paths is a 405 (on ``/contacts/{id}``: for a stored id; an unknown one is a 404), any other path a 404.

Admin, no auth, not counted: ``GET /_sandbox/contacts``, ``GET /_sandbox/stats``, ``POST /_sandbox/reset``, and
``POST /_sandbox/contacts`` with ``{"contacts": [...]}`` to seed contacts that exist before a sync (answered
``{"contacts": [<public shape>...]}``).

Every request, admin ones included, must name the sandbox by a loopback name in its ``Host`` header:
``127.0.0.1``, ``localhost`` or ``[::1]``, with any port. Any other Host (or none) is a 421 Misdirected Request in
the way in's error shape, before auth, routing or counting. Binding 127.0.0.1 keeps other machines out; this keeps
out web pages, whose browser can be pointed at 127.0.0.1 by a DNS name (DNS rebinding) but then sends that name.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any
from urllib.parse import unquote

from apollo_sync import settings
from apollo_sync.sandbox.state import APOLLO, GATEWAY, SandboxState, Window
from apollo_sync.sandbox.update import bulk_update_operation, update_one_operation, update_size
from apollo_sync.sandbox.wire import BadRequest, Operation, Reply, checked_fields, error, is_str_list

ADMIN_PREFIX = "/_sandbox"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
"""The names a request's Host header may give (with any port, IPv6 in brackets), case-insensitive."""
MAX_BODY_BYTES = 16 * 1024 * 1024
_CONTACT_PREFIX = settings.CONTACT_PATH.split("{", 1)[0]  # "/contacts/"

Parse = Callable[[bytes], Operation]
"""A validated body, from its raw bytes, as the operation to run; raises BadRequest."""


def answer(state: SandboxState, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> Reply:
    """The reply to one request. ``path`` without its query; ``body`` None when it could not be read in step."""
    if not names_loopback(headers.get("Host")):
        return misdirected(family_of(path) or GATEWAY, headers.get("Host"))
    if path.startswith(ADMIN_PREFIX + "/"):
        return admin(state, method, path, body)
    family = family_of(path)
    if family is None:
        return error(GATEWAY, 404, f"no route for {method} {path}")
    route = path[len(prefix_of(family)) :]
    if route in (settings.BULK_CREATE_PATH, settings.BULK_UPDATE_PATH):
        if method != "POST":
            return error(family, 405, f"{method} is not allowed here: use POST")
        if route == settings.BULK_CREATE_PATH:
            return run(state, family, "bulk_create", headers, body, create_operation)
        return run(state, family, "bulk_update", headers, body, bulk_update_operation)
    contact_id = contact_id_of(route)
    if contact_id is not None and method == "PATCH":
        return run(state, family, "update_one", headers, body, partial(update_one_operation, family, contact_id))
    if contact_id is not None and state.knows(contact_id):  # an unknown id is no resource: the 404 below
        return error(family, 405, f"{method} is not allowed here: use PATCH to update a contact")
    return error(family, 404, f"no route for {method} {path}")


def names_loopback(host: str | None) -> bool:
    """Whether a Host header names this machine's loopback: one of :data:`LOOPBACK_NAMES`, optionally ``:port``."""
    value = (host or "").strip().lower()
    if value.startswith("["):  # [::1] or [::1]:8765
        name, closed, port = value[1:].partition("]")
        if not closed or (port and not port.startswith(":")):
            return False
        port = port[1:]
    elif value.count(":") > 1:  # a bare IPv6 address: no port can follow
        name, port = value, ""
    else:
        name, _, port = value.partition(":")
    return name in LOOPBACK_NAMES and (port == "" or (port.isascii() and port.isdigit()))


def misdirected(family: str, host: str | None) -> Reply:
    """The 421 for a Host that does not name loopback, in the way in's error shape."""
    shown = repr(host[:100]) if host else "none"
    reply = error(family, 421, f"Host {shown} is not this sandbox: send Host 127.0.0.1, localhost or [::1] (any port)")
    if family == GATEWAY and reply.body is not None:
        reply.body["error"].update(type="invalid_request_error", code="misdirected_request")
    return reply


def family_of(path: str) -> str | None:
    """Which way in ``path`` belongs to, or None."""
    if path.startswith(settings.APOLLO_PATH_PREFIX + "/"):
        return APOLLO
    if path.startswith(settings.GATEWAY_PATH_PREFIX + "/"):
        return GATEWAY
    return None


def prefix_of(family: str) -> str:
    """The path prefix of a way in."""
    return settings.APOLLO_PATH_PREFIX if family == APOLLO else settings.GATEWAY_PATH_PREFIX


def bulk_path(family: str) -> str:
    """The bulk_create path of a way in."""
    return prefix_of(family) + settings.BULK_CREATE_PATH


def contact_id_of(route: str) -> str | None:
    """The id in a ``/contacts/{id}`` route (one non-empty path segment), or None."""
    if not route.startswith(_CONTACT_PREFIX):
        return None
    contact_id = unquote(route[len(_CONTACT_PREFIX) :])
    return contact_id if contact_id and "/" not in contact_id else None


def admin(state: SandboxState, method: str, path: str, body: bytes | None = b"") -> Reply:
    """The admin routes: the stored contacts, the counters, a reset, and seeding contacts."""
    if (method, path) == ("GET", ADMIN_PREFIX + "/contacts"):
        return Reply(200, {"contacts": state.contacts()})
    if (method, path) == ("POST", ADMIN_PREFIX + "/contacts"):
        try:
            contacts = seed_contacts(body)
        except BadRequest as exc:
            return error(GATEWAY, 422, str(exc))
        return Reply(200, {"contacts": state.seed(contacts)})
    if (method, path) == ("GET", ADMIN_PREFIX + "/stats"):
        return Reply(200, state.stats())
    if (method, path) == ("POST", ADMIN_PREFIX + "/reset"):
        state.reset()
        return Reply(200, {"reset": True})
    return error(GATEWAY, 404, f"no admin route for {method} {path}")


def seed_contacts(raw: bytes | None) -> list[dict[str, Any]]:
    """The contacts of a seed body ``{"contacts": [...]}``, checked by :func:`checked_seed`; raise BadRequest."""
    if raw is None:
        raise BadRequest(f"send the body with a Content-Length header, at most {MAX_BODY_BYTES} bytes, not chunked")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON: send a JSON object with a 'contacts' list") from None
    return checked_seed(body.get("contacts") if isinstance(body, dict) else None)


def checked_seed(contacts: Any) -> list[dict[str, Any]]:
    """Contacts to seed, validated as bulk_create's are (no cap, none required); raise BadRequest naming the field."""
    if not isinstance(contacts, list):
        raise BadRequest("contacts must be a list of contact objects")
    return [checked_fields(f"contacts[{i}]", contact, blanks=False) for i, contact in enumerate(contacts)]


def run(
    state: SandboxState, family: str, endpoint: str, headers: Mapping[str, str], raw: bytes | None, parse: Parse
) -> Reply:
    """One rate-counted request of ``endpoint``: auth, validation, rate windows, one fault draw, then apply and answer.

    The same for bulk_create, bulk_update and PATCH: one budget per key, the same latency and fault kinds.
    """
    config = state.config
    if config.latency:
        time.sleep(config.latency)
    key = api_key(family, headers)
    if key != config.api_key:
        return _finish(state, family, endpoint, error(family, 401, "Invalid access credentials."))
    if raw is None:
        message = f"send the body with a Content-Length header, at most {MAX_BODY_BYTES} bytes, not chunked"
        return _finish(state, family, endpoint, error(family, 411, message))
    try:
        operation = parse(raw)
    except BadRequest as exc:
        _note_size(state, endpoint, raw)
        return _finish(state, family, endpoint, error(family, 422, str(exc)), key=key)
    with state.lock:
        state.note_size(operation.size, endpoint)
        now = state.clock()
        spent = state.over_limit(key, now)
        if spent is not None:
            window, reset_in = spent
            reply = _rate_limited(family, window, max(1, math.ceil(reset_in)))
            return _finish_locked(state, family, endpoint, reply, key, now)
        fault = state.draw_fault()
        if fault == "burst_429":
            reply = error(family, 429, "Too many requests, retry after 1 s")
            return _finish_locked(state, family, endpoint, reply, key, now, retry=1)
        state.count_request(key, now)
        if fault == "drop":
            return _finish_locked(state, family, endpoint, Reply(0, None), key, now)
        if fault == "fail_before_store":
            reply = error(family, 503, "Service temporarily unavailable")
            return _finish_locked(state, family, endpoint, reply, key, now)
        if fault != "slow":
            reply = operation.apply(state)
            if fault == "fail_after_store":
                reply = error(family, 500, "Internal server error")
            return _finish_locked(state, family, endpoint, reply, key, now)
    time.sleep(config.slow_seconds)  # slow: outside the lock, then apply and answer late
    with state.lock:
        return _finish_locked(state, family, endpoint, operation.apply(state), key, state.clock())


def create_operation(raw: bytes) -> Operation:
    """A bulk_create body as the operation that stores (or matches) its contacts."""
    contacts, append, run_dedupe = parse_body(raw)
    return Operation(len(contacts), lambda state: Reply(200, state.create_or_match(contacts, append, run_dedupe)))


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
    elif not is_str_list(append):
        raise BadRequest("append_label_names must be a list of strings")
    run_dedupe = body.get("run_dedupe", False)
    if run_dedupe is None:
        run_dedupe = False
    elif not isinstance(run_dedupe, bool):
        raise BadRequest("run_dedupe must be a boolean")
    return [checked_fields(f"contacts[{i}]", c, blanks=False) for i, c in enumerate(contacts)], append, run_dedupe


def _rate_limited(family: str, window: Window, retry_after: int) -> Reply:
    if family == APOLLO:
        message = f"{window.family} rate limit exceeded"
    else:
        message = f"Rate limit exceeded: {window.limit} requests per {window.length:g} s; retry after {retry_after} s"
    reply = error(family, 429, message)
    reply.headers[settings.RETRY_AFTER_HEADER] = str(retry_after)
    return reply


def _note_size(state: SandboxState, endpoint: str, raw: bytes) -> None:
    """Record the size of a refused (say over-long) request too: tests use it to catch clients that overfill."""
    sizer = {"bulk_create": _create_size, "bulk_update": update_size}.get(endpoint)
    size = sizer(raw) if sizer is not None else None
    if size is not None:
        with state.lock:
            state.note_size(size, endpoint)


def _create_size(raw: bytes) -> int | None:
    try:
        contacts = json.loads(raw).get("contacts")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return len(contacts) if isinstance(contacts, list) else None


def _finish(state: SandboxState, family: str, endpoint: str, reply: Reply, key: str | None = None) -> Reply:
    with state.lock:
        return _finish_locked(state, family, endpoint, reply, key, state.clock())


def _finish_locked(
    state: SandboxState, family: str, endpoint: str, reply: Reply, key: str | None, now: float, retry: int | None = None
) -> Reply:
    """Count the answer, add the rate headers of an authenticated request (lock held)."""
    body = reply.body
    answered = body is not None
    asynchronous = body is not None and reply.status == 200 and body.get("async") is True
    state.count_answer(str(reply.status) if answered else "dropped", endpoint, asynchronous=asynchronous)
    if key is not None and answered:
        reply.headers.update(state.rate_headers(family, key, now))
    if retry is not None:
        reply.headers[settings.RETRY_AFTER_HEADER] = str(retry)
    return reply
