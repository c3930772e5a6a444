"""Verified checkpoints: COMPLETE records every file's size and sha256, and resume skips a save
whose files are missing, truncated or altered, with a warning naming the file, falling back to the
previous complete save; when none verifies the error names the checkpoints directory.

The unit tests build saves by hand in ``tmp_path`` (fast); the end-to-end test damages a real
DeepSpeed save of the tiny model and resumes through ``engine.train.train``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from engine.checkpoint import (
    COMPLETE,
    LATEST,
    CheckpointError,
    _delete_old_saves,
    complete_steps,
    describe_files,
    latest_verified_step,
    manifest_text,
    read_manifest,
)

FILES = {
    "mp_rank_00_model_states.pt": b"model weights " * 50,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"adam moments " * 80,
    "rng_rank0.pt": b"rng",
    "nested/extra_state.bin": b"a file one level down",
}


def make_save(checkpoints: Path, step: int, *, marker: str = "manifest") -> Path:
    """A save of ``FILES`` (contents varied by step) with a COMPLETE marker: ``manifest`` (the
    current format), ``old`` (just the step number) or ``none`` (an incomplete save)."""
    step_dir = checkpoints / f"step_{step}"
    for rel, content in FILES.items():
        (step_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / rel).write_bytes(content + str(step).encode())
    if marker == "manifest":
        files = describe_files(step_dir, sorted(FILES))
        (step_dir / COMPLETE).write_text(manifest_text(step, files))
    elif marker == "old":
        (step_dir / COMPLETE).write_text(f"{step}\n")
    (checkpoints / LATEST).write_text(f"step_{step}\n")
    return step_dir


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    """Complete, verifiable saves at steps 1, 2 and 3 (``latest`` names step 3)."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        make_save(root, step)
    return root


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_manifest_lists_every_file_with_size_and_checksum(checkpoints):
    manifest = read_manifest(checkpoints / "step_3")
    assert manifest["step"] == 3 and manifest["digest"] == "sha256"
    assert sorted(manifest["files"]) == sorted(FILES)  # nested paths are relative, POSIX
    entry = manifest["files"]["rng_rank0.pt"]
    assert entry["size"] == len(b"rng3")
    # sha256 of b"rng3" (`printf rng3 | sha256sum`)
    assert entry["sha256"] == "a71570bf1407f540096e30eb3848baff104939255a56ce07f899084f9449670f"


