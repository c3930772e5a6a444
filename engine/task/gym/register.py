"""The reasoning-gym plug-in announces itself: its verifier and its data source, by name.

Importing :mod:`engine.task` (the commands do) runs this module, so

- ``engine.verifiers.VERIFIERS["reasoning_gym"]`` judges a completion by the dataset's own
  ``score_answer`` (:mod:`engine.task.gym.answers`), for benchmarks (``verifier: reasoning_gym``)
  and pair sampling alike;
- ``data=reasoning_gym`` (``data.kind: reasoning_gym``) resolves to the model's start and
  on-policy pairs on reasoning-gym problems (:mod:`engine.task.gym.pipeline`), with greedy
  accuracy on the test problems as the benchmark ``reasoning_gym`` at every evaluation.

Registering imports nothing from reasoning-gym: a missing extra fails when it is used, naming it.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from engine.data.sources import SOURCES, ResolvedSource
from engine.generation.evaluation import BenchmarkEvaluator
from engine.generation.verifiers import Verdict, register
from engine.runtime import distributed as dist_utils


@register("reasoning_gym")
def reasoning_gym(completion: str, gold: str) -> Verdict:
    """reasoning-gym: the stated answer, scored by the dataset's ``score_answer`` (1 = right)."""
    from engine.task.gym.answers import judge

    return judge(completion, gold)


@SOURCES.register("reasoning_gym")
def reasoning_gym_source(cfg: DictConfig) -> ResolvedSource:
    """``data=reasoning_gym``: the model as it is (the start is also the reference), its cached
    on-policy pairs, and greedy accuracy on the held-out test problems as an evaluator."""
    from engine.task.gym.pipeline import BENCHMARK, prepare_gym

    assets = prepare_gym(cfg)
    pairs = assets.summary["pairs"]
    if not pairs["train"]["pairs"]:
        raise RuntimeError(
            f"data=reasoning_gym: no train pairs in {assets.root}: no prompt had both a correct "
            f"and a wrong sample (start accuracy {assets.summary['start']['accuracy']:.3f}, sample "
            f"accuracy {pairs['train']['sample_accuracy']:.3f}); choose datasets or options "
            "whose start lies between 0 and 1, or raise data.pairs.samples_per_prompt"
        )
    stage = int(OmegaConf.select(cfg, "deepspeed.zero_optimization.stage", default=0) or 0)
    evaluator = BenchmarkEvaluator(
        {BENCHMARK: assets.benchmark},
        batch_size=int(OmegaConf.select(cfg, "generation.batch_size", default=64)),
        lockstep=stage == 3 and dist_utils.world_size() > 1,
    )
    eval_file = assets.eval_file
    return ResolvedSource(
        model_cfg=cfg.model,
        data_cfg=OmegaConf.merge(
            cfg.data,
            {"train": str(assets.train_file), "eval": str(eval_file) if eval_file else None},
        ),
        evaluators=[evaluator],
        extra_results={
            "start": assets.summary["start"],
            "pairs": pairs,
            "reasoning_gym": {
                "problems": str(assets.problems_dir),
                "test_file": assets.benchmark["path"],
                "assets": str(assets.root),
                "build_seconds": assets.summary["build_seconds"],
            },
        },
    )
