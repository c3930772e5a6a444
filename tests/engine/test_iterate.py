"""``engine.iterate``: rounds of sample -> train -> evaluate on the embedded task, shrunk to
seconds: the round layout, which policy each phase starts from, the reference, disjoint fresh
prompts, the table, and a rerun that continues instead of redoing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.runtime.errors import ConfigError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-iterate")))


@pytest.fixture
def iterate_config(compose_config, tiny_task_overrides, iterate_overrides):
    def make(out: Path, *overrides: str):
        return compose_config(
            [*tiny_task_overrides, *iterate_overrides, f"output_dir={out}", *overrides],
            config_name="iterate",
        )

    return make


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_rounds_start_from_the_last_policy_and_a_rerun_continues(iterate_config, tmp_path):
    from engine.iterate import iterate

    out = tmp_path / "it"
    rows = iterate(iterate_config(out))

    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows == read_jsonl(out / "rounds.jsonl")
    table = (out / "rounds.md").read_text().splitlines()
    assert table[0].startswith("| round | accuracy (%) | chosen reward | pairs |")
    assert len(table) == 2 + 3
    sft_model = Path(rows[0]["policy"])
    assert sft_model.name == "sft_model"
    for number in (1, 2):
        round_dir = out / f"round_{number}"
        report = json.loads((round_dir / "pairs" / "report.json").read_text())
        assert rows[number]["pairs"]["pairs"] == report["pairs"] > 0
        assert report["prompts"] == 8
        results = json.loads((round_dir / "train" / "results.json").read_text())
        assert rows[number]["train"]["chosen_reward"] == results["train"]["chosen_reward"]
        assert results["data"]["train"]["source"] == str(round_dir / "pairs" / "pairs.jsonl")
        assert (round_dir / "train" / "final_model").is_dir()
        evaluation = json.loads((round_dir / "eval" / "results.json").read_text())
        assert rows[number]["eval"]["accuracy"] == evaluation["accuracy"]
        assert rows[number]["eval"]["n"] == 16  # the task's held-out problems

    # round 1 samples from the SFT model, round 2 from round 1's trained model
    def sampled_from(number: int) -> str:
        run = json.loads((out / f"round_{number}" / "pairs" / "parts" / "run.json").read_text())
        return run["model"]["name_or_path"]

    assert sampled_from(1) == str(sft_model)
    assert sampled_from(2) == str(out / "round_1" / "train" / "final_model")
    # every round's reference is the initial model (iterate.reference=initial)
    for number, reference in ((1, None), (2, str(sft_model))):
        config = (out / f"round_{number}" / "train" / "config.yaml").read_text()
        assert (
            f"name_or_path: {reference if reference else 'null'}" in config.split("reference:")[1]
        )

    # fresh prompts every round, none of them held out
    prompts = [
        {row["prompt"] for row in read_jsonl(out / f"round_{n}" / "prompts.jsonl")} for n in (1, 2)
    ]
    heldout = {row["prompt"] for row in read_jsonl(out / "task" / "heldout.jsonl")}
    assert len(prompts[0]) == len(prompts[1]) == 8
    assert not prompts[0] & prompts[1] and not (prompts[0] | prompts[1]) & heldout

    # a rerun after round 2's evaluation was lost redoes only that evaluation
    trained = (out / "round_2" / "train" / "results.json").stat().st_mtime_ns
    sampled = (out / "round_2" / "pairs" / "report.json").stat().st_mtime_ns
    (out / "round_2" / "round.json").unlink()
    for path in (out / "round_2" / "eval").iterdir():
        path.unlink() if path.is_file() else None
    again = iterate(iterate_config(out))

    def untimed(found: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in found]

    assert untimed(again) == untimed(rows)  # the same greedy evaluation of the same model
    assert (out / "round_2" / "train" / "results.json").stat().st_mtime_ns == trained
    assert (out / "round_2" / "pairs" / "report.json").stat().st_mtime_ns == sampled


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("iterate.rounds=0", "iterate.rounds"),
        ("iterate.samples_per_prompt=1", "iterate.samples_per_prompt"),
        ("iterate.pool=sometimes", "iterate.pool"),
        ("iterate.reference=sft", "iterate.reference"),
        ("iterate.adapters=stack", "iterate.adapters"),
        ("iterate.temperature=0", "iterate.temperature"),
    ],
)
def test_bad_iterate_keys_are_named(iterate_config, tmp_path, override, key) -> None:
    from engine.iterate import check_config

    with pytest.raises(ConfigError, match=f"config key {key}"):
        check_config(iterate_config(tmp_path, override))


def test_files_data_needs_a_pool_and_benchmarks(compose_config, tmp_path) -> None:
    from engine.iterate import check_config

    files = ["data=files", "data.train=unused.jsonl"]
    cfg = compose_config(files, config_name="iterate")
    with pytest.raises(ConfigError, match=r"config key iterate\.prompts: is required"):
        check_config(cfg)
    cfg = compose_config([*files, "+iterate.prompts={path: q.jsonl}"], config_name="iterate")
    with pytest.raises(ConfigError, match=r"config key benchmark: is required"):
        check_config(cfg)
