"""The loop's parts on a plain module (no DeepSpeed): one train step and one evaluation.

At the initial policy, with the policy as its own reference, every implicit reward is exactly 0,
so the logistic loss is log 2 on every pair: a check that does not trust the engine's numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import engine.task  # noqa: F401  (registers data=math)
from engine.data.batching import StepSampler, collate_pairs
from engine.data.packing import PairLayout
from engine.data.sources import prepare_data
from engine.loop import LoopParts, evaluate, train_step
from engine.model.loading import load_model, load_tokenizer
from engine.model.logprobs import SequenceLogProbs
from engine.model.reference import PrecomputedReference
from losses import PreferenceLoss


class ModeEvaluator:
    """Reports whether the model was in eval mode when asked."""

    def evaluate(self, model, tokenizer, device) -> dict[str, float]:
        return {"accuracy": 0.25, "asked_in_eval_mode": float(not model.training)}


@pytest.fixture
def parts(compose_config, run_overrides, pair_files, tmp_path) -> LoopParts:
    cfg = compose_config(run_overrides(pair_files.train, pair_files.eval, None))
    data = prepare_data(cfg, load_tokenizer)
    data.evaluators.append(ModeEvaluator())
    model = load_model(data.model_cfg, data.tokenizer, seed=0)
    policy = SequenceLogProbs(model, chunk_size=64)
    pad_id = int(data.tokenizer.pad_token_id)
    reference = PrecomputedReference(data.train_pairs, data.eval_pairs, 2, pad_id, "cpu")
    reference.prepare(policy, tmp_path, resume=False)
    return LoopParts(
        trainer=cfg.trainer,
        ds_engine=policy,
        scheduler=None,
        model=model,
        objective=PreferenceLoss(beta=0.1),
        reference=reference,
        data=data,
        sampler=StepSampler(len(data.train_pairs), 2, 1, 1, seed=0),
        layout=PairLayout(prefix_sharing=True, padding_free=True),
        device=torch.device("cpu"),
        total_steps=1,
        checkpoint_dir=Path(tmp_path / "checkpoints"),
        logger=None,
    )


def test_a_train_step_at_the_initial_policy(parts) -> None:
    indices = parts.sampler.indices(0, 0, 0)
    batch = collate_pairs([parts.data.train_pairs[i] for i in indices], indices, 0, parts.layout)
    out, sums = train_step(parts, batch)
    assert out.losses.requires_grad
    assert torch.allclose(out.losses, torch.full((2,), math.log(2)), atol=1e-5)
    assert sums[0] == 2 and sums[1] == pytest.approx(2 * math.log(2), abs=1e-5)


def test_evaluation_scores_the_eval_pairs_then_asks_each_evaluator(parts) -> None:
    metrics = evaluate(parts)
    assert metrics["eval/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval/chosen_reward"] == 0.0
    assert metrics["eval/accuracy"] == 0.25 and metrics["eval/asked_in_eval_mode"] == 1.0
    assert parts.ds_engine.training  # back in training mode
