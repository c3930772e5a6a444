"""The default run end to end, on a tiny budget: ``python -m engine.train loss=hinge
margin=balanced`` builds the embedded task (SFT model, verified on-policy pairs) in an empty cache,
trains on the pairs, evaluates greedy accuracy and exports the model; a second run reuses the
cache instead of building it again."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runtime.distributed import without_launcher_env

REPO = Path(__file__).resolve().parents[1]

#: after the tiny task (tests/conftest.py), 4 preference steps
TRAINER = [
    "trainer.max_steps=4",
    "trainer.micro_batch_size=4",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "trainer.tensorboard=false",
    "trainer.threads=1",
]
BUILDING = "[task] building the SFT model and pairs"


def _run(
    tmp_path: Path, run_dir: Path, cache: Path, overrides: list[str]
) -> subprocess.CompletedProcess:
    env = without_launcher_env()  # a child must not join this process's rendezvous
    # torch keeps compiled extensions (DeepSpeed's CPU ops) under XDG_CACHE_HOME too: point it at
    # the usual place, so the test does not spend half a minute compiling them again
    default_cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(default_cache) / "torch_extensions"))
    env.update(
        XDG_CACHE_HOME=str(cache),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    cmd = [sys.executable, "-m", "engine.train", *overrides, f"output_dir={run_dir}"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _problem(prompt: str):
    from engine.task.arithmetic import Problem

    a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt).groups()
    return Problem(int(a), int(b), op)


@pytest.mark.slow
def test_default_run_end_to_end_then_reuses_the_cache(
    tmp_path: Path, compose_config, tiny_task_overrides
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.task.arithmetic import verify
    from engine.task.pipeline import COMPLETE, _problem_sets, cache_key
    from engine.task.sampling import greedy_accuracy

    overrides = ["loss=hinge", "margin=balanced", *tiny_task_overrides, *TRAINER]
    cache = tmp_path / "cache"
    first = _run(tmp_path, tmp_path / "run", cache, overrides)
    assert BUILDING in first.stdout + first.stderr

    cfg = compose_config(overrides)
    entry = cache / "preference-loss-zoo" / f"math-{cache_key(cfg)}"
    assert (entry / COMPLETE).is_file()
    assert not list(entry.parent.glob("*.building-*"))

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["loss"], results["margin"], results["steps"]) == ("hinge", "balanced", 4)

    # held-out greedy accuracy of the trained model, with its binomial standard error
    evaluation = results["eval"]
    n = cfg.data.problems.eval_problems
    assert evaluation["n"] == n
    accuracy = evaluation["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert evaluation["accuracy_stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / n))
    # reward metrics on the held-out pairs and on the training pairs
    for section in ("eval", "train"):
        for key in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy", "margin"):
            assert math.isfinite(results[section][key]), (section, key)
        assert 0.0 <= results[section]["reward_accuracy"] <= 1.0
    assert results["train"]["loss"] > 0

    # the SFT stage's report
    sft = results["sft"]
    assert sft["band"] == [0.25, 0.7]
    assert sft["chosen_step"] in [h["step"] for h in sft["history"]]
    assert 0.0 <= sft["accuracy"] <= 1.0 and "accuracy_stderr" in sft
    assert sft == json.loads((entry / "summary.json").read_text())["sft"]

    # the pairs trained on are the cached ones, and every one is verified
    assert Path(results["data"]["train"]["source"]) == entry / "train_pairs.jsonl"
    for name in ("train", "eval"):
        rows = [json.loads(x) for x in (entry / f"{name}_pairs.jsonl").read_text().splitlines()]
        assert len(rows) == results["data"][name]["pairs"] >= 1
        for row in rows:
            problem = _problem(row["prompt"])
            assert verify(problem, row["chosen"]) and not verify(problem, row["rejected"]), row

    # the exported model is an ordinary Hugging Face model: it loads, it was trained (it differs
    # from the SFT model it started from), and it is the model whose accuracy was reported
    final = tmp_path / "run" / "final_model"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(tokenizer) == 23 and model.config.num_hidden_layers == 2
    sft_model = AutoModelForCausalLM.from_pretrained(entry / "sft_model")
    final_weights, sft_weights = model.state_dict(), sft_model.state_dict()
    assert final_weights.keys() == sft_weights.keys()
    assert any(not torch.equal(final_weights[k], sft_weights[k]) for k in final_weights)
    problems = _problem_sets(cfg.data.problems)["eval"]
    # with the run's one thread: kernels may split float sums by thread count, and greedy
    # decoding turns a last-bit difference at a near-tie into another answer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = greedy_accuracy(model, tokenizer, problems, max_new_tokens=80)
    finally:
        torch.set_num_threads(threads)
    assert again["accuracy"] == accuracy

    # a second run on the same cache reuses it: no build, the entry untouched, same results
    stamps = {p: p.stat().st_mtime_ns for p in entry.rglob("*")}
    second = _run(tmp_path, tmp_path / "run2", cache, overrides)
    assert BUILDING not in second.stdout + second.stderr
    assert {p: p.stat().st_mtime_ns for p in entry.rglob("*")} == stamps
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, f"{entry.name}.lock"]
    results2 = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results2["sft"] == sft
    assert results2["wall_seconds"] < results["wall_seconds"]
    for section in ("train", "eval"):
        for key in ("loss", "reward_accuracy", "accuracy"):
            if key in results[section]:
                assert results2[section][key] == pytest.approx(results[section][key], rel=1e-5)
