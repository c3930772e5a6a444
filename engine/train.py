"""Preference training on DeepSpeed: ``python -m engine.train [hydra overrides]``.

``train(cfg)`` is a plain function (tests call it); ``main`` is the Hydra wrapper. ``train`` is a
flat sequence of phases, one call each: checks (config, objective, batch), benchmarks and data
(:mod:`engine.data.sources`), all before the process group and DeepSpeed start, so a bad input is
reported in seconds; then the process group, model, reference (:mod:`engine.model.reference`),
DeepSpeed, resume and run state (:mod:`engine.run_state`), the loop (:mod:`engine.loop`:
``deepspeed``'s ``backward`` / ``step`` around one objective call, :mod:`engine.objective`),
export, results. The objective (a :class:`losses.PreferenceLoss`) is a value the loop calls, never
a branch it takes.

A stop signal at any phase ends the run at the phase's next stop point with the requeue status
(:mod:`engine.runtime.preemption`); rerun with ``trainer.resume=auto``, the run skips what was kept:
the reference pass's shards, the optimizer steps of the last checkpoint, the batches of an
interrupted evaluation, a finished export. ``done/<phase>.json`` marks each finished phase
(:mod:`engine.runtime.phases`; docs/preemption.md).
"""

# ruff: noqa: E402

from __future__ import annotations

from engine.runtime.preemption import watch_from_start

watch_from_start(__name__)  # python -m engine.train: stop signals are recorded from here on

# the imports below take seconds: after the line above (hence the file's E402 exemption)
import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import engine.task  # noqa: F401  (registers the embedded task's data source and verifier)
from engine import run_state
from engine.checkpoint import export_hf_model
from engine.config import (
    build_deepspeed_config,
    build_objective,
    resolve_batch,
    validate_config,
)
from engine.data.batching import StepSampler, step_sampler
from engine.data.packing import PairLayout
from engine.data.pair_extras import PairExtras
from engine.data.sources import PreparedData, prepare_data
from engine.generation.evaluation import benchmark_evaluators, merge_benchmark_evaluators
from engine.loop import LoopParts, discard_abandoned_evaluations, run_loop
from engine.model import adapters
from engine.model.adapter_export import export_adapters
from engine.model.logprobs import SequenceLogProbs
from engine.model.reference import make_reference
from engine.run_state import RunState, find_resume_step
from engine.runtime import distributed as dist_utils
from engine.runtime import extensions, phases
from engine.runtime.fileio import atomic_write_json
from engine.runtime.launch import hydra_entry, resolve_output_dir, write_failed
from engine.runtime.machine import machine_info
from engine.runtime.preemption import (
    Preempted,
    exit_preempted,
    stop_point,
    stop_signals_watched,
)
from engine.runtime.timing import PhaseClock
from engine.tracking import MetricsLogger
from losses import PreferenceLoss, Requirements

