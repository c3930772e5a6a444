"""Per-pair inputs that some objectives need beyond the four log-probs, built from the data once.

- ODPO (``requirements.needs_scores``): each pair's ``score_chosen`` / ``score_rejected`` columns,
  as (N,) tensors in dataset order (:func:`score_columns`), checked before training starts.
- KTO (``requirements.needs_mismatched_pairs``): its reference point is the mean log-ratio of
  mismatched (prompt, response) pairs. TRL's KTOTrainer pairs each prompt with the completion of
  the previous example of its batch; with references computed once before training the partner
  must not depend on the batch, so pair i's prompt takes the responses of pair i + 1 (mod N) in
  dataset order (:func:`mismatched_pairs`). Their reference log-probs are scored with the other
  references; their policy log-probs once per step without gradient, as KTOTrainer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.data import SCORE_FIELDS, TokenizedPair


def score_columns(pairs: Sequence[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score_chosen, score_rejected)`` of every pair, (N,) float32, in dataset order.

    Raises:
        ValueError: naming the first pair without scores (and where it came from) and the columns
            the data needs.
    """
    for pair in pairs:
        if pair.score_chosen is None or pair.score_rejected is None:
            raise ValueError(
                f"this objective (ODPO's offsets) needs per-pair scores: every data row needs "
                f"the columns {' and '.join(SCORE_FIELDS)} (as UltraFeedback's rows have); "
                f"{pair.where} has none"
            )
    chosen = torch.tensor([pair.score_chosen for pair in pairs], dtype=torch.float32)
    rejected = torch.tensor([pair.score_rejected for pair in pairs], dtype=torch.float32)
    return chosen, rejected


def mismatched_pairs(pairs: Sequence[TokenizedPair], max_length: int) -> list[TokenizedPair]:
    """Pair i's prompt with pair (i + 1) mod N's responses, each response cut to fit
    ``max_length`` tokens with the prompt (at least one token is kept)."""
    if len(pairs) < 2:
        raise ValueError("KTO's reference point needs at least two pairs to mismatch")
    out = []
    for i, pair in enumerate(pairs):
        partner = pairs[(i + 1) % len(pairs)]
        room = max(1, max_length - len(pair.prompt_ids))
        out.append(
            TokenizedPair(
                pair.prompt_ids,
                partner.chosen_ids[:room],
                partner.rejected_ids[:room],
                f"{pair.where} (prompt) with the responses of {partner.where}",
            )
        )
    return out


def mismatched_logratios(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """KTO's ``kl_logratios`` from the (2B,) policy and reference log-probs of the mismatched
    sequences of a batch (both responses of each mismatched pair), detached."""
    return (policy_logps.detach().float() - reference_logps.float()).detach()


@dataclass(frozen=True)
class PairExtras:
    """The data-derived objective inputs of a run, (N,) in dataset order, indexed per batch.

    Attributes:
        train_scores: ``(score_chosen, score_rejected)`` of the train pairs, or None.
        eval_scores: the same for the eval pairs, or None.
    """

    train_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    eval_scores: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_objective(
        cls,
        requirements: Any,
        train_pairs: Sequence[TokenizedPair],
        eval_pairs: Sequence[TokenizedPair],
    ) -> PairExtras:
        """What ``requirements`` (a :class:`losses.Requirements`) ask of the data, checked now,
        before any model is loaded."""
        if requirements.needs_mismatched_pairs:
            raise ValueError(
                "this objective (KTO) needs the log-ratios of mismatched (prompt, response) "
                "pairs, which this engine does not score yet; use losses.preference_loss with "
                "kl_logratios in your own loop (engine/pair_extras.py: mismatched_pairs)"
            )
        if not requirements.needs_scores:
            return cls()
        return cls(score_columns(train_pairs), score_columns(eval_pairs) if eval_pairs else None)

    def train_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The score columns of the train pairs at ``indices`` (None when not needed)."""
        if self.train_scores is None:
            return None
        cpu = indices.cpu()
        return self.train_scores[0][cpu], self.train_scores[1][cpu]
