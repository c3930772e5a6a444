"""A long scoring pass (the reference's scores of every pair) kept shard by shard, so that a run
stopped in the middle of it (:mod:`engine.runtime.preemption`) loses one shard, not the pass.

The pairs are cut into shards of ``shard_pairs`` pairs (independent of the number of ranks, so a
rerun on another world size finds the same shards). Each shard is scored by every rank together
(:func:`engine.model.pair_logprobs.logprobs_of_pairs`), then rank 0 writes it to
``<directory>/<name>-<index>.pt`` (atomically) and every rank passes a stop point. A rerun with
``resume`` skips the shards found there, provided they were made from the same pairs and scorer:
``<directory>/meta.json`` records a fingerprint (a digest of every pair's token ids plus the
caller's description of the scorer), and a different one is an error naming the directory.

Costs: one tiny all-gather and one all-reduce per shard, and a write of 12 float64 values per pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from array import array
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from engine.data.loading import TokenizedPair
from engine.model.pair_logprobs import ForwardFn, PairLogProbs, logprobs_of_pairs
from engine.runtime import distributed as dist_utils
from engine.runtime.fileio import atomic_open, atomic_write_json
from engine.runtime.preemption import stop_point

log = logging.getLogger(__name__)

META = "meta.json"


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """A sha256 of every pair's token ids (prompt, chosen, rejected) in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(array("q", ids).tobytes())
    return digest.hexdigest()


def concat(parts: Sequence[PairLogProbs]) -> PairLogProbs:
    """The scores of several consecutive runs of pairs, as one."""
    values = {}
    for f in fields(PairLogProbs):
        column = [getattr(part, f.name) for part in parts]
        values[f.name] = None if any(c is None for c in column) else torch.cat(column)
    return PairLogProbs(**values)


class ShardedScores:
    """Where a scoring pass keeps its shards (``directory`` None: nowhere; a pass then runs
    without being kept, e.g. outside a run directory).

    Args:
        directory: the shards' directory (created by rank 0).
        shard_pairs: pairs per shard.
        scorer: what scores the pairs (the reference's kind and model): part of the fingerprint.
        resume: reuse the shards found in ``directory``; otherwise they are deleted first.
    """

    def __init__(self, directory: Path | None, shard_pairs: int, scorer: str, resume: bool) -> None:
        if shard_pairs < 1:
            raise ValueError(f"reference.shard_pairs must be >= 1, got {shard_pairs}")
        self.directory, self.shard_pairs, self.scorer = directory, shard_pairs, scorer
        self.scored = 0  # shards scored by this process (the rest were found)
        if directory is not None and not resume and dist_utils.is_main():
            shutil.rmtree(directory, ignore_errors=True)  # another run's shards: never reused

    def score(
        self,
        name: str,
        load_forward: Callable[[], ForwardFn],
        pairs: Sequence[TokenizedPair],
        batch_size: int,
        pad_id: int,
        device: torch.device | str,
    ) -> PairLogProbs:
        """Every pair of ``pairs`` scored with the forward ``load_forward()`` returns (called once,
        and only when a shard is left to score); every rank must call this and gets the full
        result. ``name`` tells this pass's shards from another's (``train``, ``eval``)."""
        count = -(-len(pairs) // self.shard_pairs)
        found = self._found(name, pairs, count)
        forward: ForwardFn | None = None
        parts: dict[int, PairLogProbs] = {}
        if found and dist_utils.is_main():
            log.info("%s: %d of %d shards kept in %s", name, len(found), count, self.directory)
        for index in range(count):
            if index in found:
                continue
            forward = forward or load_forward()
            chunk = pairs[index * self.shard_pairs : (index + 1) * self.shard_pairs]
            parts[index] = logprobs_of_pairs(forward, chunk, batch_size, pad_id, device)
            if self.directory is not None and dist_utils.is_main():
                with atomic_open(self.directory / f"{name}-{index:05d}.pt", "wb") as handle:
                    torch.save(parts[index], handle)
            self.scored += 1
            stop_point(f"in the reference pass after {name} shard {index + 1} of {count}")
        if found:  # rank 0 reads the shards it found; every rank gets them
            kept = {i: self._load(name, i) for i in found} if dist_utils.is_main() else None
            parts.update(dist_utils.broadcast_object(kept))
        return concat([parts[index] for index in range(count)])

    def _found(self, name: str, pairs: Sequence[TokenizedPair], count: int) -> set[int]:
        """The shards of ``name`` kept by an earlier run of the same pass (rank 0 looks; every
        rank gets the answer)."""
        if self.directory is None:
            return set()
        found: set[int] | None = None
        if dist_utils.is_main():
            fingerprint = {"scorer": self.scorer, "shard_pairs": self.shard_pairs}
            meta_path = self.directory / META
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            digest = pairs_digest(pairs)
            if meta and (
                meta.get("fingerprint") != fingerprint or meta.get(name, digest) != digest
            ):
                raise ValueError(
                    f"{self.directory} holds scores of other pairs or another scorer (its "
                    f"{META} differs from this run's): a resumed run must be the same command; "
                    "delete the directory to score again"
                )
            atomic_write_json(meta_path, {**meta, "fingerprint": fingerprint, name: digest})
            found = {i for i in range(count) if (self.directory / f"{name}-{i:05d}.pt").is_file()}
        return dist_utils.broadcast_object(found)

    def _load(self, name: str, index: int) -> PairLogProbs:
        return torch.load(self.directory / f"{name}-{index:05d}.pt", weights_only=False)

    def discard(self) -> None:
        """Delete the shards (rank 0), once the whole pass is kept elsewhere."""
        if self.directory is not None and dist_utils.is_main():
            shutil.rmtree(self.directory, ignore_errors=True)
