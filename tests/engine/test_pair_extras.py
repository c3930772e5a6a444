"""engine.data.pair_extras: ODPO's score columns and KTO's mismatched pairs, built from the data."""

from __future__ import annotations

import pytest
import torch

from engine.data.loading import TokenizedPair
from engine.data.pair_extras import mismatched_pairs, score_columns
from engine.model.pair_logprobs import PairLogProbs
from engine.objective import kl_logratios


def pair(i: int, **scores) -> TokenizedPair:
    return TokenizedPair([1, i], [10 + i, 2], [20 + i, 21 + i, 2], f"row {i}", **scores)


def test_score_columns_in_dataset_order():
    pairs = [
        pair(0, score_chosen=8.0, score_rejected=2.5),
        pair(1, score_chosen=5.0, score_rejected=1.0),
    ]
    chosen, rejected = score_columns(pairs)
    assert chosen.tolist() == [8.0, 5.0] and rejected.tolist() == [2.5, 1.0]


def test_missing_scores_name_the_columns_and_the_row():
    pairs = [pair(0, score_chosen=8.0, score_rejected=2.5), pair(1)]
    with pytest.raises(ValueError, match="score_chosen and score_rejected") as info:
        score_columns(pairs)
    assert "row 1 has none" in str(info.value)


def test_mismatched_pairs_take_the_next_pairs_responses():
    pairs = [pair(0), pair(1), pair(2)]
    mixed = mismatched_pairs(pairs, max_length=100)
    assert [m.prompt_ids for m in mixed] == [p.prompt_ids for p in pairs]
    assert [m.chosen_ids for m in mixed] == [
        pairs[1].chosen_ids,
        pairs[2].chosen_ids,
        pairs[0].chosen_ids,
    ]
    assert mixed[2].rejected_ids == pairs[0].rejected_ids
    # responses are cut to fit max_length with the prompt (2 tokens here)
    short = mismatched_pairs(pairs, max_length=4)
    assert short[0].rejected_ids == pairs[1].rejected_ids[:2]
    with pytest.raises(ValueError, match="two pairs"):
        mismatched_pairs(pairs[:1], 10)


def test_kl_logratios_are_detached():
    ones = torch.ones(1, dtype=torch.long)
    policy = PairLogProbs(
        torch.tensor([-3.0], requires_grad=True), torch.tensor([-4.0]), ones, ones
    )
    reference = PairLogProbs(torch.tensor([-2.0]), torch.tensor([-5.0]), ones, ones)
    out = kl_logratios(policy, reference)
    assert out.tolist() == [-1.0, 1.0] and not out.requires_grad
