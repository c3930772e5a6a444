"""Shared fixtures for the experiments tests: small preference files written to tmp dirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from engine.task.arithmetic import Problem, solution


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
