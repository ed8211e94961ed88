"""Corpus runs written to a filesystem URI (object storage, a shared filesystem on a cluster).

``analyze_corpus(out="s3://bucket/runs/name")`` (any URI ``pyarrow.fs.FileSystem.from_uri`` opens:
``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``) writes the run as usual into a local
staging directory, and ``RunMirror`` copies each stored prompt to the URI as soon as it is
complete, its ``trace.json`` last: a prompt is on the URI iff its ``trace.json`` is, and a copy
interrupted half-way is redone whole. The manifest ``corpus.json`` follows each change. A rerun
with an empty staging directory (another machine) first copies the complete prompts back, so it
resumes. Objects are written whole by the filesystem (no rename is needed on object storage).
One driver writes a URI at a time: the lock is on the local staging directory only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from attnscope.atomic import write_dir_atomically, write_file_atomically
from attnscope.errors import AttnscopeError
from attnscope.runfiles import CORPUS_FILE, PROMPTS_DIR, TRACE_FILE

STAGING_ENV = "ATTNSCOPE_STAGING"  # where runs bound for a URI are staged
CHUNK = 1 << 20


def is_uri(out: str | Path) -> bool:
    return "://" in str(out)


@dataclass(frozen=True)
class RunMirror:
    """A corpus run staged in ``staging`` and copied to ``base`` on ``fs`` (the URI ``uri``)."""

    uri: str
    fs: pafs.FileSystem
    base: str
    staging: Path

    @classmethod
    def of(cls, uri: str) -> RunMirror:
        """The mirror of ``uri``; its staging directory is ``$ATTNSCOPE_STAGING`` (default
        ``~/.cache/attnscope/staging``) ``/<hash of the URI>``."""
        try:
            fs, base = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as err:
            raise AttnscopeError(
                f"cannot open the output URI {uri}: {str(err).splitlines()[0]}. Give a local "
                "path, or a URI pyarrow "
                "can open (s3://, gs://, abfs://, hdfs://, file://) with its credentials set"
            ) from err
        root = os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "attnscope" / "staging"
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return cls(uri, fs, base.rstrip("/"), Path(root).expanduser() / key)

    def _remote(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def _exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._remote(*parts)).type == pafs.FileType.File

    def pull(self) -> None:
        """Copy an existing run's manifest and complete prompts from the URI into an empty
        staging directory (a rerun on another machine), so that the run resumes."""
        if (self.staging / CORPUS_FILE).is_file() or not self._exists(CORPUS_FILE):
            return
        (self.staging / PROMPTS_DIR).mkdir(parents=True, exist_ok=True)
        selector = pafs.FileSelector(self._remote(PROMPTS_DIR), allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory and self._exists(
                PROMPTS_DIR, info.base_name, TRACE_FILE
            ):
                files = self.fs.get_file_info(pafs.FileSelector(info.path))

                def fill(tmp: Path, files: list[pafs.FileInfo] = files) -> None:
                    for file in files:
                        if file.type == pafs.FileType.File and not file.base_name.startswith("."):
                            self._copy_down(file.path, tmp / file.base_name)

                write_dir_atomically(self.staging / PROMPTS_DIR / info.base_name, fill)
        # last: the staged run is a corpus run only once its prompts are in place
        write_file_atomically(self.staging / CORPUS_FILE, self._read(self._remote(CORPUS_FILE)))

    def push_prompt(self, pid: str) -> None:
        """Copy prompt ``pid``'s stored run to the URI, ``trace.json`` last."""
        files = sorted(
            (self.staging / PROMPTS_DIR / pid).iterdir(), key=lambda f: f.name == TRACE_FILE
        )
        for file in files:
            self._copy_up(file, PROMPTS_DIR, pid, file.name)

    def push_file(self, name: str) -> None:
        """Copy one top-level file of the run (``corpus.json``, the report) to the URI."""
        self._copy_up(self.staging / name, name)

    def _copy_up(self, file: Path, *parts: str) -> None:
        """Copy ``file`` to ``parts`` under the URI; the markers (``trace.json``,
        ``corpus.json``) through a temporary name, so that none is ever seen half-written."""
        dest = self._remote(*parts)
        self.fs.create_dir(self._remote(*parts[:-1]), recursive=True)  # local and HDFS need it
        marker = file.name in (TRACE_FILE, CORPUS_FILE)
        target = self._remote(*parts[:-1], f".{parts[-1]}.part") if marker else dest
        with file.open("rb") as src, self.fs.open_output_stream(target) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        if marker:
            self.fs.move(target, dest)

    def _copy_down(self, remote: str, local: Path) -> None:
        with self.fs.open_input_stream(remote) as src, local.open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)

    def _read(self, remote: str) -> bytes:
        with self.fs.open_input_stream(remote) as src:
            return src.read()
