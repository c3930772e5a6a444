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
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.data.loading import SCORE_FIELDS, TokenizedPair


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


@dataclass(frozen=True)
class PairExtras:
    """The data-derived objective inputs of a run, (N,) in dataset order, indexed per batch.

    Attributes:
        train_scores: ``(score_chosen, score_rejected)`` of the train pairs, or None.
        eval_scores: the same for the eval pairs, or None.
        mismatched_train: KTO's mismatched pairs of the train pairs (:func:`mismatched_pairs`),
            or None. The reference scores them as pairs N .. 2N - 1 (:meth:`reference_data`).
        mismatched_eval: the same for the eval pairs, or None.
    """

    train_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    eval_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    mismatched_train: list[TokenizedPair] | None = None
    mismatched_eval: list[TokenizedPair] | None = None

    @classmethod
    def for_objective(
        cls,
        requirements: Any,
        train_pairs: Sequence[TokenizedPair],
        eval_pairs: Sequence[TokenizedPair],
        max_length: int,
    ) -> PairExtras:
        """What ``requirements`` (a :class:`losses.Requirements`) ask of the data, checked now,
        before any model is loaded."""
        found: dict[str, Any] = {}
        if requirements.needs_scores:
            found["train_scores"] = score_columns(train_pairs)
            found["eval_scores"] = score_columns(eval_pairs) if eval_pairs else None
        if requirements.needs_mismatched_pairs:
            found["mismatched_train"] = mismatched_pairs(train_pairs, max_length)
            if len(eval_pairs) > 1:
                found["mismatched_eval"] = mismatched_pairs(eval_pairs, max_length)
        return cls(**found)

    def reference_data(self, data: Any) -> Any:
        """``data`` (a :class:`engine.data.sources.PreparedData`) with the mismatched pairs appended
        to its train and eval pairs, for the reference to score them with the others."""
        if self.mismatched_train is None:
            return data
        return replace(
            data,
            train_pairs=[*data.train_pairs, *self.mismatched_train],
            eval_pairs=[*data.eval_pairs, *(self.mismatched_eval or [])],
        )

    def train_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The data's inputs for the train pairs at ``indices`` (ODPO's score columns)."""
        if self.train_scores is None:
            return {}
        cpu = indices.cpu()
        return {
            "score_chosen": self.train_scores[0][cpu],
            "score_rejected": self.train_scores[1][cpu],
        }

    def eval_inputs(self) -> dict[str, torch.Tensor]:
        """The data's inputs for every eval pair, in order."""
        if self.eval_scores is None:
            return {}
        return {"score_chosen": self.eval_scores[0], "score_rejected": self.eval_scores[1]}
