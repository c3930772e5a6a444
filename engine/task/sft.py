"""The SFT stage of the embedded task: teach the tiny model the solution format, and stop at a
checkpoint whose held-out greedy accuracy lies in a target band (room left to improve).

Accuracy on such tasks rises steeply with steps, so a fixed step count gives a model that is either
hopeless or already saturated depending on the seed; selecting the first evaluated checkpoint in
the band makes the starting point comparable across configurations.

It runs in one process (the task cache is built by one process while the others wait), on the
engine's own pieces: the same model builder, sequence collation and chunked log-prob module.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.data.batching import collate_sequences
from engine.model.logprobs import SequenceLogProbs
from engine.runtime.progress import Progress
from engine.task.arithmetic import Problem, solution

log = logging.getLogger(__name__)


def encode_example(
    tokenizer: PreTrainedTokenizerBase, problem: Problem
) -> tuple[list[int], list[int]]:
    """(prompt ids with BOS, solution ids with EOS): the same split the preference loader makes."""
    prompt = tokenizer(problem.prompt, add_special_tokens=True)["input_ids"]
    response = tokenizer(solution(problem), add_special_tokens=False)["input_ids"]
    return prompt, [*response, tokenizer.eos_token_id]


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_problems: Sequence[Problem],
    val_accuracy: Callable[[PreTrainedModel], float],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    band: tuple[float, float],
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place on correct solutions; leave it at the chosen checkpoint.

    The chosen checkpoint is the first evaluated one inside ``band``; if none is (the accuracy
    jumped over the band, or never reached it), the evaluated checkpoint closest to the band (of
    equally close ones below the band, the latest; above it, the earliest).
    Returns a summary: the chosen step, its validation accuracy, and the accuracy history.
    """
    low, high = band
    examples = [encode_example(tokenizer, p) for p in train_problems]
    module = SequenceLogProbs(model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / max(steps, 1))
    )
    rng = random.Random(seed)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (distance, step, weights)
    # a line every ten seconds (steps, rate, ETA, loss, validation accuracy): terminal and log
    bar = Progress("[task] SFT", steps, "steps", logger=log) if progress else None
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        input_ids, attention_mask, response_mask = collate_sequences(
            [b[0] for b in batch], [b[1] for b in batch], tokenizer.pad_token_id
        )
        logps, counts = module(
            input_ids.to(device), attention_mask.to(device), response_mask.to(device)
        )
        loss = -logps.sum() / counts.sum()  # mean token NLL over the batch's solution tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            accuracy = val_accuracy(model)
            model.train()
            history.append({"step": step, "loss": loss.item(), "val_accuracy": accuracy})
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{accuracy:.2f}")
            distance = (
                0.0 if low <= accuracy <= high else min(abs(accuracy - low), abs(accuracy - high))
            )
            # equally close below the band: keep the later (more trained) checkpoint
            if best is None or distance < best[0] or (distance == best[0] and accuracy < low):
                best = (distance, step, copy.deepcopy(model.state_dict()))
            if distance == 0.0:
                break
    if bar is not None:
        bar.close()
    assert best is not None  # at least the last step was evaluated
    if best[1] != history[-1]["step"]:
        model.load_state_dict(best[2])
    chosen_step = best[1]
    chosen = next(h for h in history if h["step"] == chosen_step)
    if best[0] > 0:
        log.warning(
            "SFT never reached the accuracy band %s in %d steps; kept step %d (val accuracy %.3f)",
            band,
            steps,
            chosen_step,
            chosen["val_accuracy"],
        )
    return {
        "chosen_step": chosen_step,
        "val_accuracy": chosen["val_accuracy"],
        "in_band": best[0] == 0.0,
        "band": [low, high],
        "history": history,
    }
