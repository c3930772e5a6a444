"""Tests for the benchmark configs: each real yaml reads a small fixture in the benchmark's own
field layout and file kind (written in tmp_path), its gold answers agree with a correct boxed
completion under its verifier, prompts follow the paper, and bad files fail naming file, row and
field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from transformers import AutoTokenizer

from engine.generation.backends import render_prompt
from engine.generation.benchmarks import PAPER_SYSTEM, Benchmark, benchmarks_from_config
from engine.verifiers import VERIFIERS

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_dataset_dir(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# Each benchmark: its rows in the real layout, the file kind they come in, and the golds expected.
FIXTURES = {
    "math500": (
        _write_jsonl,
        "test.jsonl",
        [
            {
                "problem": "Convert $(0,3)$ to polar coordinates.",
                "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
                "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                "subject": "Precalculus",
                "level": 2,
                "unique_id": "test/precalculus/807.json",
            },
            {"problem": "What is $1/2 + 1/2$?", "solution": "...", "answer": "1"},
        ],
        ["\\left( 3, \\frac{\\pi}{2} \\right)", "1"],
    ),
    "aime24": (
        _write_parquet,
        "aime.parquet",
        [
            {"id": 60, "problem": "Every morning Aya ...", "solution": "...", "answer": 204},
            {"id": 61, "problem": "Let $ABC$ be a triangle ...", "solution": "...", "answer": 113},
        ],
        ["204", "113"],
    ),
    "amc23": (
        _write_jsonl,
        "amc.jsonl",
        [
            {"id": 0, "problem": "Cities A and B are 45 miles apart ...", "answer": 27.0},
            {"id": 1, "question": "Positive real numbers ...", "answer": 36.0},
        ],
        ["27.0", "36.0"],
    ),
    "minerva_math": (
        _write_jsonl,
        "minerva.jsonl",
        [
            {
                "problem": "Each star in a galaxy ...",
                "solution": "So $m = \\boxed{10}$ ... the total is \\boxed{\\frac{3}{4}}.",
                "type": "Introduction to Astronomy (8.282J Spring 2006)",
                "idx": 0,
            }
        ],
        ["\\frac{3}{4}"],
    ),
    "olympiadbench": (
        _write_dataset_dir,
        "olympiad_ds",
        [
            {
                "id": 1606,
                "question": "Xenia and Sergey play the following game ...",
                "final_answer": ["$\\frac{1}{2}$"],
                "is_multiple_answer": False,
                "unit": None,
                "answer_type": "Numerical",
            },
            {
                "id": 1607,
                "question": "Find all pairs ...",
                "final_answer": ["$3$", "$5$"],
                "is_multiple_answer": True,
                "unit": None,
                "answer_type": "Numerical",
            },
        ],
        ["\\frac{1}{2}", "3, 5"],
    ),
}
CORRECT = {  # a correct completion for each gold above, as a model would write it
    "\\left( 3, \\frac{\\pi}{2} \\right)": "so \\boxed{(3, \\frac{\\pi}{2})}",
    "1": "\\boxed{1}",
    "204": "\\boxed{204}",
    "113": "The answer is \\boxed{113}.",
    "27.0": "\\boxed{27}",
    "36.0": "\\boxed{36}",
    "\\frac{3}{4}": "\\boxed{0.75}",
    "\\frac{1}{2}": "\\boxed{\\dfrac12}",
    "3, 5": "\\boxed{3, 5}",
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=["model.name_or_path=unused", *overrides])


@pytest.mark.parametrize("name", list(FIXTURES))
def test_each_benchmark_config_reads_its_real_layout(name: str, tmp_path: Path) -> None:
    writer, file_name, rows, golds = FIXTURES[name]
    source = writer(tmp_path / file_name, rows)
    cfg = _compose(f"benchmark=[{name}]", f"benchmark.{name}.path={source}")
    (benchmark,) = benchmarks_from_config(cfg.benchmark)
    assert benchmark.name == name
    # the paper's evaluation: its system line, greedy, 2048 new tokens, math-verify
    assert benchmark.prompt.system == PAPER_SYSTEM and benchmark.prompt.chat_template
    assert (benchmark.temperature, benchmark.max_new_tokens, benchmark.verifier) == (
        0.0,
        2048,
        "math",
    )
    problems = benchmark.load()
    assert [p.gold for p in problems] == golds
    assert [p.problem for p in problems] == [r.get("problem") or r.get("question") for r in rows]
    assert all(str(source) in p.where for p in problems)
    for problem in problems:
        assert VERIFIERS["math"](CORRECT[problem.gold], problem.gold), problem
        assert not VERIFIERS["math"]("\\boxed{999}", problem.gold), problem


def test_the_paper_benchmarks_are_the_default_selection() -> None:
    cfg = _compose()
    assert list(cfg.benchmark) == ["math500", "aime24", "amc23", "minerva_math", "olympiadbench"]
    with pytest.raises(ValueError, match=r"benchmark math500: no path; set benchmark.math500.path"):
        benchmarks_from_config(cfg.benchmark)


def test_the_paper_prompt_uses_the_chat_template_or_a_plain_format(tokenizer_with_template):
    benchmark = Benchmark.from_config("mine", {"path": "x.jsonl"})
    chat = render_prompt(tokenizer_with_template, benchmark.prompt, "What is 1+1?")
    assert chat.text == f"<s>{PAPER_SYSTEM}</s><u>What is 1+1?</u><a>"
    assert not chat.add_special_tokens  # the template writes its own special tokens
    assert chat.row == [
        {"role": "system", "content": PAPER_SYSTEM},
        {"role": "user", "content": "What is 1+1?"},
    ]
    tokenizer_with_template.chat_template = None
    plain = render_prompt(tokenizer_with_template, benchmark.prompt, "What is 1+1?")
    assert plain.text == plain.row == f"{PAPER_SYSTEM}\n\nWhat is 1+1?"
    assert plain.add_special_tokens


@pytest.fixture
def tokenizer_with_template(tmp_path: Path):
    from engine.task.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}</{{ m['role'][0] }}>"
        "{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


def test_a_row_without_its_answer_field_names_file_row_and_field(tmp_path: Path) -> None:
    source = _write_jsonl(
        tmp_path / "bad.jsonl",
        [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "solution": "4"}],
    )
    benchmark = Benchmark.from_config("math500", {"path": str(source)})
    with pytest.raises(ValueError) as error:
        benchmark.load()
    message = str(error.value)
    assert f"{source}: line 2" in message and "'answer'" in message and "math500" in message


def test_other_bad_inputs(tmp_path: Path) -> None:
    no_problem = _write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"q.jsonl: line 1: .*'problem'"):
        Benchmark.from_config("b", {"path": str(no_problem)}).load()
    unboxed = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "it is 4"}])
    spec = {"path": str(unboxed), "answer_field": "solution", "answer_format": "last_boxed"}
    with pytest.raises(ValueError, match=r"m.jsonl: line 1: .*no \\boxed\{\} answer"):
        Benchmark.from_config("minerva_math", spec).load()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems"):
        Benchmark.from_config("b", {"path": str(empty)}).load()
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        Benchmark.from_config("b", {"path": str(tmp_path / "missing.jsonl")}).load()
    with pytest.raises(ValueError, match="unknown keys \\['answer_feild'\\]"):
        Benchmark.from_config("b", {"path": "x.jsonl", "answer_feild": "a"})
    with pytest.raises(KeyError, match="unknown verifier 'maths'"):
        Benchmark.from_config("b", {"path": "x.jsonl", "verifier": "maths"})
    with pytest.raises(ValueError, match="answer_format 'boxed'"):
        Benchmark.from_config("b", {"path": "x.jsonl", "answer_format": "boxed"})


def test_limit_takes_the_first_problems(tmp_path: Path) -> None:
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(5)]
    source = _write_jsonl(tmp_path / "b.jsonl", rows)
    problems = Benchmark.from_config("b", {"path": str(source), "limit": 2}).load()
    assert [p.gold for p in problems] == ["0", "1"]


def test_paper_ablation_names_the_papers_five_benchmarks() -> None:
    from engine.config import ConfigError, validate_config
    from engine.generation.evaluation import benchmark_evaluators

    five = ["math500", "aime24", "amc23", "minerva_math", "olympiadbench"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=paper_ablation", "data.train=x.jsonl"])
        paths = [f"benchmark.{name}.path=/data/{name}.jsonl" for name in five]
        given = compose(
            "config", overrides=["+experiment=paper_ablation", "data.train=x.jsonl", *paths]
        )
        plain = compose("config")
    assert list(cfg.benchmark) == five
    assert cfg.trainer.eval_every == 0  # evaluated at the end of each run
    with pytest.raises(ConfigError, match=r"benchmark\.aime24\.path: is required"):
        validate_config(cfg)
    validate_config(given)
    assert given.benchmark.olympiadbench.answer_format == "dollar_list"
    assert plain.get("benchmark") is None and benchmark_evaluators(plain) == []
