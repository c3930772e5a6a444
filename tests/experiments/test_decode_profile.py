"""experiments.bench.decode_profile on the task's tiny model (random weights, a few prompts): what
it counts per step equals what the model's shapes say, and its report adds up."""

from __future__ import annotations

import dataclasses

import pytest

from experiments.bench import decode_profile
from experiments.bench.generation import task_cases


@pytest.fixture(scope="module")
def profiled() -> decode_profile.Profile:
    case = task_cases(None, quick=True)[0]
    case = dataclasses.replace(case, prompts=case.prompts[:5], max_new_tokens=7, rates={})
    return decode_profile.profile_case(case)


def test_the_counts_are_the_models_shapes(profiled: decode_profile.Profile) -> None:
    case = profiled.case
    model = case.model
    config = model.config
    rows = case.rows
    # random weights run every row to the limit: one step per new token after the first
    assert profiled.steps == case.max_new_tokens - 1 == len(profiled.step_seconds)
    assert profiled.tokens == rows * case.max_new_tokens
    # every matmul of a step is a linear layer on one token per row: 2 x rows x weights FLOPs
    weights = profiled.weight_bytes // 4
    assert profiled.matmul_flops == profiled.steps * 2 * rows * weights
    # the attention of step s reads the prompt's and s + 1 new tokens' keys and values per layer
    prompt = max(len(ids) for ids in case.tokenizer(case.prompts)["input_ids"])
    head_dim = config.hidden_size // config.num_attention_heads
    per_column = 2 * config.num_hidden_layers * rows * config.num_key_value_heads * head_dim * 4
    columns = sum(prompt + step + 1 for step in range(profiled.steps))
    assert profiled.kv_bytes == per_column * columns


def test_the_profiled_split_stays_inside_the_steps(profiled: decode_profile.Profile) -> None:
    parts = (profiled.matmul, profiled.attention, profiled.other)
    assert all(part > 0 for part in parts)
    assert sum(parts) <= profiled.profiled_step


def test_the_report_has_one_row_a_case_with_its_steps_and_floor(
    profiled: decode_profile.Profile,
) -> None:
    text = decode_profile.report([profiled], peak=100.0, bandwidth=10.0, command="cmd")
    rows = [line for line in text.splitlines() if line.startswith(f"| {profiled.case.name} |")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert int(cells[2]) == profiled.steps
    assert float(cells[-2]) > 0 and cells[-1].endswith("x")
