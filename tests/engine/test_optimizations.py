"""The speed switches leave training values unchanged.

Every layout of :mod:`engine.data.packing` (prefix sharing, padding-free packing, each way of doing
block attention) and every LM-head path of :mod:`engine.model.logprobs` must give the per-sequence
log-probs, the DPO losses and the parameter gradients of the plain path: two right-padded rows
per pair through the full model, a full-vocabulary float32 log-softmax. Checked on the tiny Llama
of ``engine.model.loading.tiny_llama_config`` in float32, to ~1e-5. Length grouping changes only the
order: it is checked for determinism, resumability, world-size invariance and coverage.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from engine.data.batching import PairBatch, StepSampler, collate_pairs, step_sampler
from engine.data.loading import TokenizedPair
from engine.data.packing import PairLayout, block_mask, ensure_block_attention, pair_length
from engine.model.loading import tiny_llama_config
from engine.model.logprobs import SequenceLogProbs, reference_token_logps, token_logps
from losses import preference_loss

ATOL = 2e-5
LAYOUTS = [
    PairLayout(prefix_sharing=sharing, padding_free=free, block_attention=attention)
    for sharing, free, attention in itertools.product(
        (False, True), (False, True), ("segments", "mask", "position_ids")
    )
    if not (attention == "position_ids" and (sharing or not free))
    and (sharing or free or attention == "segments")
]


def _layout_id(layout: PairLayout | None) -> str:
    if layout is None or layout.plain:
        return "plain"
    parts = [
        name
        for name, on in (("prefix", layout.prefix_sharing), ("packed", layout.padding_free))
        if on
    ]
    return "+".join([*parts, layout.block_attention])


class _Tokenizer:
    """What tiny_llama_config reads from a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 61


def tiny_model(attention: str = "sdpa", seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,  # grouped-query attention: the segments path repeats k / v itself
        "max_position_embeddings": 128,
    }
    torch.manual_seed(seed)
    config = tiny_llama_config(_Tokenizer(), tiny)
    config.use_cache = False
    model = LlamaForCausalLM(config).float()
    model.set_attn_implementation(attention)
    return model


def make_pairs(count: int, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of varied lengths, with the edge cases: one-token prompts and responses, a
    response that is a prefix of the other, identical first response tokens."""
    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, 61) for _ in range(rng.randint(low, high))]

    pairs = [TokenizedPair(ids(1, 12), ids(1, 9), ids(1, 9), f"row {i}") for i in range(count)]
    pairs[0] = TokenizedPair([5], [7], [8, 9, 10], "one-token prompt")
    if count > 1:
        pairs[1] = TokenizedPair(ids(3, 6), [11, 12, 13, 14], [11, 12], "prefix responses")
    return pairs


def scores_and_grads(
    model: nn.Module,
    pairs: list[TokenizedPair],
    layout: PairLayout | None,
    module: SequenceLogProbs | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logps, counts, DPO losses, flat parameter gradient of their mean) for one batch."""
    module = module or SequenceLogProbs(model, chunk_size=5)
    model.zero_grad(set_to_none=True)
    batch = collate_pairs(pairs, list(range(len(pairs))), 0, layout)
    logps, counts = module(**batch.model_inputs())
    n = len(pairs)
    generator = torch.Generator().manual_seed(1)
    reference = logps.detach() + torch.randn(2 * n, generator=generator)
    out = preference_loss(logps[:n], logps[n:], reference[:n], reference[n:], beta=0.5)
    out.losses.mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return logps.detach(), counts, out.losses.detach(), grads


@pytest.fixture(scope="module")
def plain() -> tuple:
    model = tiny_model()
    pairs = make_pairs(5)
    return model, pairs, scores_and_grads(model, pairs, None)


# ---- layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_every_layout_matches_the_plain_path(plain, layout):
    model, pairs, (want_logps, want_counts, want_losses, want_grads) = plain
    model.set_attn_implementation("sdpa")
    logps, counts, losses, grads = scores_and_grads(model, pairs, layout)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(logps, want_logps, rtol=0, atol=ATOL)
    torch.testing.assert_close(losses, want_losses, rtol=0, atol=ATOL)
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=ATOL)