log = logging.getLogger("engine.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run described by ``cfg`` (the composed Hydra config); returns ``results.json``.
    Stop signals are watched meanwhile: a stop raises :class:`Preempted` once the work done is
    kept (``run`` turns it into the requeue exit)."""
    with stop_signals_watched():
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    started = time.time()
    clock = PhaseClock(started)  # results.json's timings: where the wall time went
    # checks, benchmarks, data and the objective's inputs, before the process group and
    # DeepSpeed start (a bad input is reported in seconds)
    world = dist_utils.launched_world_size()
    cfg, objective, data, extras = _read_inputs(cfg, world)
    needs = objective.requirements
    stop_point("during startup, after reading the data")
    # process group, run directory (its config.yaml), seed, device
    run_dir, device = _start(cfg, world)
    stop_point("during startup, after the process group started")
    # model: the policy, and the module that scores the sequences of a pair batch with it
    model, policy = _load_policy(cfg, data, needs)
    # order: which pairs each rank sees at each step, and how many steps
    sampler = step_sampler(data.train_pairs, cfg.trainer, dist_utils.world_size(), int(cfg.seed))
    total_steps = _total_steps(cfg.trainer, sampler)
    # reference: chosen now, before DeepSpeed wraps the policy (a live reference copies it)
    # (KTO's mismatched pairs are scored by the reference with the others: extras.reference_data)
    reference = make_reference(
        cfg,
        needs.needs_reference,
        model,
        extras.reference_data(data),
        device,
        tails=needs.needs_tail_logps,
    )
    stop_point("during startup, after the model loaded")
    # DeepSpeed: the ds_engine, its optimizer and the learning-rate schedule
    ds_engine, scheduler = _initialize_deepspeed(cfg, model, policy, total_steps)
    # resume: the checkpoint to resume from (None: a fresh start)
    checkpoint_dir = run_dir / "checkpoints"
    resume_step, resuming = _resume_point(cfg, run_dir, checkpoint_dir)
    clock.lap("startup")
    stop_point("during startup, after DeepSpeed started")
    # reference scores, once before any update, kept shard by shard (read back from the run
    # directory when resuming: the whole file, or the shards a stopped pass left)
    reference.prepare(ds_engine, run_dir, resume=resuming)
    if dist_utils.is_main():
        phases.mark_done(run_dir, "reference")
    # run state: restored from the checkpoint (model, optimizer, scheduler, RNG, metrics window)
    state = run_state.restore(ds_engine, checkpoint_dir, resume_step)
    clock.lap("reference")
    # trackers: metrics.jsonl and trainer.report_to (TensorBoard, W&B, MLflow), rank 0 only;
    # their runs end as finished, failed or killed with the body
    logger = (
        MetricsLogger.from_config(run_dir, cfg, resume_step, eval_pending=state.eval_pending)
        if dist_utils.is_main()
        else None
    )
    with logger or contextlib.nullcontext():
        # loop: forward, loss, backward, step, log, checkpoint, eval
        parts = LoopParts(
            trainer=cfg.trainer,
            ds_engine=ds_engine,
            scheduler=scheduler,
            model=model,
            objective=objective,
            reference=reference,
            data=data,
            sampler=sampler,
            layout=PairLayout.from_config(cfg.trainer),
            device=device,
            total_steps=total_steps,
            checkpoint_dir=checkpoint_dir,
            logger=logger,
            extras=extras,
            eval_dir=run_dir / "eval",
        )
        run_loop(parts, state)
        if dist_utils.is_main():
            phases.mark_done(run_dir, "training", steps=state.step)
        clock.lap("train")
        clock.move(state.eval_seconds, "train", "eval")
        clock.move(parts.diagnostics.seconds, "train", "diagnostics")  # of the logged steps
        stop_point("after the final evaluation")
        # export: final_model/ in Hugging Face format (adapters: final_adapter/ and the merge)
        _export_once(cfg, ds_engine, model, data, run_dir, state.step)
        clock.lap("export")
        # results: results.json (rank 0) and the closing console line
        results = _results(cfg, data, state, total_steps, started, clock.seconds())
        if logger is not None:
            _write_results(run_dir, results, state.step)
    dist_utils.barrier()
    return results


def _read_inputs(
    cfg: DictConfig, world: int
) -> tuple[DictConfig, PreferenceLoss, PreparedData, PairExtras]:
    """The run's inputs, each checked before the next is read: the config, objective and batch
    (:func:`_check`), the benchmarks, the data, and the objective's inputs from the data. Returns
    the resolved config, the objective, the data and the objective's extra inputs."""
    # checks: the config, the objective and the batch for the launcher's world size (grad_accum
    # from trainer.global_batch), before anything is built or started
    cfg, objective = _check(cfg, world)
    # benchmarks: accuracy by generation at every evaluation (engine.evaluate); their files are
    # read now, so a bad one fails before the data source builds anything
    benchmarks = benchmark_evaluators(cfg, world_size=world)
    # data: the data source resolves to a model config, tokenizer, pairs and evaluators (its
    # files' rows are checked before the tokenizer loads)
    data = prepare_data(cfg, _load_tokenizer)
    data.evaluators = merge_benchmark_evaluators([*data.evaluators, *benchmarks])  # one average
    # objective inputs from the data (ODPO's score columns, KTO's mismatched pairs), checked
    # before the model loads
    extras = PairExtras.for_objective(
        objective.requirements, data.train_pairs, data.eval_pairs, int(cfg.data.max_length)
    )
    return cfg, objective, data, extras


def _load_policy(
    cfg: DictConfig, data: PreparedData, needs: Requirements
) -> tuple[torch.nn.Module, SequenceLogProbs]:
    """The policy (with its LoRA / QLoRA adapters when model.lora / model.adapter are set:
    :mod:`engine.model.adapters`) and the module that scores a pair batch's sequences with it
    (with the per-response terms the objective ``needs``)."""
    from engine.model.loading import load_model  # imported by _load_tokenizer already

    model = load_model(data.model_cfg, data.tokenizer, seed=int(cfg.seed), adapters=True)
    policy = SequenceLogProbs.from_trainer(
        adapters.unwrap(model),
        cfg.trainer,
        weighting=needs.needs_weighting_logps,  # WPO's per-response term, in the LM head
        tails=needs.needs_tail_logps,  # LD-DPO's tails
    )
    return model, policy


def _resume_point(cfg: DictConfig, run_dir: Path, checkpoint_dir: Path) -> tuple[int | None, bool]:
    """The step of the checkpoint to resume from (None: a fresh start; see
    :func:`engine.run_state.find_resume_step`) and whether ``trainer.resume=auto``. A fresh run
    in a reused directory clears the old run's phase markers; evaluations abandoned after the
    resume step are discarded."""
    resume_step = find_resume_step(cfg.trainer, checkpoint_dir)
    resuming = cfg.trainer.get("resume") == "auto"
    if not resuming and dist_utils.is_main():
        phases.clear(run_dir)  # a fresh run in a reused directory: nothing of the old one counts
    discard_abandoned_evaluations(run_dir / "eval", resume_step)
    return resume_step, resuming


def _export_once(
    cfg: DictConfig,
    ds_engine: Any,
    model: torch.nn.Module,
    data: PreparedData,
    run_dir: Path,
    step: int,
) -> None:
    """The export phase (with ``trainer.export``): :func:`_export`, unless one finished for
    ``step`` earlier (a rerun after a stop), then its marker and a stop point."""
    if not cfg.trainer.export or _exported(run_dir, step):
        return
    _export(cfg, ds_engine, model, data, run_dir)
    if dist_utils.is_main():
        phases.mark_done(run_dir, "export", step=step)
    stop_point("after the export")


def _write_results(run_dir: Path, results: dict[str, Any], step: int) -> None:
    """``results.json`` and the run's completion marker (rank 0), and the closing console line."""
    atomic_write_json(run_dir / "results.json", results)
    phases.mark_done(run_dir, phases.COMPLETE, steps=step)
    log.info("%s; results: %s", _summary_line(results), run_dir / "results.json")


def _load_tokenizer(model_cfg: Any) -> Any:
    """:func:`engine.model.loading.load_tokenizer`, imported here: transformers' model classes
    come with it (seconds), so they wait until the config and the data's rows are checked."""
    from engine.model.loading import load_tokenizer

    return load_tokenizer(model_cfg)


def _exported(run_dir: Path, step: int) -> bool:
    """Whether the export of ``step`` finished earlier (its marker and ``final_model/``)."""
    info = phases.done_info(run_dir, "export") if dist_utils.is_main() else None
    done = info is not None and info.get("step") == step and (run_dir / "final_model").is_dir()
    return bool(dist_utils.broadcast_object(done))


def _export(
    cfg: DictConfig, ds_engine: Any, model: torch.nn.Module, data: PreparedData, run_dir: Path
) -> None:
    """``final_model/`` (every rank takes part: ZeRO-3 gathers); with adapters also
    ``final_adapter/``, and ``final_model/`` is the adapter merged into the unquantized base."""
    from engine.model.loading import load_model

    if adapters.adapters_enabled(data.model_cfg):
        export_adapters(
            ds_engine,
            model,
            data.tokenizer,
            run_dir,
            load_base=lambda: load_model(data.model_cfg, data.tokenizer, seed=int(cfg.seed)),
        )
    else:
        export_hf_model(ds_engine, model, data.tokenizer, run_dir / "final_model")


def _check(cfg: DictConfig, world: int) -> tuple[DictConfig, PreferenceLoss]:
    """Check the config and build the objective (before anything is created), and resolve the
    batch for the launcher's world size ``world`` (:func:`engine.config.resolve_batch`). Returns
    the resolved config, which the rest of the run reads."""
    validate_config(cfg)
    adapters.validate_adapter_config(cfg.model, cfg.deepspeed)
    objective = build_objective(cfg)
    cfg = resolve_batch(cfg, world)
    if cfg.trainer.get("threads"):
        torch.set_num_threads(int(cfg.trainer.threads))
    return cfg, objective


def _start(cfg: DictConfig, world: int) -> tuple[Path, torch.device]:
    """Start the process group, make the run directory with its config.yaml, seed, and pick the
    device; returns the run directory and the device."""
    dist_utils.init_distributed()
    if dist_utils.world_size() != world:
        raise RuntimeError(
            f"the process group has {dist_utils.world_size()} processes, the launcher said {world}"
        )
    run_dir = resolve_output_dir(cfg, "outputs/run")
    if dist_utils.is_main():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(int(cfg.seed))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    return run_dir, device


def _total_steps(trainer: DictConfig, sampler: StepSampler) -> int:
    """``trainer.max_steps``, else ``trainer.epochs`` epochs of the sampler's order."""
    if trainer.get("max_steps"):
        return int(trainer.max_steps)
    return int(trainer.epochs) * sampler.steps_per_epoch


def _initialize_deepspeed(
    cfg: DictConfig, model: torch.nn.Module, policy: torch.nn.Module, total_steps: int
) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on the policy's trainable parameters; returns the ds_engine and the
    learning-rate scheduler."""
    import deepspeed

    ds_config = build_deepspeed_config(
        cfg, model_dtype=next(model.parameters()).dtype, world_size=dist_utils.world_size()
    )
    with extensions.BuildLockWatch():  # an optimizer op built here (GPUs) never waits forever
        ds_engine, _, _, scheduler = deepspeed.initialize(
            model=policy,
            model_parameters=[p for p in policy.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: _lr_schedule(opt, cfg.trainer, total_steps),
        )
    return ds_engine, scheduler


def _results(
    cfg: DictConfig,
    data: PreparedData,
    state: RunState,
    total_steps: int,
    started: float,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """``results.json``: the objective, the run's size and time (and its split by phase,
    ``timings``: startup, reference, train, eval, diagnostics, export seconds), the last logged
    train and eval means, how the data loaded, the machine (numbers differ between CPUs:
    ``machine``), and the data source's own sections (the task's ``sft``)."""
    results: dict[str, Any] = {
        "loss": cfg.loss.name,
        "margin": cfg.margin.name,
        "method": cfg.method.name,
        "beta": float(cfg.beta),
        "alpha": float(cfg.margin.alpha),
        "seed": int(cfg.seed),
        "steps": total_steps,
        "world_size": dist_utils.world_size(),
        "wall_seconds": time.time() - started,
        "timings": dict(timings or {}),
        "train": {k.split("/", 1)[1]: v for k, v in state.last_train.items()},
        "eval": _nested({k.split("/", 1)[1]: v for k, v in state.last_eval.items()}),
        "data": data.reports(),
        "machine": machine_info(),
    }
    results.update(data.extra_results)
    return results


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"benchmarks/math500/accuracy": v}`` -> ``{"benchmarks": {"math500": {"accuracy": v}}}``
    (metrics are logged flat; results.json reads ``eval.benchmarks.<name>.accuracy``)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _summary_line(results: dict[str, Any]) -> str:
    """One line for the console at the end of a run: steps, time, and the headline metrics."""
    parts = [f"finished {results['steps']} steps in {results['wall_seconds']:.0f} s"]
    for split in ("eval", "train"):
        metrics = results[split]
        if "accuracy" in metrics:
            stderr = metrics.get("accuracy_stderr")
            spread = f" +- {stderr:.3f}" if stderr is not None else ""
            parts.append(f"{split} accuracy {metrics['accuracy']:.3f}{spread}")
        if "loss" in metrics:
            parts.append(f"{split} loss {metrics['loss']:.4g}")
    return ", ".join(parts)


def _lr_schedule(optimizer: torch.optim.Optimizer, trainer: DictConfig, total_steps: int) -> Any:
    """Linear warmup over ``warmup_ratio`` of the steps, then constant, linear or cosine decay."""
    warmup = round(float(trainer.warmup_ratio) * total_steps)
    kind = trainer.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """``train`` with failure reporting for sweeps: a crash writes ``failed.json`` (error and
    traceback) in the run directory before re-raising, so a sweep's summary can list it. A stop
    signal (:mod:`engine.runtime.preemption`) is no failure: once the work done is kept the
    process exits for a requeue (status 75, or submitit's own requeue under
    ``hydra/launcher=slurm``)."""
    # a joblib sweep (hydra/launcher=local_parallel) pickles this function by value when it runs
    # as ``python -m engine.train`` (__main__): its workers never run this module's imports, so
    # the data sources and verifiers registered by importing engine.task are imported here
    import engine.task  # noqa: F401, F811

    with stop_signals_watched():
        try:
            return train(cfg)
        except Preempted as stop:  # the work done is kept: exit for a requeue, below
            stopped = stop
        except Exception as error:
            if dist_utils.is_main():
                write_failed(cfg, error, "outputs/run")
            raise
    exit_preempted(stopped, requeue=cfg.trainer.get("resume") == "auto")


if __name__ == "__main__":
    hydra_entry("config", run)
