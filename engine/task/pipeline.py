"""The embedded default task end to end: problems -> SFT model -> on-policy pairs, cached.

``prepare_math_task(cfg)`` returns a :class:`MathTask`: the SFT model directory (the policy's and
the reference's starting point), the train and eval pair files (ordinary JSONL preference files,
read by the same loader as users' data), and the held-out problems for greedy accuracy.

Pairs are made the way the BPO paper made its math pairs: sample ``k`` solutions per prompt at
temperature ``T`` from the SFT model, verify each final answer, and pair one correct solution
(chosen) with one wrong one (rejected); prompts with no correct or no wrong sample give no pair.

Cache: ``<cache_dir>/math-<key>/`` where the key hashes everything the assets depend on (problem
settings, SFT and sampling settings, the tiny model's architecture, a format version). It is built
in ``math-<key>.building-<pid>/`` and renamed into place only when complete (with a ``COMPLETE``
marker inside), under a file lock, so concurrent runs (a parallel sweep) build it once and a build
killed half-way is never used: its leftover directory is deleted by the next build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.data.loading import write_jsonl
from engine.runtime.cache import COMPLETE, default_cache_root, locked
from engine.runtime.fileio import atomic_write_json
from engine.runtime.machine import machine_info
from engine.task.arithmetic import Problem, split_problems
from engine.task.sampling import (
    MAX_NEW_TOKENS,
    TASK_PROMPT,
    VERIFIER,
    greedy_accuracy,
    task_pairs,
)

log = logging.getLogger(__name__)

#: bump when the cached assets change for the same settings (their format, or how they are made),
#: so old caches are not reused. 2: the SFT checkpoint closest to the band's middle, bisected
#: (engine/task/sft.py), instead of the first check inside the band
CACHE_VERSION = 2


@dataclass
class MathTask:
    """The cached assets of the embedded task, and its accuracy evaluation."""

    root: Path
    eval_problems: list[Problem]
    sft_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        """The SFT model and tokenizer, in Hugging Face format."""
        return self.root / "sft_model"

    @property
    def train_file(self) -> Path:
        """Training pairs (JSONL: prompt, chosen, rejected)."""
        return self.root / "train_pairs.jsonl"

    @property
    def eval_file(self) -> Path:
        """Held-out pairs from other prompts (JSONL)."""
        return self.root / "eval_pairs.jsonl"

    def made_train_pairs(self) -> int:
        """How many train pairs the build made (0: no prompt had a correct and a wrong sample)."""
        return int(json.loads((self.root / "summary.json").read_text())["pairs"]["train"]["pairs"])

    def evaluate(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device | str
    ) -> dict[str, float]:
        """Greedy accuracy on the held-out problems (``accuracy``, ``accuracy_stderr``, ``n``)."""
        return greedy_accuracy(
            model, tokenizer, self.eval_problems, max_new_tokens=MAX_NEW_TOKENS, device=device
        )


def _problem_sets(problems_cfg: Any) -> dict[str, list[Problem]]:
    """Disjoint problem sets, all drawn from ``task_seed``: the held-out ones first, so changing
    the training sizes never changes the evaluation problems."""
    sizes = {
        "eval": int(problems_cfg.eval_problems),
        "sft_val": int(problems_cfg.sft_val_problems),
        "eval_pairs": int(problems_cfg.eval_pair_prompts),
        "pairs": int(problems_cfg.pair_prompts),
        "sft": int(problems_cfg.sft_problems),
    }
    digits = {
        "min_digits": int(problems_cfg.min_digits),
        "max_digits": int(problems_cfg.max_digits),
    }
    held_out = sizes["eval"]
    rest, evaluation = split_problems(
        sum(sizes.values()) - held_out, held_out, seed=int(problems_cfg.task_seed), **digits
    )
    sets = {"eval": evaluation}
    start = 0
    for name in ("sft_val", "eval_pairs", "pairs", "sft"):
        sets[name] = rest[start : start + sizes[name]]
        start += sizes[name]
    return sets


def fresh_problems(problems_cfg: Any, count: int) -> list[Problem]:
    """``count`` problems drawn from ``task_seed`` after every set of :func:`_problem_sets`, so
    disjoint from all of them (the same held-out problems; the sets are prefixes of one draw)."""
    held_out = int(problems_cfg.eval_problems)
    used = sum(len(problems) for problems in _problem_sets(problems_cfg).values()) - held_out
    digits = {
        "min_digits": int(problems_cfg.min_digits),
        "max_digits": int(problems_cfg.max_digits),
    }
    try:
        rest, _ = split_problems(used + count, held_out, seed=int(problems_cfg.task_seed), **digits)
    except ValueError as error:
        raise ValueError(
            f"{count} problems beyond the task's own sets: {error} "
            "(data.problems.min_digits / max_digits)"
        ) from None
    return rest[used:]


@dataclass(frozen=True)
class IterationInputs:
    """What iterative training (``engine.iterate``) takes from the task: its SFT model (the
    initial policy), a pool of fresh prompts, the held-out problems, and how both are read
    (a ``prompts`` / benchmark block without its ``path``: the task's own prompt format,
    verifier and generation budget)."""

    model_dir: Path
    pool_rows: list[dict[str, Any]]
    heldout_rows: list[dict[str, Any]]
    prompts: dict[str, Any]
    benchmark: dict[str, Any]


def iteration_inputs(cfg: DictConfig, pool_size: int) -> IterationInputs:
    """The task's :class:`IterationInputs` for ``cfg`` (the task built, or reused from the
    cache), with ``pool_size`` fresh prompts."""
    task = prepare_math_task(cfg)
    reading = {
        "split": "train",
        "problem_field": "prompt",
        "answer_field": "answer",
        "verifier": VERIFIER,
        "prompt": {
            "system": TASK_PROMPT.system,
            "user": TASK_PROMPT.user,
            "chat_template": TASK_PROMPT.chat_template,
        },
    }
    return IterationInputs(
        model_dir=task.model_dir,
        pool_rows=[
            {"prompt": p.prompt, "answer": p.answer}
            for p in fresh_problems(cfg.data.problems, pool_size)
        ],
        heldout_rows=[{"prompt": p.prompt, "answer": p.answer} for p in task.eval_problems],
        prompts=reading,
        benchmark={**reading, "max_new_tokens": MAX_NEW_TOKENS},
    )


def cache_key(cfg: DictConfig) -> str:
    """A short hash of every setting the cached assets depend on."""
    data = cfg.data
    spec = {
        "version": CACHE_VERSION,
        "problems": OmegaConf.to_container(data.problems, resolve=True),
        "sft": OmegaConf.to_container(data.sft, resolve=True),
        "pairs": OmegaConf.to_container(data.pairs, resolve=True),
        "tiny": OmegaConf.to_container(cfg.model.tiny, resolve=True)
        if cfg.model.get("tiny")
        else None,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare_math_task(cfg: DictConfig) -> MathTask:
    """The task's assets for ``cfg``: reused from the cache when complete, else built (once)."""
    if cfg.model.get("name_or_path") or cfg.model.get("gguf"):
        raise ValueError(
            "data=math builds its own SFT model from model=tiny; to train a model of your own "
            "use data=files with your pairs, or data=reasoning_gym (model.name_or_path or "
            "model.gguf was set)"
        )
    root_dir = Path(cfg.data.get("cache_dir") or default_cache_root()).expanduser()
    key = cache_key(cfg)
    final = root_dir / f"math-{key}"
    sets = _problem_sets(cfg.data.problems)
    if not (final / COMPLETE).is_file():
        with locked(root_dir / f"math-{key}.lock"):
            if not (final / COMPLETE).is_file():  # another process may have built it meanwhile
                _build(cfg, final, sets)
    summary = json.loads((final / "summary.json").read_text())
    return MathTask(root=final, eval_problems=sets["eval"], sft_summary=summary["sft"])