def test_intact_newest_save_is_chosen_without_warnings(checkpoints, caplog):
    with caplog.at_level(logging.WARNING):
        assert latest_verified_step(checkpoints) == 3
    assert not warnings_of(caplog)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:5]), "size 5 bytes, saved with"),
        (lambda f: f.write_bytes(f.read_bytes() + b"!"), "longer than saved"),
        (lambda f: f.unlink(), "missing"),
        (
            lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]),
            "sha256 differs from the one saved (altered)",
        ),
    ],
    ids=["truncated", "grown", "deleted", "one_byte_altered"],
)
def test_damaged_newest_save_falls_back_to_the_previous(checkpoints, caplog, damage, expected):
    damage(checkpoints / "step_3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with caplog.at_level(logging.WARNING):
        assert latest_verified_step(checkpoints) == 2
    warned = warnings_of(caplog)
    assert "step_3" in warned and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in warned
    assert expected in warned
    if expected.startswith("size"):
        assert "(truncated)" in warned


def test_damage_in_a_nested_file_is_found(checkpoints, caplog):
    (checkpoints / "step_3" / "nested" / "extra_state.bin").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert latest_verified_step(checkpoints) == 2
    assert "nested/extra_state.bin: size 1 bytes" in warnings_of(caplog)


def test_files_outside_the_manifest_are_ignored(checkpoints):
    (checkpoints / "step_3" / "notes.txt").write_text("a user's note")
    assert latest_verified_step(checkpoints) == 3


def test_falls_back_past_several_damaged_saves(checkpoints, caplog):
    (checkpoints / "step_3" / "rng_rank0.pt").unlink()
    (checkpoints / "step_2" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert latest_verified_step(checkpoints) == 1
    warned = warnings_of(caplog)
    assert "rng_rank0.pt: missing" in warned and "mp_rank_00_model_states.pt: size 0" in warned


def test_unreadable_marker_counts_as_damage(checkpoints, caplog):
    (checkpoints / "step_3" / COMPLETE).write_text('{"files": ')  # cut short
    with caplog.at_level(logging.WARNING):
        assert latest_verified_step(checkpoints) == 2
    assert "COMPLETE" in warnings_of(caplog) and "not a manifest" in warnings_of(caplog)


def test_no_save_verifies_names_the_directory(checkpoints):
    for step in (1, 2, 3):
        (checkpoints / f"step_{step}" / "rng_rank0.pt").write_bytes(b"?")
    with pytest.raises(CheckpointError) as raised:
        latest_verified_step(checkpoints)
    message = str(raised.value)
    assert str(checkpoints) in message
    assert all(f"step_{step}: rng_rank0.pt: size 1 bytes" in message for step in (1, 2, 3))


def test_no_complete_save_means_a_fresh_start(tmp_path):
    assert latest_verified_step(tmp_path / "absent") is None
    make_save(tmp_path / "checkpoints", 4, marker="none")  # a save cut short: not a candidate
    assert latest_verified_step(tmp_path / "checkpoints") is None


def test_old_marker_is_complete_but_unverified(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    make_save(checkpoints, 1)
    old = make_save(checkpoints, 2, marker="old")
    (old / "rng_rank0.pt").write_bytes(b"")  # cannot be noticed without a manifest
    assert read_manifest(old) is None
    with caplog.at_level(logging.WARNING):
        assert latest_verified_step(checkpoints) == 2
    assert "step_2 was saved before checkpoints recorded checksums" in warnings_of(caplog)


def test_latest_is_tried_first(checkpoints):
    """``latest`` names the current timeline's newest save; a later step left by an abandoned
    timeline is only a fallback."""
    (checkpoints / LATEST).write_text("step_2\n")
    assert latest_verified_step(checkpoints) == 2
    (checkpoints / "step_2" / "rng_rank0.pt").unlink()
    assert latest_verified_step(checkpoints) == 3  # then the others, newest first


# ---- keeping old saves ------------------------------------------------------------------------


def test_retention_keeps_the_new_save_and_its_predecessors(checkpoints):
    make_save(checkpoints, 4)
    _delete_old_saves(checkpoints, 4, keep=2)
    assert complete_steps(checkpoints) == [3, 4]
    make_save(checkpoints, 5)
    _delete_old_saves(checkpoints, 5, keep=0)  # 0: keep everything
    assert complete_steps(checkpoints) == [3, 4, 5]


def test_retention_never_counts_saves_of_an_abandoned_timeline(tmp_path):
    """Steps 5 and 6 were damaged, the run resumed from 4 and has just saved step 5 again: with
    keep=1 the new save must survive (counting stale step 6 would delete it), and nothing newer
    than it is deleted either."""
    checkpoints = tmp_path / "checkpoints"
    for step in (4, 5, 6):
        make_save(checkpoints, step)
    make_save(checkpoints, 7, marker="none")
    (checkpoints / "step_6" / "rng_rank0.pt").unlink()
    make_save(checkpoints, 5)  # the new save of step 5; latest names it
    make_save(checkpoints, 3, marker="none")  # a torn save before it: garbage
    (checkpoints / LATEST).write_text("step_5\n")
    _delete_old_saves(checkpoints, 5, keep=1)
    assert complete_steps(checkpoints) == [5, 6]
    assert not (checkpoints / "step_3").exists() and (checkpoints / "step_7").exists()
    assert latest_verified_step(checkpoints) == 5


# ---- end to end: a damaged DeepSpeed save of the tiny model -------------------------------------


def test_resume_skips_a_truncated_save_of_a_real_run(
    tmp_path, train_run, metrics_rows, metrics_match, caplog
):
    """Three steps saved at 2 and 3; one ``.pt`` file of step 3 cut in half (what made
    ``trainer.resume=auto`` crash with "PytorchStreamReader failed reading zip archive"). Resume
    warns, falls back to step 2, retrains step 3 and ends where the undamaged run ended."""
    options = ("trainer.save_every=1", "trainer.keep_checkpoints=2", "trainer.tensorboard=false")
    run_dir = tmp_path / "run"
    expected, _ = train_run(run_dir, *options, eval=True, steps=3)
    expected_rows = metrics_rows(run_dir)
    checkpoints = run_dir / "checkpoints"
    assert complete_steps(checkpoints) == [2, 3]
    manifest = read_manifest(checkpoints / "step_3")
    assert {"mp_rank_00_model_states.pt", "rng_rank0.pt"} <= manifest["files"].keys()
    assert latest_verified_step(checkpoints) == 3

    victim = max((checkpoints / "step_3").glob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with caplog.at_level(logging.INFO):
        results, _ = train_run(run_dir, *options, "trainer.resume=auto", eval=True, steps=3)
    warned = warnings_of(caplog)
    assert f"{victim.name}: size" in warned and "(truncated)" in warned and "step_3" in warned
    assert f"resuming from {checkpoints / 'step_2'}" in caplog.text
    metrics_match.rows(metrics_rows(run_dir), expected_rows, rtol=1e-6)
    metrics_match.results(results, expected, rtol=1e-6)
    assert latest_verified_step(checkpoints) == 3  # the new save of step 3 is whole again
