"""Processes on this host: whether one still lives (the ledger's dead-run check, the local Prefect server), and
this process's garbage collector during a run (:func:`run_gc`)."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RUN_GC_THRESHOLDS = (20_000, 20, 10)
"""The collector's thresholds while a run goes (Python's defaults are (700, 10, 10)). A sending run allocates
containers per answer and per row (the answer's contacts, the rows' lists, the ledger's tuples) that nearly all die
young, by reference counting: with the defaults that is about 100 young and 10 middle collections in 30,000
contacts (30 ms in all, a middle one up to 11 ms), each a pause of the event loop while answers wait. Measured in
BENCHMARKS.md ("Fifth look"): about 2.5 points of the load ratio. Only reference cycles wait longer to be freed."""

_lock = threading.Lock()
_runs = 0
_restore: tuple[bool, tuple[int, int, int]] | None = None


@contextmanager
def run_gc() -> Iterator[None]:
    """Quiet the garbage collector while a run goes, and give the process its own settings back at the end.

    Two things, both undone when the last run of the process ends (runs may overlap in one process):

    - ``gc.freeze()``: the objects alive when the run starts go to the permanent generation. A process that
      imported Prefect holds about a million long-lived objects; each full collection walks them all, and measured
      here that is a 0.2 s pause of the event loop (every request in flight waits) a few times a run. A process
      that froze its own objects already is left alone.
    - :data:`RUN_GC_THRESHOLDS`, where they are higher than the process's own (a higher one set by the caller is
      kept). A process that disabled the collector is left alone.
    """
    global _runs, _restore
    with _lock:
        if _runs == 0:
            froze = not gc.get_freeze_count()
            if froze:
                gc.freeze()
            thresholds = gc.get_threshold()
            if gc.isenabled():
                gc.set_threshold(*(max(own, ours) for own, ours in zip(thresholds, RUN_GC_THRESHOLDS)))
            _restore = (froze, thresholds)
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0 and _restore is not None:
                froze, thresholds = _restore
                _restore = None
                gc.set_threshold(*thresholds)
                if froze:
                    gc.unfreeze()
