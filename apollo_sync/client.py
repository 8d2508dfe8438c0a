"""Async client for Apollo's Bulk Create Contacts endpoint, direct or through the AISA gateway.

One call, :meth:`ApolloClient.bulk_create`, sends at most 100 contacts and returns what the endpoint created and
matched, plus the rate-limit windows its headers reported (:class:`RateInfo`, both header families). Error answers in
either error shape become :class:`~apollo_sync.errors.ApolloAPIError` (``AuthError`` for 401/403,
:class:`RateLimited` for 429; each carries the answer's ``rate``); a request whose answer never came (timeout, dropped connection) becomes
:class:`TransportFailure`, which says whether the request may have landed. The API key is held privately and never
appears in an exception, a repr or a log line.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import httpx

from apollo_sync import settings
from apollo_sync.errors import ApolloAPIError, ApolloSyncError, AuthError, ConfigError, InputError

AuthMode = Literal["auto", "bearer", "x-api-key"]

_REDACTED = "***"
_EPOCH_THRESHOLD = 1e9
"""A gateway ``X-RateLimit-Reset`` above this is an epoch time in seconds, otherwise seconds from now."""


# --- Rate-limit headers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowInfo:
    """One rate-limit window as an answer reported it.

    ``name`` is ``"minute"``, ``"hourly"`` or ``"daily"`` (Apollo direct) or ``"gateway"``. ``reset_after`` is the
    number of seconds from the answer until the window resets (the gateway sends it; Apollo does not).
    ``length`` is the window's length in seconds when known (Apollo's fixed windows).
    """

    name: str
    limit: int | None
    remaining: int | None
    reset_after: float | None = None
    length: float | None = None


@dataclass(frozen=True)
class RateInfo:
    """Every rate-limit window found in an answer's headers, plus ``Retry-After`` (seconds) if sent."""

    windows: tuple[WindowInfo, ...] = ()
    retry_after: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], *, now: float | None = None) -> RateInfo:
        """Parse both header families. ``now`` (epoch seconds) converts an epoch ``Reset`` to a delay."""
        lower = {k.lower(): v for k, v in headers.items()}
        now = time.time() if now is None else now
        windows: list[WindowInfo] = []
        for name, length in settings.APOLLO_WINDOWS.items():
            limit = _number(lower.get(f"x-rate-limit-{name}"))
            left = _number(lower.get(f"x-{name}-requests-left"))
            usage = _number(lower.get(f"x-{name}-usage"))
            if left is None and limit is not None and usage is not None:
                left = limit - usage
            if limit is None and left is None:
                continue
            windows.append(WindowInfo(name, _int(limit), _int(left), None, length))
        g_limit = _number(lower.get(settings.GATEWAY_LIMIT_HEADER.lower()))
        g_left = _number(lower.get(settings.GATEWAY_REMAINING_HEADER.lower()))
        g_reset = _number(lower.get(settings.GATEWAY_RESET_HEADER.lower()))
        if g_limit is not None or g_left is not None:
            if g_reset is not None and g_reset > _EPOCH_THRESHOLD:
                g_reset = g_reset - now
            if g_reset is not None:
                g_reset = max(0.0, g_reset)
            windows.append(WindowInfo("gateway", _int(g_limit), _int(g_left), g_reset, None))
        return cls(tuple(windows), parse_retry_after(lower.get(settings.RETRY_AFTER_HEADER.lower()), now=now))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: a number of seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


# --- Answers and errors ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BulkCreateResponse:
    """A 2xx answer: the contacts created, the contacts matched (with ``run_dedupe``), the rate windows, the status."""

    created: list[dict[str, Any]]
    existing: list[dict[str, Any]]
    rate: RateInfo
    status: int = 200


class RateLimited(ApolloAPIError):
    """429: a rate window is spent. ``retry_after`` in seconds (None if not sent); ``rate`` the windows reported."""

    def __init__(self, message: str, *, retry_after: float | None, rate: RateInfo, request_id: str | None = None):
        super().__init__(429, message, request_id)
        self.retry_after = retry_after
        self.rate = rate


class TransportFailure(ApolloSyncError):
    """No usable answer: a timeout, a dropped connection or an unreadable 2xx body.

    ``maybe_landed`` is False only when the request provably never reached the server (connect failures, pool
    timeouts); otherwise the contacts may have been stored and a retry must run with ``run_dedupe`` true.
    ``kind`` is ``"timeout"``, ``"connection"`` or ``"bad_answer"``.
    """

    exit_code = 1

    def __init__(self, kind: str, message: str, *, maybe_landed: bool):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.maybe_landed = maybe_landed


# --- The client -----------------------------------------------------------------------------------------------------


def auth_for(base_url: str) -> Literal["bearer", "x-api-key"]:
    """The auth a base URL takes: ``x-api-key`` when its path ends in ``/api/v1`` (Apollo direct), else ``bearer``."""
    path = urlsplit(base_url).path.rstrip("/")
    return "x-api-key" if path.endswith(settings.APOLLO_PATH_PREFIX) else "bearer"


