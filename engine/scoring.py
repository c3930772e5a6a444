"""Scoring pairs with a model: the per-pair sequence log-probs that references and evaluation use.

Every rank scores its own share of the pairs (``shard_evenly``: equal counts, so collectives such as
ZeRO-3's per-layer gathers line up) and the shares are gathered, so every rank ends with the full
(N,) tensors in dataset order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from engine import distributed as dist_utils
from engine.batching import PairBatch, collate_pairs, shard_evenly
from engine.data import TokenizedPair


@dataclass(frozen=True)
class PairScores:
    """Per-pair summed response log-probs and response token counts, (N,) each.

    The policy's scores of a micro batch (with gradients) and a reference's scores (detached)
    have this one shape; :func:`engine.objective.objective_output` turns two of them into the
    objective's inputs. A new per-response input (an optional field, None when absent) is indexed
    by :meth:`index` with the others.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor

    def index(self, indices: torch.Tensor) -> PairScores:
        """The scores of the pairs at ``indices``."""
        return PairScores(
            *(
                None if value is None else value[indices]
                for value in (getattr(self, f.name) for f in fields(self))
            )
        )

    @classmethod
    def split(cls, logps: torch.Tensor, counts: torch.Tensor) -> PairScores:
        """The scores of a forward pass over a :class:`PairBatch` of B pairs: its 2B sequence
        log-probs and counts, chosen first."""
        n = logps.shape[0] // 2
        return cls(logps[:n], logps[n:], counts[:n], counts[n:])

    @classmethod
    def zeros(cls, num_pairs: int) -> PairScores:
        """Zero log-probs with counts of 1: the reference of a reference-free objective."""
        zeros = torch.zeros(num_pairs)
        ones = torch.ones(num_pairs, dtype=torch.long)
        return cls(zeros, zeros.clone(), ones, ones.clone())


ForwardFn = Callable[[PairBatch], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def score_pairs(
    forward: ForwardFn,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
) -> PairScores:
    """Score every pair with ``forward`` (a batch -> (logps, counts) of its 2B rows).

    Every rank must call this with the same ``pairs``; every rank gets the full result.
    """
    own = shard_evenly(len(pairs), dist_utils.rank(), dist_utils.world_size())
    rows = torch.zeros((len(own), 4), dtype=torch.float64)
    for start in range(0, len(own), batch_size):
        indices = own[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in indices], indices, pad_id).to(device)
        logps, counts = forward(batch)
        n = len(indices)
        rows[start : start + n, 0] = logps[:n].double().cpu()
        rows[start : start + n, 1] = logps[n:].double().cpu()
        rows[start : start + n, 2] = counts[:n].double().cpu()
        rows[start : start + n, 3] = counts[n:].double().cpu()
    index = torch.tensor(own, dtype=torch.float64).unsqueeze(1)
    gathered = dist_utils.all_gather_tensor(torch.cat([index, rows], dim=1).to(device)).cpu()
    full = torch.zeros((len(pairs), 4), dtype=torch.float64)
    full[gathered[:, 0].long()] = gathered[:, 1:]  # padding repeats write identical values
    return PairScores(full[:, 0].float(), full[:, 1].float(), full[:, 2].long(), full[:, 3].long())
