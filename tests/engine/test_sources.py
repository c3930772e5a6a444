"""Data sources: the data config resolves to model, tokenizer, pairs, evaluators and extra
results before the loop sees it."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import engine.data.sources as sources
import engine.task  # noqa: F401  (registers data=math)
import engine.task.pipeline as pipeline
from engine.data.sources import ResolvedSource, prepare_data
from engine.model.loading import load_tokenizer


def test_files_are_read_with_their_reports(compose_config, run_overrides, pair_files) -> None:
    cfg = compose_config(run_overrides(pair_files.train, pair_files.eval, None))
    data = prepare_data(cfg, load_tokenizer)
    assert (len(data.train_pairs), len(data.eval_pairs)) == (16, 5)
    assert data.model_cfg == cfg.model and data.evaluators == [] and data.extra_results == {}
    reports = data.reports()
    assert reports["train"]["pairs"] == 16 and reports["eval"]["pairs"] == 5
    no_eval = prepare_data(
        compose_config(run_overrides(pair_files.train, None, None)), load_tokenizer
    )
    assert no_eval.eval_pairs == [] and no_eval.reports()["eval"] is None


class FixedEvaluator:
    def evaluate(self, model, tokenizer, device) -> dict[str, float]:
        return {"accuracy": 1.0}


def test_a_source_brings_its_model_data_evaluators_and_results(
    compose_config, run_overrides, pair_files, monkeypatch
) -> None:
    evaluator = FixedEvaluator()

    def custom(cfg):
        return ResolvedSource(
            model_cfg=OmegaConf.merge(cfg.model, {"dtype": "float32"}),
            data_cfg=OmegaConf.merge(cfg.data, {"train": str(pair_files.eval)}),
            evaluators=[evaluator],
            extra_results={"custom": {"made": 5}},
        )

    monkeypatch.setitem(sources.SOURCES._items, "custom", custom)  # a registry is read-only
    cfg = compose_config([*run_overrides(pair_files.train, None, None), "data.kind=custom"])
    data = prepare_data(cfg, load_tokenizer)
    assert len(data.train_pairs) == 5  # the source's data config, not the original
    assert data.model_cfg.dtype == "float32"
    assert data.evaluators == [evaluator] and data.extra_results == {"custom": {"made": 5}}


def test_the_math_task_without_train_pairs_says_what_to_change(
    compose_config, tmp_path, monkeypatch
) -> None:
    (tmp_path / "summary.json").write_text('{"pairs": {"train": {"pairs": 0}}}')
    task = pipeline.MathTask(
        root=tmp_path, eval_problems=[], sft_summary={"accuracy": 0.01, "in_band": False}
    )
    monkeypatch.setattr(pipeline, "prepare_math_task", lambda cfg: task)
    with pytest.raises(RuntimeError, match=r"no train pairs.*data.sft.accuracy_band"):
        prepare_data(compose_config(["data=math"]), load_tokenizer)
