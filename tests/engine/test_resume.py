"""Crash safety: a run killed with a real SIGKILL and resumed with ``trainer.resume=auto`` ends
exactly where an uninterrupted run ends, and a save that never completed is never resumed from.

The SIGKILL comes from the test hook in engine/train.py: ``ENGINE_TEST_SIGKILL_AT_STEP=k`` makes
the process kill itself right after step k (and its checkpoint, when step k saves one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import engine.checkpoint as checkpoint_module
from engine.checkpoint import COMPLETE, complete_steps, latest_complete_step

STEPS = 6
RTOL = 1e-6


def overrides_for(pair_files, run_dir: Path, *extra: str) -> list[str]:
    """Six steps of two pairs; train rows every 2 steps, eval every 3, a checkpoint every step."""
    return [
        "model=tiny",
        "data=files",
        f"data.train={pair_files.train}",
        f"data.eval={pair_files.eval}",
        f"trainer.max_steps={STEPS}",
        "trainer.micro_batch_size=2",
        "trainer.log_every=2",
        "trainer.eval_every=3",
        "trainer.save_every=1",
        "trainer.keep_checkpoints=2",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.threads=1",
        f"output_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pair_files, cli):
    """The reference: the same run, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_dir = root / "run"
    proc = cli.run(overrides_for(pair_files, run_dir), cwd=root)
    assert proc.returncode == 0, cli.describe(proc)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 6]  # train 2, eval 3, train 4, train+eval 6
    return run_dir


def kill_then_resume(tmp_path, pair_files, cli, kill_at: int, before_resume=None) -> Path:
    run_dir = tmp_path / "run"
    killed = cli.run(
        overrides_for(pair_files, run_dir),
        cwd=tmp_path,
        env={"ENGINE_TEST_SIGKILL_AT_STEP": str(kill_at)},
    )
    assert killed.returncode == -9, cli.describe(killed)
    checkpoints = run_dir / "checkpoints"
    # the kill came after step kill_at's save: `latest` names it, and it is complete
    assert (checkpoints / "latest").read_text().strip() == f"step_{kill_at}"
    assert (checkpoints / f"step_{kill_at}" / COMPLETE).is_file()
    assert latest_complete_step(checkpoints) == kill_at
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "final_model").exists()
    assert max(r["step"] for r in read_metrics(run_dir)) <= kill_at
    if before_resume is not None:
        before_resume(run_dir)

    resumed = cli.run(overrides_for(pair_files, run_dir, "trainer.resume=auto"), cwd=tmp_path)
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
    tmp_path, pair_files, cli, metrics_match, uninterrupted
):
    run_dir = kill_then_resume(tmp_path, pair_files, cli, 4, before_resume=plant_incomplete_save)
    metrics_match.rows(read_metrics(run_dir), read_metrics(uninterrupted), rtol=RTOL)
    metrics_match.results(read_results(run_dir), read_results(uninterrupted), rtol=RTOL)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step_{STEPS}"
    # every save left is complete (the torn step_5 was overwritten by the real one)
    names = sorted(p.name for p in checkpoints.glob("step_*"))
    assert names == ["step_5", "step_6"]
    assert all((checkpoints / name / COMPLETE).is_file() for name in names)


@pytest.mark.slow
def test_resume_between_log_steps_matches_uninterrupted(
    tmp_path, pair_files, cli, metrics_match, uninterrupted
):
    run_dir = kill_then_resume(tmp_path, pair_files, cli, 3)  # train rows at 2, 4, 6
    metrics_match.rows(read_metrics(run_dir), read_metrics(uninterrupted), rtol=RTOL)


@pytest.mark.slow
def test_resume_after_the_last_save_writes_full_results(
    tmp_path, pair_files, cli, metrics_match, uninterrupted
):
    run_dir = kill_then_resume(tmp_path, pair_files, cli, STEPS)
    metrics_match.rows(read_metrics(run_dir), read_metrics(uninterrupted), rtol=RTOL)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    metrics_match.results(read_results(run_dir), read_results(uninterrupted), rtol=RTOL)


# ---- a crash in the middle of a save (in process) ---------------------------------------------


def test_crash_during_save_is_never_resumed_from(tmp_path, train_run, metrics_match, monkeypatch):
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
    metrics_match.rows(read_metrics(run_dir), read_metrics(reference_dir), rtol=RTOL)
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
