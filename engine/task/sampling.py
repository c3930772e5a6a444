"""The embedded task on the generic generation parts: greedy accuracy and verified pairs.

The task supplies its problems, its prompt format (the bare prompt, no chat template), its
tokenizer and its verifier (``arithmetic`` in ``engine.generation.verifiers.VERIFIERS``);
generation, verification and pairing are the same code that evaluates and samples from any model
(:mod:`engine.evaluate`, :mod:`engine.generation.pairing`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.generation.backends import HFBackend, PromptFormat
from engine.generation.evaluation import generate_and_judge, summarize
from engine.generation.pairing import build_pairs
from engine.task.arithmetic import Problem

#: the task's prompt is the problem itself ("4721+958="), tokenized with BOS
TASK_PROMPT = PromptFormat(system=None, user="{problem}", chat_template=False)
VERIFIER = "arithmetic"
#: generation budget: the longest solution (5 digits) is under 70 tokens
MAX_NEW_TOKENS = 80


def _items(problems: Sequence[Problem]) -> list[tuple[str, str]]:
    return [(p.prompt, str(p.answer)) for p in problems]


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    device: torch.device | str = "cpu",
    progress: str = "[task] greedy accuracy",
) -> dict[str, float]:
    """Greedy accuracy on ``problems`` (``accuracy``), its binomial standard error
    (``accuracy_stderr``) and the count (``n``). ``progress``: the label of the backend's
    progress lines (a call over ten seconds)."""
    records = generate_and_judge(
        HFBackend(model, tokenizer, device, progress=progress),
        tokenizer,
        _items(problems),
        prompt=TASK_PROMPT,
        verifier=VERIFIER,
        max_new_tokens=max_new_tokens,
    )
    summary = summarize(records)
    return {
        "accuracy": summary["accuracy"],
        "accuracy_stderr": summary["stderr"],
        "n": float(summary["n"]),
    }


def task_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    *,
    samples_per_prompt: int,
    temperature: float,
    seed: int,
    progress: str = "[task] sampling pairs",
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """Sample, verify and pair (:func:`engine.generation.pairing.build_pairs`): one (correct,
    wrong) pair per prompt that has both.

    Returns the rows (``prompt``, ``chosen``, ``rejected``, ``answer``) and counts: prompts,
    pairs, sample accuracy, prompts with all samples correct / all wrong. ``progress``: the
    label of the sampling's progress lines (sequences done, rate, ETA, every ten seconds).
    """
    rows, counts = build_pairs(
        HFBackend(model, tokenizer, progress=progress),
        tokenizer,
        _items(problems),
        prompt=TASK_PROMPT,
        verifier=VERIFIER,
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_new_tokens=MAX_NEW_TOKENS,
        seed=seed,
    )
    stats = counts.to_dict()
    keys = ("prompts", "pairs", "sample_accuracy", "all_correct_prompts", "all_wrong_prompts")
    return rows, {key: stats[key] for key in keys}
