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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

#: metrics that measure time, not training: excluded from every equality check
TIMING_KEYS = frozenset({"train/pairs_per_second", "pairs_per_second", "wall_seconds"})

#: variables children must not inherit: those a launcher (or an in-process ``train``, which sets
#: a world of one) leaves behind, else a plain ``python -m engine.train`` would try to rendezvous
#: on this process's port
CHILD_ENV_DROP = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_NUM_TASKS",
)


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


def make_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` prompt / chosen (correct) / rejected (wrong) rows of two-digit additions."""
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
    """Same steps, same keys, every numeric non-timing value within ``rtol`` / ``atol``."""
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
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROP}
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
