"""Atomic file writes: a reader (or a run that crashes mid-write) sees the old file or the new
one, never half of one. Every file this project produces (checkpoint markers, results, reports,
plots, converted data) goes through here. Standard library only, so light to import.

Work that is kept unit by unit (sampled batches, evaluation batches) goes to an append-only JSON
Lines log instead: :func:`append_log_entry` adds one fsynced line per finished unit and
:func:`read_log` reads the finished ones back, ignoring a last line that a killed process left
half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; replace ``path`` with it on a clean exit.

    The temporary file lives in the same directory (so ``os.replace`` is a rename on one
    filesystem), takes the old file's permissions (or an ordinary 0644, not mkstemp's 0600), is
    fsynced before the rename, and the directory after it. If the body raises, the temporary
    file is removed and ``path`` is left as it was. ``mode`` is ``"w"`` (UTF-8 text, ``\\n`` line
    ends on every platform) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(descriptor, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically (see :func:`atomic_open`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; not every platform can fsync a directory."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_log(path: str | os.PathLike, what: str = "entry") -> list[dict[str, Any]]:
    """The entries of an append-only JSON Lines log (:func:`append_log_entry`); none when the file
    does not exist. A last line without its newline (the writer died mid-line) is ignored; any
    other unreadable line is a ``ValueError`` naming the file and line (``not a finished
    <what>``)."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines if text.endswith("\n") else lines[:-1]
    entries = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number}: not a finished {what} ({error})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: line {number}: not a finished {what} (not an object)")
        entries.append(entry)
    return entries


def append_log_entry(path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the log at ``path`` as one line, flushed and fsynced before returning
    (a unit of work is kept once this returns). A half-written last line left by a killed writer
    is cut first, so the new entry starts on a line of its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as handle:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # rare (a killed writer): read it all to find the cut
                handle.seek(0)
                handle.truncate(handle.read().rfind(b"\n") + 1)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
