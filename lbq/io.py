"""The package's one atomic file writer and one JSON-lines reader.

Every JSON or JSON-lines file lbq writes (config.json, result.json, the export manifest, an
evaluation record, the rewritten metrics.jsonl, benchmark reports) goes through `atomic_open`,
and every JSON-lines file it reads through `jsonl_lines`. These stay our own code because the
standard library has no atomic write, and the libraries that add one (atomicwrites is archived)
would be a new dependency for eight lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO[Any]]:
    """A file opened for writing at ``path + '.tmp'``, renamed onto ``path`` (`os.replace`) when
    the block ends, so a kill leaves the old file or the new one, never half of one. When the
    block or the write fails, the temporary file is removed and the error propagates."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(
    path: str, document: Any, indent: int = 2, default: Callable[[Any], Any] | None = None
) -> None:
    """Writes ``document`` as JSON (and a final newline) to ``path`` atomically (`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(json.dumps(document, indent=indent, default=default) + "\n")


def jsonl_lines(path: str) -> Iterator[tuple[int, str, Any]]:
    """``(number, line, record)`` for every line of the JSON-lines file at ``path``, numbered from
    1, ``line`` as read (with its newline). ``record`` is the parsed JSON, or None for a blank
    line, a line that is not JSON, and a last line without its newline (cut short by a kill).

    Raises:
      OSError, UnicodeDecodeError: when the file cannot be read (a missing one included).
    """
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            record = None
            if line.endswith("\n") and line.strip():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
            yield number, line, record


def sha256(path: str) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks (hashlib).

    Raises:
      OSError: when the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
