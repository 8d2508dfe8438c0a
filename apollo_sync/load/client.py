"""Async client for Apollo's Bulk Create and Bulk Update Contacts endpoints, direct or through the AISA gateway.

:meth:`ApolloClient.bulk_create` sends at most 100 contacts and returns what the endpoint created and matched;
:meth:`ApolloClient.bulk_update` changes at most 100 contacts by id and returns those it updated. Both give the
rate-limit windows the headers reported (:class:`~apollo_sync.load.rates.RateInfo`, both header families). Error answers in either error shape become :class:`~apollo_sync.errors.ApolloAPIError` (``AuthError`` for
401/403, ``RateLimited`` for 429; each carries the answer's ``rate``); a request whose answer never came (timeout,
dropped connection) becomes :class:`~apollo_sync.errors.TransportFailure`, which says whether the request may have
landed. The API key is held privately and never appears in an exception, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import ssl
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import httpx

from apollo_sync import settings
from apollo_sync.errors import ApolloAPIError, AuthError, ConfigError, InputError, RateLimited, TransportFailure
from apollo_sync.load.rates import RateInfo

AuthMode = Literal["auto", "bearer", "x-api-key"]

_REDACTED = "***"


@dataclass(frozen=True)
class BulkCreateResponse:
    """A 2xx answer: the contacts created, the contacts matched (with ``run_dedupe``), the rate windows, the status."""

    created: list[dict[str, Any]]
    existing: list[dict[str, Any]]
    rate: RateInfo
    status: int = 200


@dataclass(frozen=True)
class BulkUpdateResponse:
    """A 2xx answer of Bulk Update: the contacts it lists as updated (each with ``id``), the rate windows, the
    status. A contact sent and not listed is not confirmed (an id Apollo no longer knows, or a partial success)."""

    contacts: list[dict[str, Any]]
    rate: RateInfo
    status: int = 200


# --- The client -----------------------------------------------------------------------------------------------------


def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs, or ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when set), built once per
    process and per those variables: building one reads every CA (about 20 ms holding the GIL) and each run opens
    a client. :func:`warm_tls_context` builds it in a thread ahead of the first client."""
    return _tls_context(os.environ.get("SSL_CERT_FILE") or None, os.environ.get("SSL_CERT_DIR") or None)


@functools.cache
def _tls_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context()  # reads the same two variables


async def warm_tls_context() -> None:
    """Build :func:`tls_context` in a thread (a run starts this while it reads and cleans its source)."""
    await asyncio.to_thread(tls_context)


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
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport, limits=limits,
            verify=tls_context(),
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
        response = await self._post(settings.BULK_CREATE_PATH, _encode_body(contacts, labels, run_dedupe))
        if response.is_success:
            data = self._answer(response)
            created = data.get("created_contacts") or []
            existing = data.get("existing_contacts") or []
            if not isinstance(created, list) or not isinstance(existing, list):
                raise self._unreadable(response)
            return BulkCreateResponse(list(created), list(existing), RateInfo.from_headers(response.headers), response.status_code)
        raise self._error(response, RateInfo.from_headers(response.headers))

    async def bulk_update(self, attributes: Sequence[Mapping[str, Any]]) -> BulkUpdateResponse:
        """Update up to 100 contacts by id in one request (``contact_attributes``: each a dict with ``id`` and only
        the fields to change). At most :data:`~apollo_sync.settings.MAX_SYNC_UPDATE`, so the answer lists what was
        updated (a larger request is processed asynchronously and confirms nothing): more raises ``InputError``
        with nothing sent. Errors as for :meth:`bulk_create`."""
        if len(attributes) > settings.MAX_SYNC_UPDATE:
            raise InputError(
                f"{len(attributes)} contacts in one update; at most {settings.MAX_SYNC_UPDATE} get an answer: split them"
            )
        if any(not a.get("id") for a in attributes):
            raise InputError("every contact to update needs its Apollo id")
        body = json.dumps({"contact_attributes": list(attributes)}, ensure_ascii=False, separators=(",", ":"))
        response = await self._post(settings.BULK_UPDATE_PATH, body.encode("utf-8"))
        if response.is_success:
            contacts = self._answer(response).get("contacts") or []
            if not isinstance(contacts, list):
                raise self._unreadable(response)
            kept = [c for c in contacts if isinstance(c, dict)]
            return BulkUpdateResponse(kept, RateInfo.from_headers(response.headers), response.status_code)
        raise self._error(response, RateInfo.from_headers(response.headers))

    async def _post(self, path: str, body: bytes) -> httpx.Response:
        """POST ``body``; a request that got no answer becomes a ``TransportFailure`` saying whether it may have landed."""
        try:
            return await self._http.post(path, content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransportFailure(
                "connection", self._scrub(f"could not connect: {exc!r}"), maybe_landed=False
            ) from None
        except httpx.TimeoutException as exc:
            raise TransportFailure(
                "timeout", self._scrub(f"no answer within {self.timeout}s: {exc!r}"), maybe_landed=True
            ) from None
        except httpx.TransportError as exc:
            raise TransportFailure("connection", self._scrub(f"connection lost: {exc!r}"), maybe_landed=True) from None

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        """A 2xx answer's JSON object; a body that is not one is a ``TransportFailure`` (the request may have landed)."""
        try:
            data = response.json()
        except ValueError:
            raise self._unreadable(response) from None
        if not isinstance(data, dict):
            raise self._unreadable(response)
        return data

    @staticmethod
    def _unreadable(response: httpx.Response) -> TransportFailure:
        return TransportFailure("bad_answer", f"unreadable {response.status_code} answer body", maybe_landed=True)

    def _error(self, response: httpx.Response, rate: RateInfo) -> ApolloAPIError:
        status = response.status_code
        message, request_id = _error_details(response)
        message = self._scrub(message)
        if status == 429:
            return RateLimited(message, retry_after=rate.retry_after, rate=rate, request_id=request_id)
        if status in (401, 403):
            return AuthError(status, message, request_id, rate)
        return ApolloAPIError(status, message, request_id, rate)

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
