"""The SFT stage of the embedded task: teach the tiny model the solution format, and stop at the
checkpoint whose validation greedy accuracy is closest to the middle of a target band (room left
to improve, and the same starting point on any machine).

Accuracy on such tasks rises steeply with steps (0.34 to 0.60 between two checks 25 steps apart
at the defaults), so where a fixed check interval lands is a coin that float rounding flips: two
CPUs with different SIMD kernels train to weights that differ in the last bits and land on
either side of a jump. So the search is two-level:

1. train, checking validation accuracy every ``eval_every`` steps, until a check reaches the
   band's middle (or the step budget ends);
2. bisect the last interval: go back to the state of the last check below the middle (weights,
   optimizer, LR schedule and the batch sampler's rng, kept in memory) and replay the steps up to
   a probe, halving the interval until neighbouring steps bracket the middle.

The chosen checkpoint is the evaluated one closest to the middle (among equally close ones: one
below the middle, the latest; above it, the earliest). Batches come from a seeded rng, so
replaying from a kept state gives the same weights as the first pass did (on the same machine).

Cost: one validation (a greedy generation over the validation problems) per check, plus about
log2(eval_every) for the search (5 at 25), and at most ``eval_every`` replayed steps per probe
(training steps are cheap next to a validation). Memory: two copies of the weights and the AdamW
state besides the model's own, and the best checkpoint's weights.

It runs in one process (the task cache is built by one process while the others wait), on the
engine's own pieces: the same model builder, sequence collation and chunked log-prob module.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass
class _TrainingState:
    """Everything the next SFT steps depend on, copied: restoring it and replaying gives the same
    weights again."""

    step: int
    loss: float
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    schedule: dict[str, Any]
    sampler: Any  # random.Random's state: which examples the next batches take
    torch_rng: torch.Tensor  # dropout, if a model has any


class _Trainer:
    """The SFT optimization (AdamW, warmup then linear decay, mean token NLL), one step at a time,
    with :meth:`save` / :meth:`restore` of its whole state for replays."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: list[tuple[list[int], list[int]]],
        *,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int,
        device: torch.device | str,
    ) -> None:
        self.model, self.examples, self.device = model, examples, device
        self.pad_id, self.batch_size = tokenizer.pad_token_id, min(batch_size, len(examples))
        self.module = SequenceLogProbs(model).to(device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / max(steps, 1))
        )
        self.sampler = random.Random(seed)
        self.step, self.loss = 0, float("nan")

    def advance(self, to_step: int) -> None:
        """Train until ``to_step`` steps are done."""
        self.model.train()
        while self.step < to_step:
            batch = self.sampler.sample(self.examples, self.batch_size)
            input_ids, attention_mask, response_mask = collate_sequences(
                [b[0] for b in batch], [b[1] for b in batch], self.pad_id
            )
            logps, counts = self.module(
                input_ids.to(self.device),
                attention_mask.to(self.device),
                response_mask.to(self.device),
            )
            loss = -logps.sum() / counts.sum()  # mean token NLL over the batch's solution tokens
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.step, self.loss = self.step + 1, loss.item()

    def save(self) -> _TrainingState:
        """A copy of the state (the optimizer's tensors included: they change in place)."""
        return _TrainingState(
            step=self.step,
            loss=self.loss,
            model=copy.deepcopy(self.model.state_dict()),
            optimizer=copy.deepcopy(self.optimizer.state_dict()),
            schedule=copy.deepcopy(self.schedule.state_dict()),
            sampler=self.sampler.getstate(),
            torch_rng=torch.get_rng_state(),
        )

    def restore(self, state: _TrainingState) -> None:
        """Back to ``state`` (which stays usable: the optimizer gets a copy of its tensors)."""
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        self.schedule.load_state_dict(state.schedule)
        self.sampler.setstate(state.sampler)
        torch.set_rng_state(state.torch_rng)
        self.step, self.loss = state.step, state.loss


def _preference(accuracy: float, target: float, step: int) -> tuple[float, int]:
    """Sort key of a checkpoint (smaller is better): the distance to ``target``, then among equally
    close ones, below the target the latest step, above it the earliest. Distances are rounded so
    that accuracies k/n equally far from the target tie exactly."""
    distance = round(abs(accuracy - target), 9)
    return distance, (-step if accuracy < target else step)


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
    """Train ``model`` in place on correct solutions; leave it at the chosen checkpoint: the
    evaluated one closest to the middle of ``band`` (the search is in the module docstring).

    ``val_accuracy(model)`` is called with the model in training mode and must give it back so.
    Returns a summary: the chosen step, its validation accuracy, whether it lies in the band, the
    band and its middle, and every evaluation (``history``, in step order; ``search`` marks the
    bisection's probes).
    """
    if eval_every < 1 or steps < 1:
        raise ValueError(f"data.sft: steps and eval_every must be >= 1, got {steps}, {eval_every}")
    low, high = band
    target = (low + high) / 2
    examples = [encode_example(tokenizer, p) for p in train_problems]
    trainer = _Trainer(
        model,
        tokenizer,
        examples,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    history: list[dict[str, Any]] = []
    best: tuple[tuple[float, int], int, dict[str, torch.Tensor]] | None = None
    # a line every ten seconds (steps, rate, ETA, loss, validation accuracy): terminal and log
    bar = Progress("[task] SFT", steps, "steps", logger=log) if progress else None

    def check(search: bool) -> float:
        nonlocal best
        accuracy = val_accuracy(model)
        model.train()
        step = trainer.step
        history.append(
            {"step": step, "loss": trainer.loss, "val_accuracy": accuracy, "search": search}
        )
        key = _preference(accuracy, target, step)
        if best is None or key < best[0]:
            best = (key, step, copy.deepcopy(model.state_dict()))
        if bar is not None:
            bar.set_postfix(loss=f"{trainer.loss:.3f}", val_acc=f"{accuracy:.2f}", step=step)
        return accuracy

    # 1. checks every eval_every steps until one reaches the middle
    below = trainer.save()  # the state at the last check below the middle (step 0 at first)
    reached = False
    while trainer.step < steps and not reached:
        trainer.advance(min(trainer.step + eval_every, steps))
        if bar is not None:
            bar.update(trainer.step - bar.done)
        reached = check(search=False) >= target
        if not reached:
            below = trainer.save()
    if bar is not None:
        bar.close()
    # 2. bisect (below.step, trainer.step): replay from the state below the middle to each probe
    low_step, high_step = below.step, trainer.step
    while reached and high_step - low_step > 1:
        probe = (low_step + high_step) // 2
        trainer.restore(below)
        trainer.advance(probe)
        if check(search=True) < target:
            low_step, below = probe, trainer.save()
        else:
            high_step = probe

    assert best is not None  # at least one check ran
    _, chosen_step, weights = best
    model.load_state_dict(weights)
    chosen = next(h for h in history if h["step"] == chosen_step)
    in_band = low <= chosen["val_accuracy"] <= high
    if not in_band:
        log.warning(
            "SFT: no checkpoint inside the accuracy band %s within %d steps; kept step %d (val "
            "accuracy %.3f, the closest to the band's middle)",
            band,
            steps,
            chosen_step,
            chosen["val_accuracy"],
        )
    return {
        "chosen_step": chosen_step,
        "val_accuracy": chosen["val_accuracy"],
        "in_band": in_band,
        "band": [low, high],
        "target": target,
        "evaluations": len(history),
        "history": sorted(history, key=lambda h: h["step"]),
    }
