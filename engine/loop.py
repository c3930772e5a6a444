"""The training loop: forward, loss, backward, step, log, eval, checkpoint, top to bottom.

:func:`run_loop` runs the optimizer steps from ``state.step`` to the end; :func:`train_step` is one
micro batch's forward and objective; :func:`evaluate` is the eval pairs' objective metrics plus the
data source's evaluators. Everything they use is built by ``engine.train.train`` and handed over
in one :class:`LoopParts`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import run_state
from engine.data.batching import StepSampler, collate_pairs
from engine.data.packing import PairLayout
from engine.data.pair_batch import PairBatch
from engine.data.pair_extras import PairExtras
from engine.data.sources import PreparedData
from engine.gradient_weights import GradientDiagnostics
from engine.metrics import means, pair_sums
from engine.model.pair_logprobs import PairLogProbs, logprobs_of_pairs
from engine.model.reference import Reference
from engine.objective import feed, kl_logratios, objective_inputs
from engine.run_state import RunState
from engine.runtime import distributed as dist_utils
from engine.runtime.preemption import PreemptionGuard
from engine.tracking import MetricsLogger
from losses import PreferenceLoss, PreferenceLossOutput


@dataclass
class LoopParts:
    """What the loop works with (built by ``engine.train.train``, phase by phase)."""

    trainer: Any  # the ``trainer`` config group
    ds_engine: Any  # the DeepSpeed engine around the policy's SequenceLogProbs
    scheduler: Any
    model: torch.nn.Module  # the policy's transformers model (for evaluators and export)
    objective: PreferenceLoss
    reference: Reference
    data: PreparedData
    sampler: StepSampler
    layout: PairLayout
    device: torch.device
    total_steps: int
    checkpoint_dir: Path
    logger: MetricsLogger | None  # rank 0 only
    extras: PairExtras = field(default_factory=PairExtras)  # data-derived inputs (ODPO's scores)
    diagnostics: GradientDiagnostics = field(default_factory=GradientDiagnostics)


def train_step(
    parts: LoopParts, batch: PairBatch, diagnose: bool = False
) -> tuple[PreferenceLossOutput, torch.Tensor]:
    """Forward (chosen and rejected in one pass) and the objective on one micro batch; returns
    the objective's output and the batch's metric sums. ``diagnose``: also collect the pairs'
    gradient weights (:mod:`engine.gradient_weights`; a logged step)."""
    policy = PairLogProbs.split(*parts.ds_engine(**batch.model_inputs()))
    batch_inputs = parts.extras.train_batch(batch.indices)
    if parts.extras.mismatched_train is not None:
        batch_inputs["kl_logratios"] = _mismatched_logratios(parts, batch)
    inputs = objective_inputs(
        parts.objective, policy, parts.reference.train_logprobs(batch), batch_inputs
    )
    out = feed(parts.objective, inputs)
    if diagnose:
        parts.diagnostics.add(parts.objective, inputs)
    return out, pair_sums(out, policy)


def _mismatched_logratios(parts: LoopParts, batch: PairBatch) -> torch.Tensor:
    """KTO's reference point inputs for ``batch``: its pairs' mismatched pairs (pair i's prompt
    with pair i + 1's responses; the reference holds them as pairs N + i), scored by the policy
    without gradient, as KTOTrainer does."""
    mismatched = parts.extras.mismatched_train or []
    indices = batch.indices.tolist()
    offset = len(parts.data.train_pairs)
    pad_id = int(parts.data.tokenizer.pad_token_id)
    other = collate_pairs(
        [mismatched[i] for i in indices], [offset + i for i in indices], pad_id, parts.layout
    ).to(parts.device)
    with torch.no_grad():
        policy = PairLogProbs.split(*parts.ds_engine(**other.model_inputs()))
    return kl_logratios(policy, parts.reference.train_logprobs(other))


def evaluate(parts: LoopParts) -> dict[str, float]:
    """``eval/`` metrics: the objective on every eval pair, then each evaluator of the data."""
    ds_engine, data = parts.ds_engine, parts.data
    metrics: dict[str, float] = {}
    if data.eval_pairs:
        ds_engine.eval()

        def logprobs(pairs: list) -> PairLogProbs:
            micro, pad_id = int(parts.trainer.micro_batch_size), int(data.tokenizer.pad_token_id)
            forward = lambda batch: ds_engine(**batch.model_inputs())  # noqa: E731
            return logprobs_of_pairs(forward, pairs, micro, pad_id, parts.device)

        scores = logprobs(data.eval_pairs)
        reference = parts.reference.eval_logprobs()
        batch_inputs = parts.extras.eval_inputs()
        count = len(data.eval_pairs)
        if parts.extras.mismatched_eval is not None:  # KTO: the reference also holds these
            tail = reference.index(torch.arange(count, 2 * count))
            batch_inputs["kl_logratios"] = kl_logratios(
                logprobs(parts.extras.mismatched_eval), tail
            )
            reference = reference.index(torch.arange(count))
        inputs = objective_inputs(parts.objective, scores, reference, batch_inputs)
        out = feed(parts.objective, inputs)
        metrics.update(means(pair_sums(out, scores), "eval"))
        ds_engine.train()
    for evaluator in data.evaluators:
        ds_engine.eval()
        found = evaluator.evaluate(parts.model, data.tokenizer, parts.device)
        metrics.update({f"eval/{k}": v for k, v in found.items()})
        ds_engine.train()
    return metrics


def _log_train(parts: LoopParts, state: RunState) -> None:
    """Close the metrics window into ``state.last_train`` and log it (rank 0)."""
    means_, pairs_per_second = state.window.close(parts.device)
    state.last_train = means_
    state.last_train["train/lr"] = float(parts.scheduler.get_last_lr()[0])
    grad_norm = parts.ds_engine.get_global_grad_norm()
    if grad_norm is not None:
        state.last_train["train/grad_norm"] = float(grad_norm)
    state.last_train["train/pairs_per_second"] = pairs_per_second
    state.last_train["train/epoch"] = state.step / parts.sampler.steps_per_epoch
    state.last_train.update(parts.diagnostics.flush(parts.logger, state.step, parts.device))
    if parts.logger is not None:
        parts.logger.log(state.step, state.last_train)


def _progress_bar(parts: LoopParts, start: int) -> Any:
    if not (dist_utils.is_main() and parts.trainer.progress_bar):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=parts.total_steps, initial=start, desc="train", dynamic_ncols=True, disable=None
    )


def run_loop(parts: LoopParts, state: RunState) -> None:
    """The optimizer steps from ``state.step`` to ``parts.total_steps``."""
    trainer, ds_engine, device = parts.trainer, parts.ds_engine, parts.device
    rank, grad_accum = dist_utils.rank(), int(trainer.grad_accum)
    log_every, eval_every = int(trainer.log_every), int(trainer.eval_every)
    save_every, keep = int(trainer.save_every), int(trainer.keep_checkpoints)
    pad_id = int(parts.data.tokenizer.pad_token_id)
    pairs = parts.data.train_pairs
    progress = _progress_bar(parts, state.step)
    state.window.restart_clock()
    with PreemptionGuard() as guard:  # from here a stop signal ends the loop after a whole step
        for step in range(state.step, parts.total_steps):
            logged = (step + 1) % log_every == 0 or step + 1 == parts.total_steps
            # forward + loss + backward per micro step; DeepSpeed steps the optimizer on the last
            for micro_step in range(grad_accum):
                indices = parts.sampler.indices(step, micro_step, rank)
                batch = collate_pairs([pairs[i] for i in indices], indices, pad_id, parts.layout)
                out, sums = train_step(parts, batch.to(device), diagnose=logged)
                ds_engine.backward(out.losses.mean())
                ds_engine.step()
                state.window.add(sums)
            state.step = done = step + 1
            last = done == parts.total_steps
            if progress is not None:
                progress.update(1)

            # log: one all-reduce of the window's sums (a sync point, so only every log_every steps)
            if done % log_every == 0 or last:
                _log_train(parts, state)
                if progress is not None and parts.logger is not None:
                    progress.set_postfix(
                        loss=f"{state.last_train['train/loss']:.4f}",
                        acc=f"{state.last_train['train/reward_accuracy']:.2f}",
                    )
                state.window.restart_clock()

            # eval
            if (eval_every and done % eval_every == 0) or last:
                eval_started = time.time()
                state.last_eval = evaluate(parts)
                state.eval_seconds += time.time() - eval_started
                if parts.logger is not None and state.last_eval:
                    parts.logger.log(done, state.last_eval)

            # checkpoint; a stop requested on any rank (SIGTERM / SIGUSR1; every rank agrees, one
            # tiny all-reduce when world > 1) saves now, as if save_every said so, and leaves
            stop = not last and guard.should_stop(device)
            if (save_every and done % save_every == 0) or last or stop:
                run_state.save(ds_engine, parts.checkpoint_dir, state, keep, device)
            if stop:
                raise guard.preempted(done)  # engine.train.run exits with the requeue status
    if progress is not None:
        progress.close()
