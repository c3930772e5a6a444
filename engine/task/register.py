"""The embedded task announces itself: its verifier and its data source, registered by name.

Importing :mod:`engine.task` runs this module, so the commands (``engine.train``,
``engine.evaluate``, ``engine.sample_pairs``) and ``engine.verifiers`` find

- the verifier ``arithmetic`` in :data:`engine.generation.verifiers.VERIFIERS`: exactly one
  ``####`` followed by a canonical integer equal to the gold (:func:`extract_answer`);
- the data source ``math`` in :data:`engine.data.sources.SOURCES` (``data=math``): the task's
  cached SFT model and pairs (:mod:`engine.task.pipeline`), with its greedy accuracy as an
  evaluator.

The rooms below the task (data, model, generation) never import it; it plugs into their
registries.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from engine.data.sources import SOURCES, ResolvedSource
from engine.generation.verifiers import Verdict, register
from engine.task.arithmetic import extract_answer


@register("arithmetic")
def arithmetic(completion: str, gold: str) -> Verdict:
    """The embedded arithmetic task: one ``####``, then a canonical integer equal to ``gold``."""
    answer = extract_answer(completion)
    return Verdict(
        answer is not None and answer == int(gold), None if answer is None else str(answer)
    )


@SOURCES.register("math")
def math_source(cfg: DictConfig) -> ResolvedSource:
    """``data=math``: the embedded task's cached SFT model and pairs, and its greedy accuracy."""
    from engine.task.pipeline import prepare_math_task  # builds a model on first use: lazily

    task = prepare_math_task(cfg)
    if not task.made_train_pairs():
        raise RuntimeError(
            f"the math task cached in {task.root} has no train pairs: no prompt had both a "
            "correct and a wrong answer among its samples (SFT held-out accuracy "
            f"{task.sft_summary['accuracy']:.3f}, in band: {task.sft_summary['in_band']}); "
            "change data.sft.* / data.problems.* so the SFT model lands in "
            "data.sft.accuracy_band, or raise data.problems.pair_prompts"
        )
    return ResolvedSource(
        model_cfg=OmegaConf.merge(cfg.model, {"name_or_path": str(task.model_dir)}),
        data_cfg=OmegaConf.merge(
            cfg.data, {"train": str(task.train_file), "eval": str(task.eval_file)}
        ),
        evaluators=[task],
        extra_results={"sft": task.sft_summary},
    )
