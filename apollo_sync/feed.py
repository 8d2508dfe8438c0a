"""Cleaned parts handed from the cleaning thread to the run's event loop, a few at a time.

The clean stage (``apollo_sync.clean.prepare``) runs in a thread and calls :meth:`Feed.put` with each part of
contacts as soon as it is final; the sending side iterates :meth:`Feed.parts`. At most ``ahead`` parts wait, so a
slow sender (a rate limit) holds the cleaning back instead of letting cleaned rows pile up in memory: a run's
memory follows a few parts, not the source.

A clean served from Prefect's cache runs no code, so it feeds nothing: :meth:`Feed.parts` then reads the stored
parts of the Prepared it returned, one at a time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING

import polars as pl

from apollo_sync.errors import ApolloSyncError

if TYPE_CHECKING:
    from apollo_sync.clean import Prepared

PARTS_AHEAD = 1
"""Cleaned parts that may wait for the sender (each up to ``EngineOptions.batch_rows`` rows)."""
STORED_PART_ROWS = 250_000
"""Rows a part read back from a cached clean holds."""
_END = object()
_POLL_SECONDS = 0.2


class FeedClosed(ApolloSyncError):
    """The sending side stopped reading (it failed or was cancelled): the cleaning stops too."""


class Feed:
    """A bounded hand-off of cleaned parts from one producer thread to one async consumer."""

    def __init__(self, ahead: int = PARTS_AHEAD):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._closed = threading.Event()
        self.fed = 0
        """Parts put so far (0 after a clean served from the cache)."""

    def put(self, part: pl.DataFrame) -> None:
        """Hand ``part`` over, waiting while ``ahead`` parts wait; raises FeedClosed once the consumer is gone."""
        self._offer(part)
        self.fed += 1

    def end(self) -> None:
        """No more parts (the producer calls it last, also after a failure)."""
        try:
            self._offer(_END)
        except FeedClosed:
            pass

    def close(self) -> None:
        """The consumer is done (normally or not): a waiting or later :meth:`put` raises FeedClosed."""
        self._closed.set()

    def _offer(self, item: object) -> None:
        while True:
            if self._closed.is_set():
                raise FeedClosed("the run stopped taking cleaned contacts")
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def _take(self) -> object:
        while not self._closed.is_set():
            try:
                return self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
        return _END

    async def parts(self, cleaning: Awaitable[Prepared]) -> AsyncIterator[pl.DataFrame]:
        """Each part as it is fed, then (when nothing was fed: a cached clean) the stored parts of ``cleaning``'s
        result. Raises what the cleaning raised."""
        while True:
            item = await asyncio.to_thread(self._take)
            if item is _END:
                break
            yield item  # type: ignore[misc]
        prepared = await cleaning
        if self.fed:
            return
        contacts = prepared.contacts
        for start in range(0, prepared.contacts_count, STORED_PART_ROWS):
            if isinstance(contacts, pl.DataFrame):
                yield contacts.slice(start, STORED_PART_ROWS)
            else:  # one slice of the Parquet parts at a time (collect_batches would read ahead without bound)
                yield await asyncio.to_thread(contacts.slice(start, STORED_PART_ROWS).collect)
