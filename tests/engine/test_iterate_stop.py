"""A stop signal in every phase of ``python -m engine.iterate`` (sampling, training, evaluation)
ends it with the requeue status (75); rerunning the same command each time continues the
pipeline and finishes with what an uninterrupted pipeline gives: the same rounds, the same cell
``results.json`` and the same final weights (:mod:`experiments.resume_check`, here on the shrunk
task). A crash leaves ``failed.json``.
"""

from __future__ import annotations

import json
import re

import pytest

from experiments.resume_check import check, differences, phases, what_was_kept

#: two rounds of 8 fresh prompts, sampled in four batches and evaluated in four (16 held out)
PIPELINE = (
    "iterate.rounds=2",
    "iterate.prompts_per_round=8",
    "iterate.samples_per_prompt=8",
    "iterate.batch_prompts=2",
    "generation.batch_size=4",
    "trainer.max_steps=3",
    "trainer.micro_batch_size=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "trainer.tensorboard=false",
    "trainer.threads=1",
    "method=bpo",
)


@pytest.mark.slow
def test_a_stop_in_each_phase_is_resumed_to_the_same_pipeline(tmp_path, cli, tiny_task_overrides):
    env = cli.env(XDG_CACHE_HOME=str(tmp_path / "cache"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    said: list[str] = []
    failures = check(
        [*tiny_task_overrides, *PIPELINE],
        tmp_path,
        rounds=2,
        eval_batches=4,
        env=env,
        timeout=300,
        say=said.append,
    )
    log = "\n".join(said)
    assert failures == [], log + "\n" + "\n".join(failures)
    # each stop landed in its phase and each rerun took over what it kept
    assert re.search(r"stop in sampling: exit 75, stopped in sampling after batch round \d", log)
    assert re.search(r"stop in training: exit 75, stopped after step \d \(saved\)", log)
    assert re.search(r"stop in evaluation: exit 75, stopped in evaluation after arith", log)
    assert len(re.findall(r"rerun kept the \w+ phase's work: (?!NO)", log)) == 3, log
    assert "final rerun: exit 0" in log and "same result: yes" in log

    out = tmp_path / "stopped"
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["per_round"]] == [0, 1, 2]
    assert results["eval"]["accuracy"] == results["per_round"][-1]["accuracy"]
    assert results["method"] == "bpo" and results["loss"] == "hinge" and results["seed"] == 0
    assert results["config"]["iterate"]["rounds"] == 2
    assert results["per_round"][2]["pairs"] > 0
    assert (out / ".hydra" / "config.yaml").is_file()  # a job dir the tables' collector reads
    assert not (out / "failed.json").exists()


def test_the_comparison_sees_a_difference() -> None:
    assert differences({"a": [1.0, 2]}, {"a": [1.0, 2]}) == []
    assert differences({"a": [1.0 + 1e-9, 2]}, {"a": [1.0, 2]}) == []
    assert differences({"a": [1.001, 2]}, {"a": [1.0, 2]}) == [".a[0]: 1.001 != 1.0"]
    assert differences({"a": [1.0]}, {"a": [1.0, 2]}) == [".a: 1 items != 2"]
    assert differences({"b": 1}, {"a": 1}) == [": keys ['b'] != ['a']"]


def test_the_check_tells_kept_work_from_redone_work() -> None:
    sampling, training, _ = phases(rounds=2)
    assert what_was_kept(training, "resuming from /x/round_2/train/checkpoints/step_2")
    assert what_was_kept(training, "round 2: training on 6 pairs") is None
    rerun = "round 1: sampling from sft\nrank 0: {} batches to sample ({} found done)\n"
    assert what_was_kept(sampling, rerun.format(3, 1) + "round 1: training on 5 pairs")
    assert what_was_kept(sampling, rerun.format(4, 0) + "round 1: training on 5 pairs") is None
    # a stop after the last batch leaves nothing to sample: no line, and no batch sampled again
    nothing = "round 1: sampling from sft\nround 1: training on 5 pairs\n" + rerun.format(4, 0)
    assert what_was_kept(sampling, nothing).startswith("nothing left to redo")


def test_a_crash_leaves_failed_json(compose_config, tmp_path) -> None:
    from engine.iterate import run
    from engine.runtime.errors import ConfigError

    cfg = compose_config(["iterate.rounds=0", f"output_dir={tmp_path}"], config_name="iterate")
    with pytest.raises(ConfigError, match=r"iterate\.rounds"):
        run(cfg)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert "ConfigError" in failed["error"] and "iterate.rounds" in failed["error"]
    assert not (tmp_path / "results.json").exists()
