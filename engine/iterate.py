"""Iterative on-policy preference training: ``python -m engine.iterate [hydra overrides]``.

    python -m engine.iterate loss=hinge margin=balanced iterate.rounds=3      # the embedded task
    python -m engine.iterate method=dpo model=hf model.name_or_path=<dir> \\
        iterate.prompts.path=questions.jsonl benchmark=[math500] benchmark.math500.path=...

Rounds of sample -> train -> evaluate, each round starting from the policy the previous one
trained (Iterative RPO, arXiv 2404.19733; RLHFlow's online iterative recipe):

1. **sample**: ``iterate.prompts_per_round`` prompts of the pool (``iterate.pool``: ``fresh``
   takes the next ones every round, ``same`` the same ones), ``iterate.samples_per_prompt``
   completions each from the current policy at ``iterate.temperature``, verified and paired by
   the rule of :mod:`engine.generation.pairing` (:func:`engine.sample_pairs.sample_pairs`);
2. **train**: any loss x margin or method (the training config's groups) on those pairs, from
   the current policy (:func:`engine.train.train`). The reference is the initial model
   (``iterate.reference=initial``, RLHFlow's choice) or the round's starting policy
   (``round_start``). With adapters, ``iterate.adapters=merge`` merges the round's adapter and
   starts a fresh one on the merged model; ``continue`` keeps training the same adapter;
3. **evaluate**: greedy accuracy of the trained policy on the ``benchmark`` selection
   (:func:`engine.evaluate.evaluate`).

The initial policy is evaluated once first (round 0). With the embedded task (``data=math``,
the default) the task's cached SFT model is the initial policy, the pool is fresh task problems
(disjoint from every set the task uses) and the evaluation is its held-out problems as the
``arithmetic`` benchmark; with ``data=files`` the model is ``model``'s and the pool and the
benchmarks are given.

Layout of ``output_dir``: ``start/eval/`` (round 0), ``round_<r>/`` with ``prompts.jsonl``,
``pairs/`` (sample_pairs' outputs), ``train/`` (a training run directory), ``eval/`` (evaluate's
outputs) and ``round.json``, written last: a round is done only when it is there. ``rounds.jsonl``
and ``rounds.md`` (the table: accuracy, chosen reward, pairs made, all-correct / all-wrong
prompts per round) are rewritten from the ``round.json`` files after every round.

Rerunning the same command continues where it stopped: finished rounds are skipped, and the
phase in flight resumes by itself (sampling by batch, training from its newest checkpoint with
``trainer.resume=auto``, evaluation as :mod:`engine.evaluate` resumes). ``-m`` sweeps run one
pipeline per cell (give ``hydra.sweep.dir`` to rerun a sweep in place).

Stop signals (SIGTERM, SIGUSR1, submitit's) are watched from the first line on: a stop in any
phase of any round keeps the work done (the phase's own stop points: a sampled batch, an
optimizer step, an evaluated batch) and ends the process with the requeue status
(:mod:`engine.runtime.preemption`); rerunning the same command continues and gives the same
result. A crash writes ``failed.json`` in ``output_dir``. The finished pipeline writes
``results.json`` there (the cell: final and per-round accuracy, chosen reward, pairs, config),
which the tables read (:mod:`engine.rounds`; ``experiments/tables/iterative/``).
"""

# ruff: noqa: E402

from __future__ import annotations

from engine.runtime.preemption import watch_from_start

watch_from_start(__name__)  # python -m engine.iterate: stop signals are recorded from here on

# the imports below take seconds: after the line above (hence the file's E402 exemption)
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

import engine.task  # noqa: F401  (registers the embedded task's data source and verifier)
from engine.data.loading import read_rows, write_jsonl
from engine.rounds import cell_results, eval_summary, read_round, write_round, write_table
from engine.runtime import distributed as dist_utils
from engine.runtime.errors import ConfigError, require
from engine.runtime.fileio import atomic_write_json
from engine.runtime.launch import (
    hydra_entry,
    init_if_launched,
    resolve_output_dir,
    write_failed,
)
from engine.runtime.preemption import (
    Preempted,
    exit_preempted,
    stop_point,
    stop_signals_watched,
)

log = logging.getLogger("engine.iterate")

POOLS = ("fresh", "same")
REFERENCES = ("initial", "round_start")
ADAPTER_MODES = ("merge", "continue")
#: the sample_pairs keys of a prompt pool: a benchmark's keys without its decoding
_DECODING = ("max_new_tokens", "temperature", "top_p")


