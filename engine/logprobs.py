"""Sequence log-probabilities of response tokens, without a (batch, length, vocab) log-softmax.

The policy is wrapped in :class:`SequenceLogProbs`, the module handed to DeepSpeed: its forward runs
the transformer body once over the whole (concatenated chosen + rejected) batch, keeps the hidden
states only at positions that predict a response token, and applies the LM head to those in chunks
of ``chunk_size`` tokens. Each chunk's logits are recomputed in the backward pass (activation
checkpointing) instead of stored, so peak memory holds one (chunk, vocab) float32 block rather than
(batch, length, vocab).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    # float32 for the log-softmax: bf16 logsumexp over 32k+ logits loses too much precision
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (M, H) under ``head``, computed ``chunk_size`` rows
    at a time; returns (M,) float32. Chunks are recomputed in backward when grads are needed."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, h, head, t, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, head, t))
    return torch.cat(pieces)


class SequenceLogProbs(nn.Module):
    """Wraps a causal LM so that ``forward`` returns per-sequence response log-probs.

    Args:
        model: a Hugging Face causal LM (``base_model`` + ``get_output_embeddings()``).
        chunk_size: tokens per LM-head chunk (memory vs. speed; 1024 is a good default).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of log p over response tokens, and their count, for each sequence.

        Args:
            input_ids: (N, T) token ids, right-padded.
            attention_mask: (N, T) 1 for real tokens.
            response_mask: (N, T) 1 where the token is a response token (scored).
            position_ids: (N, T) optional positions (for packed sequences).

        Returns:
            ``(logps, counts)``: (N,) float32 summed log-probs and (N,) response token counts.
        """
        body = self.model.base_model
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = body(**kwargs).last_hidden_state  # (N, T, H)
        # the hidden state at t predicts token t + 1: keep positions whose next token is scored
        scored = response_mask[:, 1:].bool()
        selected = hidden[:, :-1][scored]  # (M, H), M = scored tokens in the batch
        targets = input_ids[:, 1:][scored]
        logps = token_logps(selected, self.model.get_output_embeddings(), targets, self.chunk_size)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        row_of_token = rows.unsqueeze(1).expand_as(scored)[scored]
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        sums = sums.index_add(0, row_of_token, logps)
        return sums, scored.sum(dim=1)


def reference_token_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Plain full-vocabulary log-softmax log-probs (N, T-1) of each next token: the simple path
    that :class:`SequenceLogProbs` must agree with (used in tests and as a cross-check)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(
        -1
    )