class ApolloClient:
    """Async client over ``httpx.AsyncClient(base_url=..., transport=...)``; use as ``async with``.

    ``auth="auto"`` follows the host (see :func:`auth_for`); ``"bearer"`` or ``"x-api-key"`` override it.
    ``transport`` is for tests that need an answer the sandbox cannot give (``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        auth: AuthMode = "auto",
        timeout: float = settings.DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int | None = None,
    ):
        if not api_key:
            raise ConfigError(f"no Apollo API key given: set {settings.ENV_API_KEY} or configure the secret block")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base URL must start with http:// or https://, got {base_url!r}")
        if auth not in ("auto", "bearer", "x-api-key"):
            raise ConfigError(f"auth must be auto, bearer or x-api-key, got {auth!r}")
        self.base_url = base_url.rstrip("/")
        self.auth: Literal["bearer", "x-api-key"] = auth_for(base_url) if auth == "auto" else auth
        self.timeout = timeout
        self.__key = api_key
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        if self.auth == "bearer":
            headers["Authorization"] = f"Bearer {api_key}"
        else:
            headers["X-Api-Key"] = api_key
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport, limits=limits
        )

    def __repr__(self) -> str:
        return f"ApolloClient(base_url={self.base_url!r}, auth={self.auth!r}, timeout={self.timeout!r})"

    async def __aenter__(self) -> ApolloClient:
        await self._http.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.__aexit__(*exc_info)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def bulk_create(
        self, contacts: Sequence[Mapping[str, Any] | str], *, labels: Sequence[str] = (), run_dedupe: bool
    ) -> BulkCreateResponse:
        """Create up to 100 contacts in one request.

        Each contact is a dict of Apollo fields, or a ``str`` already holding one contact as a JSON object (the
        loader's ``payload`` column, sent as is). ``labels`` become ``append_label_names``. Raises ``InputError``
        for more than 100 contacts (nothing sent), ``AuthError``/``RateLimited``/``ApolloAPIError`` for error
        answers, ``TransportFailure`` when no answer came.
        """
        if len(contacts) > settings.MAX_CONTACTS_PER_REQUEST:
            raise InputError(
                f"{len(contacts)} contacts in one request; the endpoint takes at most "
                f"{settings.MAX_CONTACTS_PER_REQUEST}: split them into chunks"
            )
        body = _encode_body(contacts, labels, run_dedupe)
        try:
            response = await self._http.post(settings.BULK_CREATE_PATH, content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransportFailure("connection", self._scrub(f"could not connect: {exc!r}"), maybe_landed=False) from None
        except httpx.TimeoutException as exc:
            raise TransportFailure(
                "timeout", self._scrub(f"no answer within {self.timeout}s: {exc!r}"), maybe_landed=True
            ) from None
        except httpx.TransportError as exc:
            raise TransportFailure("connection", self._scrub(f"connection lost: {exc!r}"), maybe_landed=True) from None
        rate = RateInfo.from_headers(response.headers)
        if response.is_success:
            try:
                data = response.json()
                created = list(data.get("created_contacts") or [])
                existing = list(data.get("existing_contacts") or [])
            except (ValueError, AttributeError, TypeError):
                raise TransportFailure(
                    "bad_answer", f"unreadable {response.status_code} answer body", maybe_landed=True
                ) from None
            return BulkCreateResponse(created, existing, rate, response.status_code)
        raise self._error(response, rate)

    def _error(self, response: httpx.Response, rate: RateInfo) -> ApolloAPIError:
        status = response.status_code
        message, request_id = _error_details(response)
        message = self._scrub(message)
        error: ApolloAPIError
        if status == 429:
            error = RateLimited(message, retry_after=rate.retry_after, rate=rate, request_id=request_id)
        elif status in (401, 403):
            error = AuthError(status, message, request_id)
        else:
            error = ApolloAPIError(status, message, request_id)
        error.rate = rate  # the rate windows of the error answer, for the pacer
        return error

    def _scrub(self, text: str) -> str:
        """Remove the key from text that came from elsewhere (an echoed header, an exception)."""
        return text.replace(self.__key, _REDACTED) if self.__key else text


def _encode_body(contacts: Sequence[Mapping[str, Any] | str], labels: Sequence[str], run_dedupe: bool) -> bytes:
    parts = [c if isinstance(c, str) else json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in contacts]
    tail: dict[str, Any] = {"run_dedupe": bool(run_dedupe)}
    if labels:
        tail["append_label_names"] = list(labels)
    return ('{"contacts":[' + ",".join(parts) + "]," + json.dumps(tail, ensure_ascii=False)[1:]).encode("utf-8")


def _error_details(response: httpx.Response) -> tuple[str, str | None]:
    """(message, request_id) from either error shape, or the start of a non-JSON body."""
    request_id = response.headers.get("x-request-id")
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            message = err.get("message") or err.get("type") or err.get("code")
            request_id = err.get("request_id") or request_id
            if message:
                return str(message), request_id
        elif isinstance(err, str) and err:
            return err, request_id
        for key in ("message", "detail", "error_message"):
            if data.get(key):
                return str(data[key]), request_id
    text = response.text.strip().replace("\n", " ")
    if not text:
        text = response.reason_phrase or "no message"
    return text[:300], request_id
