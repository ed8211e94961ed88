"""Atomic writes into run directories: write into a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from attnscope.errors import RunExistsError


def write_dir_atomically(dest: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create ``dest`` by calling ``fill(tmp)`` on a temporary sibling and renaming it into place.

    An existing ``dest`` is refused unless ``overwrite``; then it is replaced only after the new
    content is complete, so a failure leaves the old run intact.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise RunExistsError(
            f"run directory {dest} already exists; pass overwrite=True (CLI: --overwrite)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_file_atomically(dest: Path, data: bytes | str) -> None:
    """Write one file through a temporary sibling and ``os.replace``."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
