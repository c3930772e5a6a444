"""Shared fixtures for the experiments tests: small preference files written to tmp dirs, and the
bench's pieces (a tiny model size, a worker's result, a worker spec, a report's context)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.task.arithmetic import Problem, solution
from experiments.bench.synthetic import ModelSize
from experiments.bench.variants import Plan, Variant, adapter_size


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def arithmetic_rows(count: int, seed: int = 0) -> list[dict]:
    """Pairs in the embedded task's format: prompt ``"59+63="``, a correct worked solution as
    chosen (``"9+3+0=2 c1|5+6+1=2 c1|#### 122"``) and the same steps with a wrong final answer as
    rejected. Every character is in the tiny model's char-level alphabet."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        problem = Problem(rng.randint(10, 99), rng.randint(10, 99), "+")
        chosen = solution(problem)
        steps = chosen.rsplit("#### ", 1)[0]
        rows.append(
            {
                "prompt": problem.prompt,
                "chosen": chosen,
                "rejected": f"{steps}#### {problem.answer + 1}",
            }
        )
    return rows


@pytest.fixture(scope="session")
def arithmetic_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL file of 8 string-format arithmetic preference pairs for ``model=tiny data=files``."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "arithmetic.jsonl", arithmetic_rows(8))


@pytest.fixture
def bench_size() -> ModelSize:
    """A Llama small enough to count its FLOPs by hand: hidden 8, MLP 16, 2 layers, vocab 50."""
    return ModelSize(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, vocab_size=50)


@pytest.fixture
def worker_result() -> Callable[..., dict]:
    """``result(seconds, rss, **extra)``: a bench worker's result of three steps, the first (the
    warm-up) 9 s, the others ``seconds`` each, with peak RSS ``rss`` MiB."""

    def result(seconds: float, rss: float, **extra: object) -> dict:
        return {"step_seconds": [9.0] + [seconds] * 2, "peak_rss_mb": rss, **extra}

    return result


@pytest.fixture
def bench_spec() -> Callable[..., dict]:
    """``spec(variant=None)``: the worker spec of one run (``Plan.run_spec``, the bench's own
    builder) of ``variant`` (default plain ours) with micro batch 2, 3 steps, max length 64, at
    placeholder paths (for composing its config, not for running it)."""
    plan = Plan(micro_batch=2, warmup=0, steps=3, max_length=64)

    def spec(variant: Variant | None = None) -> dict:
        return plan.run_spec(variant or Variant("ours", "ours"), "/m", "/t.jsonl", "/r")

    return spec


@pytest.fixture
def report_context(bench_size: ModelSize) -> Callable[..., dict]:
    """``context(**changes)``: what ``render_report`` is given, for a quick run on ``bench_size``
    with a fixed machine and date."""
    machine = {
        "cpu": "test CPU",
        "cores": 2,
        "torch_threads": 2,
        "memory_gb": 4.0,
        "gpu": None,
        "python": "3.11",
        "platform": "test",
        "versions": {"torch": "test"},
    }

    def context(**changes: object) -> dict:
        return {
            "command": "python -m experiments.bench --quick",
            "date": "today",
            "machine": machine,
            "load_before": "0.1",
            "load_after": "0.2",
            "minutes": 1.0,
            "peak_gflops": 100.0,
            "plan": Plan(),
            "size": bench_size,
            "adapter_size": adapter_size(bench_size),
            "quick": True,
            "trl_state": {},
            **changes,
        }

    return context
