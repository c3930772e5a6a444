"""Crash safety: a run killed with a real SIGKILL and resumed with ``trainer.resume=auto`` ends
exactly where an uninterrupted run ends, and a save that never completed is never resumed from.

The SIGKILL comes from outside: the test starts ``python -m engine.train``'s entry point in a
child whose checkpoint save is wrapped (test code, :data:`_CHILD`) to announce step k's completed
save on stdout and then wait; the test reads that line and kills the child's process tree. So the
kill lands exactly after step k's checkpoint, however fast or slow the machine is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import engine.checkpoint as checkpoint_module
from engine.checkpoint import COMPLETE, complete_steps, latest_complete_step

STEPS = 6
RTOL = 1e-6


def overrides_for(base_overrides, run_dir: Path, *extra: str) -> list[str]:
    """Six steps of two pairs; train rows every 2 steps, eval every 3, a checkpoint every step."""
    return [
        *base_overrides(run_dir, eval=True, steps=STEPS),
        "trainer.log_every=2",
        "trainer.eval_every=3",
        "trainer.save_every=1",
        "trainer.keep_checkpoints=2",
        "trainer.tensorboard=false",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


#: ``python _child.py <k> <overrides...>``: ``python -m engine.train``, with each checkpoint save
#: wrapped to print SAVED <step> once it is complete and, at step k, to wait to be killed
_CHILD = """
import runpy, sys, time
import engine.run_state as run_state

kill_at = int(sys.argv.pop(1))
real_save = run_state.save

def save(engine, checkpoint_dir, state, keep, device):
    real_save(engine, checkpoint_dir, state, keep, device)
    print(f"SAVED {state.step}", flush=True)
    if state.step == kill_at:
        time.sleep(600)

run_state.save = save
runpy.run_module("engine.train", run_name="__main__", alter_sys=True)  # python -m engine.train
"""


def run_and_kill(cli, overrides: list[str], kill_at: int, cwd: Path) -> str:
    """Run training in a child and SIGKILL it from here once step ``kill_at``'s save is complete;
    returns the child's output."""
    script = cwd / "_child.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(kill_at), *overrides],
        cwd=cwd,
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(300, cli.kill_tree, [proc.pid])  # never hang the suite
    watchdog.start()
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if line.strip() == f"SAVED {kill_at}":
                cli.kill_tree(proc.pid)
                break
        output.append(proc.stdout.read())
        proc.wait()
    finally:
        watchdog.cancel()
    text = "".join(output)
    assert proc.returncode == -9, f"return code {proc.returncode}\n{text[-4000:]}"
    return text


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, base_overrides, cli, metrics_rows):
    """The reference: the same run, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_dir = root / "run"
    proc = cli.run(overrides_for(base_overrides, run_dir), cwd=root)
    assert proc.returncode == 0, cli.describe(proc)
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 6]  # train 2, eval 3, train 4, train+eval 6
    return run_dir


def kill_then_resume(
    tmp_path, base_overrides, cli, metrics_rows, kill_at: int, before_resume=None
) -> Path:
    run_dir = tmp_path / "run"
    output = run_and_kill(cli, overrides_for(base_overrides, run_dir), kill_at, tmp_path)
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

    resumed = cli.run(overrides_for(base_overrides, run_dir, "trainer.resume=auto"), cwd=tmp_path)
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
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, uninterrupted
):
    run_dir = kill_then_resume(
        tmp_path, base_overrides, cli, metrics_rows, 4, before_resume=plant_incomplete_save
    )
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(uninterrupted), rtol=RTOL)
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
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, uninterrupted
):
    run_dir = kill_then_resume(tmp_path, base_overrides, cli, metrics_rows, 3)  # train at 2, 4, 6
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(uninterrupted), rtol=RTOL)


@pytest.mark.slow
def test_resume_after_the_last_save_writes_full_results(
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, uninterrupted
):
    run_dir = kill_then_resume(tmp_path, base_overrides, cli, metrics_rows, STEPS)
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(uninterrupted), rtol=RTOL)
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    metrics_match.results(read_results(run_dir), read_results(uninterrupted), rtol=RTOL)


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
