"""The one file-safe name rule: what a derived name (a mask's, an edit's, a results folder's, a
figure's) may hold. The characters are the store's own name characters, so that a name made
here is always a valid store name, folder name and file name."""

from __future__ import annotations

import re

# Letters, digits and . _ + = , @ - : safe in file names on every system we run on, and in
# shell words without quoting. Everything else becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,@-]")


def file_safe_name(name: str, fallback: str = "unnamed") -> str:
    """`name` with every other character replaced by `_`; a leading dot too, so that the
    result is never hidden, `.` or `..`. Empty names become `fallback`."""
    safe = _UNSAFE.sub("_", name)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe or fallback
