"""Micro-batch layouts beyond right padding: padding-free packing and prefix sharing.

The plain layout (:func:`engine.data.batching.collate_pairs`) gives each pair two right-padded rows,
prompt + chosen and prompt + rejected. Two exact alternatives cut the tokens the body runs on:

- **prefix sharing** (arXiv 2410.20305): one sequence ``[prompt | chosen | rejected]`` per pair. The
  rejected tokens attend to the prompt and to themselves, never to the chosen tokens, and their
  position ids restart where the prompt ends, so every response sees exactly the context it sees in
  the plain layout, while the prompt runs once (gradients from both responses flow into it).
- **padding-free packing**: all of a micro batch's sequences in one row, back to back, so no
  compute goes to padding; each token attends only within its own sequence.

Both describe attention as *blocks*: a run of query positions, the key spans it sees (concatenated
in order) and a causal rule aligned to the last key (query ``i`` of ``n_q`` sees the first
``n_k - n_q + i + 1`` keys). ``block_attention`` picks how the model honours them:

- ``segments``: one ``scaled_dot_product_attention`` call per block through an attention function
  registered with transformers (:func:`ensure_block_attention`); no (T, T) mask is materialized, so
  the cost is that of the sequences themselves. The fastest exact choice on CPU.
- ``mask``: a dense boolean (rows, 1, T, T) mask handed to the model's own attention (sdpa/eager).
  Simple, but a packed row of length L costs O(L^2) attention whatever the sequence lengths.
- ``position_ids``: transformers' own packed-sequence support (position ids restarting at 0 mark
  sequence starts; a dense block mask with sdpa, varlen kernels with flash-attention on GPU).
  Padding-free packing without prefix sharing only.

Every layout yields the same per-sequence log-probs and gradients as the plain one (to float
rounding; ``tests/engine/test_optimizations.py``). Scored tokens are listed explicitly
(``score_positions`` / ``score_targets`` / ``score_sequences``): sequence ``i < B`` is pair ``i``'s
chosen response, ``B + i`` its rejected one, as in the plain layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from engine.data.pair_batch import PairBatch

if TYPE_CHECKING:
    from engine.data.loading import TokenizedPair

BLOCK_ATTENTION = ("segments", "mask", "position_ids")

#: a block: (row, first query, end query, ((key start, key end), ...)), positions within the row
Block = tuple[int, int, int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class PairLayout:
    """How a micro batch of pairs is laid out for the forward pass (see the module docstring).

    Args:
        prefix_sharing: one ``[prompt | chosen | rejected]`` sequence per pair.
        padding_free: all sequences of the micro batch packed into one row.
        block_attention: ``segments`` | ``mask`` | ``position_ids``.
    """

    prefix_sharing: bool = False
    padding_free: bool = False
    block_attention: str = "segments"

    def __post_init__(self) -> None:
        if self.block_attention not in BLOCK_ATTENTION:
            raise ValueError(
                f"trainer.block_attention must be one of {', '.join(BLOCK_ATTENTION)}; "
                f"got {self.block_attention!r}"
            )
        if self.block_attention == "position_ids" and self.prefix_sharing:
            raise ValueError(
                "trainer.block_attention=position_ids cannot express prefix sharing (the rejected "
                "response must skip the chosen one); use segments or mask"
            )

    @property
    def plain(self) -> bool:
        """True for the plain right-padded two-rows-per-pair layout."""
        return not (self.prefix_sharing or self.padding_free)

    @classmethod
    def from_config(cls, trainer: Any) -> PairLayout:
        """The layout selected by ``trainer.prefix_sharing`` / ``padding_free`` /
        ``block_attention`` (``conf/trainer/default.yaml`` holds their defaults)."""
        return cls(
            prefix_sharing=bool(trainer.prefix_sharing),
            padding_free=bool(trainer.padding_free),
            block_attention=str(trainer.block_attention),
        )


def pair_length(pair: TokenizedPair, layout: PairLayout) -> int:
    """Tokens a pair costs in ``layout``'s rows: what length grouping sorts by."""
    prompt, chosen, rejected = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    if layout.prefix_sharing:
        return prompt + chosen + rejected
    if layout.padding_free:
        return 2 * prompt + chosen + rejected
    return prompt + max(chosen, rejected)  # the width of its widest padded row