@dataclass(frozen=True)
class Plan:
    """What every round reads: the initial policy, the prompt pool and the evaluation.

    Attributes:
        initial_model: the ``model`` config of round 0's policy (a plain mapping).
        prompts: the pool as a sample_pairs ``prompts`` block (path, fields, verifier, prompt).
        pool_rows: the pool's rows, in order.
        benchmark: the ``benchmark`` selection the policies are evaluated on.
    """

    initial_model: dict[str, Any]
    prompts: dict[str, Any]
    pool_rows: list[dict[str, Any]]
    benchmark: dict[str, Any]


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad ``iterate.*`` key."""
    it = cfg.iterate
    for key in ("rounds", "prompts_per_round", "samples_per_prompt", "batch_prompts"):
        value = it.get(key)
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"iterate.{key}",
            f"must be an integer > 0, got {value!r}",
        )
    require(it.samples_per_prompt >= 2, "iterate.samples_per_prompt", "needs >= 2 (pairs)")
    require(it.temperature > 0, "iterate.temperature", f"must be > 0, got {it.temperature}")
    require(it.pool in POOLS, "iterate.pool", f"must be one of {', '.join(POOLS)}")
    require(
        it.reference in REFERENCES,
        "iterate.reference",
        f"must be one of {', '.join(REFERENCES)}, got {it.reference!r}",
    )
    require(
        it.adapters in ADAPTER_MODES,
        "iterate.adapters",
        f"must be one of {', '.join(ADAPTER_MODES)}, got {it.adapters!r}",
    )
    if cfg.data.get("kind") != "math":
        require(
            it.get("prompts") is not None,
            "iterate.prompts",
            "is required with data=files: a prompt pool with gold answers "
            "(iterate.prompts.path=<file>, the keys of a benchmark)",
        )
        require(
            bool(cfg.get("benchmark")),
            "benchmark",
            "is required with data=files: what each round is evaluated on (benchmark=[...])",
        )


def make_plan(cfg: DictConfig, root: Path) -> Plan:
    """The plan of ``cfg``: from the embedded task (``data=math``: built or reused, its pool and
    held-out problems written under ``root/task/``) or from the given model, pool and
    benchmarks."""
    if cfg.data.get("kind") == "math":
        from engine.task.pipeline import iteration_inputs

        inputs = iteration_inputs(cfg, cfg.iterate.rounds * cfg.iterate.prompts_per_round)
        task_dir = root / "task"
        pool_file, heldout_file = task_dir / "pool.jsonl", task_dir / "heldout.jsonl"
        if dist_utils.is_main():
            write_jsonl(pool_file, inputs.pool_rows)
            write_jsonl(heldout_file, inputs.heldout_rows)
        dist_utils.barrier()
        benchmark = {"arithmetic": {**inputs.benchmark, "path": str(heldout_file)}}
        prompts = {**inputs.prompts, "path": str(pool_file)}
        initial = _container(cfg.model) | {"name_or_path": str(inputs.model_dir)}
    else:
        prompts = _container(cfg.iterate.prompts)
        benchmark = _container(cfg.benchmark)
        initial = _container(cfg.model)
    rows = [row for _, row in read_rows(str(prompts["path"]), split=prompts.get("split", "train"))]
    needed = cfg.iterate.prompts_per_round * (
        cfg.iterate.rounds if cfg.iterate.pool == "fresh" else 1
    )
    if len(rows) < needed:
        raise ConfigError(
            f"config key iterate.prompts_per_round: {prompts['path']} holds {len(rows)} prompts; "
            f"{cfg.iterate.rounds} rounds of {cfg.iterate.prompts_per_round} fresh prompts need "
            f"{needed} (iterate.pool=same reuses one set)"
        )
    return Plan(initial, prompts, rows, benchmark)


def iterate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run (or continue) the rounds of ``cfg``; returns ``rounds.jsonl``'s rows (every rank).
    Stop signals are watched meanwhile: a stop raises :class:`Preempted` once the phase in hand
    kept its work (``run`` turns it into the requeue exit)."""
    with stop_signals_watched():
        return _iterate(cfg)


