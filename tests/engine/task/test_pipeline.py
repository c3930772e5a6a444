"""Tests for the task pipeline: verified on-policy pairs, disjoint problem sets, and the cache
(reuse, keys, XDG_CACHE_HOME, and half-built entries that are rebuilt, never used)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.data.loading import load_pairs, write_jsonl
from engine.generation.backends import HFBackend
from engine.task import pipeline
from engine.task.arithmetic import Problem, solution, verify
from engine.task.pipeline import (
    COMPLETE,
    _problem_sets,
    cache_key,
    default_cache_root,
    prepare_math_task,
)
from engine.task.sampling import MAX_NEW_TOKENS
from engine.task.sampling import task_pairs as build_pairs

REPO = Path(__file__).resolve().parents[3]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tree_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _leftovers(cache_root: Path) -> list[Path]:
    return sorted(cache_root.glob("*.building-*"))


# ---- what a build writes -----------------------------------------------------------------------


def test_build_lands_under_xdg_cache_home(tiny_build) -> None:
    cfg, task, xdg = tiny_build
    assert task.root == xdg / "preference-loss-zoo" / f"math-{cache_key(cfg)}"
    assert (task.root / COMPLETE).is_file()
    assert not _leftovers(task.root.parent)
    names = {p.name for p in task.root.iterdir()}
    assert {"sft_model", "train_pairs.jsonl", "eval_pairs.jsonl", "summary.json", COMPLETE} <= names


def test_sft_model_and_summary(tiny_build) -> None:
    cfg, task, _ = tiny_build
    summary = json.loads((task.root / "summary.json").read_text())
    sft = task.sft_summary
    assert sft == summary["sft"]
    assert sft["band"] == [0.25, 0.7] and sft["target"] == pytest.approx(0.475)
    steps = [h["step"] for h in sft["history"]]
    assert sft["chosen_step"] in steps and steps == sorted(steps)
    assert len(set(steps)) == len(steps) == sft["evaluations"]
    chosen = sft["history"][steps.index(sft["chosen_step"])]
    assert sft["val_accuracy"] == chosen["val_accuracy"]
    assert sft["in_band"] == (0.25 <= sft["val_accuracy"] <= 0.7)
    # the kept checkpoint is the evaluated one closest to the band's middle
    distances = [abs(h["val_accuracy"] - sft["target"]) for h in sft["history"]]
    assert abs(sft["val_accuracy"] - sft["target"]) == pytest.approx(min(distances))
    # checks every 25 steps; the bisection probes lie between the last two checks
    checks = [h["step"] for h in sft["history"] if not h["search"]]
    probes = [h["step"] for h in sft["history"] if h["search"]]
    assert checks == [25 * (i + 1) for i in range(len(checks))]
    assert all(checks[-1] - 25 < step < checks[-1] for step in probes)
    assert 0.0 <= sft["accuracy"] <= 1.0
    n = cfg.data.problems.eval_problems
    assert sft["accuracy_stderr"] == pytest.approx(
        (sft["accuracy"] * (1 - sft["accuracy"]) / n) ** 0.5
    )
    # the cached model is an ordinary Hugging Face model and tokenizer...
    model = AutoModelForCausalLM.from_pretrained(task.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    # ...whose held-out greedy accuracy, evaluated again, is the one the build reported
    assert len(task.eval_problems) == n
    result = task.evaluate(model, tokenizer, "cpu")
    assert result["n"] == n
    assert result["accuracy"] == sft["accuracy"]
    assert result["accuracy_stderr"] == sft["accuracy_stderr"]


def test_written_pairs_are_verified_and_load_like_user_data(tiny_build) -> None:
    cfg, task, _ = tiny_build
    summary = json.loads((task.root / "summary.json").read_text())
    sets = _problem_sets(cfg.data.problems)
    tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
    for name, file, problem_set in (
        ("train", task.train_file, "pairs"),
        ("eval", task.eval_file, "eval_pairs"),
    ):
        rows = _read_jsonl(file)
        stats = summary["pairs"][name]
        assert stats["prompts"] == len(sets[problem_set])
        assert stats["pairs"] == len(rows)
        assert (
            stats["pairs"] + stats["all_correct_prompts"] + stats["all_wrong_prompts"]
            == (stats["prompts"])
        )
        assert len(rows) >= (4 if name == "train" else 1)  # the tiny budget does make pairs
        by_prompt = {p.prompt: p for p in sets[problem_set]}
        assert len({row["prompt"] for row in rows}) == len(rows)  # one pair per prompt
        for row in rows:
            assert set(row) == {"prompt", "chosen", "rejected", "answer"}
            problem = by_prompt[row["prompt"]]  # a prompt of this split's own problems
            assert row["answer"] == str(problem.answer)
            assert verify(problem, row["chosen"]), row
            assert not verify(problem, row["rejected"]), row
            assert row["rejected"].strip() and row["chosen"] != row["rejected"]
        # the same loader as users' files, with the data config's options
        pairs, report = load_pairs(
            str(file),
            tokenizer,
            max_length=int(cfg.data.max_length),
            max_prompt_length=int(cfg.data.max_prompt_length),
        )
        assert report.pairs == report.rows_read == len(rows)
        assert report.truncated == 0 and not report.skipped
        for pair, row in zip(pairs, rows, strict=True):
            # the split SFT trained on: BOS + prompt, then response + EOS
            assert pair.prompt_ids == tokenizer(row["prompt"])["input_ids"]
            for key in ("chosen", "rejected"):
                ids = tokenizer(row[key], add_special_tokens=False)["input_ids"]
                assert getattr(pair, f"{key}_ids") == [*ids, tokenizer.eos_token_id]


# ---- the generic parts against the task's former implementation, on this machine ---------------


@torch.no_grad()
def _former_generate(model, tokenizer, prompts, *, temperature: float, seed: int) -> list[str]:
    """The task's own generation before it ran on engine.generation (commit 66e5ac4's
    engine/task/generation.py): ``model.generate`` on 256 left-padded prompts at a time, greedy or
    seeded sampling from the full distribution, decoded without specials."""
    model.eval()
    tokenizer.padding_side = "left"
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    completions = []
    for start in range(0, len(prompts), 256):
        batch = tokenizer(list(prompts[start : start + 256]), return_tensors="pt", padding=True)
        output = model.generate(
            **batch,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **(sampling if temperature > 0 else {"do_sample": False}),
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    torch.set_rng_state(rng_state)
    return completions


def _former_pairs(model, tokenizer, problems, *, k: int, temperature: float, seed: int):
    """The former build_pairs (commit 66e5ac4's engine/task/pipeline.py): ``k`` samples per
    prompt, one (correct, wrong) pair per prompt that has both, chosen by a seeded rng among the
    sorted distinct answers."""
    samples = _former_generate(
        model, tokenizer, [p.prompt for p in problems for _ in range(k)], temperature=temperature,
        seed=seed,
    )  # fmt: skip
    rng = random.Random(seed)
    rows, all_correct, all_wrong, correct_total = [], 0, 0, 0
    for i, problem in enumerate(problems):
        mine = samples[i * k : (i + 1) * k]
        correct = sorted({s for s in mine if verify(problem, s)})
        wrong = sorted({s for s in mine if not verify(problem, s) and s.strip()})
        correct_total += sum(verify(problem, s) for s in mine)
        if not correct:
            all_wrong += 1
        elif not wrong:
            all_correct += 1
        else:
            row = {"prompt": problem.prompt, "chosen": rng.choice(correct)}
            rows.append({**row, "rejected": rng.choice(wrong), "answer": str(problem.answer)})
    stats = {
        "prompts": len(problems),
        "pairs": len(rows),
        "sample_accuracy": correct_total / max(1, len(samples)),
        "all_correct_prompts": all_correct,
        "all_wrong_prompts": all_wrong,
    }
    return rows, stats


def test_the_generic_parts_give_the_numbers_of_the_former_implementation(tiny_build) -> None:
    """Requirement: the task's accuracy and pairs run on engine.evaluate / engine.generation.pairing
    and do not change. The task's former implementation (written out above) runs here, on this
    machine, on the cached SFT model: the same greedy accuracy and the same pairs from the same
    seeds. (Both paths are pinned to nothing captured on another CPU: a trained model's outputs
    depend on the CPU's float kernels.)"""
    cfg, task, _ = tiny_build
    sets = _problem_sets(cfg.data.problems)
    model = AutoModelForCausalLM.from_pretrained(task.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(task.model_dir)
    answers = _former_generate(
        model, tokenizer, [p.prompt for p in task.eval_problems], temperature=0.0, seed=0
    )
    correct = sum(verify(p, a) for p, a in zip(task.eval_problems, answers, strict=True))
    n = len(task.eval_problems)
    accuracy = correct / n
    assert task.sft_summary["accuracy"] == accuracy
    assert task.sft_summary["accuracy_stderr"] == math.sqrt(accuracy * (1 - accuracy) / n)
    summary = json.loads((task.root / "summary.json").read_text())
    seed = int(cfg.data.problems.task_seed)
    for name, problem_set, file, offset in (
        ("train", "pairs", task.train_file, 0),
        ("eval", "eval_pairs", task.eval_file, 1),
    ):
        rows, stats = _former_pairs(
            model,
            tokenizer,
            sets[problem_set],
            k=int(cfg.data.pairs.samples_per_prompt),
            temperature=float(cfg.data.pairs.temperature),
            seed=seed + offset,
        )
        assert rows, f"no {name} pairs: nothing compared"
        assert _read_jsonl(file) == rows, name
        assert summary["pairs"][name] == stats, name


# ---- build_pairs, with answers known in advance ------------------------------------------------

SCRIPTED = [Problem(10 + i, 3 * i, "+") for i in range(8)] + [
    Problem(90, 9 * i, "-") for i in range(8)
]


def _scripted_answer(prompt: str, draw: float | None) -> str:
    """Problem i: a fixed mix; the first two are always right, the next two always wrong, the
    next one is either right or empty (empty is no rejected answer), the rest are right with
    probability 1/2 (wrong ones take several forms)."""
    index = next(i for i, p in enumerate(SCRIPTED) if p.prompt == prompt)
    problem = SCRIPTED[index]
    right = solution(problem)
    if index < 2:
        return right
    if index < 4:
        return right.replace(f"#### {problem.answer}", f"#### {problem.answer + 1}")
    if index == 4:
        return right if draw < 0.5 else ""
    if draw < 0.5:
        return right
    return [f"#### {problem.answer} #### 1", "#### 0", right[:-1] + "|"][int(draw * 6) % 3]


def test_build_pairs_pairs_a_correct_with_a_wrong_sample(scripted_model, tokenizer) -> None:
    model = scripted_model(_scripted_answer)
    rows, stats = build_pairs(
        model, tokenizer, SCRIPTED, samples_per_prompt=6, temperature=1.0, seed=3
    )
    assert all(call["do_sample"] for call in model.calls)
    prompts = [row["prompt"] for row in rows]
    assert {SCRIPTED[i].prompt for i in range(4)}.isdisjoint(prompts)  # no pair without both
    assert SCRIPTED[4].prompt not in prompts  # an empty answer is not a rejected one
    assert stats["all_correct_prompts"] >= 3 and stats["all_wrong_prompts"] >= 2
    assert stats["prompts"] == len(SCRIPTED)
    assert stats["pairs"] == len(rows) >= 8
    assert stats["pairs"] + stats["all_correct_prompts"] + stats["all_wrong_prompts"] == 16
    by_prompt = {p.prompt: p for p in SCRIPTED}
    for row in rows:
        problem = by_prompt[row["prompt"]]
        assert verify(problem, row["chosen"]) and row["chosen"] == solution(problem)
        assert not verify(problem, row["rejected"]) and row["rejected"].strip()
        assert row["answer"] == str(problem.answer)
    assert prompts == [p.prompt for p in SCRIPTED if p.prompt in prompts]  # problem order
    # sample accuracy counts every sample: re-derive it from the same seeded draws
    samples = HFBackend(scripted_model(_scripted_answer), tokenizer).generate(
        [p.prompt for p in SCRIPTED for _ in range(6)],
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=1.0,
        seed=3,
    )
    correct = sum(verify(SCRIPTED[i // 6], s) for i, s in enumerate(samples))
    assert stats["sample_accuracy"] == correct / 96
    # reproducible for a seed, different for another
    again = build_pairs(
        scripted_model(_scripted_answer),
        tokenizer,
        SCRIPTED,
        samples_per_prompt=6,
        temperature=1.0,
        seed=3,
    )
    assert again == (rows, stats)
    other, _ = build_pairs(
        scripted_model(_scripted_answer),
        tokenizer,
        SCRIPTED,
        samples_per_prompt=6,
        temperature=1.0,
        seed=4,
    )
    assert other != rows


def test_written_scripted_pairs_load_with_the_user_loader(
    scripted_model, tokenizer, tmp_path
) -> None:
    rows, _ = build_pairs(
        scripted_model(_scripted_answer),
        tokenizer,
        SCRIPTED,
        samples_per_prompt=6,
        temperature=1.0,
        seed=3,
    )
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, report = load_pairs(str(tmp_path / "pairs.jsonl"), tokenizer, max_length=160)
    assert report.pairs == len(rows) == len(pairs)
    assert [tokenizer.decode(p.prompt_ids, skip_special_tokens=True) for p in pairs] == [
        r["prompt"] for r in rows
    ]


# ---- problem sets ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_problem_sets_are_disjoint(which, task_config, tiny_task_overrides) -> None:
    cfg = task_config(*(tiny_task_overrides if which == "tiny" else ()))
    problems = cfg.data.problems
    sets = _problem_sets(problems)
    sizes = {
        "eval": problems.eval_problems,
        "sft_val": problems.sft_val_problems,
        "eval_pairs": problems.eval_pair_prompts,
        "pairs": problems.pair_prompts,
        "sft": problems.sft_problems,
    }
    assert {name: len(s) for name, s in sets.items()} == sizes
    prompts = {name: {p.prompt for p in s} for name, s in sets.items()}
    assert all(len(prompts[name]) == sizes[name] for name in sizes)  # no repeats inside a set
    names = list(sets)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert prompts[first].isdisjoint(prompts[second]), (first, second)
    lo, hi = problems.min_digits, problems.max_digits
    for s in sets.values():
        assert all(lo <= len(str(p.a)) <= hi and lo <= len(str(p.b)) <= hi for p in s)


def test_eval_problems_do_not_depend_on_training_sizes(task_config, tiny_task_overrides) -> None:
    base = _problem_sets(task_config(*tiny_task_overrides).data.problems)
    fewer = _problem_sets(
        task_config(
            *tiny_task_overrides, "data.problems.sft_problems=20", "data.problems.pair_prompts=4"
        ).data.problems
    )
    assert fewer["eval"] == base["eval"]
    other_seed = _problem_sets(
        task_config(*tiny_task_overrides, "data.problems.task_seed=7").data.problems
    )
    assert other_seed["eval"] != base["eval"]


# ---- the cache ---------------------------------------------------------------------------------


def test_second_call_reuses_the_cache(tiny_build, monkeypatch) -> None:
    cfg, task, xdg = tiny_build
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    before = _tree_mtimes(task.root)

    def no_build(*args, **kwargs):
        raise AssertionError("a complete cache entry was rebuilt")

    monkeypatch.setattr(pipeline, "_build", no_build)
    again = prepare_math_task(cfg)
    assert again.root == task.root
    assert again.sft_summary == task.sft_summary
    assert again.eval_problems == task.eval_problems
    assert _tree_mtimes(task.root) == before


def test_cache_key_follows_what_the_assets_depend_on(task_config, tiny_task_overrides) -> None:
    base = cache_key(task_config(*tiny_task_overrides))
    assert base == cache_key(task_config(*tiny_task_overrides))  # stable
    assert len(base) == 16
    changes = [
        "data.sft.steps=51",
        "data.sft.accuracy_band=[0.1,0.6]",
        "data.problems.pair_prompts=15",
        "data.problems.task_seed=1",
        "data.pairs.temperature=0.7",
        "data.pairs.samples_per_prompt=4",
        "model.tiny.hidden_size=32",
    ]
    keys = {change: cache_key(task_config(*tiny_task_overrides, change)) for change in changes}
    assert base not in keys.values()
    assert len(set(keys.values())) == len(changes)
    # settings of the preference stage do not touch the cached assets
    for same in (
        "loss=hinge",
        "margin=balanced",
        "trainer.lr=1e-3",
        "seed=5",
        "beta=0.5",
        "data.max_length=100",
        "data.limit=3",
    ):
        assert cache_key(task_config(*tiny_task_overrides, same)) == base, same


def test_default_cache_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "preference-loss-zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "preference-loss-zoo"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset
    assert default_cache_root() == tmp_path / "home" / ".cache" / "preference-loss-zoo"


def test_cache_dir_setting_wins_over_xdg(task_config, cheap_task_overrides, tmp_path) -> None:
    cfg = task_config(*cheap_task_overrides, f"data.cache_dir={tmp_path / 'mine'}")
    task = prepare_math_task(cfg)
    assert task.root.parent == tmp_path / "mine"
    assert (task.root / COMPLETE).is_file()
    assert not (Path(os.environ["XDG_CACHE_HOME"]) / "preference-loss-zoo").exists()


def test_an_sft_outside_the_band_still_gives_a_model(task_config, cheap_task_overrides) -> None:
    """Two steps cannot reach the band: the build still completes, keeps the closest checkpoint,
    says so in the summary, and reports its held-out accuracy."""
    cfg = task_config(*cheap_task_overrides)
    task = prepare_math_task(cfg)
    sft = task.sft_summary
    assert sft["in_band"] is False
    assert sft["band"] == [0.35, 0.6]
    assert sft["chosen_step"] == 2 and sft["val_accuracy"] == 0.0
    assert sft["accuracy"] == 0.0 and sft["accuracy_stderr"] == 0.0
    assert AutoModelForCausalLM.from_pretrained(task.model_dir).config.num_hidden_layers == 1
    summary = json.loads((task.root / "summary.json").read_text())
    assert summary["pairs"]["train"]["prompts"] == 3
    # no pair from a model that is always wrong: an empty file, and the loader says so
    assert summary["pairs"]["train"]["all_wrong_prompts"] == 3
    assert task.train_file.read_text() == ""


def _spy_builds(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = pipeline._build

    def spy(cfg, final, sets):
        calls.append(final)
        return real(cfg, final, sets)

    monkeypatch.setattr(pipeline, "_build", spy)
    return calls


def test_an_entry_without_complete_marker_is_rebuilt(
    task_config, cheap_task_overrides, monkeypatch
) -> None:
    cfg = task_config(*cheap_task_overrides)
    first = prepare_math_task(cfg)
    # damage it as a half-written entry would be: no marker, junk in its files
    (first.root / COMPLETE).unlink()
    first.train_file.write_text('{"prompt": "junk"}\n')
    (first.root / "summary.json").write_text("{")
    (first.root / "stray").write_text("left by someone")
    builds = _spy_builds(monkeypatch)
    task = prepare_math_task(cfg)
    assert builds == [first.root]
    assert task.root == first.root and (task.root / COMPLETE).is_file()
    assert task.train_file.read_text() == ""  # rebuilt, not the junk
    assert not (task.root / "stray").exists()
    assert json.loads((task.root / "summary.json").read_text())["sft"] == task.sft_summary
    # and now it is complete: no third build
    prepare_math_task(cfg)
    assert len(builds) == 1


def test_a_leftover_building_dir_is_removed_and_never_used(
    task_config, cheap_task_overrides, monkeypatch
) -> None:
    cfg = task_config(*cheap_task_overrides)
    cache_root = default_cache_root()
    name = f"math-{cache_key(cfg)}"
    stale = cache_root / f"{name}.building-999999"
    (stale / "sft_model").mkdir(parents=True)
    (stale / COMPLETE).write_text("ok\n")  # even one that looks complete is not trusted
    (stale / "summary.json").write_text('{"sft": {"junk": true}}')
    builds = _spy_builds(monkeypatch)
    task = prepare_math_task(cfg)
    assert builds == [cache_root / name]
    assert task.root == cache_root / name
    assert "junk" not in task.sft_summary and "chosen_step" in task.sft_summary
    assert not _leftovers(cache_root)


_CHILD = """
import json, sys, time
import engine.task.sft as sft

def hang(*args, **kwargs):  # stop mid-build, after the building dir exists, holding the lock
    print("READY", flush=True)
    time.sleep(600)

sft.train_sft = hang
from hydra import compose, initialize_config_dir
from engine.task.pipeline import prepare_math_task

with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=json.loads(sys.argv[2]))
prepare_math_task(cfg)
print("FINISHED", flush=True)
"""


def test_a_killed_build_is_rebuilt_by_a_waiting_process(
    task_config, cheap_task_overrides, tmp_path
) -> None:
    """A real build process is SIGKILLed mid-way (it holds the lock, its building dir exists). A
    second caller, waiting on the lock meanwhile, then builds the entry itself."""
    cfg = task_config(*cheap_task_overrides)
    cache_root = default_cache_root()
    final = cache_root / f"math-{cache_key(cfg)}"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(REPO / "conf"), json.dumps(list(cheap_task_overrides))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        output = []
        while "READY\n" not in output:
            assert child.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            with contextlib.suppress(queue.Empty):
                output.append(lines.get(timeout=1))
        building = cache_root / f"{final.name}.building-{child.pid}"
        assert building.is_dir()
        assert not final.exists()
        # the child holds the build lock
        lock = cache_root / f"{final.name}.lock"
        with lock.open("a") as handle, pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

        # a second caller waits on the lock rather than building alongside
        results: list = []
        waiter = threading.Thread(
            target=lambda: results.append(_catching(prepare_math_task, cfg)), daemon=True
        )
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and not results
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    waiter.join(timeout=300)
    assert not waiter.is_alive()
    (task,) = results
    assert not isinstance(task, BaseException), task
    assert task.root == final and (final / COMPLETE).is_file()
    assert not _leftovers(cache_root)
    assert task.sft_summary["chosen_step"] == 2


def _catching(function, *args):
    try:
        return function(*args)
    except BaseException as error:  # handed to the test's thread
        return error


def test_a_user_model_is_refused(task_config) -> None:
    cfg = task_config("model=hf", "model.name_or_path=/some/model")
    with pytest.raises(ValueError, match="data=files"):
        prepare_math_task(cfg)


def test_training_on_a_task_without_pairs_says_what_to_change(
    task_config, cheap_task_overrides, tmp_path
) -> None:
    """The cheap budget's SFT model is always wrong, so its cached pair file is empty: training
    stops before any model work with an error naming the cache entry and the keys to change."""
    from engine.train import train

    cfg = task_config(*cheap_task_overrides, f"output_dir={tmp_path / 'run'}")
    with pytest.raises(RuntimeError, match="has no train pairs") as error:
        train(cfg)
    assert "data.sft" in str(error.value) and "preference-loss-zoo" in str(error.value)
