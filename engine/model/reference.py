"""The reference policy pi_ref, in one place: what the train step and evaluation ask for
reference scores.

Every variant answers the same two questions: :meth:`Reference.train_logprobs` (the micro batch's
pairs) and :meth:`Reference.eval_logprobs` (every eval pair, in order). Which one a run gets
(:func:`make_reference`):

- ``precompute`` (the default): the initial policy's scores of every train and eval pair,
  computed once before the first update through the policy itself (no second model in memory);
- ``precompute`` with ``reference.name_or_path``: the same, from a separate model, which is loaded
  once for that pass and then dropped;
- ``live`` (``reference.precompute=false``): a frozen scorer kept in memory and run on every micro
  batch: a copy of the initial policy, or the separate model (loaded once); with adapters
  (:mod:`engine.model.adapters`), the policy itself with its adapters disabled (fresh adapters start
  as the base: no copy), or a frozen base + ``model.adapter`` when training continues an adapter;
- ``none``: a reference-free objective (``requirements.needs_reference`` false): zero scores, no
  scoring pass, no model loaded.

Scores computed before training are written to ``reference_logps.pt`` in the run directory and
read back on resume, so a resumed run compares against the *initial* policy. The pass itself is
kept shard by shard (``reference.shard_pairs`` pairs, in ``reference/``:
:mod:`engine.model.score_shards`), so a run stopped in the middle of it resumes after its last
whole shard; ``reference_logps.json`` records what the scores were computed from, and a resumed
run with other pairs or another reference is refused.

Adding a variant: a live reference is any frozen scorer, a callable ``PairBatch -> (logps,
counts)`` of the batch's 2B sequences (:data:`engine.model.pair_logprobs.ForwardFn`), run under
``torch.no_grad``. E.g. "the policy with its adapters disabled" is ``LiveReference(scorer)`` with
a scorer that runs the policy inside peft's ``disable_adapter()``; choose it in
:func:`make_reference`. A precomputed one from another scorer is
``PrecomputedReference(load_scorer=...)``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from engine.data.loading import TokenizedPair
from engine.data.pair_batch import PairBatch
from engine.model import adapters
from engine.model.logprobs import SequenceLogProbs
from engine.model.pair_logprobs import ForwardFn, PairLogProbs
from engine.model.score_shards import ShardedScores, pairs_digest
from engine.runtime import distributed as dist_utils
from engine.runtime.fileio import atomic_open, atomic_write_json

#: the reference's scores in the run directory: (train PairLogProbs | None, eval PairLogProbs |
#: None)
REFERENCE_FILE = "reference_logps.pt"
#: what they were computed from: the scorer and a digest of the train and eval pairs
REFERENCE_META = "reference_logps.json"
#: the pass's shards while it runs (deleted once REFERENCE_FILE is written)
SHARDS_DIR = "reference"
#: pairs per shard when ``reference.shard_pairs`` is not set
DEFAULT_SHARD_PAIRS = 512


class Reference:
    """Reference scores for the train step and evaluation (see the module docstring).

    Args:
        pairs: the train pairs; eval_pairs: the eval pairs (may be empty).
        micro_batch_size, pad_id, device: how scoring passes batch the pairs.
        description: what scores them, in words (the reference's model): kept with the
            scores, so a resumed run with another reference is refused.
        shard_pairs: pairs per kept shard of the scoring pass.
    """

    kind = "abstract"

    def __init__(
        self,
        pairs: list[TokenizedPair],
        eval_pairs: list[TokenizedPair],
        micro_batch_size: int,
        pad_id: int,
        device: torch.device,
        description: str = "",
        shard_pairs: int = DEFAULT_SHARD_PAIRS,
    ) -> None:
        self.pairs, self.eval_pairs = pairs, eval_pairs
        self.micro_batch_size, self.pad_id, self.device = micro_batch_size, pad_id, device
        self.description = f"{self.kind}: {description}"
        self.shard_pairs = int(shard_pairs)
        self._train: PairLogProbs | None = None
        self._eval: PairLogProbs | None = None

    def prepare(self, policy: torch.nn.Module, run_dir: Path, resume: bool) -> None:
        """Compute what is computed before the first update, with ``policy`` (the DeepSpeed
        ds_engine, still the initial policy) and save it in ``run_dir``. On ``resume``, read it
        back instead when the file is there, or score only the shards an interrupted pass left.
        Every rank must call this (the pass has stop points)."""
        path, meta_path = run_dir / REFERENCE_FILE, run_dir / REFERENCE_META
        meta = {
            "scorer": self.description,
            "train": pairs_digest(self.pairs),
            "eval": pairs_digest(self.eval_pairs),
        }
        if resume and path.is_file():
            kept = json.loads(meta_path.read_text()) if meta_path.is_file() else meta
            if kept != meta:
                raise ValueError(
                    f"{path} holds the scores of other pairs or another reference ({meta_path} "
                    "differs): a resumed run must be the same command; delete it to score again"
                )
            self._train, self._eval = torch.load(path, weights_only=False)
            return
        shards = ShardedScores(run_dir / SHARDS_DIR, self.shard_pairs, self.description, resume)
        self._train, self._eval = self._logprobs_all(policy, shards)
        if dist_utils.is_main():
            with atomic_open(path, "wb") as handle:
                torch.save((self._train, self._eval), handle)
            atomic_write_json(meta_path, meta)
        shards.discard()

    def _logprobs_all(
        self, policy: torch.nn.Module, shards: ShardedScores
    ) -> tuple[PairLogProbs | None, PairLogProbs | None]:
        raise NotImplementedError

    def _logprobs(
        self,
        shards: ShardedScores,
        name: str,
        load_forward: Callable[[], ForwardFn],
        pairs: list[TokenizedPair],
    ) -> PairLogProbs | None:
        if not pairs:
            return None
        return shards.score(
            name, load_forward, pairs, self.micro_batch_size, self.pad_id, self.device
        )

    def train_logprobs(self, batch: PairBatch) -> PairLogProbs:
        """The reference's scores of ``batch``'s pairs (detached; on the CPU or ``device``)."""
        raise NotImplementedError

    def eval_logprobs(self) -> PairLogProbs | None:
        """The reference's scores of every eval pair (None without eval pairs)."""
        return self._eval


class PrecomputedReference(Reference):
    """Scores of every pair computed once, before the first update, by the scorer that
    ``load_scorer`` returns (a separate frozen model, loaded only for that pass and never on a
    resume that finds the scores saved) or, when ``load_scorer`` is None, by the initial policy."""

    kind = "precompute"

    def __init__(
        self, *args: Any, load_scorer: Callable[[], ForwardFn] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._load_scorer = load_scorer

    def _logprobs_all(
        self, policy: torch.nn.Module, shards: ShardedScores
    ) -> tuple[PairLogProbs | None, PairLogProbs | None]:
        loaded: list[ForwardFn] = []

        def load_forward() -> ForwardFn:  # loaded once, and only if a shard is left to score
            if not loaded:
                loaded.append(self._load_scorer() if self._load_scorer else _forward_of(policy))
            return loaded[0]

        policy.eval()
        try:
            return (
                self._logprobs(shards, "train", load_forward, self.pairs),
                self._logprobs(shards, "eval", load_forward, self.eval_pairs),
            )  # a separate reference goes out of scope here: needed for this pass only
        finally:
            policy.train()

    def train_logprobs(self, batch: PairBatch) -> PairLogProbs:
        return self._train.index(batch.indices.cpu())


class NoReference(PrecomputedReference):
    """A reference-free objective's reference: zero log-probs (counts of 1), never scored."""

    kind = "none"

    def _logprobs_all(
        self, policy: torch.nn.Module, shards: ShardedScores
    ) -> tuple[PairLogProbs | None, PairLogProbs | None]:
        return PairLogProbs.zeros(len(self.pairs)), (
            PairLogProbs.zeros(len(self.eval_pairs)) if self.eval_pairs else None
        )


class LiveReference(Reference):
    """A frozen ``scorer`` run on every micro batch (``reference.precompute=false``); the eval
    pairs are scored by it once, before the first update."""

    kind = "live"

    def __init__(self, *args: Any, scorer: ForwardFn, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scorer = scorer

    def _logprobs_all(
        self, policy: torch.nn.Module, shards: ShardedScores
    ) -> tuple[PairLogProbs | None, PairLogProbs | None]:
        return None, self._logprobs(shards, "eval", lambda: self.scorer, self.eval_pairs)

    def train_logprobs(self, batch: PairBatch) -> PairLogProbs:
        with torch.no_grad():
            return PairLogProbs.split(*self.scorer(batch))


def make_reference(
    cfg: Any,
    needs_reference: bool,
    model: torch.nn.Module,
    data: Any,
    device: torch.device,
    tails: bool = False,
) -> Reference:
    """The reference ``cfg.reference`` asks for (see the module docstring). Call it before
    DeepSpeed wraps ``model`` (the initial policy): a live copy is taken from it.

    ``data`` is the run's :class:`engine.data.sources.PreparedData`; ``tails``: the objective needs
    LD-DPO's tail log-probs of the reference too (a policy scoring with ``tails`` returns them).
    """
    reference_cfg = cfg.get("reference") or {}
    trainer = cfg.trainer
    common = (
        data.train_pairs,
        data.eval_pairs,
        int(trainer.micro_batch_size),
        int(data.tokenizer.pad_token_id),
        device,
    )
    if not needs_reference:
        return NoReference(*common)
    common_options = {
        "description": _description(cfg, data.model_cfg, tails),
        "shard_pairs": int(reference_cfg.get("shard_pairs") or DEFAULT_SHARD_PAIRS),
    }
    separate = None
    if reference_cfg.get("name_or_path"):

        def separate() -> ForwardFn:
            return frozen_scorer(_load_separate(cfg, data, device), trainer, tails)

    if reference_cfg.get("precompute", True):
        return PrecomputedReference(*common, load_scorer=separate, **common_options)
    if separate is not None:
        return LiveReference(*common, scorer=separate(), **common_options)
    if adapters.adapters_enabled(data.model_cfg):
        if data.model_cfg.get("adapter"):
            # the initial policy is base + that adapter (not the bare base: LLaMA-Factory #8459),
            # and the policy's copy of it trains: a second, frozen copy is loaded
            from engine.model.loading import load_model  # transformers' model classes: seconds

            initial = load_model(data.model_cfg, data.tokenizer, int(cfg.seed), adapters=True)
            scorer = frozen_scorer(adapters.unwrap(initial).to(device), trainer, tails)
            return LiveReference(*common, scorer=scorer, **common_options)
        # fresh adapters: the initial policy is the base, i.e. the policy with adapters disabled
        scorer = adapters.disabled_adapter_scorer(model, trainer, tails)
        return LiveReference(*common, scorer=scorer, **common_options)
    # copied before DeepSpeed wraps (and under ZeRO-3 partitions) the policy
    frozen = copy.deepcopy(model).to(device)
    return LiveReference(*common, scorer=frozen_scorer(frozen, trainer, tails), **common_options)


def _description(cfg: Any, model_cfg: Any, tails: bool) -> str:
    """What the reference's scores depend on besides the pairs, in one line (kept with them)."""
    keys = ("name_or_path", "adapter", "dtype", "quantization", "tiny")
    model = {key: OmegaConf.select(model_cfg, key) for key in keys}
    described = {
        "model": OmegaConf.to_container(OmegaConf.create(model), resolve=True),
        "seed": int(cfg.seed),
        "reference": OmegaConf.select(cfg, "reference.name_or_path"),
        "tails": tails,
    }
    return json.dumps(described, sort_keys=True)


def _load_separate(cfg: Any, data: Any, device: torch.device) -> torch.nn.Module:
    """The model at ``reference.name_or_path``. It is scored with the policy's token ids, so it
    must share the policy's vocabulary."""
    from engine.model.loading import load_model, load_tokenizer  # seconds: only when used

    path = str(cfg.reference.name_or_path)
    ref_cfg = OmegaConf.merge(data.model_cfg, {"name_or_path": path, "tokenizer": None})
    ref_tokenizer = load_tokenizer(ref_cfg, key="reference")
    if ref_tokenizer.get_vocab() != data.tokenizer.get_vocab():
        raise ValueError(
            f"reference.name_or_path={path!r}: its tokenizer differs from the policy's; a "
            "reference must score the same token ids"
        )
    return load_model(ref_cfg, data.tokenizer, seed=int(cfg.seed), key="reference").to(device)


def frozen_scorer(model: torch.nn.Module, trainer: Any, tails: bool = False) -> ForwardFn:
    """``batch -> (logps, counts)`` of a frozen model (a reference), in eval mode, no gradients;
    ``tails``: also LD-DPO's tail log-probs (``(logps, counts, extras)``)."""
    model.eval().requires_grad_(False)
    scorer = SequenceLogProbs.from_trainer(model, trainer, tails=tails).eval()

    @torch.no_grad()
    def forward(batch: PairBatch) -> tuple:
        return scorer(**batch.model_inputs())

    return forward


def _forward_of(policy: torch.nn.Module) -> ForwardFn:
    """``batch -> (logps, counts)`` of the policy (the DeepSpeed engine around SequenceLogProbs),
    without gradients: the scores are constants, so no autograd graph is recorded (it held every
    activation of the pass until the batch's scores were copied out)."""

    @torch.no_grad()
    def forward(batch: PairBatch) -> tuple:
        return policy(**batch.model_inputs())

    return forward
