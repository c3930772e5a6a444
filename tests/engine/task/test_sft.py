"""Tests for the SFT stage: it trains, checks every ``eval_every`` steps until a check reaches the
band's middle, bisects the last interval by replaying its steps, and keeps the evaluated
checkpoint closest to the middle, with the model left at that checkpoint's weights.

Scripted accuracies are functions of the step. The step a model is at is read off its weights:
a first run of the same seed, checked at every step, records the weights of every step, so a
replayed step is recognized only if the replay gave the same weights bit for bit."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from engine.task.arithmetic import Problem, solution, split_problems
from engine.task.sampling import greedy_accuracy
from engine.task.sft import encode_example, train_sft

TRAIN, VAL = split_problems(200, 8, seed=0, min_digits=1, max_digits=2)


def _sft(model, tokenizer, val_accuracy, **overrides):
    options = {
        "steps": 8,
        "batch_size": 8,
        "lr": 3e-3,
        "eval_every": 2,
        "band": (0.35, 0.60),
        "seed": 0,
        "progress": False,
    }
    options.update(overrides)
    return train_sft(model, tokenizer, TRAIN, val_accuracy, **options)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(model, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.fixture
def trajectory(make_tiny_model, tokenizer) -> Callable[..., list[dict[str, torch.Tensor]]]:
    """``trajectory(steps, seed=0)``: the weights after every step 0..steps of an SFT run of
    ``make_tiny_model()`` (checked at every step, never reaching the band: no search). The LR
    schedule depends on ``steps``: compare with runs of the same ``steps``."""

    def record(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        model = make_tiny_model()
        weights = [_weights(model)]

        def never(m) -> float:
            weights.append(_weights(m))
            return 0.0

        _sft(model, tokenizer, never, steps=steps, eval_every=1, seed=seed)
        assert len(weights) == steps + 1
        return weights

    return record


class ScriptedAccuracy:
    """``val_accuracy`` returning ``accuracy(step)``, the step read off the model's weights; it
    records the steps it was asked about, in order."""

    def __init__(self, weights: list[dict[str, torch.Tensor]], accuracy: Callable[[int], float]):
        self.weights, self.accuracy = weights, accuracy
        self.steps: list[int] = []

    def __call__(self, model) -> float:
        assert model.training  # called mid-training; train_sft gets the model back in train mode
        matches = [s for s, w in enumerate(self.weights) if _same_weights(model, w)]
        assert len(matches) == 1, f"weights of no recorded step (or of several): {matches}"
        self.steps.append(matches[0])
        return self.accuracy(matches[0])


def test_encode_example_splits_prompt_and_solution(tokenizer) -> None:
    problem = Problem(47, 8, "+")
    prompt, response = encode_example(tokenizer, problem)
    assert prompt[0] == tokenizer.bos_token_id
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in response[:-1]
    assert tokenizer.decode(prompt, skip_special_tokens=True) == "47+8="
    assert tokenizer.decode(response, skip_special_tokens=True) == solution(problem)
    assert len(response) == len(solution(problem)) + 1  # one token per character, plus EOS


def test_the_search_bisects_to_the_step_closest_to_the_middle(
    make_tiny_model, tokenizer, trajectory
) -> None:
    """Accuracy step / 20 and the band [0.3, 0.6] (middle 0.45): checks at 4 (0.2) and 8 (0.4)
    are below, 12 (0.6) reaches it; the bisection replays from step 8 to 10 (0.5, above), then
    to 9 (0.45): step 9 is chosen, its weights those of step 9 in an uninterrupted run."""
    weights = trajectory(16)
    scripted = ScriptedAccuracy(weights, lambda step: step / 20)
    model = make_tiny_model()
    summary = _sft(model, tokenizer, scripted, steps=16, eval_every=4, band=(0.3, 0.6))
    assert scripted.steps == [4, 8, 12, 10, 9]  # no training, no check after the search
    assert summary["chosen_step"] == 9 and summary["val_accuracy"] == 0.45
    assert summary["in_band"] is True
    assert summary["band"] == [0.3, 0.6] and summary["target"] == pytest.approx(0.45)
    assert summary["evaluations"] == 5
    history = summary["history"]
    assert [h["step"] for h in history] == [4, 8, 9, 10, 12]  # in step order
    assert [h["search"] for h in history] == [False, False, True, True, False]
    assert [h["val_accuracy"] for h in history] == [0.2, 0.4, 0.45, 0.5, 0.6]
    assert all(h["loss"] > 0 for h in history)
    assert _same_weights(model, weights[9])


def test_a_jump_over_the_band_is_searched_step_by_step(
    make_tiny_model, tokenizer, trajectory
) -> None:
    """Accuracy 0.1 up to step 5, then 0.9 (a jump over the whole band between two checks): the
    search narrows the jump to steps 5 and 6 and keeps the one closer to the middle, outside the
    band, with a warning."""
    weights = trajectory(8)
    scripted = ScriptedAccuracy(weights, lambda step: 0.1 if step <= 5 else 0.9)
    model = make_tiny_model()
    summary = _sft(model, tokenizer, scripted, steps=8, eval_every=4)
    assert scripted.steps == [4, 8, 6, 5]
    assert summary["chosen_step"] == 5 and summary["val_accuracy"] == 0.1
    assert summary["in_band"] is False
    assert _same_weights(model, weights[5])


def test_a_first_check_above_the_middle_searches_from_the_start(
    make_tiny_model, tokenizer, trajectory
) -> None:
    weights = trajectory(4)
    scripted = ScriptedAccuracy(weights, lambda step: [0.0, 0.2, 0.5, 0.7, 0.8][step])
    model = make_tiny_model()
    summary = _sft(model, tokenizer, scripted, steps=4, eval_every=4)
    assert scripted.steps == [4, 2, 1]
    assert summary["chosen_step"] == 2 and summary["in_band"] is True
    assert _same_weights(model, weights[2])


def test_never_reaching_the_middle_keeps_the_closest_checkpoint(
    make_tiny_model, tokenizer, trajectory, caplog
) -> None:
    """No check reaches the middle (0.475): no search; the closest check is kept (step 6, in the
    band), not the last one, and the model is put back to its weights."""
    weights = trajectory(8)
    values = {2: 0.1, 4: 0.3, 6: 0.45, 8: 0.2}
    scripted = ScriptedAccuracy(weights, values.get)
    model = make_tiny_model()
    caplog.clear()  # the trajectory's run warned
    with caplog.at_level(logging.WARNING, logger="engine.task.sft"):
        summary = _sft(model, tokenizer, scripted, steps=8)
    assert scripted.steps == [2, 4, 6, 8]
    assert (summary["chosen_step"], summary["in_band"]) == (6, True)
    assert _same_weights(model, weights[6])
    assert not caplog.text  # in the band: nothing to warn about


def test_outside_the_band_says_so(make_tiny_model, tokenizer, trajectory, caplog) -> None:
    weights = trajectory(6)
    scripted = ScriptedAccuracy(weights, lambda step: 0.05 * step)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.task.sft"):
        summary = _sft(make_tiny_model(), tokenizer, scripted, steps=6)
    assert summary["chosen_step"] == 6 and summary["in_band"] is False
    assert "no checkpoint inside the accuracy band" in caplog.text
    assert "kept step 6" in caplog.text


def test_ties_below_the_middle_keep_the_later_checkpoint(
    make_tiny_model, tokenizer, trajectory
) -> None:
    """A budget too small for the band, accuracy stuck at 0: keep the most trained model, not the
    first one evaluated (which would throw the training away)."""
    weights = trajectory(6)
    model = make_tiny_model()
    summary = _sft(model, tokenizer, ScriptedAccuracy(weights, lambda step: 0.0), steps=6)
    assert summary["chosen_step"] == 6 and summary["in_band"] is False
    assert _same_weights(model, weights[6])


def test_ties_across_the_middle_keep_the_one_below(make_tiny_model, tokenizer, trajectory) -> None:
    """0.45 and 0.5 are equally far from 0.475 (as k/n accuracies often are): the one below the
    middle is kept (room to improve), whichever came first."""
    weights = trajectory(4)
    scripted = ScriptedAccuracy(weights, lambda step: [0.0, 0.3, 0.45, 0.5, 0.5][step])
    summary = _sft(make_tiny_model(), tokenizer, scripted, steps=4)
    assert scripted.steps == [2, 4, 3]
    assert summary["chosen_step"] == 2
    scripted = ScriptedAccuracy(weights, lambda step: [0.0, 0.3, 0.5, 0.5, 0.45][step])
    summary = _sft(make_tiny_model(), tokenizer, scripted, steps=4)
    assert scripted.steps == [2, 1]
    assert summary["chosen_step"] == 2  # 0.5 at 2 vs 0.3 at 1: 2 is closer


def test_ties_above_the_middle_keep_the_earlier_checkpoint(
    make_tiny_model, tokenizer, trajectory
) -> None:
    weights = trajectory(4)
    scripted = ScriptedAccuracy(weights, lambda step: [0.0, 0.8, 0.8, 0.9, 0.9][step])
    summary = _sft(make_tiny_model(), tokenizer, scripted, steps=4)
    assert scripted.steps == [2, 1]
    assert summary["chosen_step"] == 1


def test_the_last_step_is_always_evaluated(make_tiny_model, tokenizer, trajectory) -> None:
    weights = trajectory(5)
    scripted = ScriptedAccuracy(weights, lambda step: 0.06 * step)
    summary = _sft(make_tiny_model(), tokenizer, scripted, steps=5, eval_every=2)
    assert scripted.steps == [2, 4, 5]
    assert summary["chosen_step"] == 5  # 0.3 is the closest to the middle


def test_same_seed_same_weights(make_tiny_model, tokenizer) -> None:
    first, second, other = make_tiny_model(), make_tiny_model(), make_tiny_model()
    for model, seed in ((first, 0), (second, 0), (other, 1)):
        _sft(model, tokenizer, lambda m: 0.0, steps=3, eval_every=3, seed=seed)
    assert _same_weights(second, first.state_dict())
    assert not _same_weights(other, first.state_dict())


def test_bad_budgets_are_refused(make_tiny_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        _sft(make_tiny_model(), tokenizer, lambda m: 0.0, eval_every=0)


def test_real_sft_on_a_tiny_budget(make_tiny_model, tokenizer) -> None:
    """Real SFT, real greedy accuracy: the loss falls well below an untrained model's, and with a
    band it cannot reach, the summary still names a step (the model is left at its weights)."""
    model = make_tiny_model(hidden=64, layers=2)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def val_accuracy(m) -> float:
        snapshots[len(snapshots)] = _weights(m)
        return greedy_accuracy(m, tokenizer, VAL, max_new_tokens=40)["accuracy"]

    summary = _sft(
        model, tokenizer, val_accuracy, steps=100, batch_size=16, eval_every=50, band=(0.99, 1.0)
    )
    history = summary["history"]
    assert [h["step"] for h in history] == [50, 100]
    # log(23 tokens) = 3.14 is an untrained model's loss; the format is learned within 100 steps
    assert history[0]["loss"] < 2.2
    assert history[1]["loss"] < min(1.2, history[0]["loss"])
    assert summary["in_band"] is False
    chosen = [h["step"] for h in history].index(summary["chosen_step"])
    assert summary["val_accuracy"] == history[chosen]["val_accuracy"]
    assert _same_weights(model, snapshots[chosen])


def test_one_step(make_tiny_model, tokenizer, trajectory) -> None:
    weights = trajectory(1)
    scripted = ScriptedAccuracy(weights, lambda step: 0.9)
    summary = _sft(make_tiny_model(), tokenizer, scripted, steps=1)
    assert scripted.steps == [1]  # nothing to bisect between steps 0 and 1
    assert summary["chosen_step"] == 1 and len(summary["history"]) == 1
