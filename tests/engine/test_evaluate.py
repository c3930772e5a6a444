"""Tests for engine.evaluate: per-problem records and their summary, the paper's table, the
average, sharding helpers, and two processes under torchrun giving one process's results.

The end-to-end check against the embedded task's own accuracy is in
tests/engine/task/test_evaluate_and_pairs.py (it needs the task's trained SFT model)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.generation.backends import PromptFormat
from engine.generation.evaluation import (
    Record,
    average,
    generate_and_judge,
    markdown_table,
    summarize,
)
from engine.runtime.distributed import gather_in_order, shard, without_launcher_env

REPO = Path(__file__).resolve().parents[2]


class EchoBackend:
    """Answers each prompt with a scripted completion; records what it was asked."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[dict] = []

    def generate(self, prompts, **options) -> list[str]:
        self.calls.append({"prompts": list(prompts), **options})
        return [self.answers[p] for p in prompts]


def test_generate_and_judge_records_each_problem() -> None:
    backend = EchoBackend({"1+1=": "#### 2", "2+2=": "#### 5", "3+3=": "no marker"})
    records = generate_and_judge(
        backend,
        None,  # plain prompts (chat_template=false) never touch the tokenizer
        [("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6")],
        prompt=PromptFormat(chat_template=False),
        verifier="arithmetic",
        max_new_tokens=7,
    )
    assert records == [
        Record("1+1=", "#### 2", "2", "2", True, False),
        Record("2+2=", "#### 5", "5", "4", False, False),
        Record("3+3=", "no marker", None, "6", False, False),
    ]
    (call,) = backend.calls
    assert call["max_new_tokens"] == 7 and call["temperature"] == 0.0  # greedy by default
    assert call["add_special_tokens"] is True


def test_summary_table_and_average() -> None:
    records = [Record("p", "c", "1", "1", i < 3, i == 9) for i in range(10)]
    summary = summarize(records)
    # binomial standard error sqrt(p (1 - p) / n) = sqrt(0.3 * 0.7 / 10)
    assert summary == {
        "accuracy": 0.3,
        "stderr": pytest.approx(math.sqrt(0.021)),
        "n": 10,
        "timeouts": 1,
    }
    empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["stderr"])
    summaries = {
        "math500": {"accuracy": 0.5, "stderr": 0.05, "n": 100},
        "aime24": {"accuracy": 0.1, "stderr": 0.055, "n": 30},
    }
    assert average(summaries) == pytest.approx(0.3)  # unweighted, as the paper's Avg.
    table = markdown_table({"benchmarks": summaries, "accuracy": 0.3}, label="bpo")
    assert table.splitlines() == [
        "| bpo | math500 | aime24 | Avg. |",
        "|---|---|---|---|",
        "| accuracy (%) | 50.0 | 10.0 | 30.0 |",
        "| stderr (%) | 5.0 (n=100) | 5.5 (n=30) |  |",
    ]


