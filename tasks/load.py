"""Loading as Prefect tasks: one task run per group of chunks, so task runs stay bounded at any scale.

Not cached, and not retried by Prefect: the sync ledger (``apollo_sync.ledger``) is the memory of what landed in
Apollo, and the loader retries each request itself with the right semantics (Retry-After, dedupe on an unknown
outcome, bisection on 422). A Prefect-level retry of a half-done group could resend rows already created with
dedupe off; a retried *flow run* is safe instead, because it plans again from the ledger.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from apollo_sync.loader import Chunk, GroupResult, LoadSession


@task(name="send_chunks", cache_policy=NO_CACHE, persist_result=False, retries=0)
async def send_chunks(session: LoadSession, chunks: list[Chunk], group_no: int) -> GroupResult:
    """Send one group of chunks through the run's shared session (client, pacer, ledger)."""
    return await session.load(chunks)
