"""Retries as a policy: after each attempt of a request, what to do next. Pure: it decides, it never sleeps.

:meth:`RetryPolicy.decide` takes what one attempt met (:class:`Attempt`), where the request stands (:class:`Tries`)
and whether the API has answered at all, and returns a :class:`Decision`; ``LoadSession`` applies it (waits, sends
again, splits, records). The rules:

* 429: wait as the pacer says (``Retry-After``) and retry; these retries have their own, larger bound
  (``max_rate_limited``).
* 5xx, timeouts, dropped connections: retry with exponential backoff and jitter, up to ``max_attempts``. The
  request may have landed, so every later attempt of those rows runs with ``run_dedupe`` true, whatever the user
  chose: no second contact is created. After a timeout or a dropped connection of an attempt sent *without*
  dedupe, the retry waits at least ``settle_seconds`` (default ``settle_factor`` = twice the client timeout), so a
  server still processing that attempt has stored it before the retry's dedupe looks (a server slower than that
  could still race a retry). An attempt sent with dedupe needs no wait: whichever of it and its retry lands second
  finds the first. A ``Retry-After`` on a 5xx is honoured too. 408 and 425 are treated as 5xx.
* 401/403: stop the run at once; no further request is sent by the session, and the rows are given up. An API
  that has not answered once by the time a chunk exhausts its retries (connections refused, a wrong host) stops
  the run the same way (``Unreachable``), instead of spending as long on every chunk.
* 400/413/422: split the chunk in halves until the offending contacts are isolated; they are ``failed`` with the
  API's message and the rest land. Any other error status gives the rows up at once.
* Rows that exhaust their attempts are ``failed`` with the reason, or ``unconfirmed`` if any attempt's outcome was
  unknown (it may have landed).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

from apollo_sync import settings
from apollo_sync.errors import InputError

DEFAULT_MAX_ATTEMPTS = 8
"""Attempts per request for 5xx, timeouts and dropped connections (429s are counted apart)."""
MAX_RATE_LIMITED = 50
"""429 answers one request may get before its rows are given up as failed."""
BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
SETTLE_FACTOR = 2.0
"""After a timeout or a dropped connection, wait at least this many client timeouts before retrying: a server
still working on the first request then has finished, and the retry's dedupe finds what it stored."""
BISECT_STATUSES = frozenset({400, 413, 422})
RETRY_STATUSES = frozenset({408, 425})
"""Besides 5xx: client-side statuses worth retrying (their outcome is treated as unknown)."""
AUTH_STATUSES = frozenset({401, 403})

Outcome = Literal["failed", "unconfirmed"]


@dataclass(frozen=True)
class Attempt:
    """What one attempt met.

    ``status`` is the HTTP status of the answer, None when no usable answer came (a timeout, a dropped connection,
    an unreadable body: a ``TransportFailure``). ``retry_after`` is the answer's ``Retry-After`` in seconds.
    ``maybe_landed`` (no answer only) is False when the request provably never reached the server.
    ``with_dedupe`` says whether this attempt was sent with ``run_dedupe``.
    """

    status: int | None
    retry_after: float | None = None
    maybe_landed: bool = True
    with_dedupe: bool = False


@dataclass(frozen=True)
class Tries:
    """Where one request stands: attempts counted against ``max_attempts``, 429s, and whether any attempt may
    have landed (from then on it is sent with dedupe and never called ``failed`` for running out)."""

    attempts: int = 0
    rate_limited: int = 0
    maybe_landed: bool = False

    @property
    def total(self) -> int:
        """Every attempt made, 429s included."""
        return self.attempts + self.rate_limited


class Action(enum.Enum):
    """What the session does next with a request's rows."""

    ACCEPT = "accept"
    """A 2xx answer: match it to the rows."""
    RETRY = "retry"
    """Wait ``delay`` seconds (the pacer may add its own wait), then send again, with dedupe if ``dedupe``."""
    BISECT = "bisect"
    """Send each half of the rows as its own request (with dedupe if ``dedupe``)."""
    GIVE_UP = "give_up"
    """The rows end as ``outcome``; the run goes on."""
    STOP_AUTH = "stop_auth"
    """401/403: the rows end as ``outcome`` and the run stops (``AuthError``)."""
    STOP_UNREACHABLE = "stop_unreachable"
    """No answer ever came: the rows end as ``outcome`` and the run stops (``Unreachable``)."""