def test_the_plain_path_is_the_full_log_softmax(plain):
    """The reference everything is compared with: the model's own logits, full log-softmax."""
    model, pairs, (want_logps, want_counts, _, _) = plain
    batch = collate_pairs(pairs, list(range(len(pairs))), 0)
    with torch.no_grad():
        per_token = reference_token_logps(model, batch.input_ids, batch.attention_mask)
    scored = batch.response_mask[:, 1:].float()
    torch.testing.assert_close((per_token * scored).sum(1), want_logps, rtol=0, atol=ATOL)
    assert torch.equal(scored.sum(1).long(), want_counts)


def test_prefix_sharing_row_layout():
    """[prompt | chosen | rejected], positions restart after the prompt, rejected skips chosen."""
    pair = TokenizedPair([5, 6], [7, 8], [9], "x")
    batch = collate_pairs([pair], [0], 0, PairLayout(prefix_sharing=True, block_attention="mask"))
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the rejected token sees the prompt and itself, not the chosen tokens
    ]
    # chosen 7 <- position 1, 8 <- 2; rejected 9 <- position 1 (the prompt's last token)
    assert batch.score_positions.tolist() == [1, 2, 1]
    assert batch.score_targets.tolist() == [7, 8, 9]
    assert batch.score_sequences.tolist() == [0, 0, 1]


def test_padding_free_packs_one_row_without_padding():
    pairs = make_pairs(3)
    batch = collate_pairs(pairs, [0, 1, 2], 0, PairLayout(padding_free=True))
    assert batch.input_ids.shape == (
        1,
        sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
    )
    assert batch.attention_mask.bool().all()  # the blocks carry the structure


def test_block_mask_gives_padding_queries_themselves():
    """No all-False softmax row: it would be NaN, and NaN * 0 poisons weight gradients."""
    filled = torch.tensor([[True, True, False]])
    mask = block_mask([(0, 0, 2, ((0, 2),))], 1, 3, filled)
    assert mask[0, 0].any(dim=-1).all()


def test_segments_attention_leaves_other_calls_unchanged():
    """After the switch, calls without blocks (eval, generation, plain batches) run sdpa."""
    model = tiny_model()
    ids = torch.randint(3, 61, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        ensure_block_attention(model)
        ensure_block_attention(model)  # idempotent
        after = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert model.config._attn_implementation == "engine_segments"
    assert torch.equal(before, after)
    assert generated.shape == (1, 7)


def test_segments_needs_sdpa_and_mask_works_with_eager():
    pairs = make_pairs(3)
    eager = tiny_model("eager")
    with pytest.raises(ValueError, match="sdpa"):
        scores_and_grads(eager, pairs, PairLayout(padding_free=True))
    want = scores_and_grads(eager, pairs, None)
    got = scores_and_grads(eager, pairs, PairLayout(True, True, "mask"))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=ATOL)


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="block_attention must be one of"):
        PairLayout(padding_free=True, block_attention="flash")
    with pytest.raises(ValueError, match="prefix sharing"):
        PairLayout(prefix_sharing=True, padding_free=True, block_attention="position_ids")


def test_batch_to_and_model_inputs_keep_every_field():
    batch = collate_pairs(make_pairs(2), [3, 4], 0, PairLayout(True, True))
    moved = batch.to("cpu")
    assert isinstance(moved, PairBatch) and moved.attention_blocks == batch.attention_blocks
    inputs = moved.model_inputs()
    assert inputs["num_sequences"] == 4 and inputs["response_mask"] is None
    plain_inputs = collate_pairs(make_pairs(2), [3, 4], 0).model_inputs()
    assert set(plain_inputs) == {"input_ids", "attention_mask", "response_mask"}


# ---- the LM head ---------------------------------------------------------------------------------


