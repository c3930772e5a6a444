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
