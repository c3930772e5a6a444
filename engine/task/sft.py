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
    # a line every ten seconds (steps, rate, ETA, loss, validation accuracy): terminal and log
    bar = Progress("[task] SFT", steps, "steps", logger=log) if progress else None
    checks = _Checks(trainer, val_accuracy, target=(low + high) / 2, bar=bar)
    # 1. checks every eval_every steps until one reaches the middle
    below, reached = _check_until_middle(trainer, checks, steps, eval_every)
    # 2. bisect the last interval: replay from the state below the middle to each probe
    if reached:
        _bisect(trainer, checks, below)
    return _keep_best(checks, band, steps)


class _Checks:
    """The validations of one search: each one's record (``history``, in the order they ran) and
    the best checkpoint so far (by :func:`_preference`: step and weights)."""

    def __init__(
        self,
        trainer: _Trainer,
        val_accuracy: Callable[[PreTrainedModel], float],
        *,
        target: float,
        bar: Progress | None,
    ) -> None:
        self.trainer, self.val_accuracy, self.target, self.bar = trainer, val_accuracy, target, bar
        self.history: list[dict[str, Any]] = []
        self.best: tuple[tuple[float, int], int, dict[str, torch.Tensor]] | None = None

    def check(self, search: bool) -> float:
        """The validation accuracy at the trainer's step, recorded (``search``: a bisection
        probe); its weights are kept if it is the best so far."""
        trainer = self.trainer
        model = trainer.model
        accuracy = self.val_accuracy(model)
        model.train()
        step = trainer.step
        self.history.append(
            {"step": step, "loss": trainer.loss, "val_accuracy": accuracy, "search": search}
        )
        key = _preference(accuracy, self.target, step)
        if self.best is None or key < self.best[0]:
            self.best = (key, step, copy.deepcopy(model.state_dict()))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{trainer.loss:.3f}", val_acc=f"{accuracy:.2f}", step=step)
        return accuracy


def _check_until_middle(
    trainer: _Trainer, checks: _Checks, steps: int, eval_every: int
) -> tuple[_TrainingState, bool]:
    """Train, checking every ``eval_every`` steps, until a check reaches the band's middle or the
    ``steps`` budget ends. Returns the state at the last check below the middle (step 0 if none)
    and whether a check reached the middle (the trainer then stands at it)."""
    below = trainer.save()  # the state at the last check below the middle (step 0 at first)
    reached = False
    while trainer.step < steps and not reached:
        trainer.advance(min(trainer.step + eval_every, steps))
        if checks.bar is not None:
            checks.bar.update(trainer.step - checks.bar.done)
        reached = checks.check(search=False) >= checks.target
        if not reached:
            below = trainer.save()
    if checks.bar is not None:
        checks.bar.close()
    return below, reached


def _bisect(trainer: _Trainer, checks: _Checks, below: _TrainingState) -> None:
    """Bisect the steps between ``below`` (a check below the middle) and the trainer's step (one
    at or above it): restore ``below``, replay to the probe halfway, check it, and halve the
    interval until neighbouring steps bracket the middle."""
    low_step, high_step = below.step, trainer.step
    while high_step - low_step > 1:
        probe = (low_step + high_step) // 2
        trainer.restore(below)
        trainer.advance(probe)
        if checks.check(search=True) < checks.target:
            low_step, below = probe, trainer.save()
        else:
            high_step = probe


def _keep_best(checks: _Checks, band: tuple[float, float], steps: int) -> dict[str, Any]:
    """Load the best checkpoint's weights into the model (a warning if it lies outside ``band``)
    and return the search's summary (:func:`train_sft`)."""
    assert checks.best is not None  # at least one check ran
    _, chosen_step, weights = checks.best
    checks.trainer.model.load_state_dict(weights)
    history = checks.history
    chosen = next(h for h in history if h["step"] == chosen_step)
    low, high = band
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
        "target": checks.target,
        "evaluations": len(history),
        "history": sorted(history, key=lambda h: h["step"]),
    }
