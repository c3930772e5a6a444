"""A stop signal at every phase of ``python -m engine.train``, ``engine.evaluate`` and
``engine.sample_pairs`` ends the process with the requeue status (75), and rerunning the same
command finishes with exactly what an uninterrupted run gives, redoing at most the unit of work
in hand (docs/preemption.md).

Each phase is caught from outside, with no hook in the engine: the test waits for the file (or
the signal handler) that shows the phase has begun, freezes the process (SIGSTOP), sends the stop
signal, and lets it go on (SIGCONT), so the signal lands in that phase however fast the machine
is. Everything runs in a world of one with ``TORCH_EXTENSIONS_DIR`` an empty directory: nothing
is compiled or loaded there (DeepSpeed's shared-memory op is for larger worlds).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.runtime.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 4
RTOL = 1e-6
PROBLEMS = 6  # benchmark problems; one generation batch each (generation.batch_size=1)
EVAL_STEP = 3  # the periodic evaluation (trainer.eval_every); the final one is at STEPS


@pytest.fixture(scope="module")
def phase_files(tmp_path_factory, jsonl) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phase_inputs")
    problems = [{"prompt": f"{i}+{i + 2}=", "answer": 2 * i + 2} for i in range(PROBLEMS)]
    return {
        "train": jsonl.write(root / "train.jsonl", jsonl.pairs(40, seed=3)),
        "eval": jsonl.write(root / "eval.jsonl", jsonl.pairs(5, seed=4)),
        "problems": jsonl.write(root / "problems.jsonl", problems),
    }


def train_overrides(files: dict[str, Path], run_dir: Path) -> list[str]:
    """Four steps; the reference pass in shards of one pair (40 + 5 shards); a benchmark of six
    one-problem batches evaluated at step 3 and at the end; checkpoints only at the end."""
    return [
        "model=tiny",
        "data=files",
        f"data.train={files['train']}",
        f"data.eval={files['eval']}",
        f"trainer.max_steps={STEPS}",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.eval_every=3",
        "trainer.save_every=0",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.threads=1",
        "trainer.resume=auto",
        "reference.shard_pairs=1",
        "benchmark=[arithmetic]",
        f"benchmark.arithmetic.path={files['problems']}",
        "benchmark.arithmetic.max_new_tokens=12",
        "generation.batch_size=1",
        f"hydra.run.dir={run_dir}",
    ]


def start(cli, module: str, overrides: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = cli.env(TORCH_EXTENSIONS_DIR=str(cwd / "torch_extensions"))
    with (cwd / "output.log").open("a") as log:
        log.write(f"\n==== {module} {' '.join(overrides)}\n")
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", module, *overrides],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def finish(cli, proc: subprocess.Popen, cwd: Path, timeout: float = 300) -> str:
    """Wait for ``proc`` (its tree killed after ``timeout``); the output of its run."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        cli.kill_tree(proc.pid)
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{(cwd / 'output.log').read_text()[-4000:]}")
    return (cwd / "output.log").read_text().rsplit("\n==== ", 1)[-1]


def handles_sigterm(pid: int) -> bool:
    """Whether ``pid`` has a handler on SIGTERM (``SigCgt`` in /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def stop_when(
    proc: subprocess.Popen, ready: Callable[[], bool], signum: int = signal.SIGTERM
) -> None:
    """Once ``ready()``: freeze ``proc``, send ``signum``, let it go on. Polls; no clock."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before the phase"
        assert time.monotonic() < deadline, "the phase never began"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)


def stopped_where(output: str) -> str:
    found = re.findall(r"stopped (.+), on (SIG\w+)", output)
    assert found, f"no stop message in:\n{output[-4000:]}"
    return found[-1][0]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_run(run_dir: Path, expected: Path, metrics_rows, metrics_match) -> None:
    """The rerun's outputs equal the uninterrupted run's: every metrics row, results.json, the
    benchmark records of every evaluation, the reference scores and the exported weights."""
    metrics_match.rows(metrics_rows(run_dir), metrics_rows(expected), rtol=RTOL)
    results = json.loads((run_dir / "results.json").read_text())
    metrics_match.results(results, json.loads((expected / "results.json").read_text()), rtol=RTOL)
    for step in (EVAL_STEP, STEPS):
        records = f"eval/step_{step}/records/arithmetic.jsonl"
        assert (run_dir / records).read_text() == (expected / records).read_text()
    ours = torch.load(run_dir / "reference_logps.pt", weights_only=False)
    theirs = torch.load(expected / "reference_logps.pt", weights_only=False)
    for mine, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.chosen_logps, want.chosen_logps, rtol=RTOL, atol=0)
        torch.testing.assert_close(mine.rejected_logps, want.rejected_logps, rtol=RTOL, atol=0)
    weights, expected_weights = (
        load_weights(run_dir / "final_model"),
        load_weights(expected / "final_model"),
    )
    assert weights.keys() == expected_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, expected_weights[key], rtol=RTOL, atol=1e-7)
    assert (run_dir / "done" / "complete.json").is_file()
    assert not (run_dir / "reference").exists()  # the shards go once the scores are whole
    assert not (run_dir / "failed.json").exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, phase_files, cli) -> Path:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = start(cli, "engine.train", train_overrides(phase_files, cwd / "run"), cwd)
    output = finish(cli, proc, cwd)
    assert proc.returncode == 0, output[-4000:]
    assert not any((cwd / "torch_extensions").glob("*")), "a world of one compiled or loaded an op"
    return cwd / "run"