def _build(cfg: DictConfig, final: Path, sets: dict[str, list[Problem]]) -> None:
    from engine.model.loading import load_model
    from engine.task.tokenizer import build_tokenizer

    started = time.time()
    for stale in final.parent.glob(f"{final.name}.building-*"):  # left by a killed build
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():  # a directory without COMPLETE is never trusted
        shutil.rmtree(final)
    work = final.with_name(f"{final.name}.building-{os.getpid()}")
    work.mkdir(parents=True)
    log.info("building the math task's SFT model and pairs in %s (cached for later runs)", final)
    print(f"[task] building the SFT model and pairs (once; cached in {final})", flush=True)

    from engine.task.sft import train_sft

    data = cfg.data
    seed = int(data.problems.task_seed)
    tokenizer = build_tokenizer()  # the task's own 23 tokens, saved with its SFT model
    model = load_model(
        OmegaConf.merge(cfg.model, {"name_or_path": None, "dtype": "float32"}), tokenizer, seed=seed
    )

    def val_accuracy(m: PreTrainedModel) -> float:
        return greedy_accuracy(m, tokenizer, sets["sft_val"], max_new_tokens=MAX_NEW_TOKENS)[
            "accuracy"
        ]

    sft_summary = train_sft(
        model,
        tokenizer,
        sets["sft"],
        val_accuracy,
        steps=int(data.sft.steps),
        batch_size=int(data.sft.batch_size),
        lr=float(data.sft.lr),
        eval_every=int(data.sft.eval_every),
        band=(float(data.sft.accuracy_band[0]), float(data.sft.accuracy_band[1])),
        seed=seed,
    )
    held_out = greedy_accuracy(
        model,
        tokenizer,
        sets["eval"],
        max_new_tokens=MAX_NEW_TOKENS,
        progress="[task] held-out accuracy",
    )
    sft_summary["accuracy"] = held_out["accuracy"]
    sft_summary["accuracy_stderr"] = held_out["accuracy_stderr"]
    # the SFT model (its chosen step, accuracies, and so the pairs) depends on the CPU's kernels
    sft_summary["built_on"] = machine_info()
    print(
        f"[task] SFT model: step {sft_summary['chosen_step']} (validation accuracy "
        f"{sft_summary['val_accuracy']:.3f}, band {sft_summary['band']}), held-out greedy "
        f"accuracy {held_out['accuracy']:.3f} +- {held_out['accuracy_stderr']:.3f}",
        flush=True,
    )
    model.save_pretrained(work / "sft_model", safe_serialization=True)
    tokenizer.save_pretrained(work / "sft_model")

    pair_stats = {}
    for name, problems, file in (
        ("train", sets["pairs"], "train_pairs.jsonl"),
        ("eval", sets["eval_pairs"], "eval_pairs.jsonl"),
    ):
        print(
            f"[task] sampling {name} pairs: {len(problems)} prompts x "
            f"{int(data.pairs.samples_per_prompt)} samples at temperature {data.pairs.temperature}",
            flush=True,
        )
        rows, stats = task_pairs(
            model,
            tokenizer,
            problems,
            samples_per_prompt=int(data.pairs.samples_per_prompt),
            temperature=float(data.pairs.temperature),
            seed=seed + (0 if name == "train" else 1),
            progress=f"[task] sampling {name} pairs",
        )
        write_jsonl(work / file, rows)
        pair_stats[name] = stats
        print(
            f"[task] {name} pairs: {stats['pairs']} from {stats['prompts']} prompts "
            f"(sample accuracy {stats['sample_accuracy']:.3f})",
            flush=True,
        )
    atomic_write_json(
        work / "summary.json",
        {
            "sft": sft_summary,
            "pairs": pair_stats,
            "build_seconds": time.time() - started,
            "key": final.name,
        },
    )
    (work / COMPLETE).write_text("ok\n")
    os.replace(work, final)
