"""From tokenized pairs to tensors, and the deterministic, rank-sharded order they are seen in.

Order: each epoch is a permutation of the pairs drawn from ``seed + epoch``; a global batch of
``micro_batch_size * world_size * grad_accum`` pairs is cut from it in order, and within each
micro step rank r takes its own ``micro_batch_size`` slice. The position is a pure function of the
step, so a resumed run sees exactly the pairs an uninterrupted one would, and N processes see the
same global batches as one process with N times the micro batch. Length grouping
(``trainer.length_grouping``) reorders each epoch's permutation within mega-batches so that micro
batches hold pairs of similar length, keeping all of these properties (:class:`StepSampler`).

Layouts: :func:`collate_pairs` builds the plain layout itself (two right-padded rows per pair);
prefix sharing and padding-free packing are :mod:`engine.data.packing`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.data.packing import PairLayout, collate_layout, pair_length
from engine.data.pair_batch import PairBatch

if TYPE_CHECKING:
    from engine.data.loading import TokenizedPair

__all__ = [
    "PairBatch",
    "StepSampler",
    "collate_pairs",
    "collate_sequences",
    "shard_evenly",
    "step_sampler",
]


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


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    indices: Sequence[int],
    pad_id: int,
    layout: PairLayout | None = None,
) -> PairBatch:
    """Stack pairs into one :class:`PairBatch`: in the plain layout (``layout`` None or plain),
    chosen rows first, then rejected rows; else as :func:`engine.data.packing.collate_layout` lays
    them out."""
    if layout is not None and not layout.plain:
        return collate_layout(pairs, indices, pad_id, layout)
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
        lengths: per-pair lengths for length grouping (None: no grouping). Each epoch's
            permutation (its first ``steps_per_epoch`` global batches, the pairs the plain order
            uses) is cut into mega-batches of ``megabatch`` global batches; each mega-batch is
            sorted by length, longest first (ties keep the shuffled order), cut into global
            batches, and those are shuffled. Micro batches, consecutive slices of a global batch,
            then hold pairs of similar length (less padding), while each epoch still sees every
            pair of the plain order once. A pure function of (seed, epoch, global batch size):
            resumable, and the same global batches for any world size.
        megabatch: global batches per mega-batch (grouping is local to the shuffled order).
    """

    def __init__(
        self,
        num_items: int,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        megabatch: int = 64,
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
        if lengths is not None and len(lengths) != num_items:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_items} pairs")
        if megabatch < 1:
            raise ValueError(f"megabatch must be >= 1, got {megabatch}")
        self.lengths = None if lengths is None else torch.tensor(list(lengths), dtype=torch.long)
        self.megabatch = megabatch
        self.steps_per_epoch = num_items // self.global_batch
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_items, generator=generator)
            if self.lengths is not None:
                perm = self._group_by_length(perm, generator)
            self._perm = perm
            self._epoch = epoch
        return self._perm

    def _group_by_length(self, perm: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        used = perm[: self.steps_per_epoch * self.global_batch]
        span = self.megabatch * self.global_batch
        grouped = []
        for start in range(0, len(used), span):
            mega = used[start : start + span]
            order = torch.sort(self.lengths[mega], descending=True, stable=True).indices
            batches = mega[order].reshape(-1, self.global_batch)
            batches = batches[torch.randperm(batches.shape[0], generator=generator)]
            grouped.append(batches.reshape(-1))
        return torch.cat(grouped)

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


def step_sampler(
    pairs: Sequence[TokenizedPair], trainer: Any, world_size: int, seed: int
) -> StepSampler:
    """The training order ``trainer`` (the ``trainer`` config group) asks for: length-grouped by
    the pairs' lengths in the configured layout when ``trainer.length_grouping`` is set."""
    lengths = None
    if trainer.length_grouping:
        layout = PairLayout.from_config(trainer)
        lengths = [pair_length(pair, layout) for pair in pairs]
    return StepSampler(
        len(pairs),
        int(trainer.micro_batch_size),
        int(trainer.grad_accum),
        world_size,
        seed,
        lengths=lengths,
        megabatch=int(trainer.length_grouping_megabatch),
    )


def shard_evenly(num_items: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank::world_size``, padded by repeating the last index so every rank holds the
    same count (collectives such as ZeRO-3's forward need every rank to run the same steps)."""
    own = list(range(rank, num_items, world_size))
    per_rank = -(-num_items // world_size)
    while len(own) < per_rank:
        own.append(own[-1] if own else 0)
    return own
