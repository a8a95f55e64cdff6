"""Durability primitives: writes that are whole or absent, never half-done. Temporary siblings
fsynced and renamed into place, HDF5 files written the same way with space reserved up front,
directories swapped atomically, leftovers of dead processes cleaned up, free space checked
before work starts. store/ builds the store's schema on these; nothing here knows it."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py

from wandacli.core.errors import StoreError, first_line

# Marks a temporary file or directory: `.<name>.tmp-<pid>`; anything so named in a store is
# the leftover of a dead writer.
TMP_MARKER = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(final: Path) -> Path:
    """A temporary sibling of `final`: hidden, marked, and naming the writing process."""
    return final.with_name(f".{final.name}{TMP_MARKER}{os.getpid()}")


class WriteFailed(StoreError):
    """Writing to a store file failed (disk full, file size limit, I/O error)."""


def expected_file_bytes(array_bytes: int, datasets: int) -> int:
    """A generous size for an HDF5 file holding `datasets` arrays of `array_bytes` in all:
    object headers and chunk indexes cost ~3 KiB per dataset (measured: 14 small vectors make
    a 43 KB file), chunking and checksums ~1% of the data."""
    return int(array_bytes * 1.02) + datasets * 3584 + (16 << 10)


def _reserve(path: Path, size: int) -> None:
    """Claim `size` bytes for `path` with plain file I/O, which fails cleanly on a full disk,
    a quota or a file size limit; HDF5 itself may crash when a write fails midway."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # pragma: no cover - macOS, Windows
            block = b"\0" * (1 << 20)
            for start in range(0, size, len(block)):
                os.write(fd, block[: min(len(block), size - start)])
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_h5(final: Path, reserve_bytes: int | None = None) -> Iterator[h5py.File]:
    """Write an HDF5 file under a temporary name; rename it into place only when complete.
    With `reserve_bytes`, the space is claimed first so that a full disk or a file size limit
    is reported before HDF5 writes anything. A failed write (see `write_array`) or a failed
    close becomes one WriteFailed naming `final`; other errors of the caller pass through
    unchanged. The temporary file is removed on any failure."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    tmp.unlink(missing_ok=True)
    try:
        if reserve_bytes:
            try:
                _reserve(tmp, reserve_bytes)
            except OSError as exc:
                raise _write_failure(final, exc) from exc
        try:
            handle = h5py.File(tmp, "w", locking=False)
        except OSError as exc:
            raise _write_failure(final, exc) from exc
        try:
            yield handle
        except WriteFailed as exc:
            with contextlib.suppress(Exception):
                handle.close()
            raise _write_failure(final, exc.__cause__ or exc) from exc
        except BaseException:
            with contextlib.suppress(Exception):
                handle.close()
            raise
        try:
            handle.flush()
            handle.close()
            _fsync_file(tmp)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except (OSError, RuntimeError) as exc:  # h5py reports some write failures as RuntimeError
            raise _write_failure(final, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _write_failure(final: Path, exc: BaseException) -> WriteFailed:
    """A failed write as a one-line error; nothing partial is left visible and earlier files
    are untouched."""
    reason = getattr(exc, "strerror", None) or first_line(exc)
    return WriteFailed(
        f"writing {final} failed ({reason}); nothing partial was kept and earlier finished "
        "work is intact: free space (or raise the file size limit) and run the same command again"
    )


def atomic_write_text(final: Path, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write `final` whole or not at all: a temporary file, fsynced, renamed over it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_failure(final, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically (renameat2, Linux 3.15+)
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(result == 0)


def replace_directory_atomically(tmp_dir: Path, final: Path) -> None:
    """Move a finished directory into place so that, at every instant, `final` is either the
    old directory (or absent) or the new one: renameat2's exchange where the system has it;
    elsewhere the old one is moved aside first and `recover_directory` restores it if the
    process dies between the two renames."""
    if not final.exists():
        os.replace(tmp_dir, final)
        fsync_dir(final.parent)
        return
    if _exchange(tmp_dir, final):  # tmp_dir now holds the old directory
        fsync_dir(final.parent)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    aside = final.with_name(f".{final.name}.old{TMP_MARKER}{os.getpid()}")
    os.replace(final, aside)
    os.replace(tmp_dir, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_directory(final: Path) -> None:
    """Put back a directory moved aside by an interrupted `replace_directory_atomically`, and
    remove temporaries a dead writer left beside it."""
    asides = (
        sorted(final.parent.glob(f".{final.name}.old{TMP_MARKER}*"))
        if final.parent.is_dir()
        else []
    )
    if asides and not final.exists():
        os.replace(asides[0], final)
        asides = asides[1:]
    for leftover in (
        [*asides, *final.parent.glob(f".{final.name}.tmp-*")] if final.parent.is_dir() else []
    ):
        shutil.rmtree(leftover, ignore_errors=True)


def _writer_alive(path: Path) -> bool:
    """Whether the process a temporary's name ends with (`temporary_path`) still runs on this
    machine: its temporaries are its own, even while other files of the store are written."""
    pid = path.name.rsplit(TMP_MARKER, 1)[-1]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_orphan_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files and directories left by dead writers under `directory` (a live
    writer's, of another file of the store, are left alone; so are this process's own)."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.rglob(f".*{TMP_MARKER}*"):
        if _writer_alive(path):
            continue
        with contextlib.suppress(OSError):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def check_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Refuse up front when the disk cannot hold what is about to be written."""
    free = shutil.disk_usage(directory).free
    # 5% and 16 MiB of slack for HDF5 metadata and chunk overhead: asked for, and said, in full
    # (a message saying "needs 13 MiB, 20 MiB free" reads as a refusal without a reason).
    asked = needed_bytes * 1.05 + (16 << 20)
    if free < asked:
        raise StoreError(
            f"not enough free space in {directory} for {what}: needs about {_mib(asked)} "
            f"({_mib(needed_bytes)} and room for the file's own structure), {_mib(free)} free; "
            "free some space or choose another --store"
        )


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB" if n < (1 << 30) else f"{n / (1 << 30):,.1f} GiB"


def ensure_writable_directory(root: Path, option: str = "--store") -> None:
    """Create `root` if needed and prove it writable (os.access is wrong for root users and
    read-only mounts, so write a probe file). `option` names the flag in the error."""
    noun = "store directory" if option == "--store" else f"{option} directory"
    if root.exists() and not root.is_dir():
        raise StoreError(f"{noun} {root} is a file, not a directory: choose another {option}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe{TMP_MARKER}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StoreError(
            f"{noun} {root} is not writable ({exc.strerror}): choose another {option} "
            "or fix its permissions"
        ) from exc


def save_model_directory(
    model: Any, tokenizer: Any, target: Path, add_files: Callable[[Path], Any] | None = None
) -> None:
    """The one atomic save of a model directory. save_pretrained into a temporary sibling of
    `target`; `add_files(tmp)` writes what marks it finished (a recipe, the mask's provenance);
    every file and the directory are fsynced; then `replace_directory_atomically` swaps it in.
    At every instant `target` is the previous model (or absent) or the whole new one, and a
    save killed midway is cleaned up by the next one (`recover_directory`). An OSError
    propagates, for the caller to say what to do, after the temporary is removed."""
    recover_directory(target)
    tmp = temporary_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if add_files is not None:
            add_files(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_file(path)
        fsync_dir(tmp)
        replace_directory_atomically(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