@dataclass
class _Unit:
    """One packed unit: tokens, position ids, attention blocks and scored tokens, all relative
    to the unit's start."""

    tokens: list[int]
    positions: list[int]
    blocks: list[tuple[int, int, tuple[tuple[int, int], ...]]]
    scored: list[tuple[int, int, int]]  # (position whose hidden state predicts, target, sequence)


def _scored(
    prompt_len: int, response: Sequence[int], first_source: int, rest_start: int, sequence: int
) -> list[tuple[int, int, int]]:
    """Scored tokens of one response: its token k is predicted by the hidden state before it,
    ``first_source`` for k = 0 and ``rest_start + k - 1`` after. As in the plain layout, a token at
    sequence index 0 (an empty prompt) has no predictor and is not scored."""
    out = []
    for k, token in enumerate(response):
        if prompt_len + k == 0:
            continue
        out.append((first_source if k == 0 else rest_start + k - 1, token, sequence))
    return out


def _units(pairs: Sequence[TokenizedPair], layout: PairLayout) -> list[_Unit]:
    num = len(pairs)
    units = []
    if layout.prefix_sharing:
        for i, pair in enumerate(pairs):
            prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
            p, c, r = len(prompt), len(chosen), len(rejected)
            units.append(
                _Unit(
                    tokens=[*prompt, *chosen, *rejected],
                    positions=[*range(p + c), *range(p, p + r)],
                    blocks=[
                        (0, p + c, ((0, p + c),)),
                        (p + c, p + c + r, ((0, p), (p + c, p + c + r))),
                    ],
                    scored=_scored(p, chosen, p - 1, p, i)
                    + _scored(p, rejected, p - 1, p + c, num + i),
                )
            )
        return units
    for sequence, (pair, response) in enumerate(
        [(pair, pair.chosen_ids) for pair in pairs] + [(pair, pair.rejected_ids) for pair in pairs]
    ):
        p, n = len(pair.prompt_ids), len(pair.prompt_ids) + len(response)
        units.append(
            _Unit(
                tokens=[*pair.prompt_ids, *response],
                positions=list(range(n)),
                blocks=[(0, n, ((0, n),))],
                scored=_scored(p, response, p - 1, p, sequence),
            )
        )
    return units


def collate_layout(
    pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int, layout: PairLayout
) -> PairBatch:
    """A :class:`~engine.data.pair_batch.PairBatch` of ``pairs`` in ``layout`` (any but plain)."""
    units = _units(pairs, layout)
    if layout.padding_free:
        rows = [units]
        width = sum(len(u.tokens) for u in units)
    else:
        rows = [[u] for u in units]
        width = max(len(u.tokens) for u in units)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    filled = torch.zeros((len(rows), width), dtype=torch.bool)
    blocks: list[Block] = []
    scored: list[tuple[int, int, int]] = []
    for r, row in enumerate(rows):
        offset = 0
        for unit in row:
            n = len(unit.tokens)
            input_ids[r, offset : offset + n] = torch.tensor(unit.tokens, dtype=torch.long)
            position_ids[r, offset : offset + n] = torch.tensor(unit.positions, dtype=torch.long)
            filled[r, offset : offset + n] = True
            for q0, q1, spans in unit.blocks:
                if q1 == q0:  # an empty response: nothing attends
                    continue
                shifted = tuple((s + offset, e + offset) for s, e in spans)
                blocks.append((r, q0 + offset, q1 + offset, shifted))
            scored.extend((r * width + offset + pos, t, s) for pos, t, s in unit.scored)
            offset += n
    score = torch.tensor(scored, dtype=torch.long).reshape(-1, 3)
    attention_mask: torch.Tensor | None
    attention_blocks: tuple[Block, ...] | None = None
    if layout.block_attention == "segments":
        # all ones: transformers then builds no mask of its own; the blocks say everything
        attention_mask = torch.ones((len(rows), width), dtype=torch.long)
        attention_blocks = tuple(blocks)
    elif layout.block_attention == "mask":
        attention_mask = block_mask(blocks, len(rows), width, filled)
    else:  # position_ids: transformers reads sequence starts from position ids restarting at 0
        attention_mask = None
    return PairBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=None,
        indices=torch.tensor(list(indices), dtype=torch.long),
        position_ids=position_ids,
        score_positions=score[:, 0].contiguous(),
        score_targets=score[:, 1].contiguous(),
        score_sequences=score[:, 2].contiguous(),
        attention_blocks=attention_blocks,
    )


