"""Crash safety: a run killed with a real SIGKILL and resumed with ``trainer.resume=auto`` ends
exactly where an uninterrupted run ends, and a save that never completed is never resumed from.

The SIGKILL comes from outside: the test starts ``python -m engine.train``'s entry point in a
child whose checkpoint save is wrapped (test code, :data:`_CHILD`) to announce step k's completed
save on stdout and then wait; the test reads that line and kills the child's process tree. So the
kill lands exactly after step k's checkpoint, however fast or slow the machine is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import engine.checkpoint as checkpoint_module
from engine.checkpoint import COMPLETE, complete_steps, latest_complete_step

RTOL = 1e-6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, base_overrides, cli, metrics_rows, runs):
    """The reference: the same run, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_dir = root / "run"
    proc = cli.run(runs.resume_overrides(base_overrides, run_dir), cwd=root)
    assert proc.returncode == 0, cli.describe(proc)
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 6]  # train 2, eval 3, train 4, train+eval 6
    return run_dir


def kill_then_resume(
    tmp_path, base_overrides, cli, metrics_rows, runs, kill_at: int, before_resume=None
) -> Path:
    run_dir = tmp_path / "run"
    output = runs.run_and_kill(runs.resume_overrides(base_overrides, run_dir), kill_at, tmp_path)
    assert f"SAVED {kill_at + 1}" not in output
    checkpoints = run_dir / "checkpoints"
    # the kill came after step kill_at's save: `latest` names it, and it is complete
    assert (checkpoints / "latest").read_text().strip() == f"step_{kill_at}"
    assert (checkpoints / f"step_{kill_at}" / COMPLETE).is_file()
    assert latest_complete_step(checkpoints) == kill_at
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "final_model").exists()
    assert max(r["step"] for r in metrics_rows(run_dir)) <= kill_at
    if before_resume is not None:
        before_resume(run_dir)

    resumed = cli.run(
        runs.resume_overrides(base_overrides, run_dir, "trainer.resume=auto"), cwd=tmp_path
    )
    assert resumed.returncode == 0, cli.describe(resumed)
    # proof that it resumed (a fresh start would end with the same metrics too): the engine's log
    log = resumed.stdout + resumed.stderr
    assert "resuming from" in log and f"step_{kill_at}" in log, cli.describe(resumed)
    return run_dir


def plant_incomplete_save(run_dir: Path) -> None:
    """A newer save cut short by a crash: DeepSpeed's files (truncated), no COMPLETE marker."""
    checkpoints = run_dir / "checkpoints"
    newest = latest_complete_step(checkpoints)
    torn = checkpoints / f"step_{newest + 1}"
    shutil.copytree(checkpoints / f"step_{newest}", torn)
    (torn / COMPLETE).unlink()
    for state in torn.glob("*.pt"):
        state.write_bytes(state.read_bytes()[:100])
    assert latest_complete_step(checkpoints) == newest


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, uninterrupted, runs
):
    run_dir = kill_then_resume(
        tmp_path, base_overrides, cli, metrics_rows, runs, 4, before_resume=plant_incomplete_save
    )
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(uninterrupted), rtol=RTOL)
    metrics_match.results(runs.results(run_dir), runs.results(uninterrupted), rtol=RTOL)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{runs.resume_steps}"
    # every save left is complete (the torn step_5 was overwritten by the real one)
    names = sorted(p.name for p in checkpoints.glob("step_*"))
    assert names == ["step_5", "step_6"]
    assert all((checkpoints / name / COMPLETE).is_file() for name in names)


@pytest.mark.slow
def test_resume_between_log_steps_matches_uninterrupted(
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, uninterrupted, runs
):
    # train rows at 2, 4, 6: killed at 3
    run_dir = kill_then_resume(tmp_path, base_overrides, cli, metrics_rows, runs, 3)
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(uninterrupted), rtol=RTOL)


@pytest.mark.slow
def test_resume_after_the_last_save_writes_full_results(
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, uninterrupted, runs
):
    run_dir = kill_then_resume(tmp_path, base_overrides, cli, metrics_rows, runs, runs.resume_steps)
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(uninterrupted), rtol=RTOL)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    metrics_match.results(runs.results(run_dir), runs.results(uninterrupted), rtol=RTOL)


# ---- a crash in the middle of a save (in process) ---------------------------------------------


