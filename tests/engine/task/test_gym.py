"""reasoning-gym as data and verifier (engine.task.gym): problem sets that are seeded and disjoint,
config errors that name their key, the answer rules, and each dataset's own scorer behind the
``reasoning_gym`` verifier. No model: milliseconds (skipped when the real extra is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym", reason="reasoning-gym (the real extra) is not installed")

import engine.task  # noqa: F401  (registers the verifier and the data source)
from engine.data.sources import SOURCES
from engine.generation.benchmarks import Benchmark
from engine.generation.verifiers import VERIFIERS
from engine.runtime.errors import ConfigError
from engine.task.gym.answers import extract_answer
from engine.task.gym.problems import (
    ProblemSpec,
    draw_problem_sets,
    make_dataset,
    read_gold,
    write_problem_sets,
)

CHAIN = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


def spec(train: int = 40, eval: int = 8, test: int = 20, seed: int = 7, **datasets) -> ProblemSpec:
    chosen = datasets or {"chain_sum": {"weight": 1, "options": CHAIN}}
    return ProblemSpec.from_config(
        {"seed": seed, "sizes": {"train": train, "eval": eval, "test": test}, "datasets": chosen}
    )


def test_splits_are_seeded_disjoint_and_sized() -> None:
    sets = draw_problem_sets(spec())
    assert {k: len(v) for k, v in sets.items()} == {"test": 20, "eval": 8, "train": 40}
    texts = [r["problem"] for rows in sets.values() for r in rows]
    assert len(set(texts)) == len(texts)  # no question in two splits (nor twice in one)
    assert draw_problem_sets(spec()) == sets  # the same seed, the same problems
    assert draw_problem_sets(spec(seed=8))["test"] != sets["test"]


def test_the_held_out_problems_do_not_move_when_train_grows() -> None:
    small, large = draw_problem_sets(spec(train=10)), draw_problem_sets(spec(train=60))
    assert small["test"] == large["test"] and small["eval"] == large["eval"]
    assert large["train"][:10] == small["train"]


def test_datasets_share_the_splits_by_weight() -> None:
    mixed = spec(
        train=30,
        eval=0,
        test=10,
        chain_sum={"weight": 2, "options": CHAIN},
        basic_arithmetic={"weight": 1, "options": {"min_terms": 2, "max_terms": 2}},
    )
    sets = draw_problem_sets(mixed)
    assert mixed.shares("train") == [20, 10]
    assert mixed.shares("test") == [7, 3]  # largest remainders: 6.67 -> 7, 3.33 -> 3
    for split, expected in (("train", 20), ("test", 7)):
        assert sum(r["dataset"] == "chain_sum" for r in sets[split]) == expected
        assert (
            sum(r["dataset"] == "basic_arithmetic" for r in sets[split])
            == len(sets[split]) - expected
        )
    assert sets["eval"] == []  # an empty split is allowed for eval


def test_rows_carry_what_the_dataset_scores(tmp_path: Path) -> None:
    paths = write_problem_sets(spec(train=4, eval=0, test=3), tmp_path)
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    name, options, entry = read_gold(rows[0]["gold"])
    assert (name, options) == ("chain_sum", CHAIN) and entry["answer"] == rows[0]["answer"]
    assert entry["question"] == rows[0]["problem"]
    # the benchmark yaml's fields read these files
    problems = Benchmark.from_config(
        "reasoning_gym",
        {"path": str(paths["test"]), "problem_field": "problem", "answer_field": "gold"}
        | {"verifier": "reasoning_gym"},
    ).load()
    assert [p.problem for p in problems] == [r["problem"] for r in rows]


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"datasets": {"no_such_dataset": {}}}, "data.problems.datasets.no_such_dataset"),
        ({"datasets": {"chain_sum": {"options": {"digits": 2}}}}, "datasets.chain_sum.options"),
        (
            {"datasets": {"chain_sum": {"options": {"min_digits": 3, "max_digits": 1}}}},
            "datasets.chain_sum.options",
        ),
        ({"datasets": {"chain_sum": {"weight": 0}}}, "datasets.chain_sum.weight"),
        ({"datasets": {}}, "data.problems.datasets"),
        ({"sizes": {"train": 4, "test": 2}}, "data.problems.sizes"),
        ({"sizes": {"train": 0, "eval": 0, "test": 2}}, "data.problems.sizes.train"),
        ({"seed": "one"}, "data.problems.seed"),
    ],
)
def test_bad_problem_settings_name_their_key(block: dict, key: str) -> None:
    base = {
        "seed": 1,
        "sizes": {"train": 4, "eval": 0, "test": 2},
        "datasets": {"chain_sum": {"options": CHAIN}},
    }
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        draw_problem_sets(ProblemSpec.from_config(base | block))


def test_too_few_distinct_questions_is_an_error() -> None:
    one_digit = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    # 10 x 10 operands x 2 operators: 200 distinct questions, 310 wanted
    with pytest.raises(ConfigError, match="distinct questions"):
        draw_problem_sets(spec(train=300, eval=0, test=10, chain_sum={"options": one_digit}))


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("so 4 + 5 = 9, \\boxed{9}. Then 12.", "9", "9"),  # the last \boxed{} wins
        ("<answer> 42 </answer> and 7", "42", "42"),  # reasoning-gym's own tag
        ("The answer is -12.", "-12", "-12"),  # the last number
        ("I think 1,234 is the sum", "1234", "1234"),  # thousands separators
        ("3 + 4 = 7\nthe answer is 8", "7", "8"),  # the last number, right or wrong
        ("no numbers here", "7", None),
        ("first line\n\n  last line  \n", "cat", "last line"),  # a word answer: the last line
        ("", "cat", None),
    ],
)
def test_answer_extraction_rules(completion: str, gold: str, expected: str | None) -> None:
    assert extract_answer(completion, gold) == expected


def test_the_verifier_asks_the_dataset_and_records_its_score(tmp_path: Path) -> None:
    row = draw_problem_sets(spec(train=1, eval=0, test=1))["test"][0]
    judge = VERIFIERS["reasoning_gym"].judge
    right = judge(f"The final answer is {row['answer']}.", row["gold"])
    assert right.correct and right.score == 1.0 and right.extracted == row["answer"]
    wrong = judge(f"It is {int(row['answer']) + 1}.", row["gold"])
    assert not wrong.correct and wrong.score == 0.0
    nothing = judge("I cannot say.", row["gold"])
    assert not nothing.correct and nothing.extracted is None and nothing.score == 0.0
    # a partial score (the dataset's own rule) still counts as wrong, and is kept
    partial = judge(f"It is {row['answer']}0.", row["gold"])
    dataset = make_dataset("chain_sum", CHAIN)
    expected = dataset.score_answer(f"{row['answer']}0", read_gold(row["gold"])[2])
    assert partial.score == expected and not partial.correct
    with pytest.raises(ValueError, match="not a reasoning_gym gold answer"):
        judge("7", "7")


def test_the_plugin_registers_without_importing_reasoning_gym() -> None:
    import subprocess
    import sys

    code = (
        "import sys, engine.task\n"
        "from engine.data.sources import SOURCES\n"
        "from engine.verifiers import VERIFIERS\n"
        "assert 'reasoning_gym' in SOURCES and 'reasoning_gym' in VERIFIERS\n"
        "assert 'reasoning_gym' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "reasoning_gym" in SOURCES


def test_a_missing_extra_names_it(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_gym(name, *args, **kwargs):
        if name == "reasoning_gym" or name.startswith("reasoning_gym."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gym)
    with pytest.raises(ConfigError, match=r"\.\[real\]"):
        make_dataset("chain_sum", CHAIN)
