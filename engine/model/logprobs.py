"""Sequence log-probabilities of response tokens, without a (batch, length, vocab) log-softmax.

The policy is wrapped in :class:`SequenceLogProbs`, the module handed to DeepSpeed: its forward runs
the transformer body once over the whole batch (any layout of :mod:`engine.data.packing`), keeps the
hidden states only at positions that predict a response token, and applies the LM head to those in
chunks of ``chunk_size`` tokens (:class:`ChunkedTokenLogProbs`): prompt and padding positions never
reach the head, and no (batch, length, vocab) tensor exists. Each chunk's softmax is kept for the
backward pass while it fits in ``keep_mb`` (saving a recomputation of the head's matmul), and
recomputed after that, so memory stays bounded whatever the batch.

Per-response extras, on request (``SequenceLogProbs(weighting=True, tails=True)``): WPO's term,
each response's mean over its tokens of ``log p(y_t) - log sum_v p(v)^2`` (the sum of squares is
one more reduction over each chunk's softmax, still no vocabulary-sized tensor kept), and
LD-DPO's tail, the summed log-probs of each response's tokens beyond the shorter response of its
pair.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


def _token_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    # float32 for the log-softmax: bf16 logsumexp over 32k+ logits loses too much precision
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p(v)^2 of each row of ``logits``: logsumexp(2 log_softmax)."""
    return torch.logsumexp(2.0 * torch.log_softmax(logits.float(), dim=-1), dim=-1)


class ChunkedTokenLogProbs(torch.autograd.Function):
    """log p(target) under ``hidden @ weight.T + bias``, ``chunk_size`` rows at a time.

    Forward, per chunk: the (chunk, vocab) float32 logits, their logsumexp, the target's logit;
    then the logits buffer is turned into the softmax in place and kept for backward while the
    kept chunks stay within ``keep_bytes`` (else only the logsumexp is kept and backward
    recomputes that chunk's logits). Backward, per chunk: d log p_t / d z = onehot(t) - softmax,
    formed in place in the same buffer, then two matmuls. Fewer passes over (chunk, vocab) than
    autograd through ``log_softmax`` + ``gather`` and, for kept chunks, one matmul less than
    activation checkpointing; the values are the same to float rounding.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        keep_bytes: int,
        with_sum_sq: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        logps = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        # WPO's log sum_v p(v)^2 per row (empty unless asked for; never differentiated)
        sum_sq_rows = rows if with_sum_sq else 0
        log_sum_sq = torch.empty(sum_sq_rows, dtype=torch.float32, device=hidden.device)
        kept: list[torch.Tensor | None] = []  # per chunk: its softmax, or None (recompute)
        budget = keep_bytes
        for start in range(0, rows, chunk_size):
            end = min(start + chunk_size, rows)
            logits = F.linear(hidden[start:end], weight, bias).float()  # (chunk, vocab)
            target = logits.gather(1, targets[start:end, None]).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: one (chunk, vocab) buffer in all
            total = probs.sum(dim=1, keepdim=True)
            logsumexp[start:end] = (peak + total.log()).squeeze(1)
            logps[start:end] = target - logsumexp[start:end]
            if with_sum_sq:  # sum p^2 = ||exp(z - peak)||^2 / total^2; the norm is >= 1
                norm = torch.linalg.vector_norm(probs, dim=1)
                log_sum_sq[start:end] = 2.0 * (norm.log() - total.squeeze(1).log())
            size = probs.numel() * probs.element_size()
            keep = budget >= size
            budget -= size if keep else 0
            kept.append(probs.div_(total) if keep else None)
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexp)
        ctx.kept = kept
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(log_sum_sq)
        return logps, log_sum_sq

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: torch.Tensor, _grad_sum_sq: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, targets, logsumexp = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        # kept softmaxes are consumed (turned into gradients in place): a second backward
        # (retain_graph=True) recomputes every chunk
        kept = ctx.kept or [None] * -(-hidden.shape[0] // chunk_size)
        ctx.kept = None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # the weight gradient sums over every chunk: accumulate in float32 whatever the dtype
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        for i, start in enumerate(range(0, hidden.shape[0], chunk_size)):
            end = min(start + chunk_size, hidden.shape[0])
            h, g = hidden[start:end], grad_logps[start:end].float()
            grad = kept[i]
            kept[i] = None  # free each kept chunk as soon as it is used
            if grad is None:  # recompute the softmax of this chunk
                grad = F.linear(h, weight, bias).float().sub_(logsumexp[start:end, None]).exp_()
            grad.mul_(-g[:, None])  # d/dz of g * (z_t - logsumexp(z)) = g * (onehot(t) - softmax)
            grad[torch.arange(end - start, device=grad.device), targets[start:end]] += g
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start:end])
            if grad_weight is not None and grad.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), h)
            elif grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    keep_mb: float = 0.0,
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` (M, H) under ``head``, computed ``chunk_size`` rows
    at a time; returns (M,) float32.

    With grads, up to ``keep_mb`` MiB of the chunks' float32 softmax is kept for backward and the
    rest recomputed there (:class:`ChunkedTokenLogProbs`). A head that is not a plain
    ``nn.Linear``, or whose weight ZeRO-3 partitions (it is gathered only inside the module's own
    forward), goes through the module under activation checkpointing instead.
    """
    return token_logps_and_sum_sq(hidden, head, targets, chunk_size, keep_mb)[0]


