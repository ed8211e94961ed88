"""Safe writes of runs: one writer per run, atomic directory and file writes, and the cleanup of
what killed writers leave behind.

A write of ``DIR/NAME`` (a run directory, or a file) holds the writer lock
``DIR/.NAME.attnscope-lock`` (filelock) from start to end; it fills a temporary sibling
``DIR/.NAME.attnscope-tmp-<random suffix>`` and renames it into place. Replacing a run (``overwrite``)
first moves it aside to ``DIR/.NAME.attnscope-old-PID``. These hidden names exist only while their
writer holds the lock, so any of them whose lock is free is the leftover of a killed writer: a
writer taking a lock in ``DIR`` removes such leftovers (``sweep``) and puts back a run set aside
whose replacement never arrived (inside a run it holds, e.g. a corpus, whoever opens the run
sweeps). Nothing else is ever removed, and ``overwrite`` replaces only an attnscope run
(``run_kind``) or an empty directory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from attnscope.errors import AttnscopeError, RunExistsError
from attnscope.runfiles import CORPUS_FILE, CORPUS_FORMAT, STATS_FILE, TRACE_FILE

LOCK, TMP, OLD = ".attnscope-lock", ".attnscope-tmp-", ".attnscope-old-"
_LEFTOVER = re.compile(
    rf"\.(?P<name>.+)(?:(?P<lock>{re.escape(LOCK)})|{re.escape(TMP)}\w+"
    rf"|(?P<old>{re.escape(OLD)}\d+))"
)
LOCK_WAIT_S = 2.0  # a writer waits this long for a lock held by a sweep before it is refused
KILL_AT = "ATTNSCOPE_TEST_KILL_AT"  # tests: "POINT:NAME" kills the writer of NAME at POINT

_held: dict[tuple[int, Path], Path] = {}  # (thread, lock file) -> the path it claims


def run_kind(path: Path) -> Literal["trace", "corpus"] | None:
    """What attnscope run the directory ``path`` holds: ``"trace"`` (``trace.json`` with a trace
    header and ``stats.parquet``: analyze, vlm and speech runs, corpus prompts), ``"corpus"``
    (``corpus.json`` of format attnscope-corpus) or None (not a run, or not a directory)."""
    if path.is_symlink() or not path.is_dir():
        return None
    header = _read_json(path / TRACE_FILE)
    if {"tokens", "layers", "n_heads"} <= header.keys() and (path / STATS_FILE).is_file():
        return "trace"
    if _read_json(path / CORPUS_FILE).get("format") == CORPUS_FORMAT:
        return "corpus"
    return None


def check_target(dest: Path, overwrite: bool) -> None:
    """Refuse a ``dest`` that may not be written: a new path or an empty directory may be;
    an attnscope run only with ``overwrite``; anything else never."""
    dest = Path(dest)
    if dest.is_symlink():
        raise AttnscopeError(f"{dest} is a symbolic link; write to a plain directory path")
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return
    if not dest.is_dir():
        raise AttnscopeError(
            f"{dest} exists and is not a directory: refusing to replace it; choose another out "
            "directory"
        )
    if run_kind(dest) is None:
        if overwrite:
            raise AttnscopeError(
                f"{dest} is not an attnscope run: refusing to overwrite it (a run holds "
                "trace.json and stats.parquet, or corpus.json); choose another out directory"
            )
        raise RunExistsError(
            f"{dest} exists and is not an attnscope run; choose another out directory"
        )
    if not overwrite:
        raise RunExistsError(
            f"run directory {dest} already exists; pass overwrite=True (CLI: --overwrite) to "
            "replace it"
        )


@contextmanager
def claim(dest: Path, what: str = "run") -> Iterator[None]:
    """Hold the writer lock of ``dest`` while the body runs; a second writer is refused (after
    ``LOCK_WAIT_S``). Reentrant within a thread. Taking it clears what killed writers left in
    ``dest``'s directory (``sweep``), unless that lies inside a path this thread holds."""
    dest = _canonical(Path(dest))
    me = threading.get_ident()
    key = (me, lock_file(dest))
    if key in _held:
        yield
        return
    inside = any(t == me and dest.is_relative_to(path) for (t, _), path in list(_held.items()))
    lock = FileLock(str(key[1]))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout as err:
        raise AttnscopeError(
            f"another process is writing the {what} {dest}; let it finish (or stop it), then run "
            "the same command again"
        ) from err
    except OSError as err:
        raise AttnscopeError(f"cannot write the {what} {dest}: {err}") from err
    _held[key] = dest
    try:
        if not inside:
            sweep(dest.parent, own=dest.name)
        yield
    finally:
        del _held[key]
        _release(lock, key[1])


