"""``python -m engine.evaluate`` and ``python -m engine.sample_pairs`` end to end on the embedded
task's SFT model (the session's tiny build): evaluation equals the task's own accuracy, and
sampling makes verified pairs that the preference loader reads, resumes after an interruption
and reruns for free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from engine import sample_pairs as sample_pairs_module
from engine.data.loading import load_pairs, write_jsonl
from engine.evaluate import evaluate
from engine.sample_pairs import sample_pairs
from engine.task.arithmetic import Problem, verify
from engine.task.pipeline import _problem_sets

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _problems_file(path: Path, problems: list[Problem]) -> Path:
    write_jsonl(path, ({"prompt": p.prompt, "answer": p.answer} for p in problems))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_evaluate_on_the_sft_model_equals_the_tasks_accuracy(tiny_build, tmp_path) -> None:
    _, task, _ = tiny_build
    source = _problems_file(tmp_path / "heldout.jsonl", task.eval_problems)
    eval_cfg = _compose(
        "evaluate",
        "model=hf",
        f"model.name_or_path={task.model_dir}",
        "benchmark=[arithmetic]",
        f"benchmark.arithmetic.path={source}",
        "generation.batch_size=256",  # the task's batch: the same left padding, the same argmax
        f"output_dir={tmp_path / 'eval'}",
    )
    results = evaluate(eval_cfg)
    arithmetic = results["benchmarks"]["arithmetic"]
    assert arithmetic["n"] == len(task.eval_problems) == 16
    assert arithmetic["accuracy"] == task.sft_summary["accuracy"]
    assert arithmetic["stderr"] == task.sft_summary["accuracy_stderr"]
    assert results["accuracy"] == arithmetic["accuracy"]  # the average of one benchmark
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["benchmarks"] == results["benchmarks"]
    table = (tmp_path / "eval" / "results.md").read_text().splitlines()
    assert table[0] == "| sft_model | arithmetic | Avg. |"
    assert table[2].startswith(f"| accuracy (%) | {100 * arithmetic['accuracy']:.1f} |")
    records = _read_jsonl(tmp_path / "eval" / "records" / "arithmetic.jsonl")
    assert [r["prompt"] for r in records] == [p.prompt for p in task.eval_problems]
    assert {"completion", "extracted", "gold", "correct", "timed_out"} <= set(records[0])
    for record, problem in zip(records, task.eval_problems, strict=True):
        assert record["gold"] == str(problem.answer)
        assert record["correct"] == verify(problem, record["completion"])
    assert sum(r["correct"] for r in records) / len(records) == arithmetic["accuracy"]


def _sample_cfg(task, source: Path, out: Path, *overrides: str):
    return _compose(
        "sample_pairs",
        "model=hf",
        f"model.name_or_path={task.model_dir}",
        f"prompts.path={source}",
        "prompts.problem_field=prompt",
        "prompts.verifier=arithmetic",
        "prompts.prompt.system=null",
        "prompts.prompt.user='{problem}'",
        "max_new_tokens=80",
        "samples_per_prompt=8",
        "batch_prompts=5",
        "seed=3",
        f"output_dir={out}",
        *overrides,
    )


@pytest.mark.slow
def test_sample_pairs_end_to_end_and_resume(tiny_build, tmp_path, monkeypatch) -> None:
    cfg, task, _ = tiny_build
    problems = _problem_sets(cfg.data.problems)["pairs"]  # 16 prompts: batches of 5, 5, 5, 1
    by_prompt = {p.prompt: p for p in problems}
    source = _problems_file(tmp_path / "questions.jsonl", problems)
    out = tmp_path / "pairs"
    report = sample_pairs(_sample_cfg(task, source, out))

    rows = _read_jsonl(out / "pairs.jsonl")
    assert report == json.loads((out / "report.json").read_text())
    assert report["prompts"] == 16 and report["samples"] == 128
    assert report["pairs"] == len(rows) >= 3  # the tiny SFT model is right now and then
    assert report["pairs"] + report["all_correct_prompts"] + report["all_wrong_prompts"] == 16
    assert 0 < report["sample_accuracy"] < 1 and report["verification_timeouts"] == 0
    for row in rows:
        problem = by_prompt[row["prompt"]]
        assert verify(problem, row["chosen"]) and not verify(problem, row["rejected"])
        assert row["answer"] == str(problem.answer)
    prompts = [row["prompt"] for row in rows]
    assert prompts == [p.prompt for p in problems if p.prompt in prompts]  # file order
    tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
    pairs, loaded = load_pairs(str(out / "pairs.jsonl"), tokenizer, max_length=160)
    assert loaded.pairs == len(rows) == len(pairs)

    # a rerun finds every batch done: no model is even loaded, the same files come out
    def no_model(*args, **kwargs):
        raise AssertionError("a finished run sampled again")

    monkeypatch.setattr(sample_pairs_module, "load_backend", no_model)
    assert sample_pairs(_sample_cfg(task, source, out)) == report
    monkeypatch.undo()

    # a run killed in batch 2's write: its line is half there; batch 3 never ran
    part = out / "parts" / "rank-0.jsonl"
    lines = part.read_text().splitlines(keepends=True)
    assert [json.loads(line)["batch"] for line in lines] == [0, 1, 2, 3]
    part.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    (out / "pairs.jsonl").unlink()
    sampled: list[int] = []
    real = sample_pairs_module.build_pairs

    def counting(*args, **kwargs):
        sampled.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_pairs_module, "build_pairs", counting)
    assert sample_pairs(_sample_cfg(task, source, out)) == report
    assert sampled == [5, 1]  # only the lost batches, each with its own seed: the same pairs
    assert _read_jsonl(out / "pairs.jsonl") == rows

    # other settings into the same directory are refused
    with pytest.raises(ValueError, match="other settings"):
        sample_pairs(_sample_cfg(task, source, out, "seed=4"))