def test_crash_during_save_is_never_resumed_from(
    tmp_path, train_run, metrics_rows, metrics_match, monkeypatch
):
    """The process dies after DeepSpeed wrote step 3's files but before its COMPLETE marker."""
    options = ("trainer.save_every=1", "trainer.tensorboard=false", "trainer.keep_checkpoints=5")
    reference, reference_dir = train_run(tmp_path / "reference", *options, eval=True, steps=4)

    real_write = checkpoint_module.atomic_write_text

    def crash_on_step_3(path, text):
        if Path(path).parent.name == "step_3" and Path(path).name == COMPLETE:
            raise RuntimeError("simulated crash during save")
        real_write(path, text)

    monkeypatch.setattr(checkpoint_module, "atomic_write_text", crash_on_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(tmp_path / "run", *options, eval=True, steps=4)
    monkeypatch.setattr(checkpoint_module, "atomic_write_text", real_write)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "step_3").is_dir() and any((checkpoints / "step_3").iterdir())
    assert not (checkpoints / "step_3" / COMPLETE).exists()
    assert (checkpoints / "latest").read_text().strip() == "step_2"  # never the torn save
    assert complete_steps(checkpoints) == [1, 2]
    assert latest_complete_step(checkpoints) == 2

    results, run_dir = train_run(
        tmp_path / "run", *options, "trainer.resume=auto", eval=True, steps=4
    )
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(reference_dir), rtol=RTOL)
    metrics_match.results(results, reference, rtol=RTOL)
    assert complete_steps(checkpoints) == [1, 2, 3, 4]
    assert (checkpoints / "latest").read_text().strip() == "step_4"


# ---- choosing the save to resume from ---------------------------------------------------------


def make_save(checkpoints: Path, step: int, complete: bool) -> None:
    (checkpoints / f"step_{step}").mkdir(parents=True)
    (checkpoints / f"step_{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (checkpoints / f"step_{step}" / COMPLETE).write_text(f"{step}\n")


def test_latest_complete_step_ignores_incomplete_saves(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert latest_complete_step(checkpoints) is None  # no directory at all
    checkpoints.mkdir()
    assert latest_complete_step(checkpoints) is None
    make_save(checkpoints, 30, complete=False)
    assert latest_complete_step(checkpoints) is None  # an incomplete save alone: start fresh
    make_save(checkpoints, 10, complete=True)
    make_save(checkpoints, 20, complete=True)
    (checkpoints / "step_99.tmp").mkdir()  # not a save's name
    (checkpoints / "latest").write_text("step_30\n")  # even if latest named a torn save
    assert latest_complete_step(checkpoints) == 20
    assert complete_steps(checkpoints) == [10, 20]
    (checkpoints / "latest").write_text("step_10\n")  # latest wins over the newest complete one
    assert latest_complete_step(checkpoints) == 10
    (checkpoints / "latest").write_text("garbage")
    assert latest_complete_step(checkpoints) == 20


@pytest.mark.slow
def test_a_failed_final_evaluation_is_redone_from_the_final_checkpoint(
    tmp_path, train_run, metrics_rows, metrics_match, monkeypatch, caplog
):
    """The final checkpoint is written before the final evaluation: when that evaluation fails,
    the rerun resumes from it and evaluates, without training a step again, and ends where an
    uninterrupted run ends."""
    import engine.loop

    expected, _ = train_run(tmp_path / "expected", "trainer.save_every=0", eval=True, steps=4)
    real_evaluate = engine.loop.evaluate

    def failing_at_the_end(parts, step=None):
        if step == parts.total_steps:
            raise RuntimeError("the benchmark server went away")
        return real_evaluate(parts, step)

    monkeypatch.setattr(engine.loop, "evaluate", failing_at_the_end)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="went away"):
        train_run(run_dir, "trainer.save_every=0", "trainer.resume=auto", eval=True, steps=4)
    assert complete_steps(run_dir / "checkpoints") == [4]  # saved before it was judged
    assert not (run_dir / "results.json").exists()

    monkeypatch.setattr(engine.loop, "evaluate", real_evaluate)
    steps_trained = []
    real_step = engine.loop.train_step
    monkeypatch.setattr(
        engine.loop, "train_step", lambda *a, **k: steps_trained.append(1) or real_step(*a, **k)
    )
    with caplog.at_level("INFO", logger="engine.train"):
        results, _ = train_run(
            run_dir, "trainer.save_every=0", "trainer.resume=auto", eval=True, steps=4
        )
    assert f"resuming from {run_dir / 'checkpoints' / 'step_4'}" in caplog.text
    assert steps_trained == []  # only the evaluation was redone
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(tmp_path / "expected"), rtol=RTOL)
    metrics_match.results(results, expected, rtol=RTOL)
