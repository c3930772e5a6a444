"""Preference training on DeepSpeed: ``python -m engine.train [hydra overrides]``.

``train(cfg)`` is a plain function (tests call it); ``main`` is the Hydra wrapper. The loop is one
flat function around ``deepspeed.initialize`` / ``engine.backward`` / ``engine.step``: the objective
(a :class:`losses.PreferenceLoss`) is a value it calls, never a branch it takes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from engine import distributed as dist_utils
from engine.batching import PairBatch, collate_pairs, step_sampler
from engine.checkpoint import (
    export_hf_model,
    latest_complete_step,
    load_checkpoint,
    save_checkpoint,
)
from engine.config import build_deepspeed_config, build_objective, validate_config
from engine.data import TokenizedPair, load_pairs
from engine.fileio import atomic_open, atomic_write_json
from engine.logprobs import SequenceLogProbs
from engine.modeling import load_model, load_tokenizer
from engine.packing import PairLayout
from engine.scoring import PairScores, score_pairs
from engine.tracking import MetricsLogger

log = logging.getLogger("engine.train")

# Sums accumulated between log steps, in this order (one tensor: one all-reduce per log step).
_SUMS = (
    "pairs",
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_accuracy",
    "margin",
    "chosen_logp",
    "rejected_logp",
    "chosen_reward_below_zero",
)


def _pair_stats(
    out: Any, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor
) -> torch.Tensor:
    """Per-batch sums of the DCR metrics (see _SUMS), detached, float64."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return torch.stack(
        [
            torch.tensor(float(chosen.numel())),
            out.losses.detach().sum().cpu(),
            chosen.sum().cpu(),
            rejected.sum().cpu(),
            (chosen > rejected).float().sum().cpu(),
            out.margins.sum().cpu(),
            policy_chosen.detach().sum().cpu(),
            policy_rejected.detach().sum().cpu(),
            (chosen < 0).float().sum().cpu(),
        ]
    ).double()


