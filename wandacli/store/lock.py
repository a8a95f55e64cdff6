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
from wandacli.store.schema import LOCKS_DIR, Store

# ---------------------------------------------------------------------------------------------
# One writer per file: a lock per thing a store holds


def lock_paths(root: Path, target: str) -> tuple[Path, Path]:
    """The lock file and its holder note for `target` (`scores/<name>`, `masks/<name>`,
    `edits/<name>`, `searches/<name>`), in STORE/.locks/."""
    stem = target.replace("/", "--")
    directory = root / LOCKS_DIR
    return directory / f"{stem}.lock", directory / f"{stem}.json"


def _lock_holder(holder_path: Path) -> str:
    try:
        holder = json.loads(holder_path.read_text())
        return (
            f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')})"
        )
    except (OSError, ValueError):
        return "another process"


_NOUNS = {"scores": "set", "masks": "mask", "edits": "edit", "searches": "search"}


@contextlib.contextmanager
def writer_lock(root: Path, target: str, command: str | None = None) -> Iterator[Store]:
    """Hold the lock of the one thing a run writes (`target`, e.g. `scores/<name>`), with the
    store created if missing and dead writers' temporaries cleaned on entry.

    A second writer of the same thing fails at once with an error naming the holder; writers
    of other things in the store, and readers of finished files, go on (a GPU user's hours of
    scoring do not block pruning what is done). The lock is an flock on
    STORE/.locks/<target>.lock, independent of HDF5's own file locking.
    """
    from filelock import FileLock, Timeout

    ensure_writable_directory(root)
    lock_path, holder_path = lock_paths(root, target)
    lock_path.parent.mkdir(exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        kind, _, name = target.partition("/")
        raise StoreLockedError(
            f"{_NOUNS.get(kind, kind)} {name!r} in store {root} is being written by "
            f"{_lock_holder(holder_path)}: wait for it to finish, or write another --name"
        ) from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now_iso(),
            "command": command or " ".join(sys.argv),
            "target": target,
        }
        atomic_write_text(holder_path, json.dumps(holder))
        remove_orphan_temporaries(root)
        yield Store(root)
    finally:
        with contextlib.suppress(OSError):
            holder_path.unlink()
        lock.release()
