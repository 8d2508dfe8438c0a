"""Typed errors. Each knows the CLI exit code it maps to and never carries the API key.

Every field an error carries is declared here and set by its constructor: callers read ``exc.rate`` or
``exc.maybe_landed``, never ``getattr(exc, ...)``. This module imports nothing heavy (no httpx, no polars), so the
CLI and the flows can catch these without loading the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apollo_sync.load.rates import RateInfo


class ApolloSyncError(Exception):
    """Base class: a message for people, one line, and the exit code it maps to."""

    exit_code = 1


class InputError(ApolloSyncError):
    """Bad input or usage: a missing file, an unreadable source, a bad option. Nothing was sent."""

    exit_code = 2


class ConfigError(InputError):
    """Configuration that cannot work (no API key, a bad base URL). Nothing was sent."""


class ApolloAPIError(ApolloSyncError):
    """An error answer from the endpoint, whichever of its two error shapes it came in.

    ``status`` is the HTTP status, ``message`` the API's message (key removed), ``request_id`` the answer's id when
    it gave one, ``rate`` the rate-limit windows its headers reported (for the pacer; None when not from an answer).
    """

    exit_code = 1
    status: int
    message: str
    request_id: str | None
    rate: RateInfo | None

    def __init__(self, status: int, message: str, request_id: str | None = None, rate: RateInfo | None = None):
        self.status = status
        self.message = message
        self.request_id = request_id
        self.rate = rate
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"Apollo answered {status}: {message}{rid}")


class RateLimited(ApolloAPIError):
    """429: a rate window is spent. ``retry_after`` in seconds (None if not sent); ``rate`` the windows reported."""

    retry_after: float | None

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        rate: RateInfo | None = None,
        request_id: str | None = None,
    ):
        super().__init__(429, message, request_id, rate)
        self.retry_after = retry_after


class RunStopped(ApolloAPIError):
    """The run must stop: sending more would only fail the same way. Nothing more is sent.

    ``LoadSession.load`` does not raise it: it returns it as ``GroupResult.stopped``, beside an outcome per row.
    """


class AuthError(RunStopped):
    """401 or 403: the key is wrong or lacks the scope. The run stops at once."""


class Unreachable(RunStopped):
    """The API never answered (connections refused or failing) through a whole chunk's retries. ``status`` is 0."""

    def __init__(self, message: str):
        super().__init__(0, message)
        Exception.__init__(self, f"cannot reach the API: {message}; check --base-url and the network")


class TransportFailure(ApolloSyncError):
    """No usable answer: a timeout, a dropped connection or an unreadable 2xx body.

    ``kind`` is ``"timeout"``, ``"connection"`` or ``"bad_answer"``. ``maybe_landed`` is False only when the
    request provably never reached the server (connect failures, pool timeouts); otherwise the contacts may have
    been stored and a retry must run with ``run_dedupe`` true.
    """

    exit_code = 1
    kind: str
    message: str
    maybe_landed: bool

    def __init__(self, kind: str, message: str, maybe_landed: bool):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.maybe_landed = maybe_landed
