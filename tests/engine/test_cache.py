"""engine.runtime.cache.build_once: built once, never half-used, a killed build's leftovers
removed, a failed build leaves no entry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.runtime.cache import COMPLETE, build_once, default_cache_root, is_complete


def _writer(calls: list[Path], text: str = "weights"):
    def build(work: Path) -> None:
        calls.append(work)
        (work / "model.bin").write_text(text)

    return build


def test_builds_once_then_reuses(tmp_path: Path) -> None:
    calls: list[Path] = []
    entry = tmp_path / "models" / "m-123"
    assert build_once(entry, _writer(calls)) == entry
    assert build_once(entry, _writer(calls, "other")) == entry
    assert len(calls) == 1 and calls[0] != entry  # built beside the entry, then renamed
    assert (entry / "model.bin").read_text() == "weights" and is_complete(entry)
    assert not list(entry.parent.glob("m-123.building-*"))


def test_a_half_written_entry_is_rebuilt(tmp_path: Path) -> None:
    entry = tmp_path / "m-1"
    entry.mkdir()
    (entry / "model.bin").write_text("half")  # no COMPLETE marker: a killed writer's
    stale = tmp_path / "m-1.building-999999"
    stale.mkdir()
    calls: list[Path] = []
    build_once(entry, _writer(calls))
    assert len(calls) == 1 and (entry / "model.bin").read_text() == "weights"
    assert not stale.exists()


def test_a_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    entry = tmp_path / "m-2"

    def broken(work: Path) -> None:
        (work / "part").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build_once(entry, broken)
    assert not entry.exists() and not list(tmp_path.glob("m-2.building-*"))
    calls: list[Path] = []
    build_once(entry, _writer(calls))  # the next use builds it
    assert (entry / COMPLETE).is_file() and len(calls) == 1


def test_the_cache_root_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_root() == tmp_path / "preference-loss-zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_root() == Path(os.path.expanduser("~")) / ".cache" / "preference-loss-zoo"
