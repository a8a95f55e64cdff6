"""One writer per store: a file lock that names its holder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from wandacli.core.durable import (
    atomic_write_text,
    ensure_writable_directory,
    remove_orphan_temporaries,
)
from wandacli.core.errors import (
    StoreLockedError,
)
from wandacli.core.provenance import now_iso
from wandacli.store.schema import LOCK_HOLDER_NAME, LOCK_NAME, Store

# ---------------------------------------------------------------------------------------------
# The writer lock


def _lock_holder(root: Path) -> str:
    try:
        holder = json.loads((root / LOCK_HOLDER_NAME).read_text())
        return (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')})"
        )
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def writer_lock(root: Path, command: str | None = None) -> Iterator[Store]:
    """Hold the store's writer lock (created if missing), cleaning orphan temporaries on entry.

    A second writer fails at once with an error naming the holder. The lock is an flock on
    DIR/.wandacli.lock, independent of HDF5's own file locking.
    """
    from filelock import FileLock, Timeout

    ensure_writable_directory(root)
    lock = FileLock(str(root / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLockedError(
            f"store {root} is being written by {_lock_holder(root)}: wait for it to finish, "
            "or use another --store"
        ) from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now_iso(),
            "command": command or " ".join(sys.argv),
        }
        atomic_write_text(root / LOCK_HOLDER_NAME, json.dumps(holder))
        remove_orphan_temporaries(root)
        yield Store(root)
    finally:
        with contextlib.suppress(OSError):
            (root / LOCK_HOLDER_NAME).unlink()
        lock.release()


SEARCH_LOCK_NAME = ".search.lock"


@contextlib.contextmanager
def search_lock(directory: Path, name: str) -> Iterator[None]:
    """One process per search (STORE/searches/<name>/.search.lock): a second fails at once.
    Not the store's writer lock: a search writes only its own folder, and the masks it keeps
    take the writer lock themselves through `prune`."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(directory / SEARCH_LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StoreLockedError(
            f"search {name!r} is running in another process: wait for it, or use another --name"
        ) from None
    try:
        yield
    finally:
        lock.release()
