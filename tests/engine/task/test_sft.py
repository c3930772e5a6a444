"""Tests for the SFT stage: it trains, and keeps the first checkpoint in the accuracy band (else
the closest one), with the model left at that checkpoint's weights."""

from __future__ import annotations

import logging

import torch

from engine.task.arithmetic import Problem, solution, split_problems
from engine.task.sampling import greedy_accuracy
from engine.task.sft import encode_example, train_sft

TRAIN, VAL = split_problems(200, 8, seed=0, min_digits=1, max_digits=2)


class ScriptedAccuracy:
    """A ``val_accuracy`` returning scripted values, snapshotting the weights at each call."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def __call__(self, model) -> float:
        assert model.training  # called mid-training; train_sft puts the model back in eval/train
        self.snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return self.values[len(self.snapshots) - 1]


def _same_weights(model, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


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


def test_encode_example_splits_prompt_and_solution(tokenizer) -> None:
    problem = Problem(47, 8, "+")
    prompt, response = encode_example(tokenizer, problem)
    assert prompt[0] == tokenizer.bos_token_id
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in response[:-1]
    assert tokenizer.decode(prompt, skip_special_tokens=True) == "47+8="
    assert tokenizer.decode(response, skip_special_tokens=True) == solution(problem)
    assert len(response) == len(solution(problem)) + 1  # one token per character, plus EOS


def test_stops_at_the_first_checkpoint_in_the_band(make_tiny_model, tokenizer) -> None:
    model = make_tiny_model()
    # distances to [0.35, 0.6]: 0.25, 0.15, 0.1 (jumped over), then 0 at step 8: stop there
    scripted = ScriptedAccuracy([0.1, 0.2, 0.7, 0.4, 0.5, 0.5])
    summary = _sft(model, tokenizer, scripted, steps=12)
    assert summary["chosen_step"] == 8
    assert summary["val_accuracy"] == 0.4
    assert summary["in_band"] is True
    assert summary["band"] == [0.35, 0.60]
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
    assert [h["val_accuracy"] for h in summary["history"]] == [0.1, 0.2, 0.7, 0.4]
    assert len(scripted.snapshots) == 4  # no evaluation (and no training) after the band
    assert _same_weights(model, scripted.snapshots[-1])
    assert not _same_weights(model, scripted.snapshots[0])  # it did train


def test_band_edges_count_as_inside(make_tiny_model, tokenizer) -> None:
    summary = _sft(make_tiny_model(), tokenizer, ScriptedAccuracy([0.2, 0.6]))
    assert (summary["chosen_step"], summary["in_band"]) == (4, True)
    summary = _sft(make_tiny_model(), tokenizer, ScriptedAccuracy([0.35]))
    assert (summary["chosen_step"], summary["in_band"]) == (2, True)


def test_outside_the_band_keeps_the_closest_checkpoint(make_tiny_model, tokenizer, caplog) -> None:
    model = make_tiny_model()
    # distances 0.25, 0.1, 0.02, 0.3: step 6 is the closest, and not the last one
    scripted = ScriptedAccuracy([0.1, 0.7, 0.62, 0.9])
    with caplog.at_level(logging.WARNING, logger="engine.task.sft"):
        summary = _sft(model, tokenizer, scripted, steps=8)
    assert summary["chosen_step"] == 6
    assert summary["val_accuracy"] == 0.62
    assert summary["in_band"] is False
    assert len(summary["history"]) == 4  # ran to the end
    # the model is put back to step 6's weights
    assert _same_weights(model, scripted.snapshots[2])
    assert not _same_weights(model, scripted.snapshots[3])
    assert "never reached the accuracy band" in caplog.text
    assert "kept step 6" in caplog.text


def test_ties_below_the_band_keep_the_later_checkpoint(make_tiny_model, tokenizer) -> None:
    # A budget too small for the band, accuracy stuck at 0: keep the most trained model, not the
    # first one evaluated (which would throw the training away).
    model = make_tiny_model()
    scripted = ScriptedAccuracy([0.0, 0.0, 0.0])
    summary = _sft(model, tokenizer, scripted, steps=6)
    assert summary["chosen_step"] == 6 and summary["in_band"] is False
    assert _same_weights(model, scripted.snapshots[2])
    # a later tie below the band wins over an earlier one, not over a closer one
    model = make_tiny_model()
    scripted = ScriptedAccuracy([0.1, 0.3, 0.1, 0.3, 0.2])
    summary = _sft(model, tokenizer, scripted, steps=10)
    assert summary["chosen_step"] == 8
    assert _same_weights(model, scripted.snapshots[3])


def test_ties_above_the_band_keep_the_earlier_checkpoint(make_tiny_model, tokenizer) -> None:
    model = make_tiny_model()
    scripted = ScriptedAccuracy([0.8, 0.8, 0.9])
    summary = _sft(model, tokenizer, scripted, steps=6)
    assert summary["chosen_step"] == 2 and summary["in_band"] is False
    assert _same_weights(model, scripted.snapshots[0])


def test_the_last_step_is_always_evaluated(make_tiny_model, tokenizer) -> None:
    scripted = ScriptedAccuracy([0.0, 0.0, 0.3])
    summary = _sft(make_tiny_model(), tokenizer, scripted, steps=5, eval_every=2)
    assert [h["step"] for h in summary["history"]] == [2, 4, 5]
    assert summary["chosen_step"] == 5  # 0.3 is the closest to the band


def test_same_seed_same_weights(make_tiny_model, tokenizer) -> None:
    first, second, other = make_tiny_model(), make_tiny_model(), make_tiny_model()
    for model, seed in ((first, 0), (second, 0), (other, 1)):
        _sft(model, tokenizer, ScriptedAccuracy([0.0]), steps=3, eval_every=3, seed=seed)
    assert _same_weights(second, first.state_dict())
    assert not _same_weights(other, first.state_dict())


def test_real_sft_on_a_tiny_budget(make_tiny_model, tokenizer) -> None:
    """Real SFT, real greedy accuracy: the loss falls well below an untrained model's, and with a
    band it cannot reach, the summary still names a step (the model is left at its weights)."""
    model = make_tiny_model(hidden=64, layers=2)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def val_accuracy(m) -> float:
        snapshots[len(snapshots)] = {k: v.clone() for k, v in m.state_dict().items()}
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


def test_band_reached_at_the_first_evaluation_stops_early(make_tiny_model, tokenizer) -> None:
    model = make_tiny_model()
    calls = []

    def val_accuracy(m) -> float:
        calls.append(1)
        return greedy_accuracy(m, tokenizer, VAL[:2], max_new_tokens=4)["accuracy"]

    summary = _sft(model, tokenizer, val_accuracy, steps=50, eval_every=3, band=(0.0, 1.0))
    assert summary["chosen_step"] == 3 and summary["in_band"] is True
    assert len(calls) == 1


def test_one_step(make_tiny_model, tokenizer) -> None:
    summary = _sft(make_tiny_model(), tokenizer, ScriptedAccuracy([0.9]), steps=1)
    assert summary["chosen_step"] == 1 and len(summary["history"]) == 1
