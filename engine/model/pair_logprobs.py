"""Scoring pairs with a model: the per-pair sequence log-probs that references and evaluation use.

Every rank scores its own share of the pairs (``shard_evenly``: equal counts, so collectives such as
ZeRO-3's per-layer gathers line up) and the shares are gathered, so every rank ends with the full
(N,) tensors in dataset order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from engine.data.batching import PairBatch, collate_pairs, shard_evenly
from engine.data.loading import TokenizedPair
from engine.runtime import distributed as dist_utils


@dataclass(frozen=True)
class PairLogProbs:
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
    # per-response extras (engine.model.logprobs.SequenceLogProbs(tails=..., weighting=...)), or
    # None: LD-DPO's log-probs past the pair's shorter response, and WPO's mean log p - log sum p^2
    chosen_tail_logps: torch.Tensor | None = None
    rejected_tail_logps: torch.Tensor | None = None
    chosen_weighting_logps: torch.Tensor | None = None
    rejected_weighting_logps: torch.Tensor | None = None

    def index(self, indices: torch.Tensor) -> PairLogProbs:
        """The scores of the pairs at ``indices``."""
        return PairLogProbs(
            *(
                None if value is None else value[indices]
                for value in (getattr(self, f.name) for f in fields(self))
            )
        )

    @classmethod
    def split(
        cls,
        logps: torch.Tensor,
        counts: torch.Tensor,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> PairLogProbs:
        """The scores of a forward pass over a :class:`PairBatch` of B pairs: its 2B sequence
        log-probs and counts, chosen first, and any per-sequence ``extras`` of the scorer
        (``"tail_logps"``, ``"weighting_logps"``)."""
        n = logps.shape[0] // 2
        halves = {}
        for key, values in (extras or {}).items():
            name = key.removesuffix("_logps")
            halves[f"chosen_{name}_logps"] = values[:n]
            halves[f"rejected_{name}_logps"] = values[n:]
        return cls(logps[:n], logps[n:], counts[:n], counts[n:], **halves)

    @classmethod
    def zeros(cls, num_pairs: int) -> PairLogProbs:
        """Zero log-probs with counts of 1: the reference of a reference-free objective."""
        zeros = torch.zeros(num_pairs)
        ones = torch.ones(num_pairs, dtype=torch.long)
        return cls(zeros, zeros.clone(), ones, ones.clone())


#: ``batch -> (logps, counts)`` of its 2B sequences, or ``(logps, counts, extras)`` when the scorer
#: also returns per-sequence extras (a dict, see :meth:`PairLogProbs.split`)
ForwardFn = Callable[[PairBatch], tuple]

#: the per-sequence extras a scorer may return, in the column order logprobs_of_pairs stores them
EXTRAS = ("tail_logps", "weighting_logps")


@torch.no_grad()
def logprobs_of_pairs(
    forward: ForwardFn,
    pairs: Sequence[TokenizedPair],
    batch_size: int,
    pad_id: int,
    device: torch.device | str,
) -> PairLogProbs:
    """Score every pair with ``forward`` (a batch -> (logps, counts) of its 2B rows).

    Every rank must call this with the same ``pairs``; every rank gets the full result.
    """
    own = shard_evenly(len(pairs), dist_utils.rank(), dist_utils.world_size())
    # columns: chosen / rejected log-probs, counts, then each extra's chosen / rejected values
    width = 4 + 2 * len(EXTRAS)
    rows = torch.full((len(own), width), float("nan"), dtype=torch.float64)
    for start in range(0, len(own), batch_size):
        indices = own[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in indices], indices, pad_id).to(device)
        logps, counts, *rest = forward(batch)
        n = len(indices)
        columns = [logps, counts]
        extras = rest[0] if rest else {}
        columns += [extras.get(key, torch.full_like(logps, float("nan"))) for key in EXTRAS]
        for k, values in enumerate(columns):
            rows[start : start + n, 2 * k] = values[:n].double().cpu()
            rows[start : start + n, 2 * k + 1] = values[n:].double().cpu()
    index = torch.tensor(own, dtype=torch.float64).unsqueeze(1)
    gathered = dist_utils.all_gather_tensor(torch.cat([index, rows], dim=1).to(device)).cpu()
    full = torch.zeros((len(pairs), width), dtype=torch.float64)
    full[gathered[:, 0].long()] = gathered[:, 1:]  # padding repeats write identical values
    found = {}
    for k, key in enumerate(EXTRAS):
        chosen, rejected = full[:, 4 + 2 * k], full[:, 5 + 2 * k]
        if not torch.isnan(chosen).any():  # the scorer returned this extra
            name = key.removesuffix("_logps")
            found[f"chosen_{name}_logps"] = chosen.float()
            found[f"rejected_{name}_logps"] = rejected.float()
    return PairLogProbs(
        full[:, 0].float(), full[:, 1].float(), full[:, 2].long(), full[:, 3].long(), **found
    )
