"""Generating answers from the policy: greedy (evaluation) and sampled (pair building)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.task.arithmetic import Problem, verify


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[str]:
    """One completion per prompt (greedy when ``temperature == 0``), decoded without specials.

    Prompts are left-padded so that every row's new tokens start at the same column; generation
    stops at EOS. Sampling is seeded, so the same call gives the same completions.
    """
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]), return_tensors="pt", padding=True
            ).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **(sampling if temperature > 0 else {"do_sample": False}),
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        torch.set_rng_state(generator_state)
        model.train(was_training)
    return completions


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Greedy accuracy on ``problems`` with its binomial standard error, and the count."""
    answers = generate(
        model, tokenizer, [p.prompt for p in problems], max_new_tokens=max_new_tokens, device=device
    )
    correct = sum(verify(p, a) for p, a in zip(problems, answers, strict=True))
    n = len(problems)
    accuracy = correct / n if n else float("nan")
    stderr = math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")
    return {"accuracy": accuracy, "accuracy_stderr": stderr, "n": float(n)}
