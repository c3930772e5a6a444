"""The training loop: forward, loss, backward, step, log, checkpoint, eval, top to bottom.

:func:`run_loop` runs the optimizer steps from ``state.step`` to the end; :func:`train_step` is one
micro batch's forward and objective; :func:`evaluate` is the eval pairs' objective metrics plus the
data source's evaluators. Everything they use is built by ``engine.train.train`` and handed over
in one :class:`LoopParts`.

Training is saved before it is judged: at a step that both saves and evaluates (the last one
always does) the checkpoint comes first, marked ``eval_pending``, so an evaluation that fails or
is stopped is redone from the saved model by the rerun, without training again. A stop signal
(:mod:`engine.runtime.preemption`) is taken after a whole optimizer step, or inside an evaluation
after a generation batch; either way the step is saved before the run leaves. Each evaluation
keeps its work in ``eval/step_<N>/``: evaluators that keep records (benchmarks) append them per
generation batch under ``records/``, and ``metrics.json`` holds the step's metrics once the whole
evaluation is done, so a redone evaluation skips what was finished.
"""

from __future__ import annotations

import json
import shutil
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
from engine.runtime.fileio import atomic_write_json
from engine.runtime.preemption import Preempted, active_guard, stop_point
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
    eval_dir: Path | None = None  # each evaluation's kept work: eval_dir/step_<N>/ (None: none)


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


def evaluate(parts: LoopParts, step: int | None = None) -> dict[str, float]:
    """``eval/`` metrics: the objective on every eval pair, then each evaluator of the data.

    With ``step`` (and ``parts.eval_dir``) the work is kept in ``eval_dir/step_<step>/`` and an
    evaluation of that step finished earlier is read back instead (module docstring). Stop points
    between its parts (the eval pairs, each evaluator) and inside those that keep records."""
    step_dir = None if parts.eval_dir is None or step is None else parts.eval_dir / f"step_{step}"
    if step_dir is not None:
        done = step_dir / "metrics.json"
        kept = json.loads(done.read_text()) if dist_utils.is_main() and done.is_file() else None
        kept = dist_utils.broadcast_object(kept)
        if kept is not None:
            return kept
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
    for index, evaluator in enumerate(data.evaluators):
        if index or data.eval_pairs:
            stop_point(f"in the evaluation of step {step}, before evaluator {index + 1}")
        ds_engine.eval()
        keeps = step_dir is not None and getattr(evaluator, "keeps_records", False)
        options = {"records": step_dir / "records"} if keeps else {}
        found = evaluator.evaluate(parts.model, data.tokenizer, parts.device, **options)
        metrics.update({f"eval/{k}": v for k, v in found.items()})
        ds_engine.train()
    if step_dir is not None and dist_utils.is_main():
        atomic_write_json(step_dir / "metrics.json", metrics)
    return metrics


def discard_abandoned_evaluations(eval_dir: Path, resume_step: int | None) -> None:
    """Delete the kept evaluations of steps after ``resume_step`` (all of them when None): work
    of a timeline the run no longer follows (rank 0; the checkpoint resumed from is older)."""
    if not dist_utils.is_main() or not eval_dir.is_dir():
        return
    for child in eval_dir.iterdir():
        step = child.name.removeprefix("step_")
        if step.isdigit() and (resume_step is None or int(step) > resume_step):
            shutil.rmtree(child, ignore_errors=True)


def _evaluate_and_log(parts: LoopParts, state: RunState, saved: bool) -> None:
    """Evaluate at ``state.step`` and log it. Stopped inside, the step is saved (unless
    ``saved`` already, marked ``eval_pending``) before the stop goes on."""
    started = time.time()
    try:
        state.last_eval = evaluate(parts, state.step)
    except Preempted:
        if not saved:
            state.eval_pending = True
            _save(parts, state)
        raise
    finally:
        state.eval_seconds += time.time() - started
    state.eval_pending = False
    if parts.logger is not None and state.last_eval:
        parts.logger.log(state.step, state.last_eval)


def _save(parts: LoopParts, state: RunState) -> None:
    keep = int(parts.trainer.keep_checkpoints)
    run_state.save(parts.ds_engine, parts.checkpoint_dir, state, keep, parts.device)


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
    """The optimizer steps from ``state.step`` to ``parts.total_steps`` (first the evaluation a
    resumed checkpoint left pending). A stop signal ends it after a whole step (or inside an
    evaluation), that step saved: ``Preempted`` (``engine.train.run`` exits for a requeue)."""
    trainer, ds_engine, device = parts.trainer, parts.ds_engine, parts.device
    rank, grad_accum = dist_utils.rank(), int(trainer.grad_accum)
    log_every, eval_every = int(trainer.log_every), int(trainer.eval_every)
    save_every = int(trainer.save_every)
    pad_id = int(parts.data.tokenizer.pad_token_id)
    pairs = parts.data.train_pairs
    if state.eval_pending:  # the saved model is judged before anything trains on
        _evaluate_and_log(parts, state, saved=True)
    progress = _progress_bar(parts, state.step)
    state.window.restart_clock()
    guard = active_guard()
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
        evaluates = bool(eval_every and done % eval_every == 0) or last
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

        # checkpoint, before the evaluation of its step (the last step's above all): an
        # evaluation that fails or is stopped is redone from it, without training again
        saved = bool(save_every and done % save_every == 0) or last
        if saved:
            state.eval_pending = evaluates
            _save(parts, state)

        # eval (a stop inside saves this step first, unless saved above)
        if evaluates:
            _evaluate_and_log(parts, state, saved)

        # stop: requested on any rank (SIGTERM / SIGUSR1; every rank agrees, one tiny all-reduce
        # when world > 1): this step is saved now, as if save_every said so, and the run leaves
        if not last and guard is not None and guard.should_stop(device):
            if not saved:
                _save(parts, state)
            raise guard.preempted(f"after step {done} (saved)", step=done)
    if progress is not None:
        progress.close()
