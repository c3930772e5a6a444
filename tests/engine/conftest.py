"""Shared fixtures for the engine tests: tiny arithmetic preference pairs, Hydra composition,
in-process training runs, and subprocess runs of ``python -m engine.train`` (plain or torchrun).

Every run uses ``model=tiny`` (a small Llama with the arithmetic task's char-level tokenizer, built
in code) and ``data=files`` pointing at JSONL pairs written here, so nothing is downloaded and no
SFT stage runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine.runtime.distributed import without_launcher_env

REPO = Path(__file__).resolve().parents[2]

#: metrics that measure time, not training: excluded from every equality check
TIMING_KEYS = frozenset({"train/pairs_per_second", "pairs_per_second", "wall_seconds"})


# ---- tiny arithmetic pairs --------------------------------------------------------------------


def solution(a: int, b: int, answer: int | None = None, wrong_step: bool = False) -> str:
    """The task's worked addition, one column per step, e.g. ``solution(12, 34)`` is
    ``"2+4+0=6 c0|1+3+0=4 c0|#### 46"``; ``answer`` / ``wrong_step`` make a wrong one."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        digit = (total + 1) % 10 if wrong_step and i == 0 else total % 10
        steps.append(f"{x}+{y}+{carry}={digit} c{total // 10}|")
        carry = total // 10
    return "".join(steps) + f"#### {a + b if answer is None else answer}"


