"""The attnscope cache: directories built once, atomically, and reused.

A cache entry is a directory ``<root>/<key>`` that holds a ``.complete`` marker. It is built in a
temporary sibling directory and renamed into place, so a half-written entry is never used; an entry
without the marker (a crash from an older layout, a manual deletion) is rebuilt.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

MARKER = ".complete"


def cache_root() -> Path:
    """``$ATTNSCOPE_CACHE`` or ``~/.cache/attnscope``."""
    root = os.environ.get("ATTNSCOPE_CACHE") or Path.home() / ".cache" / "attnscope"
    return Path(root).expanduser()


def is_cached(key: str) -> bool:
    return (cache_root() / key / MARKER).is_file()


def cached_dir(key: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_root()/key``, calling ``build(tmp_dir)`` first if the entry is missing."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if (final / MARKER).is_file():
        return final
    with FileLock(str(root / f"{key}.lock")):
        if (final / MARKER).is_file():  # built by another process while we waited
            return final
        if final.exists():
            shutil.rmtree(final)  # incomplete or corrupt entry
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            build(tmp)
            (tmp / MARKER).write_text("ok\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
