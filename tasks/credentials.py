"""Where the Apollo key comes from at run time: a Prefect Secret block, else the environment.

Deliberately not a task: a task's return value may be persisted as a result, and the key must never be.
"""

from __future__ import annotations

import os

from apollo_sync.errors import ConfigError
from apollo_sync.redact import api_key_from
from apollo_sync.settings import ENV_API_KEY


async def resolve_api_key(block_name: str | None) -> str:
    """The key from Secret block ``block_name`` when that block exists, else from ``APOLLO_API_KEY``.

    The key is registered for redaction before it is returned, so no later log line can carry it.
    """
    key = None
    if block_name:
        from prefect.blocks.system import Secret

        try:
            key = (await Secret.aload(block_name)).get()
        except ValueError:  # no such block: fall through to the environment
            key = None
    key = key or os.environ.get(ENV_API_KEY)
    if not key or not key.strip():
        where = f"Secret block '{block_name}' or " if block_name else ""
        raise ConfigError(f"no Apollo API key: set {where}the {ENV_API_KEY} environment variable (or pass --api-key)")
    try:
        return api_key_from(key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
