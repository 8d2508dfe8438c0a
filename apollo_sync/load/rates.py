"""Rate-limit headers as values: the windows an answer reported and its ``Retry-After`` (pure; no I/O).

Both header families are read: the gateway's ``X-RateLimit-Limit``/``Remaining``/``Reset`` and Apollo's
``x-rate-limit-<window>``/``x-<window>-requests-left``/``x-<window>-usage`` for the minute, hourly and daily
windows. The client attaches a :class:`RateInfo` to every answer and every error answer; the pacer reads it.

A gateway ``Reset`` is kept as the server gave it too: an epoch time (``reset_epoch``, which the pacer measures on
its own wall clock) and whether it came in whole seconds (``reset_step`` 1.0: the reset really falls up to a second
before the value, when the server rounds up, so a delay read from it is up to a second long).
"""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Mapping

from apollo_sync import settings

EPOCH_THRESHOLD = 1e9
"""A gateway ``X-RateLimit-Reset`` above this is an epoch time in seconds, otherwise seconds from now."""


@dataclass(frozen=True)
class WindowInfo:
    """One rate-limit window as an answer reported it.

    ``name`` is ``"minute"``, ``"hourly"`` or ``"daily"`` (Apollo direct) or ``"gateway"``. ``reset_after`` is the
    number of seconds from the answer until the window resets (the gateway sends it; Apollo does not).
    ``length`` is the window's length in seconds when known (Apollo's fixed windows). ``reset_epoch`` is the reset
    as an epoch time when the header gave one; ``reset_step`` is 1.0 when the header was a whole number of seconds
    (its precision), else 0.
    """

    name: str
    limit: int | None
    remaining: int | None
    reset_after: float | None = None
    length: float | None = None
    reset_epoch: float | None = None
    reset_step: float = 0.0


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
        raw_reset = lower.get(settings.GATEWAY_RESET_HEADER.lower())
        g_reset = _number(raw_reset)
        if g_limit is not None or g_left is not None:
            epoch = g_reset if g_reset is not None and g_reset > EPOCH_THRESHOLD else None
            if epoch is not None:
                g_reset = epoch - now
            if g_reset is not None:
                g_reset = max(0.0, g_reset)
            step = 1.0 if g_reset is not None and raw_reset is not None and "." not in raw_reset else 0.0
            windows.append(WindowInfo("gateway", _int(g_limit), _int(g_left), g_reset, None, epoch, step))
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
