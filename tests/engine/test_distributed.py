"""Two processes under torchrun train exactly what one process trains on the same global batch.

``torchrun --standalone --nproc_per_node 2`` with ZeRO-2 and ZeRO-3 and two pairs per rank, against
one process with four pairs per micro batch: the sampler gives rank r its slice of the same global
batch, gradients are averaged over ranks, and logged sums are all-reduced, so every train/* and
eval/* value agrees up to float reassociation. Only rank 0 writes: one run directory, chosen by
rank 0 (Hydra's default ``outputs/<date>/<time>``) and shared with rank 1.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RTOL = 1e-4
ATOL = 1e-6  # for values that are 0 up to float noise (rewards at step 1 are exactly 0)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, pair_files, cli, runs):
    cwd = tmp_path_factory.mktemp("one_process")
    proc = cli.run(runs.distributed_overrides(pair_files, 4, "zero2"), cwd=cwd)
    assert proc.returncode == 0, cli.describe(proc)
    run_dir = runs.only_run_dir(cwd)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 1
    return run_dir, results


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one(
    tmp_path, pair_files, cli, metrics_rows, metrics_match, one_process, stage, runs
):
    expected_dir, expected = one_process
    proc = cli.run(runs.distributed_overrides(pair_files, 2, stage), cwd=tmp_path, nproc=2)
    assert proc.returncode == 0, cli.describe(proc)

    run_dir = runs.only_run_dir(tmp_path)  # rank 1 created no directory of its own
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["steps"] == runs.distributed_steps
    assert results["data"]["train"]["pairs"] == 16 and results["data"]["eval"]["pairs"] == 5
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 3]  # train 1, train + eval 2, train + eval 3
    assert all("train/grad_norm" in r for r in rows if "train/loss" in r)

    metrics_match.rows(rows, metrics_rows(expected_dir), rtol=RTOL, atol=ATOL)
    metrics_match.results(results, expected, rtol=RTOL, atol=ATOL)
    assert rows[0]["train/chosen_reward"] == 0.0 and rows[-2]["train/chosen_reward"] != 0.0

    # the exported model: gathered from both ranks' shards under ZeRO-3, and the same model
    exported = load_file(run_dir / "final_model" / "model.safetensors")
    reference = load_file(expected_dir / "final_model" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        assert tensor.shape == exported[name].shape, name
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=5e-5)


def test_zero3_on_two_ranks_evaluates_benchmarks_in_lockstep(tmp_path, pair_files, cli, runs):
    """Generation under ZeRO-3 on two ranks (every rank in every forward: ``synced_gpus``) runs at
    each evaluation and its accuracy lands in results.json. It once raised "got multiple values
    for keyword argument 'synced_gpus'" in the evaluation before the final checkpoint."""
    from engine.task.arithmetic import generate_problems

    problems = generate_problems(7, seed=3, min_digits=1, max_digits=2)  # 7: shards of 4 and 3
    source = tmp_path / "problems.jsonl"
    source.write_text(
        "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    )
    benchmark = [
        "benchmark=[arithmetic]",
        f"benchmark.arithmetic.path={source}",
        "benchmark.arithmetic.max_new_tokens=6",
        "generation.batch_size=2",
    ]
    cwd = tmp_path / "run"
    proc = cli.run(
        [*runs.distributed_overrides(pair_files, 2, "zero3"), *benchmark], cwd=cwd, nproc=2
    )
    assert proc.returncode == 0, cli.describe(proc)
    results = json.loads((runs.only_run_dir(cwd) / "results.json").read_text())
    summary = results["eval"]["benchmarks"]["arithmetic"]
    assert summary["n"] == 7 and 0.0 <= summary["accuracy"] <= 1.0
    assert results["eval"]["accuracy"] == summary["accuracy"]