def _naive_token_logps(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor
) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), -1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize(
    ("chunk", "keep_mb"),
    [(4, 0.0), (4, 1e-3), (7, 100.0), (64, 100.0)],
    ids=["recompute", "keep-some", "keep-all", "one-chunk"],
)
def test_chunked_head_matches_the_full_log_softmax(chunk, keep_mb, bias):
    """keep-some: the budget holds one 4 x 61 float32 chunk (~1 KB), not all of them."""
    torch.manual_seed(0)
    head = nn.Linear(16, 61, bias=bias)
    hidden = torch.randn(19, 16, requires_grad=True)
    targets = torch.randint(0, 61, (19,))
    weights = torch.randn(19)

    want = _naive_token_logps(hidden, head, targets)
    (want * weights).sum().backward()
    want_grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()

    got = token_logps(hidden, head, targets, chunk, keep_mb)
    (got * weights).sum().backward()
    got_grads = [hidden.grad] + [p.grad for p in head.parameters()]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_head_in_bfloat16_matches_autograd():
    """bf16 weights: float32 log-softmax, weight gradient accumulated in float32 over chunks."""
    torch.manual_seed(2)
    head = nn.Linear(16, 61, bias=False).to(torch.bfloat16)
    hidden = torch.randn(19, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 61, (19,))
    want = _naive_token_logps(hidden, head, targets)
    want.sum().backward()
    want_grads = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    got = token_logps(hidden, head, targets, 4, keep_mb=1e-3)
    got.sum().backward()
    assert got.dtype == torch.float32 and head.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(hidden.grad, want_grads[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(head.weight.grad, want_grads[1], rtol=2e-2, atol=2e-2)


def test_chunked_head_backward_twice_with_retain_graph():
    """Kept softmaxes are used up by the first backward; a second one recomputes them."""
    torch.manual_seed(1)
    head = nn.Linear(8, 13, bias=False)
    hidden = torch.randn(6, 8, requires_grad=True)
    targets = torch.randint(0, 13, (6,))
    out = token_logps(hidden, head, targets, 4, keep_mb=100.0).sum()
    out.backward(retain_graph=True)
    first = hidden.grad.clone()
    out.backward()
    torch.testing.assert_close(hidden.grad, 2 * first, rtol=1e-6, atol=1e-6)


def test_chunked_head_without_grad_and_empty():
    head = nn.Linear(8, 11, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    with torch.no_grad():
        got = token_logps(hidden, head, targets, 2, keep_mb=100.0)
    torch.testing.assert_close(got, _naive_token_logps(hidden, head, targets), rtol=0, atol=1e-5)
    assert token_logps(hidden[:0], head, targets[:0]).shape == (0,)


@pytest.mark.parametrize("keep_mb", [0.0, 512.0])
def test_naive_and_chunked_sequence_logprobs_agree(plain, keep_mb):
    model, pairs, (want_logps, _, want_losses, want_grads) = plain
    model.set_attn_implementation("sdpa")
    for module in (
        SequenceLogProbs(model, chunked=False),
        SequenceLogProbs(model, chunk_size=3, keep_mb=keep_mb),
    ):
        logps, _, losses, grads = scores_and_grads(model, pairs, PairLayout(True, True), module)
        torch.testing.assert_close(logps, want_logps, rtol=0, atol=ATOL)
        torch.testing.assert_close(losses, want_losses, rtol=0, atol=ATOL)
        torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=ATOL)


# ---- length grouping -----------------------------------------------------------------------------


def _epoch(sampler: StepSampler, epoch: int, world: int, micro_steps: int) -> list[list[int]]:
    """Global batches of an epoch: the union over micro steps and ranks of each step."""
    steps = range(epoch * sampler.steps_per_epoch, (epoch + 1) * sampler.steps_per_epoch)
    return [
        sorted(
            i for m in range(micro_steps) for r in range(world) for i in sampler.indices(s, m, r)
        )
        for s in steps
    ]


def test_length_grouping_sees_the_plain_pairs_each_epoch_in_global_batches_of_like_length():
    rng = random.Random(3)
    lengths = [rng.randint(1, 500) for _ in range(103)]
    plain_sampler = StepSampler(103, 4, 1, 1, seed=7)
    grouped = StepSampler(103, 4, 1, 1, seed=7, lengths=lengths, megabatch=5)
    for epoch in range(3):
        seen = sorted(i for batch in _epoch(grouped, epoch, 1, 1) for i in batch)
        assert seen == sorted(i for batch in _epoch(plain_sampler, epoch, 1, 1) for i in batch)

    def spread(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)

    assert spread(_epoch(grouped, 0, 1, 1)) < spread(_epoch(plain_sampler, 0, 1, 1)) / 2


def test_length_grouping_is_a_pure_function_of_the_step_and_the_same_across_world_sizes():
    rng = random.Random(4)
    lengths = [rng.randint(1, 300) for _ in range(64)]
    one = StepSampler(64, 8, 1, 1, seed=1, lengths=lengths, megabatch=3)
    two = StepSampler(64, 4, 1, 2, seed=1, lengths=lengths, megabatch=3)
    accum = StepSampler(64, 2, 2, 2, seed=1, lengths=lengths, megabatch=3)
    assert _epoch(one, 1, 1, 1) == _epoch(two, 1, 2, 1) == _epoch(accum, 1, 2, 2)
    fresh = StepSampler(64, 8, 1, 1, seed=1, lengths=lengths, megabatch=3)  # a resumed run
    assert [fresh.indices(s, 0, 0) for s in (13, 2, 9)] == [
        one.indices(s, 0, 0) for s in (13, 2, 9)
    ]


def test_without_grouping_the_order_is_the_seeded_permutation():
    sampler = StepSampler(10, 2, 1, 1, seed=5)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    assert [i for s in range(5, 10) for i in sampler.indices(s, 0, 0)] == perm


def test_step_sampler_reads_the_trainer_config(compose_config):
    pairs = make_pairs(12)
    plain = ("trainer.padding_free=false", "trainer.prefix_sharing=false")
    trainer = compose_config(
        [
            "trainer.micro_batch_size=2",
            "trainer.grad_accum=1",
            "trainer.length_grouping=true",
            *plain,
        ]
    ).trainer
    sampler = step_sampler(pairs, trainer, 1, seed=0)
    assert sampler.lengths.tolist() == [pair_length(p, PairLayout()) for p in pairs]
    trainer.length_grouping = False
    assert step_sampler(pairs, trainer, 1, seed=0).lengths is None


# ---- through engine.train -----------------------------------------------------------------------

OFF = (
    "trainer.prefix_sharing=false",
    "trainer.padding_free=false",
    "trainer.logit_keep_mb=0",
    "trainer.logit_chunk_size=1024",
)


@pytest.fixture
def paths_taken(monkeypatch) -> list[tuple[str, object]]:
    """Records, while training runs in this process, each training batch's layout and each
    chunked LM-head call's (chunk size, kept MiB)."""
    import engine.loop
    import engine.model.logprobs

    taken: list[tuple[str, object]] = []
    real_collate, real_token_logps = engine.loop.collate_pairs, engine.model.logprobs.token_logps

    def collate(pairs, indices, pad_id, layout=None):
        batch = real_collate(pairs, indices, pad_id, layout)
        packed = batch.response_mask is None and batch.attention_blocks is not None
        taken.append(("batch", ("packed", batch.input_ids.shape[0]) if packed else "plain"))
        return batch

    def token_logps(hidden, head, targets, chunk_size, keep_mb=0.0):
        taken.append(("head", (chunk_size, keep_mb)))
        return real_token_logps(hidden, head, targets, chunk_size, keep_mb)

    monkeypatch.setattr(engine.loop, "collate_pairs", collate)
    monkeypatch.setattr(engine.model.logprobs, "token_logps", token_logps)
    return taken


@pytest.mark.slow
def test_training_with_every_switch_on_matches_every_switch_off(
    tmp_path, train_run, metrics_rows, metrics_match, paths_taken
):
    options = ("trainer.tensorboard=false", "trainer.export=false")
    _, on = train_run(tmp_path / "on", *options, "trainer.block_attention=segments", steps=3)
    # the switches were on: each micro batch one packed, prefix-shared row; the kept-chunk head
    assert {value for kind, value in paths_taken if kind == "batch"} == {("packed", 1)}
    assert {value for kind, value in paths_taken if kind == "head"} == {(256, 512.0)}
    paths_taken.clear()
    _, off = train_run(tmp_path / "off", *options, *OFF, steps=3)
    assert {value for kind, value in paths_taken if kind == "batch"} == {"plain"}
    assert {value for kind, value in paths_taken if kind == "head"} == {(1024, 0.0)}
    rows_on, rows_off = metrics_rows(on), metrics_rows(off)
    metrics_match.rows(rows_on, rows_off, rtol=1e-4, atol=1e-5)
    # step 1: the policy is the reference, whatever the layout
    assert rows_on[0]["train/chosen_reward"] == pytest.approx(0.0, abs=1e-6)
    assert rows_on[0]["train/loss"] == pytest.approx(0.6931472, abs=1e-6)