def make_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` prompt / chosen (correct) / rejected (wrong) rows of two-digit additions, with
    UltraFeedback-style ``score_chosen`` > ``score_rejected`` columns (ODPO reads them; every
    other objective ignores them)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        rows.append(
            {
                "prompt": f"{a}+{b}=",
                "chosen": solution(a, b),
                "rejected": solution(a, b, answer=wrong, wrong_step=rng.random() < 0.5),
                "score_chosen": 6.0 + a % 4,
                "score_rejected": 1.0 + b % 3,
            }
        )
    return rows


def write_jsonl(path: Path, rows: Iterable[dict | str]) -> Path:
    """Rows as JSON Lines; a ``str`` row is written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory) -> SimpleNamespace:
    """``train`` (16 pairs) and ``eval`` (5 pairs: an odd count, so that sharding pads)."""
    root = tmp_path_factory.mktemp("pairs")
    return SimpleNamespace(
        train=write_jsonl(root / "train.jsonl", make_pairs(16, seed=0)),
        eval=write_jsonl(root / "eval.jsonl", make_pairs(5, seed=1)),
    )


# ---- configs and in-process runs --------------------------------------------------------------


@pytest.fixture(scope="session")
def base_overrides(pair_files, run_overrides) -> Callable[..., list[str]]:
    """``base_overrides(run_dir, eval=False, steps=2)``: the tiny-run overrides."""

    def make(run_dir: Path | None, *, eval: bool = False, steps: int = 2) -> list[str]:
        return run_overrides(
            pair_files.train, pair_files.eval if eval else None, run_dir, steps=steps
        )

    return make


@pytest.fixture(scope="session")
def train_run(base_overrides, compose_config) -> Callable[..., tuple[dict[str, Any], Path]]:
    """``train_run(run_dir, *overrides, eval=False, steps=2)`` composes the tiny run (later
    overrides win) and calls ``engine.train.train`` in this process; returns (results, run_dir)."""

    def run(
        run_dir: Path, *overrides: str, eval: bool = False, steps: int = 2
    ) -> tuple[dict[str, Any], Path]:
        from engine.train import train

        cfg = compose_config([*base_overrides(run_dir, eval=eval, steps=steps), *overrides])
        return train(cfg), Path(run_dir)

    return run


# ---- comparing metrics ------------------------------------------------------------------------


def numeric_items(row: dict[str, Any]) -> dict[str, float]:
    """The numeric, non-timing entries of a metrics row."""
    return {
        k: v
        for k, v in row.items()
        if k not in TIMING_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def assert_rows_match(
    actual: list[dict[str, Any]],
    expected: list[dict[str, Any]],
    *,
    rtol: float,
    atol: float = 0.0,
    ignore: Iterable[str] = (),
) -> None:
    """Same steps, same keys, every numeric non-timing value within ``rtol`` / ``atol``; at least
    one row (two empty lists are no evidence that two runs agree)."""
    assert expected, "no rows to compare: the reference run logged nothing"
    ignore = set(ignore)
    assert [r["step"] for r in actual] == [r["step"] for r in expected], (
        f"logged steps differ: {[r['step'] for r in actual]} vs {[r['step'] for r in expected]}"
    )
    for got, want in zip(actual, expected, strict=True):
        got_items = {k: v for k, v in numeric_items(got).items() if k not in ignore}
        want_items = {k: v for k, v in numeric_items(want).items() if k not in ignore}
        assert got_items.keys() == want_items.keys(), (
            f"step {got['step']}: keys differ: {sorted(got_items.keys() ^ want_items.keys())}"
        )
        bad = {
            k: (got_items[k], want_items[k])
            for k in want_items
            if not math.isclose(got_items[k], want_items[k], rel_tol=rtol, abs_tol=atol)
        }
        assert not bad, f"step {got['step']}: values differ (actual, expected): {bad}"


def assert_results_match(
    actual: dict[str, Any], expected: dict[str, Any], *, rtol: float, atol: float = 0.0
) -> None:
    """``results.json`` train / eval sections agree (timing keys excluded); both non-empty."""
    for section in ("train", "eval"):
        assert expected[section], f"the reference results.json has an empty {section!r}"
        assert_rows_match(
            [{"step": section, **actual[section]}],
            [{"step": section, **expected[section]}],
            rtol=rtol,
            atol=atol,
        )


@pytest.fixture(scope="session")
def metrics_match() -> SimpleNamespace:
    """``rows(actual, expected, rtol=, atol=, ignore=)`` and ``results(actual, expected, ...)``."""
    return SimpleNamespace(rows=assert_rows_match, results=assert_results_match)


# ---- subprocess runs --------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """This environment minus launcher variables, plus one thread and the repo on the path."""
    # without the launcher variables (a launcher's, or those an in-process ``train`` set for a
    # world of one), else a plain ``python -m engine.train`` would rendezvous on this port
    env = without_launcher_env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is none). torchrun starts its
    workers in sessions of their own, so killing its process group does not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL the process ``pid`` started by this test and everything it started."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def run_cli(
    overrides: Sequence[str],
    *,
    cwd: Path,
    nproc: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``python -m engine.train overrides`` (``nproc`` > 1: under torchrun --standalone)."""
    launcher: list[str] = []
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "engine.train", *overrides]
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=child_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\nstderr tail:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def describe(proc: subprocess.CompletedProcess) -> str:
    """The command, return code and output tails, for assertion messages."""
    return (
        f"command: {' '.join(map(str, proc.args))}\nreturn code: {proc.returncode}\n"
        f"stdout tail:\n{proc.stdout[-2000:]}\nstderr tail:\n{proc.stderr[-4000:]}"
    )


@pytest.fixture(scope="session")
def cli() -> SimpleNamespace:
    """``run(overrides, cwd=, nproc=1, env=None, timeout=300)``, ``describe(proc)``, and for
    tests that manage a child themselves ``env(**extra)`` and ``kill_tree(pid)``."""
    return SimpleNamespace(run=run_cli, describe=describe, env=child_env, kill_tree=kill_tree)


@pytest.fixture(scope="session")
def jsonl() -> SimpleNamespace:
    """``read(path)`` and ``write(path, rows)`` for JSON Lines; ``pairs(n, seed)`` makes rows."""
    return SimpleNamespace(read=read_jsonl, write=write_jsonl, pairs=make_pairs)


# ---- runs shared by the resume, distributed and adapter tests ---------------------------------

#: steps of test_distributed's runs; of test_resume's (a checkpoint every step)
DISTRIBUTED_STEPS = 3
RESUME_STEPS = 6


def distributed_overrides(pair_files, micro_batch_size: int, stage: str) -> list[str]:
    """Three steps of the tiny model on the pair files under ``stage``, every step logged, eval
    every 2 (what test_distributed compares across world sizes)."""
    return [
        "model=tiny",
        "data=files",
        f"data.train={pair_files.train}",
        f"data.eval={pair_files.eval}",
        f"deepspeed={stage}",
        f"trainer.max_steps={DISTRIBUTED_STEPS}",
        f"trainer.micro_batch_size={micro_batch_size}",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.threads=1",
    ]


def only_run_dir(cwd: Path) -> Path:
    """The one run directory Hydra created under ``cwd/outputs``; nothing else was written."""
    run_dirs = sorted(p.parent for p in cwd.rglob("metrics.jsonl"))
    assert len(run_dirs) == 1, f"expected one run directory, found {run_dirs}"
    run_dir = run_dirs[0]
    assert run_dir.relative_to(cwd).parts[0] == "outputs"
    strays = [p for p in cwd.rglob("*") if p.is_file() and run_dir not in p.parents]
    assert not strays, f"files written outside the run directory: {strays}"
    return run_dir


def resume_overrides(base_overrides, run_dir: Path, *extra: str) -> list[str]:
    """Six steps of two pairs; train rows every 2 steps, eval every 3, a checkpoint every step."""
    return [
        *base_overrides(run_dir, eval=True, steps=RESUME_STEPS),
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


def run_and_kill(overrides: list[str], kill_at: int, cwd: Path) -> str:
    """Run training in a child and SIGKILL it from here once step ``kill_at``'s save is complete;
    returns the child's output."""
    script = cwd / "_child.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(kill_at), *overrides],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(300, kill_tree, [proc.pid])  # never hang the suite
    watchdog.start()
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if line.strip() == f"SAVED {kill_at}":
                kill_tree(proc.pid)
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


@pytest.fixture(scope="session")
def runs() -> SimpleNamespace:
    """Runs other test modules repeat: ``distributed_overrides(pair_files, micro, stage)`` and
    ``distributed_steps``; ``only_run_dir(cwd)``; ``resume_overrides(base_overrides, run_dir,
    *extra)`` and ``resume_steps``; ``run_and_kill(overrides, kill_at, cwd)`` (SIGKILL once step
    ``kill_at``'s save is complete); ``results(run_dir)`` (its results.json)."""
    return SimpleNamespace(
        distributed_overrides=distributed_overrides,
        distributed_steps=DISTRIBUTED_STEPS,
        only_run_dir=only_run_dir,
        resume_overrides=resume_overrides,
        resume_steps=RESUME_STEPS,
        run_and_kill=run_and_kill,
        results=read_results,
    )


#: engine.iterate shrunk to seconds: two rounds of 8 fresh prompts, two DPO steps each
ITERATE_ROUNDS = (
    "iterate.rounds=2",
    "iterate.prompts_per_round=8",
    "iterate.samples_per_prompt=8",
    "iterate.batch_prompts=4",
    "trainer.max_steps=2",
    "trainer.micro_batch_size=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "trainer.tensorboard=false",
    "trainer.threads=1",
    "method=dpo",
)


@pytest.fixture(scope="session")
def iterate_overrides() -> tuple[str, ...]:
    """The overrides of a two-round ``engine.iterate`` on the shrunk task (:data:`ITERATE_ROUNDS`;
    with ``tiny_task_overrides``)."""
    return ITERATE_ROUNDS