def _iterate(cfg: DictConfig) -> list[dict[str, Any]]:
    started = time.time()
    check_config(cfg)
    if cfg.trainer.get("threads"):  # sampling and evaluation too, not only training
        import torch

        torch.set_num_threads(int(cfg.trainer.threads))
    init_if_launched()
    root = resolve_output_dir(cfg, "outputs/iterate")
    if dist_utils.is_main():
        (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    plan = make_plan(cfg, root)
    stop_point("during startup, after the plan")
    rows = [_round_zero(cfg, plan, root)]
    stop_point("after round 0")
    policy = plan.initial_model
    for number in range(1, int(cfg.iterate.rounds) + 1):
        round_dir = root / f"round_{number}"
        done = read_round(round_dir)
        if done is None:
            done = _run_round(cfg, plan, number, policy, round_dir)
        rows.append(done)
        policy = _trained_policy(cfg, plan, round_dir / "train")
        write_table(root, rows)
        stop_point(f"after round {number}")
    if dist_utils.is_main():
        atomic_write_json(root / "results.json", cell_results(cfg, rows, time.time() - started))
        (root / "failed.json").unlink(missing_ok=True)  # an earlier attempt's, now superseded
    dist_utils.barrier()
    return rows


def _round_zero(cfg: DictConfig, plan: Plan, root: Path) -> dict[str, Any]:
    """Round 0: the initial policy's accuracy (evaluated once, then read back)."""
    done = read_round(root / "start")
    if done is None:
        started = time.time()
        results = _evaluate(cfg, plan, plan.initial_model, root / "start" / "eval")
        done = {
            "round": 0,
            "policy": plan.initial_model.get("name_or_path"),
            "eval": eval_summary(results),
            "seconds": {"eval": round(time.time() - started, 1)},
        }
        write_round(root / "start", done)
    return done


def _run_round(
    cfg: DictConfig, plan: Plan, number: int, policy: dict[str, Any], round_dir: Path
) -> dict[str, Any]:
    """One round, sample -> train -> evaluate, each phase resuming what a killed run left."""
    log.info("round %d: sampling from %s", number, policy.get("name_or_path"))
    clock = {"start": time.time()}
    prompts_file = _write_round_prompts(cfg, plan, number, round_dir)
    report = _sample(cfg, plan, number, policy, prompts_file, round_dir / "pairs")
    clock["sample"] = time.time()
    if report["pairs"] == 0:
        raise RuntimeError(
            f"round {number} made no pairs from {report['prompts']} prompts (all correct: "
            f"{report['all_correct_prompts']}, all wrong: {report['all_wrong_prompts']}): "
            "raise iterate.samples_per_prompt or iterate.prompts_per_round, or change "
            "iterate.temperature"
        )
    log.info("round %d: training on %d pairs", number, report["pairs"])
    results = _train(cfg, plan, number, policy, Path(report["pairs_file"]), round_dir / "train")
    clock["train"] = time.time()
    trained = _trained_policy(cfg, plan, round_dir / "train")
    evaluation = _evaluate(cfg, plan, _plain(trained), round_dir / "eval")
    clock["eval"] = time.time()
    done = {
        "round": number,
        "policy": trained.get("name_or_path"),
        "pairs": {
            key: report[key]
            for key in (
                "prompts",
                "pairs",
                "sample_accuracy",
                "all_correct_prompts",
                "all_wrong_prompts",
            )
        },
        "train": {key: results["train"].get(key) for key in _TRAIN_KEYS},
        "eval": eval_summary(evaluation),
        "seconds": {
            phase: round(clock[phase] - clock[previous], 1)
            for previous, phase in (("start", "sample"), ("sample", "train"), ("train", "eval"))
        },
    }
    write_round(round_dir, done)
    return done


_TRAIN_KEYS = (
    "loss",
    "chosen_reward",
    "rejected_reward",
    "reward_accuracy",
    "chosen_logp",
    "chosen_reward_below_zero",
)


def _write_round_prompts(cfg: DictConfig, plan: Plan, number: int, round_dir: Path) -> Path:
    """Round ``number``'s prompts (a slice of the pool) as a JSONL file in its directory."""
    size = int(cfg.iterate.prompts_per_round)
    start = (number - 1) * size if cfg.iterate.pool == "fresh" else 0
    path = round_dir / "prompts.jsonl"
    if dist_utils.is_main() and not path.is_file():
        write_jsonl(path, plan.pool_rows[start : start + size])
    dist_utils.barrier()
    return path


def round_seed(seed: int, number: int) -> int:
    """Round ``number``'s sampling seed: a hash of both, so rounds draw independently."""
    return int(hashlib.sha256(f"iterate:{seed}:{number}".encode()).hexdigest()[:8], 16)


def _sample(
    cfg: DictConfig,
    plan: Plan,
    number: int,
    policy: dict[str, Any],
    prompts_file: Path,
    out: Path,
) -> dict[str, Any]:
    from engine.sample_pairs import sample_pairs

    if (out / "report.json").is_file():  # sample_pairs writes it last, atomically
        return json.loads((out / "report.json").read_text())
    it = cfg.iterate
    prompts = {k: v for k, v in plan.prompts.items() if k not in (*_DECODING, "limit")}
    sample_cfg = OmegaConf.create(
        {
            "model": _plain(policy),
            "prompts": {**prompts, "path": str(prompts_file), "split": "train"},
            "samples_per_prompt": int(it.samples_per_prompt),
            "temperature": float(it.temperature),
            "top_p": float(it.top_p),
            "max_new_tokens": int(it.max_new_tokens),
            "seed": round_seed(int(cfg.seed), number),
            "batch_prompts": int(it.batch_prompts),
            "generation": _container(cfg.generation),
            "output_dir": str(out),
        }
    )
    return sample_pairs(sample_cfg)


def _train(
    cfg: DictConfig,
    plan: Plan,
    number: int,
    policy: dict[str, Any],
    pairs_file: Path,
    out: Path,
) -> dict[str, Any]:
    from engine.train import train

    train_cfg = cfg.copy()
    with open_dict(train_cfg):
        train_cfg.pop("iterate", None)
        train_cfg.benchmark = None  # the evaluate phase measures the policy, once
        train_cfg.data.kind = "files"
        train_cfg.data.train = str(pairs_file)
        train_cfg.data.eval = None
        train_cfg.model = OmegaConf.merge(cfg.model, _training_model(cfg, plan, policy, number))
        train_cfg.output_dir = str(out)
        train_cfg.trainer.resume = "auto"  # a rerun continues from the newest checkpoint
        initial = plan.initial_model.get("name_or_path")
        separate = cfg.iterate.reference == "initial" and number > 1
        train_cfg.reference.name_or_path = str(initial) if separate else None
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    return train(train_cfg)


def _training_model(
    cfg: DictConfig, plan: Plan, policy: dict[str, Any], number: int
) -> dict[str, Any]:
    """The ``model`` keys of round ``number``'s training run: the current policy, with fresh
    adapters (on the merged model) or the previous round's adapter continued."""
    if number > 1 and cfg.iterate.adapters == "continue" and policy.get("adapter"):
        return {
            "name_or_path": plan.initial_model.get("name_or_path"),
            "adapter": policy["adapter"],
        }
    return {"name_or_path": policy.get("name_or_path"), "adapter": None}


def _trained_policy(cfg: DictConfig, plan: Plan, run_dir: Path) -> dict[str, Any]:
    """The policy a finished training run left: its merged / full ``final_model/`` (what
    sampling and evaluation load), with ``adapter`` set to its ``final_adapter/`` when it
    trained adapters (what ``iterate.adapters=continue`` trains further)."""
    adapter = run_dir / "final_adapter"
    return plan.initial_model | {
        "name_or_path": str(run_dir / "final_model"),
        "adapter": str(adapter) if adapter.is_dir() else None,
    }


def _plain(model: dict[str, Any]) -> dict[str, Any]:
    """A model config that loads the weights at ``name_or_path`` as they are (no adapters)."""
    plain = dict(model) | {"adapter": None, "quantization": None}
    if isinstance(plain.get("lora"), dict):
        plain["lora"] = {**plain["lora"], "r": None}
    return plain


def _evaluate(cfg: DictConfig, plan: Plan, model: dict[str, Any], out: Path) -> dict[str, Any]:
    from engine.evaluate import evaluate

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    eval_cfg = OmegaConf.create(
        {
            "model": _plain(model),
            "benchmark": plan.benchmark,
            "generation": _container(cfg.generation),
            "output_dir": str(out),
        }
    )
    return evaluate(eval_cfg)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run(cfg: DictConfig) -> list[dict[str, Any]] | None:
    """:func:`iterate` as a command: stop signals watched from its start; a stop in any phase
    exits with the requeue status (a rerun of the same command continues; submitit's handler
    requeues the cell under ``hydra/launcher=slurm``); a crash writes ``failed.json`` in the
    pipeline's directory before re-raising, so a sweep's summary can list the cell."""
    import engine.task  # noqa: F401, F811  (the registrations, in a parallel sweep's worker too)

    with stop_signals_watched():
        try:
            return iterate(cfg)
        except Preempted as stop:  # the phase in hand kept its work: exit for a requeue, below
            stopped = stop
        except Exception as error:
            if dist_utils.is_main():
                write_failed(cfg, error, "outputs/iterate")
            raise
    exit_preempted(stopped, requeue=True)


if __name__ == "__main__":
    hydra_entry("iterate", run)