def _startup(run_dir: Path, proc: subprocess.Popen) -> bool:
    return handles_sigterm(proc.pid)  # the guard is in place: the imports are still running


def _model_load(run_dir: Path, proc: subprocess.Popen) -> bool:
    return (run_dir / "config.yaml").is_file()  # written once the process group started


def _reference(run_dir: Path, proc: subprocess.Popen) -> bool:
    return (run_dir / "reference" / "train-00000.pt").is_file()


def _training(run_dir: Path, proc: subprocess.Popen) -> bool:
    path = run_dir / "metrics.jsonl"  # a train row: step 1 is done, the stop ends step 1 or 2
    return path.is_file() and '"train/loss"' in path.read_text()


def _evaluation(step: int) -> Callable[[Path, subprocess.Popen], bool]:
    def ready(run_dir: Path, proc: subprocess.Popen) -> bool:
        return (run_dir / f"eval/step_{step}/records/.parts/arithmetic.jsonl").is_file()

    return ready


def _export(run_dir: Path, proc: subprocess.Popen) -> bool:
    return (run_dir / "done" / "training.json").is_file()  # the loop is over: export next


#: phase -> (its start, what the stop message says, what the rerun says it kept)
PHASES = {
    "startup": (_startup, r"during startup, after reading the data", None),
    "model_load": (
        _model_load,
        r"during startup, after (the process group started|the model loaded|DeepSpeed started)",
        None,
    ),
    "reference": (
        _reference,
        r"in the reference pass after train shard (\d+) of 40",
        r"train: (\d+) of 40 shards kept",
    ),
    "training": (_training, r"after step (\d) \(saved\)", r"resuming from .*step_(\d)"),
    "periodic_eval": (
        _evaluation(EVAL_STEP),
        rf"in evaluation after arithmetic batch round (\d) of {PROBLEMS}",
        rf"arithmetic: (\d) of {PROBLEMS} batches kept by an earlier run",
    ),
    "final_eval": (
        _evaluation(STEPS),
        rf"in evaluation after arithmetic batch round (\d) of {PROBLEMS}",
        rf"arithmetic: (\d) of {PROBLEMS} batches kept by an earlier run",
    ),
    "export": (_export, r"after the (final evaluation|export)", None),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_stop_in_any_phase_of_training_is_resumed_to_the_same_run(
    phase, tmp_path, phase_files, cli, uninterrupted, metrics_rows, metrics_match
):
    ready, where, kept = PHASES[phase]
    run_dir = tmp_path / "run"
    overrides = train_overrides(phase_files, run_dir)
    signum = signal.SIGUSR1 if phase == "training" else signal.SIGTERM  # both are stop signals
    proc = start(cli, "engine.train", overrides, tmp_path)
    stop_when(proc, lambda: ready(run_dir, proc), signum)
    output = finish(cli, proc, tmp_path)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    stopped = re.fullmatch(where, stopped_where(output))
    assert stopped, f"{phase}: stopped {stopped_where(output)!r}"
    assert not (run_dir / "failed.json").exists() and not (run_dir / "results.json").exists()
    if phase.endswith("_eval"):  # the step of the interrupted evaluation is saved
        step = EVAL_STEP if phase == "periodic_eval" else STEPS
        assert (run_dir / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
    exported = run_dir / "final_model" / "model.safetensors"
    export_time = exported.stat().st_mtime_ns if exported.is_file() else None

    rerun = start(cli, "engine.train", overrides, tmp_path)
    output = finish(cli, rerun, tmp_path)
    assert rerun.returncode == 0, output[-4000:]
    assert_same_run(run_dir, uninterrupted, metrics_rows, metrics_match)
    # what the rerun took over instead of redoing it
    if kept is not None:
        taken = re.search(kept, output)
        assert taken, f"{phase}: the rerun kept nothing:\n{output[-4000:]}"
        if phase in ("reference", "training"):
            assert taken.group(1) == stopped.group(1)  # every shard / step up to the stop
        else:  # the batch rounds done before the stop (one batch per round in a world of one)
            assert int(taken.group(1)) >= int(stopped.group(1))
    if phase == "final_eval":  # redone from the final checkpoint: no step trained again
        assert re.search(r"resuming from (\S+)", output).group(1).endswith(f"step_{STEPS}")
    if phase == "export" and stopped.group(1) == "export":
        assert exported.stat().st_mtime_ns == export_time  # not exported again
    assert not any((tmp_path / "torch_extensions").glob("*"))


# ---- evaluate and sample_pairs ------------------------------------------------------------------


def evaluate_overrides(files: dict[str, Path], out: Path) -> list[str]:
    """Two benchmarks (the second: arithmetic's config under another name) of six batches."""
    return [
        "model=tiny",
        "benchmark=[arithmetic]",
        f"benchmark.arithmetic.path={files['problems']}",
        "benchmark.arithmetic.max_new_tokens=12",
        f"+benchmark.second={{path: '{files['problems']}', problem_field: prompt, "
        "verifier: arithmetic, prompt: {system: null, chat_template: false}, max_new_tokens: 6}",
        "generation.batch_size=1",
        f"output_dir={out}",
    ]


def test_a_stopped_evaluation_resumes_without_redoing_finished_benchmarks(
    tmp_path, phase_files, cli
):
    expected = tmp_path / "expected"
    proc = start(cli, "engine.evaluate", evaluate_overrides(phase_files, expected), tmp_path)
    output = finish(cli, proc, tmp_path)
    assert proc.returncode == 0, output[-4000:]

    out = tmp_path / "out"
    overrides = evaluate_overrides(phase_files, out)
    proc = start(cli, "engine.evaluate", overrides, tmp_path)
    stop_when(proc, lambda: (out / "records" / ".parts" / "second.jsonl").is_file())
    output = finish(cli, proc, tmp_path)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    stopped = re.fullmatch(
        rf"in evaluation after second batch round (\d) of {PROBLEMS}", stopped_where(output)
    )
    assert stopped, stopped_where(output)
    assert (out / "records" / "arithmetic.jsonl").is_file()  # the first benchmark finished

    rerun = start(cli, "engine.evaluate", overrides, tmp_path)
    output = finish(cli, rerun, tmp_path)
    assert rerun.returncode == 0, output[-4000:]
    assert "arithmetic: finished earlier" in output  # not generated again
    kept = re.search(rf"second: (\d) of {PROBLEMS} batches kept by an earlier run", output)
    assert kept and int(kept.group(1)) >= int(stopped.group(1))
    assert (
        json.loads((out / "results.json").read_text())["benchmarks"]
        == json.loads((expected / "results.json").read_text())["benchmarks"]
    )
    for name in ("arithmetic", "second"):
        records = f"records/{name}.jsonl"
        assert (out / records).read_text() == (expected / records).read_text()
    assert (out / "done" / "complete.json").is_file()

    again = start(cli, "engine.evaluate", overrides, tmp_path)  # a finished one: read back
    output = finish(cli, again, tmp_path)
    assert again.returncode == 0 and "finished earlier: " in output, output[-4000:]
    assert "batches kept" not in output


def sample_overrides(files: dict[str, Path], out: Path) -> list[str]:
    return [
        "model=tiny",
        f"prompts.path={files['problems']}",
        "prompts.problem_field=prompt",
        "prompts.verifier=arithmetic",
        "prompts.prompt.system=null",
        "prompts.prompt.user='{problem}'",
        "samples_per_prompt=2",
        "max_new_tokens=12",
        "batch_prompts=1",
        f"output_dir={out}",
    ]


def test_a_stopped_sampling_resumes_after_its_last_batch(tmp_path, phase_files, cli):
    expected = tmp_path / "expected"
    proc = start(cli, "engine.sample_pairs", sample_overrides(phase_files, expected), tmp_path)
    output = finish(cli, proc, tmp_path)
    assert proc.returncode == 0, output[-4000:]

    out = tmp_path / "out"
    overrides = sample_overrides(phase_files, out)
    proc = start(cli, "engine.sample_pairs", overrides, tmp_path)
    stop_when(proc, lambda: (out / "parts" / "rank-0.jsonl").is_file())
    output = finish(cli, proc, tmp_path)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    stopped = re.fullmatch(
        rf"in sampling after batch round (\d) of {PROBLEMS}", stopped_where(output)
    )
    assert stopped and int(stopped.group(1)) < PROBLEMS, stopped_where(output)
    assert not (out / "pairs.jsonl").exists()

    rerun = start(cli, "engine.sample_pairs", overrides, tmp_path)
    output = finish(cli, rerun, tmp_path)
    assert rerun.returncode == 0, output[-4000:]
    found = re.search(r"(\d) batches to sample \((\d) found done\)", output)
    assert found and int(found.group(2)) >= int(stopped.group(1))
    assert int(found.group(1)) + int(found.group(2)) == PROBLEMS
    assert (out / "pairs.jsonl").read_text() == (expected / "pairs.jsonl").read_text()
    report, want = (json.loads((d / "report.json").read_text()) for d in (out, expected))
    for report_ in (report, want):
        report_.pop("pairs_file")
    assert report == want and report["samples"] == 2 * PROBLEMS
    assert (out / "done" / "complete.json").is_file()