def _means(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    n = max(float(sums[0]), 1.0)
    return {f"{prefix}/{name}": float(sums[i]) / n for i, name in enumerate(_SUMS) if i > 0}


def _resolve_run_dir(cfg: DictConfig) -> Path:
    """The run directory: ``output_dir`` if set, else Hydra's, else ./outputs/run (rank 0's
    choice, broadcast so every rank writes to the same place)."""
    run_dir = cfg.get("output_dir")
    if not run_dir:
        try:
            from hydra.core.hydra_config import HydraConfig

            run_dir = HydraConfig.get().runtime.output_dir
        except ValueError:  # train(cfg) called outside @hydra.main
            run_dir = "outputs/run"
    run_dir = dist_utils.broadcast_object(str(Path(run_dir).resolve()))
    path = Path(run_dir)
    if dist_utils.is_main():
        path.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    return path


def _objective_inputs(
    logps: torch.Tensor, counts: torch.Tensor, length_normalized: bool
) -> torch.Tensor:
    return logps / counts.clamp(min=1) if length_normalized else logps


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one run described by ``cfg`` (the composed Hydra config); returns ``results.json``."""
    started = time.time()
    validate_config(cfg)
    objective = build_objective(cfg)
    needs = objective.requirements
    trainer = cfg.trainer
    if trainer.get("threads"):
        torch.set_num_threads(int(trainer.threads))

    dist_utils.init_distributed()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    run_dir = _resolve_run_dir(cfg)
    if dist_utils.is_main():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(int(cfg.seed))
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )

    # ---- data and model ------------------------------------------------------------------------
    task = None
    model_cfg = cfg.model
    data_cfg = cfg.data
    if data_cfg.kind == "math":  # the embedded task: builds (or reuses) its SFT model and pairs
        from engine.task.pipeline import prepare_math_task

        task = prepare_math_task(cfg)
        made = json.loads((task.root / "summary.json").read_text())["pairs"]
        if not made["train"]["pairs"]:
            raise RuntimeError(
                f"the math task cached in {task.root} has no train pairs: no prompt had both a "
                "correct and a wrong answer among its samples (SFT held-out accuracy "
                f"{task.sft_summary['accuracy']:.3f}, in band: {task.sft_summary['in_band']}); "
                "change data.sft.* / data.problems.* so the SFT model lands in "
                "data.sft.accuracy_band, or raise data.problems.pair_prompts"
            )
        model_cfg = OmegaConf.merge(model_cfg, {"name_or_path": str(task.model_dir)})
        data_cfg = OmegaConf.merge(
            data_cfg, {"train": str(task.train_file), "eval": str(task.eval_file)}
        )
    tokenizer = load_tokenizer(model_cfg)
    pair_options = {
        "max_length": int(data_cfg.max_length),
        "max_prompt_length": data_cfg.get("max_prompt_length"),
        "on_bad_row": data_cfg.on_bad_row,
    }
    train_pairs, train_report = load_pairs(
        data_cfg.train, tokenizer, split=data_cfg.split, limit=data_cfg.get("limit"), **pair_options
    )
    eval_pairs: list[TokenizedPair] = []
    eval_report = None
    if data_cfg.get("eval"):
        eval_pairs, eval_report = load_pairs(
            data_cfg.eval,
            tokenizer,
            split=data_cfg.eval_split,
            limit=data_cfg.get("eval_limit"),
            **pair_options,
        )
    model = load_model(model_cfg, tokenizer, seed=int(cfg.seed))
    policy = SequenceLogProbs(
        model,
        chunk_size=int(trainer.logit_chunk_size),
        keep_mb=float(trainer.get("logit_keep_mb", 0)),
        chunked=bool(trainer.get("chunked_logprobs", True)),
    )
    layout = PairLayout.from_config(trainer)  # prefix sharing / padding-free packing
    sampler = step_sampler(train_pairs, trainer, world, int(cfg.seed))
    total_steps = (
        int(trainer.max_steps)
        if trainer.get("max_steps")
        else int(trainer.epochs) * sampler.steps_per_epoch
    )

    reference_cfg = cfg.get("reference") or {}
    live_reference = None  # reference.precompute=false: a frozen copy scored at every micro step
    if needs.needs_reference and not reference_cfg.get("precompute", True):
        if reference_cfg.get("name_or_path"):
            live_reference, _ = _separate_reference(
                model_cfg, reference_cfg, tokenizer, trainer, device, int(cfg.seed)
            )
        else:  # copied before DeepSpeed wraps (and under ZeRO-3 partitions) the policy
            live_reference = _frozen_scorer(copy.deepcopy(model).to(device), trainer)

    # ---- DeepSpeed -----------------------------------------------------------------------------
    import deepspeed

    ds_config = build_deepspeed_config(
        cfg, model_dtype=next(model.parameters()).dtype, world_size=world
    )
    optimizer_params = [p for p in policy.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=policy,
        model_parameters=optimizer_params,
        config=ds_config,
        lr_scheduler=lambda opt: _lr_schedule(opt, trainer, total_steps),
    )

    def forward(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return engine(**batch.model_inputs())

    # ---- reference log-probs, once, before any update -------------------------------------------
    # from the initial policy itself: no second model in memory (trainer.reference=precompute)
    micro = int(trainer.micro_batch_size)
    pad_id = int(tokenizer.pad_token_id)
    ckpt_dir = run_dir / "checkpoints"
    resume_step = latest_complete_step(ckpt_dir) if trainer.get("resume") == "auto" else None
    if trainer.get("resume") not in (None, "auto"):
        raise ValueError(f"trainer.resume must be null or 'auto', got {trainer.resume!r}")
    reference_scores = eval_reference = None
    if resume_step is not None and dist_utils.is_main():
        log.info("resuming from %s", ckpt_dir / f"step_{resume_step}")
    ref_file = run_dir / "reference_logps.pt"
    if resume_step is not None and ref_file.is_file():
        reference_scores, eval_reference = torch.load(ref_file, weights_only=False)
    else:
        ref_forward, ref_model = forward, None
        if reference_cfg.get("name_or_path"):
            ref_forward, ref_model = _separate_reference(
                model_cfg, reference_cfg, tokenizer, trainer, device, int(cfg.seed)
            )
        if live_reference is not None:  # train references come per batch; eval ones once
            reference_scores = None
            eval_reference = (
                score_pairs(live_reference, eval_pairs, micro, pad_id, device)
                if eval_pairs
                else None
            )
        elif needs.needs_reference:
            engine.eval()
            reference_scores = score_pairs(ref_forward, train_pairs, micro, pad_id, device)
            eval_reference = (
                score_pairs(ref_forward, eval_pairs, micro, pad_id, device) if eval_pairs else None
            )
            engine.train()
        else:  # reference-free objectives (simpo) ignore these: skip the scoring pass
            reference_scores = _zero_scores(train_pairs)
            eval_reference = _zero_scores(eval_pairs) if eval_pairs else None
        del ref_forward, ref_model  # a separate reference is needed for this pass only
        if dist_utils.is_main():  # a resumed run must use the references of the *initial* policy
            with atomic_open(ref_file, "wb") as handle:
                torch.save((reference_scores, eval_reference), handle)

    window = torch.zeros(len(_SUMS), dtype=torch.float64)  # sums since the last log step
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    start_step = 0
    if resume_step is not None:
        client = load_checkpoint(engine, ckpt_dir, resume_step)
        start_step = int(client.get("step", resume_step))
        # the interrupted run's metrics state: the unlogged window's global sums (restored on
        # rank 0 only, since logging all-reduces them) and the last logged means (for results)
        if client.get("window") is not None and dist_utils.is_main():
            window += torch.tensor(client["window"], dtype=torch.float64)
        last_train = dict(client.get("last_train") or {})
        last_eval = dict(client.get("last_eval") or {})
    logger = (
        MetricsLogger(run_dir, resume_step=resume_step, tensorboard=bool(trainer.tensorboard))
        if dist_utils.is_main()
        else None
    )

    def compute_objective(batch: PairBatch, scores: PairScores | None) -> tuple[Any, torch.Tensor]:
        logps, counts = forward(batch)
        n = batch.num_pairs
        policy_chosen = _objective_inputs(logps[:n], counts[:n], needs.length_normalized)
        policy_rejected = _objective_inputs(logps[n:], counts[n:], needs.length_normalized)
        if scores is None:  # a live reference
            with torch.no_grad():
                ref_logps, ref_counts = live_reference(batch)
            ref = PairScores(ref_logps[:n], ref_logps[n:], ref_counts[:n], ref_counts[n:])
        else:
            ref = scores.index(batch.indices.cpu())
        ref_chosen = _objective_inputs(
            ref.chosen_logps, ref.chosen_counts, needs.length_normalized
        ).to(device)
        ref_rejected = _objective_inputs(
            ref.rejected_logps, ref.rejected_counts, needs.length_normalized
        ).to(device)
        chosen_nll = -logps[:n] / counts[:n].clamp(min=1)
        out = objective(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, policy_chosen_nll=chosen_nll
        )
        return out, _pair_stats(out, logps[:n], logps[n:])

    def evaluate() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if eval_pairs:
            engine.eval()
            scores = score_pairs(forward, eval_pairs, micro, pad_id, device)
            out = objective(
                _objective_inputs(
                    scores.chosen_logps, scores.chosen_counts, needs.length_normalized
                ),
                _objective_inputs(
                    scores.rejected_logps, scores.rejected_counts, needs.length_normalized
                ),
                _objective_inputs(
                    eval_reference.chosen_logps,
                    eval_reference.chosen_counts,
                    needs.length_normalized,
                ),
                _objective_inputs(
                    eval_reference.rejected_logps,
                    eval_reference.rejected_counts,
                    needs.length_normalized,
                ),
                policy_chosen_nll=-scores.chosen_logps / scores.chosen_counts.clamp(min=1),
            )
            metrics.update(
                _means(_pair_stats(out, scores.chosen_logps, scores.rejected_logps), "eval")
            )
            engine.train()
        if task is not None:
            engine.eval()
            metrics.update(
                {f"eval/{k}": v for k, v in task.evaluate(model, tokenizer, device).items()}
            )
            engine.train()
        return metrics

    # ---- the loop ------------------------------------------------------------------------------
    grad_accum = int(trainer.grad_accum)
    log_every, eval_every, save_every = (
        int(trainer.log_every),
        int(trainer.eval_every),
        int(trainer.save_every),
    )
    progress = None
    if dist_utils.is_main() and trainer.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None
        )
    kill_at = int(os.environ.get("ENGINE_TEST_SIGKILL_AT_STEP", "-1"))  # test hook: a real SIGKILL
    window_started = time.time()
    for step in range(start_step, total_steps):
        # forward + loss + backward per micro step; DeepSpeed steps the optimizer on the last one
        for micro_step in range(grad_accum):
            indices = sampler.indices(step, micro_step, rank)
            batch = collate_pairs([train_pairs[i] for i in indices], indices, pad_id, layout)
            batch = batch.to(device)
            out, stats = compute_objective(batch, reference_scores)
            engine.backward(out.losses.mean())
            engine.step()
            window += stats
        done = step + 1
        if progress is not None:
            progress.update(1)

        # log: one all-reduce of the window's sums (a sync point, so only every log_every steps)
        if done % log_every == 0 or done == total_steps:
            sums = dist_utils.all_reduce_sum(window.to(device)).cpu()
            last_train = _means(sums, "train")
            elapsed = time.time() - window_started
            last_train["train/lr"] = float(scheduler.get_last_lr()[0])
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                last_train["train/grad_norm"] = float(grad_norm)
            last_train["train/pairs_per_second"] = float(sums[0]) / max(elapsed, 1e-9)
            last_train["train/epoch"] = done / sampler.steps_per_epoch
            if logger is not None:
                logger.log(done, last_train)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{last_train['train/loss']:.4f}",
                        acc=f"{last_train['train/reward_accuracy']:.2f}",
                    )
            window.zero_()
            window_started = time.time()

        # eval, then checkpoint
        if (eval_every and done % eval_every == 0) or done == total_steps:
            last_eval = evaluate()
            if logger is not None and last_eval:
                logger.log(done, last_eval)
        if (save_every and done % save_every == 0) or done == total_steps:
            pending = dist_utils.all_reduce_sum(window.clone().to(device)).cpu()
            client_state = {
                "step": done,
                "window": pending.tolist(),
                "last_train": last_train,
                "last_eval": last_eval,
            }
            save_checkpoint(
                engine, ckpt_dir, done, client_state, keep=int(trainer.keep_checkpoints)
            )
        if done == kill_at:
            os.kill(os.getpid(), 9)

    if progress is not None:
        progress.close()
    if trainer.get("export", True):
        export_hf_model(engine, model, tokenizer, run_dir / "final_model")

    # ---- results -------------------------------------------------------------------------------
    results: dict[str, Any] = {
        "loss": cfg.loss.name,
        "margin": cfg.margin.name,
        "method": cfg.method.name,
        "beta": float(cfg.beta),
        "alpha": float(cfg.margin.alpha),
        "seed": int(cfg.seed),
        "steps": total_steps,
        "world_size": world,
        "wall_seconds": time.time() - started,
        "train": {k.split("/", 1)[1]: v for k, v in last_train.items()},
        "eval": {k.split("/", 1)[1]: v for k, v in last_eval.items()},
        "data": {
            "train": train_report.to_dict(),
            "eval": eval_report.to_dict() if eval_report else None,
        },
    }
    if task is not None:
        results["sft"] = task.sft_summary
    if logger is not None:
        logger.close()
        atomic_write_json(run_dir / "results.json", results)
        log.info("%s; results: %s", _summary_line(results), run_dir / "results.json")
    dist_utils.barrier()
    return results


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


def _zero_scores(pairs: list[TokenizedPair]) -> PairScores:
    """Placeholder reference scores for reference-free objectives (counts kept at 1)."""
    zeros = torch.zeros(len(pairs))
    ones = torch.ones(len(pairs), dtype=torch.long)
    return PairScores(zeros, zeros.clone(), ones, ones.clone())


def _separate_reference(
    model_cfg: DictConfig,
    reference_cfg: Any,
    tokenizer: Any,
    trainer: DictConfig,
    device: torch.device,
    seed: int,
) -> tuple[Any, torch.nn.Module]:
    """A frozen reference model (``reference.name_or_path``) and its scoring function.

    It is scored with the policy's token ids, so it must share the policy's vocabulary.
    """
    ref_cfg = OmegaConf.merge(
        model_cfg, {"name_or_path": str(reference_cfg["name_or_path"]), "tokenizer": None}
    )
    ref_tokenizer = load_tokenizer(ref_cfg, key="reference")
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"reference.name_or_path={reference_cfg['name_or_path']!r}: its tokenizer differs from "
            "the policy's; a reference must score the same token ids"
        )
    ref_model = load_model(ref_cfg, tokenizer, seed=seed, key="reference").to(device)
    return _frozen_scorer(ref_model, trainer), ref_model


def _frozen_scorer(model: torch.nn.Module, trainer: DictConfig) -> Any:
    """``batch -> (logps, counts)`` of a frozen model (a reference), in eval mode, no gradients."""
    model.eval().requires_grad_(False)
    scorer = SequenceLogProbs(
        model,
        chunk_size=int(trainer.logit_chunk_size),
        keep_mb=float(trainer.get("logit_keep_mb", 0)),
        chunked=bool(trainer.get("chunked_logprobs", True)),
    ).eval()

    @torch.no_grad()
    def ref_forward(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return scorer(**batch.model_inputs())

    return ref_forward


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
    traceback) in the run directory before re-raising, so a sweep's summary can list it."""
    try:
        return train(cfg)
    except Exception as error:
        if dist_utils.is_main():
            try:
                # rank 0's own choice of directory (what _resolve_run_dir broadcasts), found
                # without a collective: the other ranks may be dead or stuck
                run_dir = cfg.get("output_dir")
                if not run_dir:
                    from hydra.core.hydra_config import HydraConfig

                    run_dir = (
                        HydraConfig.get().runtime.output_dir
                        if HydraConfig.initialized()
                        else "outputs/run"
                    )
                path = Path(run_dir).resolve()
                path.mkdir(parents=True, exist_ok=True)
                atomic_write_json(
                    path / "failed.json",
                    {
                        "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc(),
                    },
                )
            except Exception:  # reporting must never mask the real error
                pass
        raise


def _hydra_main() -> None:
    import hydra

    # the deepspeed launcher appends --local_rank=N (Hydra would reject it); LOCAL_RANK says it too
    for arg in list(sys.argv[1:]):
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)
    # ranks other than 0 must not create run directories of their own: rank 0's is broadcast
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += [
            "hydra.output_subdir=null",
            "hydra.run.dir=.",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        run(cfg)

    main()


if __name__ == "__main__":
    _hydra_main()
