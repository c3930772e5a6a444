"""``engine.iterate`` with adapters (``iterate.adapters=merge`` and ``continue``) and under
torchrun on two processes, on the shrunk embedded task: every round completes, each round's
training starts from what the mode says, and two ranks sample the same pairs as one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runtime.distributed import without_launcher_env


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _iterate(overrides: list[str], cwd: Path, cache: Path, nproc: int = 1) -> Path:
    """``python -m engine.iterate`` (``nproc`` > 1: under torchrun); its output directory."""
    out = cwd / "it"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [
        sys.executable,
        *(launcher if nproc > 1 else []),
        "-m",
        "engine.iterate",
        *overrides,
        f"output_dir={out}",
    ]
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        command,
        cwd=cwd,
        env=without_launcher_env() | {"XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _train_model(out: Path, number: int) -> dict:
    """The ``model`` section round ``number``'s training run was configured with."""
    import yaml

    config = yaml.safe_load((out / f"round_{number}" / "train" / "config.yaml").read_text())
    return config["model"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merge", "continue"])
def test_adapters_merge_or_continue_round_after_round(
    tmp_path, tiny_task_overrides, iterate_overrides, mode
):
    out = _iterate(
        [*tiny_task_overrides, *iterate_overrides, "model.lora.r=4", f"iterate.adapters={mode}"],
        tmp_path / "run",
        tmp_path / "cache",
    )
    rows = _read_jsonl(out / "rounds.jsonl")
    assert [row["round"] for row in rows] == [0, 1, 2]
    first, second = _train_model(out, 1), _train_model(out, 2)
    assert first["lora"]["r"] == second["lora"]["r"] == 4
    assert (out / "round_1" / "train" / "final_adapter").is_dir()
    assert first["adapter"] is None
    if mode == "merge":  # a fresh adapter on round 1's merged model
        assert second["name_or_path"] == str(out / "round_1" / "train" / "final_model")
        assert second["adapter"] is None
    else:  # round 1's adapter trained further on the initial model
        assert second["name_or_path"] == first["name_or_path"]
        assert second["adapter"] == str(out / "round_1" / "train" / "final_adapter")
    # round 2 samples from round 1's policy (its merged model) either way
    run = json.loads((out / "round_2" / "pairs" / "parts" / "run.json").read_text())
    assert run["model"]["name_or_path"] == str(out / "round_1" / "train" / "final_model")


@pytest.mark.slow
def test_two_ranks_under_torchrun_run_every_round_and_sample_as_one(
    tmp_path, tiny_task_overrides, iterate_overrides
):
    cache = tmp_path / "cache"  # one task build, shared by both runs
    overrides = [*tiny_task_overrides, *iterate_overrides, "iterate.rounds=1"]
    one = _iterate(overrides, tmp_path / "one", cache)
    two = _iterate(overrides, tmp_path / "two", cache, nproc=2)
    rows = _read_jsonl(two / "rounds.jsonl")
    assert [row["round"] for row in rows] == [0, 1]
    assert (two / "round_1" / "round.json").is_file()  # the round is marked complete
    # sampling is sharded by batch with per-batch seeds: the same pairs on two ranks as on one
    assert _read_jsonl(two / "round_1" / "pairs" / "pairs.jsonl") == _read_jsonl(
        one / "round_1" / "pairs" / "pairs.jsonl"
    )
    assert (two / "round_1" / "train" / "results.json").is_file()
    assert rows[1]["eval"]["n"] == _read_jsonl(one / "rounds.jsonl")[1]["eval"]["n"]