def token_logps_and_sum_sq(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    keep_mb: float = 0.0,
    with_sum_sq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logps`, and with ``with_sum_sq`` also each row's ``log sum_v p(v)^2``
    (detached, (M,) float32; WPO's normaliser), else an empty tensor in its place."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    if isinstance(head, nn.Linear) and getattr(head.weight, "ds_id", None) is None:
        grads = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
        keep_bytes = int(keep_mb * 2**20) if grads else 0
        return ChunkedTokenLogProbs.apply(
            hidden, head.weight, head.bias, targets, chunk_size, keep_bytes, with_sum_sq
        )
    pieces, sums_sq = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logps, h, head, t, use_reentrant=False))
        else:
            pieces.append(_token_logps(h, head, t))
        if with_sum_sq:
            with torch.no_grad():
                sums_sq.append(_log_sum_sq_probs(head(h)))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces), torch.cat(sums_sq) if with_sum_sq else empty


def tail_logps(
    logps: torch.Tensor,
    sequences: torch.Tensor,
    positions: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """LD-DPO's tails: per sequence, the sum of the log-probs of its scored tokens past the
    shorter response of its pair. Sequences ``i`` and ``i + S/2`` are a pair (chosen, rejected).

    Args:
        logps: (M,) per-token log-probs (differentiable).
        sequences: (M,) the sequence of each token.
        positions: (M,) a key that increases along each sequence (flat position in the batch).
        counts: (S,) scored tokens per sequence.

    Returns:
        (S,) tail sums (0 for the shorter response of each pair).
    """
    num = counts.shape[0]
    if num % 2:
        raise ValueError(f"tail_logps needs chosen/rejected pairs of sequences, got {num}")
    # each token's rank within its sequence: sort by (sequence, position), subtract the start
    order = torch.argsort(sequences * (positions.max() + 1 if len(positions) else 1) + positions)
    sorted_sequences = sequences[order]
    first = torch.searchsorted(sorted_sequences, sorted_sequences)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - first
    shared = torch.minimum(counts[: num // 2], counts[num // 2 :]).repeat(2)
    in_tail = rank >= shared[sequences]
    zeros = torch.zeros(num, dtype=logps.dtype, device=logps.device)
    return zeros.index_add(0, sequences, torch.where(in_tail, logps, torch.zeros_like(logps)))


class SequenceLogProbs(nn.Module):
    """Wraps a causal LM so that ``forward`` returns per-sequence response log-probs.

    Args:
        model: a Hugging Face causal LM (``base_model`` + ``get_output_embeddings()``).
        chunk_size: tokens per LM-head chunk.
        keep_mb: MiB of float32 softmax chunks kept from forward to backward (beyond it, chunks
            are recomputed; 0: always recompute, the least memory).
        chunked: True: the LM head and log-softmax run only at scored positions, in chunks
            (above). False: the naive path, a full (rows, T, vocab) float32 log-softmax over
            every position; kept to measure what the chunked head saves.
        weighting: also return each response's WPO term (``"weighting_logps"``, detached).
        tails: also return LD-DPO's ``"tail_logps"`` (sequences i and i + S/2 are a pair).

    ``forward`` returns ``(logps, counts)``, or ``(logps, counts, extras)`` with a dict of the
    requested per-sequence extras when ``weighting`` or ``tails`` is set.
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 1024,
        keep_mb: float = 0.0,
        chunked: bool = True,
        *,
        weighting: bool = False,
        tails: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.keep_mb = keep_mb
        self.chunked = chunked
        self.weighting = weighting
        self.tails = tails

    @classmethod
    def from_trainer(
        cls, model: nn.Module, trainer: Any, *, weighting: bool = False, tails: bool = False
    ) -> SequenceLogProbs:
        """The module configured by the ``trainer`` config group (``logit_chunk_size``,
        ``logit_keep_mb``, ``chunked_logprobs``): the one way the engine builds it, for the
        policy, a frozen reference and a policy with its adapters disabled alike.
        ``weighting`` / ``tails``: the objective's per-response extras (WPO's, LD-DPO's)."""
        return cls(
            model,
            chunk_size=int(trainer.logit_chunk_size),
            keep_mb=float(trainer.logit_keep_mb),
            chunked=bool(trainer.chunked_logprobs),
            weighting=weighting,
            tails=tails,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        response_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        score_positions: torch.Tensor | None = None,
        score_targets: torch.Tensor | None = None,
        score_sequences: torch.Tensor | None = None,
        num_sequences: int | None = None,
        attention_blocks: tuple | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Sum of log p over response tokens, and their count, for each sequence.

        The plain layout passes ``response_mask`` (one sequence per row); other layouts
        (:mod:`engine.data.packing`) pass the scored tokens explicitly instead.

        Args:
            input_ids: (N, T) token ids.
            attention_mask: (N, T) 1 for real tokens, a (N, 1, T, T) bool mask, or None.
            response_mask: (N, T) 1 where the token is a response token (scored); one sequence
                per row. None when the ``score_*`` arguments are given.
            position_ids: (N, T) optional positions (packed or prefix-shared sequences).
            score_positions: (M,) flat index into N * T of the hidden state predicting each
                scored token.
            score_targets: (M,) the scored tokens.
            score_sequences: (M,) the sequence (0 .. num_sequences - 1) each belongs to.
            num_sequences: S, the number of sequences.
            attention_blocks: :mod:`engine.data.packing` blocks for segment-wise attention.

        Returns:
            ``(logps, counts)``: (S,) float32 summed log-probs and (S,) response token counts,
            S = N in the plain layout; and the extras dict when ``weighting`` / ``tails`` is set:
            ``"weighting_logps"`` (S,) mean over the response of log p - log sum_v p(v)^2,
            ``"tail_logps"`` (S,) summed log-probs past the pair's shorter response.
        """
        hidden = self._hidden_states(input_ids, attention_mask, position_ids, attention_blocks)
        if response_mask is not None:  # plain layout: rows are sequences
            score_positions, score_targets, score_sequences = _plain_scored(
                input_ids, response_mask
            )
            num_sequences = input_ids.shape[0]
        if score_positions is None or score_targets is None or score_sequences is None:
            raise ValueError(
                "pass response_mask, or score_positions, score_targets, score_sequences"
            )
        if num_sequences is None:
            raise ValueError("num_sequences is required with score_positions")
        flat = hidden.reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        if self.chunked:
            selected = flat.index_select(0, score_positions)  # (M, H), M = scored tokens
            if self.weighting:
                logps, log_sum_sq = token_logps_and_sum_sq(
                    selected, head, score_targets, self.chunk_size, self.keep_mb, True
                )
            else:
                logps = token_logps(selected, head, score_targets, self.chunk_size, self.keep_mb)
        else:  # naive: materializes rows x T x vocab float32 log-probs
            all_logps = F.log_softmax(head(flat).float(), dim=-1)
            logps = all_logps[score_positions, score_targets]
            if self.weighting:
                log_sum_sq = torch.logsumexp(2.0 * all_logps[score_positions].detach(), dim=-1)
        sums = torch.zeros(num_sequences, dtype=torch.float32, device=input_ids.device)
        sums = sums.index_add(0, score_sequences, logps)
        counts = torch.bincount(score_sequences, minlength=num_sequences)
        if not (self.weighting or self.tails):
            return sums, counts
        extras: dict[str, torch.Tensor] = {}
        if self.weighting:  # WPO (arXiv 2406.11827, Eq. 2), no gradient
            aligned = (logps.detach() - log_sum_sq).to(sums.dtype)
            totals = torch.zeros_like(sums).index_add(0, score_sequences, aligned)
            extras["weighting_logps"] = totals / counts.clamp(min=1)
        if self.tails:
            extras["tail_logps"] = tail_logps(logps, score_sequences, score_positions, counts)
        return sums, counts, extras

    def _hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_blocks: tuple | None,
    ) -> torch.Tensor:
        """The body's last hidden states (N, T, H), attending as the layout says: segment-wise
        over ``attention_blocks``, or through ``attention_mask`` (a boolean 4-D mask made
        additive for eager attention)."""
        # no KV cache: training needs none, and with one transformers ignores packed position ids
        kwargs: dict = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if attention_blocks is not None:
            from engine.data.packing import ensure_block_attention

            ensure_block_attention(self.model)
            kwargs["attention_blocks"] = attention_blocks
        elif (
            attention_mask is not None
            and attention_mask.dim() == 4
            and attention_mask.dtype == torch.bool
            and self.model.config._attn_implementation == "eager"
        ):  # eager attention adds its mask: make it additive
            kwargs["attention_mask"] = torch.zeros(
                attention_mask.shape, dtype=self.model.dtype, device=attention_mask.device
            ).masked_fill(~attention_mask, torch.finfo(self.model.dtype).min)
        return self.model.base_model(**kwargs).last_hidden_state


def _plain_scored(
    input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain layout's scored tokens (one sequence per row): the flat index of the hidden
    state predicting each, the token, and its row."""
    # the hidden state at t predicts token t + 1: keep positions whose next token is scored
    scored = response_mask[:, 1:].bool()
    width = input_ids.shape[1]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    row_of_token = rows.unsqueeze(1).expand_as(scored)[scored]
    cols = torch.arange(width - 1, device=input_ids.device).expand_as(scored)[scored]
    return row_of_token * width + cols, input_ids[:, 1:][scored], row_of_token


def reference_token_logps(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Plain full-vocabulary log-softmax log-probs (N, T-1) of each next token: the simple path
    that :class:`SequenceLogProbs` must agree with (used in tests and as a cross-check)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(
        -1
    )