@dataclass(frozen=True)
class Decision:
    """The policy's answer. ``tries`` are the request's counters after this attempt (pass them to the next
    ``decide``). ``exhausted`` says the rows are given up because the attempts ran out."""

    action: Action
    tries: Tries
    delay: float = 0.0
    dedupe: bool = False
    outcome: Outcome | None = None
    exhausted: bool = False


def _lost(tries: Tries) -> Outcome:
    """How rows given up end: ``unconfirmed`` when some attempt may have stored them, else ``failed``."""
    return "unconfirmed" if tries.maybe_landed else "failed"


@dataclass(frozen=True)
class RetryPolicy:
    """The retry rules of the module docstring, with their bounds and waits.

    ``settle_seconds`` None means ``settle_factor`` times the client's timeout (:meth:`for_timeout`; the session
    calls it with its client's). ``jitter`` returns uniform numbers in [0, 1) for the backoff:
    ``jitter=random.Random(seed).random`` fixes the sequence, a constant function removes it.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_rate_limited: int = MAX_RATE_LIMITED
    backoff_base: float = BACKOFF_BASE
    backoff_max: float = BACKOFF_MAX
    settle_seconds: float | None = None
    settle_factor: float = SETTLE_FACTOR
    jitter: Callable[[], float] = field(default_factory=lambda: random.Random().random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InputError(f"max attempts must be at least 1, got {self.max_attempts}")

    def for_timeout(self, timeout: float) -> RetryPolicy:
        """This policy with ``settle_seconds`` filled in from a client timeout (unless it was given)."""
        return self if self.settle_seconds is not None else replace(self, settle_seconds=self.settle_factor * timeout)

    @property
    def settle(self) -> float:
        """The least wait after an attempt without dedupe got no answer."""
        if self.settle_seconds is not None:
            return self.settle_seconds
        return self.settle_factor * settings.DEFAULT_TIMEOUT_SECONDS

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter: between half and all of ``base * 2**(attempts-1)``, capped."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempts - 1))
        return ceiling / 2 + self.jitter() * (ceiling / 2)

    def decide(self, attempt: Attempt, tries: Tries, *, rows: int, answered: bool) -> Decision:
        """What to do after ``attempt`` of a request of ``rows`` rows that stood at ``tries`` before it.

        ``answered`` says whether the API has given any HTTP answer in this run (this attempt's included).
        """
        status = attempt.status
        if status is None:
            tries = replace(tries, attempts=tries.attempts + 1, maybe_landed=tries.maybe_landed or attempt.maybe_landed)
            settle = attempt.maybe_landed and not attempt.with_dedupe
            return self._again(tries, answered, at_least=self.settle if settle else 0.0)
        if 200 <= status < 300:
            return Decision(Action.ACCEPT, tries)
        if status == 429:
            # No backoff of its own: the pacer pauses every request for the Retry-After.
            return self._again(replace(tries, rate_limited=tries.rate_limited + 1), answered, backoff=False)
        if status in AUTH_STATUSES:
            return Decision(Action.STOP_AUTH, tries, outcome=_lost(tries))
        if status >= 500 or status in RETRY_STATUSES:
            tries = replace(tries, attempts=tries.attempts + 1, maybe_landed=True)
            return self._again(tries, answered, at_least=attempt.retry_after or 0.0)
        tries = replace(tries, attempts=tries.attempts + 1)
        if status in BISECT_STATUSES:
            if rows == 1:
                return Decision(Action.GIVE_UP, tries, outcome="failed")  # the API refused this very contact
            return Decision(Action.BISECT, tries, dedupe=tries.maybe_landed)
        return Decision(Action.GIVE_UP, tries, outcome=_lost(tries))

    def _again(self, tries: Tries, answered: bool, *, at_least: float = 0.0, backoff: bool = True) -> Decision:
        """Retry, unless the request has used its attempts (then give up, or stop if the API never answered)."""
        if tries.attempts >= self.max_attempts or tries.rate_limited >= self.max_rate_limited:
            action = Action.GIVE_UP if answered else Action.STOP_UNREACHABLE
            return Decision(action, tries, outcome=_lost(tries), exhausted=True)
        delay = max(at_least, self.backoff(tries.attempts)) if backoff else 0.0
        return Decision(Action.RETRY, tries, delay=delay, dedupe=tries.maybe_landed)