def test_shard_deals_round_robin_and_gather_restores_the_order() -> None:
    items = list(range(7))
    parts = [shard(items, rank, 3) for rank in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert gather_in_order(items) == items  # one process: the identity


def _child_env() -> dict[str, str]:
    env = without_launcher_env()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _evaluate_cli(source: Path, out: Path, nproc: int) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [
        sys.executable,
        *(launcher if nproc > 1 else []),
        "-m",
        "engine.evaluate",
        "model=tiny",  # random weights: answers are junk, but every completion is compared
        "benchmark=[arithmetic]",
        f"benchmark.arithmetic.path={source}",
        "benchmark.arithmetic.max_new_tokens=12",
        "generation.batch_size=1",  # no padding: a prompt's completion cannot depend on its shard
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        command, cwd=out.parent, env=_child_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_give_the_results_of_one(tmp_path: Path) -> None:
    from engine.task.arithmetic import generate_problems

    problems = generate_problems(7, seed=11, min_digits=1, max_digits=3)
    source = tmp_path / "problems.jsonl"
    source.write_text(
        "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    )
    one = _evaluate_cli(source, tmp_path / "one", nproc=1)
    two = _evaluate_cli(source, tmp_path / "two", nproc=2)
    assert two["benchmarks"] == one["benchmarks"]
    assert one["benchmarks"]["arithmetic"]["n"] == 7
    records = {
        name: (tmp_path / name / "records" / "arithmetic.jsonl").read_text()
        for name in ("one", "two")
    }
    assert records["two"] == records["one"]  # gathered back into file order on rank 0
    prompts = [json.loads(line)["prompt"] for line in records["one"].splitlines()]
    assert prompts == [p.prompt for p in problems]


def test_benchmark_evaluator_scores_a_model_in_memory(tmp_path: Path) -> None:
    """What training calls: files read once up front, the model as it is at each call."""
    from omegaconf import OmegaConf

    from engine.generation.backends import HFBackend
    from engine.generation.evaluation import BenchmarkEvaluator
    from engine.model.loading import load_model, load_tokenizer

    source = tmp_path / "b.jsonl"
    source.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": i + 1}) + "\n" for i in range(3))
    )
    spec = {"path": str(source), "problem_field": "prompt", "verifier": "arithmetic"}
    spec |= {"prompt": {"system": None, "chat_template": False}, "max_new_tokens": 6}
    evaluator = BenchmarkEvaluator(OmegaConf.create({"mine": spec}), batch_size=2)
    source.unlink()  # read at construction
    model_cfg = OmegaConf.create(
        {
            "dtype": "float32",
            "tiny": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_layers": 1,
                "num_heads": 2,
                "max_position_embeddings": 64,
            },
        }
    )
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    metrics = evaluator.evaluate(model, tokenizer, "cpu")
    records = generate_and_judge(
        HFBackend(model, tokenizer, batch_size=2),
        tokenizer,
        [(f"{i}+1=", str(i + 1)) for i in range(3)],
        prompt=PromptFormat(chat_template=False),
        verifier="arithmetic",
        max_new_tokens=6,
    )
    summary = summarize(records)
    assert metrics == {
        "accuracy": summary["accuracy"],
        **{f"benchmarks/mine/{key}": float(value) for key, value in summary.items()},
    }
    assert metrics["benchmarks/mine/n"] == 3.0
    with pytest.raises(FileNotFoundError):
        BenchmarkEvaluator(OmegaConf.create({"mine": spec}))


def test_a_bad_benchmark_file_fails_before_any_model_work(tmp_path: Path, monkeypatch) -> None:
    from hydra import compose, initialize_config_dir

    import engine.evaluate as evaluate_module

    good = tmp_path / "math500.jsonl"
    good.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    bad = tmp_path / "aime.jsonl"
    bad.write_text(json.dumps({"problem": "2+2?", "answer": "4"}) + "\n")
    bad.write_text(bad.read_text() + json.dumps({"problem": "3+3?", "Answer": "6"}) + "\n")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            [
                "model=tiny",
                "benchmark=[math500,aime24]",
                f"benchmark.math500.path={good}",
                f"benchmark.aime24.path={bad}",
                f"output_dir={tmp_path / 'out'}",
            ],
        )

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the benchmark files were checked")

    monkeypatch.setattr(evaluate_module, "load_backend", no_model)
    with pytest.raises(ValueError, match=r"aime\.jsonl: line 2: benchmark aime24: missing answer"):
        evaluate_module.evaluate(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_reports_benchmark_accuracy(
    tmp_path: Path, pair_files, compose_config, run_overrides, metrics_rows
) -> None:
    """benchmark=[...] in a training run: evaluated every trainer.eval_every steps and at the end,
    logged flat (eval/benchmarks/<name>/accuracy), nested in results.json; eval.accuracy is the
    average over benchmarks."""
    from engine.train import train

    sources = {}
    for name, offset in (("arithmetic", 0), ("second", 5)):
        sources[name] = tmp_path / f"{name}.jsonl"
        sources[name].write_text(
            "".join(
                json.dumps({"prompt": f"{i}+{offset}=", "answer": i + offset}) + "\n"
                for i in range(4)
            )
        )
    # the second benchmark: arithmetic's config under another name, via Hydra's + syntax
    second = {
        "path": str(sources["second"]),
        "problem_field": "prompt",
        "verifier": "arithmetic",
        "prompt": {"system": None, "chat_template": False},
        "max_new_tokens": 8,
    }
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            *run_overrides(pair_files.train, None, run_dir, steps=2),
            "trainer.eval_every=1",
            "benchmark=[arithmetic]",
            f"benchmark.arithmetic.path={sources['arithmetic']}",
            "benchmark.arithmetic.max_new_tokens=8",
            "generation.batch_size=3",
        ]
    )
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    cfg.benchmark.second = second
    results = train(cfg)
    on_disk = json.loads((run_dir / "results.json").read_text())
    benchmarks = on_disk["eval"]["benchmarks"]
    assert set(benchmarks) == {"arithmetic", "second"}
    for summary in benchmarks.values():
        assert set(summary) == {"accuracy", "stderr", "n", "timeouts"} and summary["n"] == 4
        p = summary["accuracy"]
        assert summary["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    assert on_disk["eval"]["accuracy"] == pytest.approx(
        (benchmarks["arithmetic"]["accuracy"] + benchmarks["second"]["accuracy"]) / 2
    )
    assert results["eval"] == on_disk["eval"]
    rows = metrics_rows(run_dir, "eval/benchmarks/arithmetic/accuracy")
    assert [row["step"] for row in rows] == [1, 2]  # every eval_every step and the end
    assert all("eval/accuracy" in row for row in rows)
