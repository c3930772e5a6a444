"""The project's cache of built assets: a directory per key, built once and never half-used.

:func:`build_once` is the pattern every cached asset follows (the embedded task's SFT model and
pairs, a converted GGUF model, reasoning-gym problem sets and pairs): the entry
``<root>/<name>/`` is built in ``<name>.building-<pid>/`` and renamed into place only when complete,
with a ``COMPLETE`` marker inside, under a file lock. Concurrent processes (a parallel sweep, the
ranks of one run) build it once; a build killed half-way is never used, and its leftover
directory is deleted by the next build. Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: the file inside a cache entry that says it is complete
COMPLETE = "COMPLETE"


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/preference-loss-zoo`` (``~/.cache/preference-loss-zoo`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "preference-loss-zoo"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created), released on exit or when the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` is a finished cache entry (its ``COMPLETE`` marker exists)."""
    return (entry / COMPLETE).is_file()


def build_once(entry: Path, build: Callable[[Path], None]) -> Path:
    """``entry``, built by ``build(work_dir)`` unless it is already complete; returns ``entry``.

    ``build`` writes everything into the empty ``work_dir`` it is given; when it returns, the
    marker is written and ``work_dir`` is renamed to ``entry``. If it raises, ``work_dir`` is
    deleted and the error propagates: no entry appears. A directory at ``entry`` without the
    marker, and ``.building-*`` siblings (a killed build's), are deleted before building.
    """
    if is_complete(entry):
        return entry
    with locked(entry.with_name(f"{entry.name}.lock")):
        if is_complete(entry):  # another process built it while this one waited
            return entry
        for stale in entry.parent.glob(f"{entry.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if entry.exists():  # a directory without the marker is never trusted
            shutil.rmtree(entry)
        work = entry.with_name(f"{entry.name}.building-{os.getpid()}")
        work.mkdir(parents=True)
        try:
            build(work)
            (work / COMPLETE).write_text("ok\n")
            os.replace(work, entry)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return entry
