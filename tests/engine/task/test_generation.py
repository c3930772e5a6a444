"""Tests for generation with the Hugging Face backend (engine.generation.backends.HFBackend) on the
task's tiny models: greedy determinism, left padding, seeded sampling; and the task's greedy
accuracy, which runs on the generic evaluation parts."""

from __future__ import annotations

import math

import pytest
import torch

from engine.generation.backends import HFBackend
from engine.task.arithmetic import Problem, generate_problems, solution
from engine.task.sampling import greedy_accuracy

# Prompts of 4 to 12 characters: a batch of them is padded.
PROMPTS = [p.prompt for p in generate_problems(12, seed=5, min_digits=1, max_digits=5)]
MAX_NEW = 24


def generate(model, tokenizer, prompts, *, batch_size: int = 256, **options) -> list[str]:
    return HFBackend(model, tokenizer, batch_size=batch_size).generate(prompts, **options)


@pytest.fixture
def model(make_tiny_model):
    # Peaked random weights: outputs depend on the prompt, and argmax never sits on a near-tie.
    return make_tiny_model(hidden=32, layers=2, seed=3, init_std=0.3)


def test_prompts_have_mixed_lengths() -> None:
    assert len({len(p) for p in PROMPTS}) >= 4


def test_greedy_is_deterministic_and_restores_state(model, tokenizer) -> None:
    model.train()
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW)
    second = generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW)
    assert first == second
    assert len(first) == len(PROMPTS)
    assert all(isinstance(c, str) and len(c) <= MAX_NEW for c in first)
    # the outputs depend on the prompt (otherwise the padding test below proves nothing)
    assert len(set(first)) > len(PROMPTS) // 2
    # the model's mode and the tokenizer's padding side are given back
    assert model.training
    assert tokenizer.padding_side == "right"
    model.eval()
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4)
    assert not model.training


def test_left_padding_does_not_change_results(model, tokenizer) -> None:
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=MAX_NEW)[0] for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW)
    assert batched == one_by_one
    # chunking into batches of different paddings changes nothing either
    chunked = generate(model, tokenizer, PROMPTS, max_new_tokens=MAX_NEW, batch_size=5)
    assert chunked == one_by_one


def test_sampling_is_reproducible_with_a_seed(model, tokenizer) -> None:
    prompts = PROMPTS[:6] * 4
    sample = {
        seed: generate(
            model, tokenizer, prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=seed
        )
        for seed in (7, 8)
    }
    again = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW, temperature=1.0, seed=7)
    assert again == sample[7]
    assert sample[8] != sample[7]
    greedy = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW)
    assert sample[7] != greedy
    # the same prompt sampled several times in one call gives different completions
    assert len({sample[7][i] for i in range(0, len(prompts), 6)}) > 1


def test_generation_leaves_the_global_rng_alone(model, tokenizer) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, tokenizer, PROMPTS[:3], max_new_tokens=8, temperature=1.0, seed=99)
    assert torch.equal(torch.rand(3), expected)


def test_generation_stops_at_eos_and_drops_specials(scripted_model, tokenizer) -> None:
    responses = {"3+4=": "3+4+0=7 c0|#### 7", "12+30=": "#### 42", "5-5=": ""}
    stub = scripted_model(lambda prompt, draw: responses[prompt])
    prompts = list(responses)
    out = generate(stub, tokenizer, prompts, max_new_tokens=40)
    assert out == list(responses.values())
    (call,) = stub.calls
    assert call["do_sample"] is False
    assert call["training"] is False
    # left padded: every row's prompt ends in the last column, pads are on the left
    ids, mask = call["input_ids"], call["attention_mask"]
    assert (ids[:, -1] == tokenizer.convert_tokens_to_ids("=")).all()
    assert ids[0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert mask[0].tolist() == [0, 0, *[1] * (ids.shape[1] - 2)]
    assert mask[1].all()
    # a completion is cut at max_new_tokens
    assert generate(stub, tokenizer, ["3+4="], max_new_tokens=5) == ["3+4+0"]


# ---- greedy accuracy ---------------------------------------------------------------------------

PROBLEMS = [Problem(a, b, "+") for a, b in [(1, 2), (3, 4), (10, 20), (55, 44), (9, 9)]] + [
    Problem(a, b, "-") for a, b in [(9, 2), (50, 25), (31, 13), (77, 7), (40, 4)]
]
# Exactly three answered correctly; the others are wrong in different ways.
CORRECT = {"1+2=", "55+44=", "31-13="}
WRONG = {
    "3+4=": "3+4+0=7 c0|#### 8",  # wrong final answer
    "10+20=": "0+0+0=0 c0|1+2+0=3 c0",  # no answer marker
    "9+9=": "#### 18 #### 18",  # two markers
    "9-2=": "#### 07",  # not canonical
    "50-25=": "#### -25",  # wrong sign
    "77-7=": "",  # nothing
    "40-4=": "#### 36|c",  # junk after the answer
}


def _respond(prompt: str, draw: float | None) -> str:
    problem = next(p for p in PROBLEMS if p.prompt == prompt)
    return solution(problem) if prompt in CORRECT else WRONG[prompt]


def test_greedy_accuracy_and_its_standard_error(scripted_model, tokenizer) -> None:
    stub = scripted_model(_respond)
    result = greedy_accuracy(stub, tokenizer, PROBLEMS, max_new_tokens=80)
    assert result["accuracy"] == pytest.approx(0.3)
    # binomial standard error sqrt(p (1 - p) / n) = sqrt(0.3 * 0.7 / 10) = sqrt(0.021)
    assert result["accuracy_stderr"] == pytest.approx(0.14491376746189438)
    assert result["n"] == 10
    assert all(call["do_sample"] is False for call in stub.calls)  # greedy


def test_greedy_accuracy_edge_cases(scripted_model, tokenizer) -> None:
    always_right = scripted_model(
        lambda prompt, draw: solution(next(p for p in PROBLEMS if p.prompt == prompt))
    )
    result = greedy_accuracy(always_right, tokenizer, PROBLEMS[:4], max_new_tokens=80)
    assert result == {"accuracy": 1.0, "accuracy_stderr": 0.0, "n": 4.0}
    always_wrong = scripted_model(lambda prompt, draw: "#### 1000")
    result = greedy_accuracy(always_wrong, tokenizer, PROBLEMS, max_new_tokens=80)
    assert result == {"accuracy": 0.0, "accuracy_stderr": 0.0, "n": 10.0}
    one_of_four = greedy_accuracy(
        scripted_model(_respond), tokenizer, PROBLEMS[1:5], max_new_tokens=80
    )
    assert one_of_four["accuracy"] == 0.25
    assert one_of_four["accuracy_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    empty = greedy_accuracy(scripted_model(_respond), tokenizer, [], max_new_tokens=80)
    assert empty["n"] == 0 and math.isnan(empty["accuracy"])
    assert math.isnan(empty["accuracy_stderr"])
