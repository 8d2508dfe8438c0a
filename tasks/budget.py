"""The Prefect side of the shared rate budget: which limiter a run's requests go through, and at what rate.

``load.rate_limit_name`` names the budget every run and worker shares. Its rate is configured once, as the Prefect
global concurrency limit of that name (``deployments/setup.py --rate-per-minute N``: slot decay N/60 per second).
What enforces it depends on the ledger:

- **a PostgreSQL ledger** (``run.state_url``, which scale-out across hosts needs anyway): the token bucket in that
  database (:class:`apollo_sync.ledger.budget.SharedBudget`), at the limit's rate, read once per run. One statement
  per request, every turn used, never more than N in any minute.
- **otherwise** (the SQLite ledger of one machine): Prefect's ``rate_limit(name, strict=True)`` itself. Prefect
  applies the slot decay in whole slots since the limit's last update, so it delivers less than configured
  (BENCHMARKS.md, "The shared rate budget", measures how much).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from apollo_sync.errors import ConfigError
from apollo_sync.ledger.budget import SharedBudget
from apollo_sync.redact import redact_url

logger = logging.getLogger("apollo_sync.budget")


def shared_rate_limit(name: str, state_url: str | None = None) -> Callable[[], Awaitable[None]]:
    """The acquire a run awaits before every request, for the budget ``name`` (see the module docstring).

    ``state_url``: the run's ``run.state_url``; when not given, it is taken from the current flow run's
    parameters (a run outside a flow run has none and uses Prefect's limit).
    """
    url = state_url if state_url is not None else state_url_of_this_run()
    if url:
        return ledger_budget(name, url)
    return prefect_rate_limit(name)


def prefect_rate_limit(name: str) -> Callable[[], Awaitable[None]]:
    """Take one slot of Prefect global rate limit ``name`` (strict: a missing limit is an error)."""
    from prefect.concurrency.asyncio import rate_limit

    logger.info("Shared rate limit %r: Prefect's global rate limit (no PostgreSQL ledger)", name)

    async def acquire() -> None:
        await rate_limit(name, strict=True)

    return acquire


def ledger_budget(name: str, state_url: str) -> Callable[[], Awaitable[None]]:
    """The token bucket ``name`` in the PostgreSQL ledger at ``state_url``, at the rate of the Prefect limit of the
    same name (read at the first request). Its connection closes when the acquire is dropped."""
    budgets: list[SharedBudget] = []

    async def acquire() -> None:
        if not budgets:
            per_minute = await configured_per_minute(name)
            if not budgets:  # another request of this run may have read it meanwhile
                budgets.append(SharedBudget(state_url, name, per_minute))
                logger.info("Shared rate limit %r: %g requests a minute, token bucket in the ledger at %s", name,
                            per_minute, redact_url(state_url))  # fmt: skip
        await budgets[0].acquire()

    weakref.finalize(acquire, _close, budgets)
    return acquire


def _close(budgets: list[SharedBudget]) -> None:
    for budget in budgets:
        budget.close()


async def configured_per_minute(name: str) -> float:
    """The rate (requests a minute) of Prefect global concurrency limit ``name``: its slot decay times 60."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        raise ConfigError(f"no Prefect global rate limit {name!r}: create it with "
                          "python deployments/setup.py --rate-per-minute N") from None  # fmt: skip
    per_second = limit.slot_decay_per_second or 0.0
    if per_second <= 0:
        raise ConfigError(f"Prefect global concurrency limit {name!r} has no slot decay, so it is no rate: "
                          "recreate it with python deployments/setup.py --rate-per-minute N")  # fmt: skip
    return per_second * 60.0


def state_url_of_this_run() -> str | None:
    """``run.state_url`` of the current flow run's parameters, or None (no flow run, or no shared ledger)."""
    from prefect.runtime import flow_run

    try:
        run: Any = (flow_run.get_parameters() or {}).get("run")
    except Exception:  # noqa: BLE001 - outside a flow run there are no parameters
        return None
    if isinstance(run, dict):
        return run.get("state_url") or None
    return getattr(run, "state_url", None) or None
