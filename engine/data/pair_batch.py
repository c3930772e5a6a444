"""The micro batch the policy scores: :class:`PairBatch`, one forward pass over B pairs.

Its own module because both layouts build it: the plain one (:mod:`engine.data.batching`) and the
packed ones (:mod:`engine.data.packing`), and :mod:`engine.data.batching` uses
:mod:`engine.data.packing`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class PairBatch:
    """A micro batch of B pairs as one forward pass whose output is 2B sequence log-probs:
    sequences 0..B-1 are the chosen responses, B..2B-1 the rejected ones.

    In the plain layout (:func:`engine.data.batching.collate_pairs` without a layout) the rows are
    those sequences, prompt + response, right-padded: (2B, T) tensors, ``response_mask`` marking
    the scored tokens.
    Other layouts (:mod:`engine.data.packing`: prefix sharing, padding-free packing) arrange the
    tokens differently and list the scored tokens explicitly in ``score_*`` instead.
    """

    input_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor | None  # (rows, T) padding mask, (rows, 1, T, T) bool, or None
    response_mask: torch.Tensor | None  # (rows, T), plain layout only
    indices: torch.Tensor  # (B,) pair indices into the dataset (for reference log-prob lookup)
    position_ids: torch.Tensor | None = None  # (rows, T); None: 0, 1, ... in every row
    score_positions: torch.Tensor | None = None  # (M,) flat index into rows * T: the predictor
    score_targets: torch.Tensor | None = None  # (M,) the token it predicts
    score_sequences: torch.Tensor | None = None  # (M,) which of the 2B sequences it belongs to
    attention_blocks: tuple | None = None  # engine.data.packing blocks (block_attention=segments)

    @property
    def num_pairs(self) -> int:
        """B, the number of pairs."""
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The same batch on ``device``."""
        return PairBatch(
            *(
                value.to(device) if isinstance(value, torch.Tensor) else value
                for value in (getattr(self, f.name) for f in fields(self))
            )
        )

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`engine.model.logprobs.SequenceLogProbs` for this batch."""
        inputs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "response_mask": self.response_mask,
        }
        if self.response_mask is None:
            inputs.update(
                position_ids=self.position_ids,
                score_positions=self.score_positions,
                score_targets=self.score_targets,
                score_sequences=self.score_sequences,
                num_sequences=2 * self.num_pairs,
            )
            if self.attention_blocks is not None:
                inputs["attention_blocks"] = self.attention_blocks
        return inputs
