"""Typed errors. Each knows the CLI exit code it maps to and never carries the API key."""

from __future__ import annotations


class ApolloSyncError(Exception):
    """Base class: a message for people, one line, and the exit code it maps to."""

    exit_code = 1


class InputError(ApolloSyncError):
    """Bad input or usage: a missing file, an unreadable source, a bad option. Nothing was sent."""

    exit_code = 2


class ConfigError(InputError):
    """Configuration that cannot work (no API key, a bad base URL). Nothing was sent."""


class ApolloAPIError(ApolloSyncError):
    """An error answer from the endpoint, whichever of its two error shapes it came in."""

    exit_code = 1

    def __init__(self, status: int, message: str, request_id: str | None = None):
        self.status = status
        self.message = message
        self.request_id = request_id
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"Apollo answered {status}: {message}{rid}")


class RunStopped(ApolloAPIError):
    """The run must stop: sending more would only fail the same way. Nothing more is sent."""


class AuthError(RunStopped):
    """401 or 403: the key is wrong or lacks the scope. The run stops at once."""


class Unreachable(RunStopped):
    """The API never answered (connections refused or failing) through a whole chunk's retries."""

    def __init__(self, message: str):
        self.status = 0
        self.message = message
        self.request_id = None
        Exception.__init__(self, f"cannot reach the API: {message}; check --base-url and the network")
