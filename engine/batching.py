"""From tokenized pairs to tensors, and the deterministic, rank-sharded order they are seen in.

Order: each epoch is a permutation of the pairs drawn from ``seed + epoch``; a global batch of
``micro_batch_size * world_size * grad_accum`` pairs is cut from it in order, and within each
micro step rank r takes its own ``micro_batch_size`` slice. The position is a pure function of the
step, so a resumed run sees exactly the pairs an uninterrupted one would, and N processes see the
same global batches as one process with N times the micro batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.data import TokenizedPair


@dataclass(frozen=True)
class PairBatch:
    """A micro batch of B pairs as one concatenated forward: rows 0..B-1 are prompt + chosen,
    rows B..2B-1 are prompt + rejected. Tensors are (2B, T), right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    indices: torch.Tensor  # (B,) pair indices into the dataset (for reference log-prob lookup)

    @property
    def num_pairs(self) -> int:
        """B, the number of pairs."""
        return int(self.indices.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The same batch on ``device``."""
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            self.indices.to(device),
        )


def collate_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad prompt + response sequences; returns input_ids, attention_mask, response_mask."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    response_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt, n_total = len(prompt), len(prompt) + len(response)
        input_ids[row, :n_total] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :n_total] = 1
        response_mask[row, n_prompt:n_total] = 1
    return input_ids, attention_mask, response_mask


def collate_pairs(pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_id: int) -> PairBatch:
    """Stack pairs into one :class:`PairBatch` (chosen rows first, then rejected rows)."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    input_ids, attention_mask, response_mask = collate_sequences(prompts, responses, pad_id)
    return PairBatch(
        input_ids, attention_mask, response_mask, torch.tensor(list(indices), dtype=torch.long)
    )


class StepSampler:
    """Which pair indices each rank sees at each (step, micro step).

    Args:
        num_items: dataset size.
        micro_batch_size: pairs per rank per micro step.
        grad_accum: micro steps per optimizer step.
        world_size: number of ranks.
        seed: base seed of the per-epoch permutations.
    """

    def __init__(
        self, num_items: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int
    ) -> None:
        self.num_items = num_items
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.global_batch = micro_batch_size * grad_accum * world_size
        if num_items < self.global_batch:
            raise ValueError(
                f"the dataset has {num_items} pairs, fewer than one global batch of "
                f"{self.global_batch} (micro_batch_size {micro_batch_size} x grad_accum "
                f"{grad_accum} x world_size {world_size}); use smaller batches or more data"
            )
        self.steps_per_epoch = num_items // self.global_batch
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_items, generator=generator)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        """Pair indices for ``rank`` at optimizer step ``step`` (0-based), micro step
        ``micro_step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = (
            within * self.global_batch
            + micro_step * self.micro_batch_size * self.world_size
            + rank * self.micro_batch_size
        )
        return self._permutation(epoch)[start : start + self.micro_batch_size].tolist()


def shard_evenly(num_items: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank::world_size``, padded by repeating the last index so every rank holds the
    same count (collectives such as ZeRO-3's forward need every rank to run the same steps)."""
    own = list(range(rank, num_items, world_size))
    per_rank = -(-num_items // world_size)
    while len(own) < per_rank:
        own.append(own[-1] if own else 0)
    return own
