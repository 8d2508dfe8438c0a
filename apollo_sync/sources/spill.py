"""This process's private spill directory: transcoded text and SQL results, streamed to disk and scanned from there.

The directory is made on first use and removed when the process exits; :func:`discard_spill_files` empties it
earlier, for a long-lived worker serving many runs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_spill_dir: str | None = None


def discard_spill_files() -> int:
    """Delete this process's spill files (transcoded text, SQL results); return how many were removed.

    Call it when the frames of a run are no longer needed (a long-lived worker serving many runs); frames
    read from them fail afterwards. Spill files are removed at process exit in any case.
    """
    if _spill_dir is None or not os.path.isdir(_spill_dir):
        return 0
    removed = 0
    for entry in os.scandir(_spill_dir):
        os.unlink(entry.path)
        removed += 1
    return removed


def spill_path(suffix: str) -> Path:
    """A new file in this process's private spill directory (removed when the process exits)."""
    global _spill_dir
    if _spill_dir is None:
        _spill_dir = tempfile.mkdtemp(prefix="apollo-sync-spill-")
        atexit.register(shutil.rmtree, _spill_dir, True)
    fd, name = tempfile.mkstemp(suffix=suffix, dir=_spill_dir)
    os.close(fd)
    return Path(name)