def sweep(directory: Path, own: str | None = None) -> None:
    """Clear what killed writers left in ``directory``: the temporaries, set-aside runs and lock
    files of every name whose writer lock is free (``own``: a name whose lock the caller has just
    taken). A run set aside whose replacement never arrived is put back."""
    found: dict[str, list[tuple[str, Path]]] = defaultdict(list)  # name -> (kind, entry)
    with suppress(OSError):
        for entry in Path(directory).iterdir():
            if match := _LEFTOVER.fullmatch(entry.name):
                kind = "lock" if match["lock"] else "old" if match["old"] else "tmp"
                found[match["name"]].append((kind, entry))
    for name, entries in found.items():
        target = Path(directory) / name
        if name == own:
            _clear(target, entries)
            continue
        path = lock_file(target)
        if (threading.get_ident(), path) in _held:
            continue
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except (Timeout, OSError):
            continue  # a live writer, or a directory we may not write
        try:
            _clear(target, entries)
        finally:
            _release(lock, path)


def write_dir_atomically(dest: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create ``dest`` by calling ``fill(tmp)`` on a temporary sibling and renaming it into place,
    holding ``dest``'s writer lock throughout.

    ``dest`` may be new or an empty directory; an attnscope run is replaced only if ``overwrite``
    (after the new content is complete, so a failure leaves the old run intact); anything else is
    refused, also when it appears while ``fill`` runs.
    """
    dest = Path(dest)
    with claim(dest):
        check_target(dest, overwrite)
        tmp = _fresh(dest, os.mkdir)
        try:
            _checkpoint("tmp", dest)
            fill(tmp)
            _checkpoint("filled", dest)
            old = _rename_into_place(tmp, dest, overwrite)
        except BaseException:
            _remove(tmp)
            raise
        _checkpoint("renamed", dest)
        if old is not None:
            _remove(old)
    return dest


def write_file_atomically(dest: Path, data: bytes | str) -> None:
    """Write one file through a temporary sibling and ``os.replace``, holding its writer lock."""
    dest = Path(dest)
    with claim(dest, "file"):
        tmp = _fresh(dest, lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL, 0o666)))
        try:
            _checkpoint("tmp", dest)
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
            _checkpoint("filled", dest)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def lock_file(dest: Path) -> Path:
    """The writer lock file of ``dest`` (a run directory or a file)."""
    dest = _canonical(Path(dest))
    return dest.with_name(f".{dest.name}{LOCK}")


def _rename_into_place(tmp: Path, dest: Path, overwrite: bool) -> Path | None:
    """Rename ``tmp`` to ``dest``; a run there is moved aside first (returned, to be removed)."""
    check_target(dest, overwrite)  # again: something may have appeared while tmp was filled
    old = None
    if run_kind(dest) is not None:
        old = dest.with_name(f".{dest.name}{OLD}{os.getpid()}")
        os.rename(dest, old)
        _checkpoint("aside", dest)
    try:
        os.rename(tmp, dest)  # onto a missing path or an empty directory only
    except OSError as err:
        if old is not None:
            with suppress(OSError):  # else the next write into the directory puts it back
                os.rename(old, dest)
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise RunExistsError(
                f"{dest} appeared while this run was being written: refusing to replace it; "
                "choose another out directory"
            ) from err
        raise
    return old


def _clear(target: Path, entries: list[tuple[str, Path]]) -> None:
    """Remove a dead writer's temporaries and set-aside runs of ``target``; put a set-aside run
    back if ``target`` is missing. Lock files go when their lock is released."""
    olds = sorted(p for kind, p in entries if kind == "old")
    if olds and not os.path.lexists(target):
        with suppress(OSError):
            os.rename(olds.pop(), target)
    for kind, entry in entries:
        if kind != "lock":
            _remove(entry)


def _release(lock: FileLock, path: Path) -> None:
    """Remove the lock file while holding it (a contender that opened it retries on the new
    one), then release it."""
    try:
        path.unlink(missing_ok=True)
    finally:
        lock.release()


def _fresh(dest: Path, make: Callable[[Path], Any]) -> Path:
    """A new temporary sibling of ``dest`` made by ``make`` (umask permissions, unlike
    ``tempfile``'s private 0700 / 0600)."""
    while True:
        tmp = dest.with_name(f".{dest.name}{TMP}{secrets.token_hex(4)}")
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink()


def _canonical(dest: Path) -> Path:
    """``dest`` with a resolved parent (one lock per directory entry, however it is named)."""
    if dest.name in ("", ".", ".."):
        dest = dest.resolve()
    return dest.parent.resolve() / dest.name


def _read_json(file: Path) -> dict:
    """The JSON object in ``file``; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _checkpoint(point: str, dest: Path) -> None:
    """A moment of a write (tmp, filled, aside, renamed) at which tests kill the writer as
    ``kill -9`` would: environment variable ``ATTNSCOPE_TEST_KILL_AT=POINT:NAME``."""
    if os.environ.get(KILL_AT) == f"{point}:{dest.name}":
        os.kill(os.getpid(), signal.SIGKILL)
