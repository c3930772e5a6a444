"""engine.runtime.fileio: every file the project writes is all-or-nothing."""

from __future__ import annotations

import json
import stat

import pytest

from engine.runtime.fileio import atomic_open, atomic_write_json, atomic_write_text


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_text_and_json_round_trip_with_ordinary_permissions(tmp_path) -> None:
    path = tmp_path / "sub" / "a.txt"  # parents are created
    atomic_write_text(path, "one\ntwo\n")
    assert path.read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    atomic_write_json(tmp_path / "b.json", {"z": 1, "a": [1, 2]})
    assert (tmp_path / "b.json").read_text().startswith('{\n  "a"')  # sorted by default
    atomic_write_json(tmp_path / "c.json", {"z": 1, "a": 2}, sort_keys=False)
    assert list(json.loads((tmp_path / "c.json").read_text())) == ["z", "a"]
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_a_replaced_file_keeps_its_permissions(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(path, "wb") as handle:
        handle.write(b"half of the new")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # not JSON: nothing is created
        atomic_write_json(tmp_path / "new.json", {"x": object()})
    assert not (tmp_path / "new.json").exists() and _leftovers(tmp_path) == []


def test_readers_see_the_old_file_until_the_write_completes(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    with atomic_open(path) as handle:
        handle.write("new")
        assert path.read_text() == "old"
    assert path.read_text() == "new"


def test_only_write_modes(tmp_path) -> None:
    with (
        pytest.raises(ValueError, match="mode must be 'w' or 'wb', got 'a'"),
        atomic_open(tmp_path / "a.txt", "a"),
    ):
        pass
    assert not (tmp_path / "a.txt").exists()
