"""Files apollo-sync writes are private to the user who runs it: folders it creates 0700, files 0600.

The ledger names every contact it sent, the prepared parts and reports hold the cleaned rows, and rejected.csv
the original ones: nothing another account on the machine should read. Folders that already exist (a report
folder the user chose) keep their mode; what apollo-sync creates inside them is private.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apollo_sync.errors import InputError

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | Path) -> Path:
    """``path`` as a folder, created (with its missing parents) 0700 when it does not exist."""
    folder = Path(path)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for created in missing:
        os.chmod(created, DIR_MODE)
    return folder


def private_file(path: str | Path) -> Path:
    """Make an existing file 0600."""
    os.chmod(path, FILE_MODE)
    return Path(path)


def private_tree(root: str | Path) -> None:
    """Every folder under ``root`` (itself included) 0700, every file 0600."""
    top = Path(root)
    os.chmod(top, DIR_MODE)
    for folder, dirs, files in os.walk(top):
        for name in dirs:
            os.chmod(os.path.join(folder, name), DIR_MODE)
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE)


def touch_private(path: str | Path) -> Path:
    """Create ``path`` empty and 0600 if it does not exist (before a library opens it with its own mode)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
    return private_file(path)


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Refuse, before anything is sent, a folder that cannot be written: a file in its place, or a nearest existing
    parent without write permission. ``flag`` names the setting in the message."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is a file, not a folder: give a folder (it is created if missing)")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {folder}: cannot write in {existing}; choose a folder you can write")


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file, created private) for the block: one process at a time."""
    handle = os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)
