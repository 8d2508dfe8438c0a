"""Prepare a Prefect server for apollo-sync; safe to run again (the second run changes nothing).

    python deployments/setup.py                          # the process work pool named in prefect.yaml
    python deployments/setup.py --save-key               # + Secret block 'apollo-api-key' from APOLLO_API_KEY
    python deployments/setup.py --rate-per-minute 60     # + global rate limit 'apollo-sync-rate' (slot decay)
    python deployments/setup.py --check                  # change nothing: one line per object, exit 1 if one is missing

It talks to the server in PREFECT_API_URL through Prefect's client (one process, one connection), not through
CLI subprocesses, each of which would boot its own temporary server when no PREFECT_API_URL is set.
The key is read from the environment and never printed: the output says only whether the block changed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
DEFAULT_SECRET_BLOCK = "apollo-api-key"
DEFAULT_RATE_LIMIT = "apollo-sync-rate"
ENV_API_KEY = "APOLLO_API_KEY"
WORK_POOL_TYPE = "process"


class SetupError(Exception):
    """Setup cannot proceed; the message says what to do. Never carries the key."""


@dataclass(frozen=True)
class RateLimit:
    """A global concurrency limit used as a rate: ``limit`` slots (the burst), refilled at ``per_second``."""

    name: str
    limit: int
    per_second: float


def pool_name_from(prefect_yaml: Path = PREFECT_YAML) -> str:
    """The work pool name declared under ``definitions.work_pools`` in prefect.yaml (the one place it is named)."""
    config = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    pools = (config.get("definitions") or {}).get("work_pools") or {}
    names = {pool.get("name") for pool in pools.values() if isinstance(pool, dict)}
    if len(names) != 1 or None in names:
        raise SetupError(f"{prefect_yaml} should name exactly one work pool under definitions.work_pools")
    return names.pop()


def rate_limits_from(prefect_yaml: Path = PREFECT_YAML) -> dict[str, list[str]]:
    """The global rate limits the deployments of prefect.yaml use (``load.rate_limit_name``) -> those deployments."""
    config = yaml.safe_load(prefect_yaml.read_text(encoding="utf-8")) or {}
    used: dict[str, list[str]] = {}
    for deployment in config.get("deployments") or []:
        name = ((deployment.get("parameters") or {}).get("load") or {}).get("rate_limit_name")
        if name:
            used.setdefault(name, []).append(deployment.get("name", "?"))
    return used


def rate_limit_for(requests_per_minute: int, name: str = DEFAULT_RATE_LIMIT) -> RateLimit:
    """Slots refill at ``requests_per_minute / 60`` per second; the burst is one second's worth (at least 1)."""
    if requests_per_minute < 1:
        raise SetupError("--rate-per-minute must be at least 1")
    per_second = requests_per_minute / 60.0
    return RateLimit(name=name, limit=max(1, math.ceil(per_second)), per_second=per_second)