def _block_pattern(n_queries: int, n_keys: int) -> torch.Tensor:
    """(n_queries, n_keys) bool: query i sees the first n_keys - n_queries + i + 1 keys."""
    return torch.ones((n_queries, n_keys), dtype=torch.bool).tril(diagonal=n_keys - n_queries)


def block_mask(
    blocks: Sequence[Block], rows: int, width: int, filled: torch.Tensor
) -> torch.Tensor:
    """The dense boolean (rows, 1, width, width) mask of ``blocks`` (True: may attend). Padding
    queries attend to themselves only, so no softmax row is empty (an empty one is NaN, and NaN
    times a zero gradient is still NaN in the weight gradients)."""
    mask = torch.zeros((rows, 1, width, width), dtype=torch.bool)
    for r, q0, q1, spans in blocks:
        keys = torch.cat([torch.arange(s, e) for s, e in spans])
        mask[r, 0, q0:q1, keys] = _block_pattern(q1 - q0, len(keys))
    padding = (~filled).nonzero()
    mask[padding[:, 0], 0, padding[:, 1], padding[:, 1]] = True
    return mask


# ---- the attention function for block_attention=segments ----------------------------------------

_SEGMENTS = "engine_segments"


def _segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    dropout: float,
    blocks: Sequence[Block],
) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    rows, _, width, _ = query.shape
    by_row: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    covered = [0] * rows
    for r, q0, q1, spans in blocks:
        if q0 != covered[r]:
            raise ValueError(f"attention blocks must tile each row in order (row {r} at {q0})")
        q = query[r : r + 1, :, q0:q1]
        if len(spans) == 1 and spans[0] == (q0, q1):  # one causal sequence: the fast kernel
            out = F.scaled_dot_product_attention(
                q,
                key[r : r + 1, :, q0:q1],
                value[r : r + 1, :, q0:q1],
                is_causal=True,
                dropout_p=dropout,
                scale=scaling,
            )
        else:
            k = torch.cat([key[r : r + 1, :, s:e] for s, e in spans], dim=2)
            v = torch.cat([value[r : r + 1, :, s:e] for s, e in spans], dim=2)
            pattern = _block_pattern(q1 - q0, k.shape[2]).to(q.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=pattern, dropout_p=dropout, scale=scaling
            )
        by_row[r].append(out)
        covered[r] = q1
    pieces = []
    for r in range(rows):
        if covered[r] < width:  # padding: zeros (never scored, never attended to)
            by_row[r].append(
                query.new_zeros((1, query.shape[1], width - covered[r], value.shape[3]))
            )
        pieces.append(torch.cat(by_row[r], dim=2))
    return torch.cat(pieces, dim=0).transpose(1, 2).contiguous()  # (rows, width, heads, head_dim)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa, except for calls that pass ``attention_blocks``: those attend block by block."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = kwargs.pop("attention_blocks", None)
    if blocks is None:  # any other call (generation, plain batches): transformers' sdpa unchanged
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return _segment_attention(module, query, key, value, scaling, dropout, blocks), None


def ensure_block_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` (a transformers model using sdpa attention) to the engine's segments
    attention: calls that pass ``attention_blocks`` attend block by block, every other call runs
    transformers' sdpa unchanged. Idempotent; saved configs are unaffected (transformers does not
    serialize the attention implementation)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    current = model.config._attn_implementation
    if current == _SEGMENTS:
        return
    if current != "sdpa":
        raise ValueError(
            f"trainer.block_attention=segments needs sdpa attention, not {current!r}; use "
            "trainer.block_attention=position_ids (flash-attention) or mask (eager)"
        )
    if _SEGMENTS not in AttentionInterface._global_mapping:
        AttentionInterface.register(_SEGMENTS, _attention)
        AttentionMaskInterface.register(_SEGMENTS, sdpa_mask)
    model.set_attn_implementation(_SEGMENTS)
