"""Loading into Apollo: the client, pacing, retries as a policy, the session that sends chunks, reconciliation.

- :mod:`.rates`: rate-limit headers as values (:class:`RateInfo`, :class:`WindowInfo`, ``parse_retry_after``).
- :mod:`.client`: :class:`ApolloClient` over httpx, both ways in (:func:`auth_for`), both error shapes.
- :mod:`.pacing`: :class:`Pacer`, one rate budget shared by every request of a run.
- :mod:`.retry`: :class:`RetryPolicy`, what to do after each attempt (pure: it decides, never sleeps).
- :mod:`.session`: :class:`LoadSession`, chunks with bounded concurrency, the ledger, the policy's decisions applied.
- :mod:`.chunks`: :class:`Chunk` and the outcomes frame (``OUTCOMES_SCHEMA``); :mod:`.reconcile`: answers to rows.
- :mod:`.upsert`: one chunk in ``upsert`` mode (update by id, create, make equal); :mod:`.update`: what an update
  sends (pure: diffs against the ledger's field hashes or Apollo's copy, label and custom-field merges).

Errors (``RateLimited``, ``TransportFailure``, ``AuthError``, ``Unreachable``, ...) live in :mod:`apollo_sync.errors`.
"""

from __future__ import annotations

from apollo_sync.load.chunks import OUTCOMES_SCHEMA, Chunk
from apollo_sync.load.client import ApolloClient, BulkCreateResponse, BulkUpdateResponse, auth_for
from apollo_sync.load.pacing import Pacer
from apollo_sync.load.rates import RateInfo, WindowInfo, parse_retry_after
from apollo_sync.load.retry import RetryPolicy
from apollo_sync.load.session import ChunkResult, GroupResult, LoadConfig, LoadSession, LoadStats

__all__ = [
    "OUTCOMES_SCHEMA",
    "ApolloClient",
    "BulkCreateResponse",
    "BulkUpdateResponse",
    "Chunk",
    "ChunkResult",
    "GroupResult",
    "LoadConfig",
    "LoadSession",
    "LoadStats",
    "Pacer",
    "RateInfo",
    "RetryPolicy",
    "WindowInfo",
    "auth_for",
    "parse_retry_after",
]