async def ensure_work_pool(client, name: str) -> str:
    """Create process work pool ``name`` with the default job template unless it exists; returns what happened."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        await client.create_work_pool(WorkPoolCreate(name=name, type=WORK_POOL_TYPE, base_job_template=template))
        return f"work pool '{name}' ({WORK_POOL_TYPE}): created"
    if pool.type != WORK_POOL_TYPE:
        raise SetupError(f"work pool '{name}' exists with type '{pool.type}'; delete it or rename the pool in prefect.yaml")
    return f"work pool '{name}' ({WORK_POOL_TYPE}): already there, left as is"


async def ensure_secret(block_name: str, value: str) -> str:
    """Save ``value`` in Secret block ``block_name`` unless it already holds it; never shows the value."""
    from prefect.blocks.system import Secret

    try:
        current = (await Secret.aload(block_name)).get()
    except ValueError:
        current = None
    if current == value:
        return f"Secret block '{block_name}': already holds this key, left as is"
    await Secret(value=value).asave(block_name, overwrite=True)
    return f"Secret block '{block_name}': {'updated' if current is not None else 'created'} (value not shown)"


async def ensure_rate_limit(client, rate: RateLimit) -> str:
    """Create or update the global concurrency limit ``rate.name`` to ``rate.limit`` slots decaying at the rate."""
    await client.upsert_global_concurrency_limit_by_name(rate.name, limit=rate.limit, slot_decay_per_second=rate.per_second)
    return (
        f"global rate limit '{rate.name}': {rate.per_second * 60:g} requests/minute "
        f"(limit {rate.limit}, slot decay {rate.per_second:g}/s)"
    )


async def check_work_pool(client, name: str, default: str) -> tuple[bool, str]:
    """Whether process work pool ``name`` exists, and one line saying so or what creates it."""
    from prefect.exceptions import ObjectNotFound

    try:
        pool = await client.read_work_pool(name)
    except ObjectNotFound:
        flag = "" if name == default else f" --pool {name}"
        return False, f"work pool '{name}': missing; create it with `python deployments/setup.py{flag}`"
    if pool.type != WORK_POOL_TYPE:
        return False, (
            f"work pool '{name}': type '{pool.type}', not {WORK_POOL_TYPE}; delete it or rename the pool in prefect.yaml"
        )
    return True, f"work pool '{name}' ({WORK_POOL_TYPE}): ok"


async def check_secret(client, block_name: str) -> tuple[bool, str]:
    """Whether Secret block ``block_name`` exists (its value is not read), and one line saying so."""
    from prefect.exceptions import ObjectNotFound

    try:
        await client.read_block_document_by_name(block_name, block_type_slug="secret", include_secrets=False)
    except ObjectNotFound:
        flag = "" if block_name == DEFAULT_SECRET_BLOCK else f" --secret-block {block_name}"
        return False, (
            f"Secret block '{block_name}': missing; create it with `{ENV_API_KEY}=... python deployments/setup.py "
            f"--save-key{flag}` (or give every worker {ENV_API_KEY})"
        )
    return True, f"Secret block '{block_name}': ok (value not shown)"


async def check_rate_limit(client, name: str, used_by: list[str]) -> tuple[bool, str]:
    """Whether global concurrency limit ``name`` exists with a slot decay (a rate), and one line saying so."""
    from prefect.exceptions import ObjectNotFound

    try:
        limit = await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        flag = "" if name == DEFAULT_RATE_LIMIT else f" --rate-limit-name {name}"
        return False, (
            f"global rate limit '{name}' (used by {', '.join(used_by)}): missing; create it with "
            f"`python deployments/setup.py --rate-per-minute N{flag}`"
        )
    if not limit.slot_decay_per_second:
        return False, f"global rate limit '{name}': no slot decay, so not a rate; run setup.py --rate-per-minute N"
    return True, f"global rate limit '{name}': ok ({limit.slot_decay_per_second * 60:g} requests/minute)"


async def check(*, pool: str, secret_block: str, rate_limits: dict[str, list[str]]) -> tuple[bool, list[str]]:
    """Read-only: whether everything a deployment run needs is on the server; one line per object."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        results = [await check_work_pool(client, pool, pool_name_from()), await check_secret(client, secret_block)]
        results += [await check_rate_limit(client, name, used_by) for name, used_by in rate_limits.items()]
    return all(ok for ok, _ in results), [line for _, line in results]


async def setup(*, pool: str, save_key: bool, secret_block: str, rate: RateLimit | None) -> list[str]:
    """Bring the server to the wanted state; returns one line per object."""
    from prefect.client.orchestration import get_client

    key = os.environ.get(ENV_API_KEY, "") if save_key else ""
    if save_key and not key:
        raise SetupError(f"--save-key reads the key from {ENV_API_KEY}, which is not set")
    async with get_client() as client:
        lines = [await ensure_work_pool(client, pool)]
        if save_key:
            lines.append(await ensure_secret(secret_block, key))
        if rate is not None:
            lines.append(await ensure_rate_limit(client, rate))
    return lines


def main(argv: list[str] | None = None) -> int:
    """Command line entry: set up (or ``--check``), print one line per object; 1 if a check failed, 2 on an error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", help="work pool name (default: the one in prefect.yaml)")
    parser.add_argument("--save-key", action="store_true", help=f"save {ENV_API_KEY} in the Secret block")
    parser.add_argument("--secret-block", default=DEFAULT_SECRET_BLOCK, help="Secret block name (default: %(default)s)")
    parser.add_argument("--rate-per-minute", type=int, help="create/update the shared rate limit at N requests a minute")
    parser.add_argument("--rate-limit-name", default=DEFAULT_RATE_LIMIT, help="its name (default: %(default)s)")
    parser.add_argument(
        "--check", action="store_true",
        help="change nothing: check the work pool, the Secret block and the rate limits prefect.yaml uses",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.check and (args.save_key or args.rate_per_minute is not None):
        parser.error("--check changes nothing: leave out --save-key and --rate-per-minute")
    ok = True
    try:
        pool = args.pool or pool_name_from()
        if args.check:
            ok, lines = asyncio.run(check(pool=pool, secret_block=args.secret_block, rate_limits=rate_limits_from()))
        else:
            rate = rate_limit_for(args.rate_per_minute, args.rate_limit_name) if args.rate_per_minute is not None else None
            lines = asyncio.run(setup(pool=pool, save_key=args.save_key, secret_block=args.secret_block, rate=rate))
    except SetupError as exc:
        print(f"setup: {exc}", file=sys.stderr)
        return 2
    except httpx.TransportError as exc:
        from prefect.settings import PREFECT_API_URL

        where = PREFECT_API_URL.value() or "the temporary server"
        print(f"setup: cannot reach the Prefect API at {where} ({type(exc).__name__}); is the server running?", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
