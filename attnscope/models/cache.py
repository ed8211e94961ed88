"""The attnscope cache: directories built once, atomically, verified on every use.

A cache entry is a directory ``<root>/<key>`` whose ``.complete`` manifest, written last, lists the
size and SHA-256 of every file in it. It is built in a temporary sibling directory and renamed into
place, so a half-written entry is never used. Every use checks the sizes and parses the header of
each weight file (fast, also for the ~1 GB Gemma entry); an entry that fails (no manifest, a file
missing, truncated or grown, a weight file that does not parse) is damaged and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from filelock import FileLock
from safetensors import SafetensorError, safe_open

from attnscope.errors import AttnscopeError

MARKER = ".complete"  # the manifest: {"files": {relative path: {"size": bytes, "sha256": hex}}}
_OLD_MARKER = b"ok\n"  # written by attnscope before manifests; such entries are still used
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
EntryState = Literal["missing", "complete", "damaged"]


def cache_root() -> Path:
    """``$ATTNSCOPE_CACHE`` or ``~/.cache/attnscope``."""
    root = os.environ.get("ATTNSCOPE_CACHE") or Path.home() / ".cache" / "attnscope"
    return Path(root).expanduser()


def weights_problem(file: Path) -> str | None:
    """Why ``file`` (``.safetensors`` or zip-format torch ``.bin``) is unreadable; None if it is not.

    Reads only the safetensors header or the zip directory: a truncated or grown file fails here.
    """
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="numpy"):  # checks that the data fills the file exactly
                return None
        with zipfile.ZipFile(file):
            return None
    except (SafetensorError, zipfile.BadZipFile, OSError) as err:
        return f"{type(err).__name__}: {err}"


def entry_problem(entry: Path) -> str | None:
    """Why the cache directory ``entry`` cannot be used; None if it is complete and intact."""
    marker = entry / MARKER
    if not marker.is_file():
        return f"it has no {MARKER} manifest (an interrupted build)"
    if marker.read_bytes() == _OLD_MARKER:  # no manifest: the weight files alone are checked
        sizes = {f.relative_to(entry).as_posix(): f.stat().st_size for f in _weight_files(entry)}
    else:
        try:
            files = json.loads(marker.read_bytes())["files"]
            sizes = {name: int(meta["size"]) for name, meta in files.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return f"its {MARKER} manifest is unreadable ({type(err).__name__}: {err})"
    for name, size in sizes.items():
        file = entry / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file.suffix in _WEIGHT_SUFFIXES and (problem := weights_problem(file)):
            return f"{name} is unreadable ({problem})"
    return None


def entry_state(key: str) -> EntryState:
    """``missing`` (never built), ``complete`` or ``damaged`` (rebuilt on the next use)."""
    entry = cache_root() / key
    if not entry.exists():
        return "missing"
    return "complete" if entry_problem(entry) is None else "damaged"


def cached_dir(key: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_root()/key``, calling ``build(tmp_dir)`` first if it is missing or damaged."""
    root = cache_root()
    final = root / key
    if entry_problem(final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        problem = entry_problem(final)
        if problem is None:  # built by another process while we waited
            return final
        for stale in root.glob(f".{key}.*"):  # left by a killed build; the lock excludes live ones
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            warnings.warn(
                f"cache entry {final} is damaged ({problem}): rebuilding it", stacklevel=3
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            build(tmp)
            _write_manifest(tmp)
            if problem := entry_problem(tmp):
                raise AttnscopeError(
                    f"building the cache entry {key} wrote a broken file: {problem}"
                )
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _weight_files(entry: Path) -> list[Path]:
    return sorted(f for f in entry.rglob("*") if f.suffix in _WEIGHT_SUFFIXES and f.is_file())


def _write_manifest(entry: Path) -> None:
    files = {
        file.relative_to(entry).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
        for file in sorted(entry.rglob("*"))
        if file.is_file()
    }
    (entry / MARKER).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _sha256(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; a damaged ``final`` is moved aside first, then deleted."""
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.damaged-", dir=final.parent))
        os.replace(final, aside)  # onto the empty directory mkdtemp made
        os.replace(new, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, final)
