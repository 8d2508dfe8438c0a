"""Where the Apollo key comes from at run time: a Prefect Secret block, else the environment.

Deliberately not a task: a task's return value may be persisted as a result, and the key must never be.
"""

from __future__ import annotations

import os

from apollo_sync.errors import ConfigError
from apollo_sync.redact import api_key_from
from apollo_sync.settings import DEFAULT_SECRET_BLOCK, ENV_API_KEY


async def resolve_api_key(block_name: str | None) -> str:
    """The key from Secret block ``block_name`` when that block exists, else from ``APOLLO_API_KEY``.

    The key is registered for redaction before it is returned, so no later log line can carry it.
    """
    key, block_found = None, False
    if block_name:
        from prefect.blocks.system import Secret

        try:
            key, block_found = (await Secret.aload(block_name)).get(), True
        except ValueError:  # no such block: fall through to the environment
            key = None
    key = key or os.environ.get(ENV_API_KEY)
    if not key or not key.strip():
        raise ConfigError(_no_key_message(block_name, block_found))
    return api_key_from(key)


def _no_key_message(block_name: str | None, block_found: bool) -> str:
    """One line naming where the key was looked for and the command that puts it there."""
    where_it_runs = "where the flow runs (`apollo-sync run` also takes --api-key)"
    if not block_name:
        return f"no Apollo API key: set {ENV_API_KEY} {where_it_runs}"
    state = "is empty" if block_found else "does not exist on this Prefect server"
    flag = "" if block_name == DEFAULT_SECRET_BLOCK else f" --secret-block {block_name}"
    return (
        f"no Apollo API key: Secret block '{block_name}' {state} and {ENV_API_KEY} is not set; save the key with "
        f"`{ENV_API_KEY}=... python deployments/setup.py --save-key{flag}`, or set {ENV_API_KEY} {where_it_runs}"
    )
