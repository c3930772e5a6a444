"""The per-response extras of engine.model.logprobs.SequenceLogProbs against the plain
full-vocabulary computation: WPO's mean of log p - log sum_v p(v)^2, and LD-DPO's tail past the
pair's shorter response, in every batch layout, chunked and naive.

Hand-worked tail: chosen of 4 response tokens with log-probs (a, b, c, d), rejected of 2: the
shared length is 2, so the chosen tail is c + d and the rejected tail is 0.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from engine.data.batching import collate_pairs
from engine.data.loading import TokenizedPair
from engine.data.packing import PairLayout
from engine.model.logprobs import SequenceLogProbs, tail_logps

LAYOUTS = [None] + [
    PairLayout(prefix_sharing=sharing, padding_free=free, block_attention="mask")
    for sharing, free in itertools.product((False, True), (False, True))
    if sharing or free
]


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).float().eval()


def make_pairs() -> list[TokenizedPair]:
    rng = random.Random(1)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, 40) for _ in range(rng.randint(low, high))]

    pairs = [TokenizedPair(ids(1, 6), ids(1, 7), ids(1, 7), f"row {i}") for i in range(4)]
    pairs[0] = TokenizedPair([5], [7, 8, 9, 10], [8, 9], "chosen longer")
    return pairs


def expected(model, pairs):
    """Per sequence (chosen 0..B-1, rejected B..2B-1): sums, WPO terms, tails, by hand."""
    batch = collate_pairs(pairs, list(range(len(pairs))), 0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token = log_probs.gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    log_sum_sq = torch.logsumexp(2 * log_probs, dim=-1)
    scored = batch.response_mask[:, 1:].bool()
    sums, weighting, tails = [], [], []
    lengths = scored.sum(1)
    half = len(pairs)
    for row in range(2 * half):
        values = token[row][scored[row]]
        shared = min(lengths[row % half], lengths[row % half + half])
        sums.append(values.sum())
        weighting.append((values - log_sum_sq[row][scored[row]]).mean())
        tails.append(values[shared:].sum())
    return torch.stack(sums), torch.stack(weighting), torch.stack(tails)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "naive"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "plain" if l is None else repr(l))
def test_extras_match_the_full_softmax(model, chunked, layout):
    pairs = make_pairs()
    want_sums, want_weighting, want_tails = expected(model, pairs)
    scorer = SequenceLogProbs(model, chunk_size=3, chunked=chunked, weighting=True, tails=True)
    batch = collate_pairs(pairs, list(range(len(pairs))), 0, layout)
    sums, counts, extras = scorer(**batch.model_inputs())
    torch.testing.assert_close(sums, want_sums, rtol=0, atol=1e-5)
    torch.testing.assert_close(extras["weighting_logps"], want_weighting, rtol=0, atol=1e-5)
    torch.testing.assert_close(extras["tail_logps"], want_tails, rtol=0, atol=1e-5)
    assert not extras["weighting_logps"].requires_grad
    # the hand-worked pair: chosen 4 tokens vs rejected 2, so the rejected has no tail
    assert (counts[0].item(), counts[len(pairs)].item()) == (4, 2)
    assert extras["tail_logps"][len(pairs)].item() == 0.0
    assert extras["tail_logps"][0].item() != 0.0


def test_tails_carry_gradient_and_extras_are_opt_in(model):
    pairs = make_pairs()
    batch = collate_pairs(pairs, list(range(len(pairs))), 0)
    assert len(SequenceLogProbs(model)(**batch.model_inputs())) == 2  # unchanged by default
    scorer = SequenceLogProbs(model, tails=True)
    _, _, extras = scorer(**batch.model_inputs())
    assert set(extras) == {"tail_logps"}
    extras["tail_logps"].sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad()


def test_tail_logps_by_hand():
    # sequences: 0 chosen (4 tokens), 1 chosen (1 token), 2 rejected (2), 3 rejected (3)
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0])
    sequences = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3, 3])
    positions = torch.tensor([0, 1, 2, 3, 9, 4, 5, 6, 7, 8])
    counts = torch.tensor([4, 1, 2, 3])
    tails = tail_logps(logps, sequences, positions, counts)
    # pair 0 shares 2 tokens: chosen tail -3 - 4; pair 1 shares 1: rejected tail -9 - 10
    assert tails.tolist() == [-7.0, 0.0, 0.0, -19.0]
    # the order of the tokens does not matter, only their positions
    perm = torch.tensor([9, 3, 0, 5, 7, 1, 8, 2, 6, 4])
    assert tail_logps(logps[perm], sequences[perm], positions[perm], counts).tolist() == [
        -7.0, 0.0, 0.0, -19.0,
    ]  # fmt: skip
