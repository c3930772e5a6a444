"""The reference policy: precomputed once (default) or scored live; the initial policy or a
separate model. Every combination gives the same training values as its counterpart, and each
run really took its own path (the scorers' calls are counted)."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import engine.model.reference as reference_module
import engine.task  # noqa: F401  (registers data=math)
from engine.data.batching import collate_pairs
from engine.data.sources import prepare_data
from engine.model.loading import load_model, load_tokenizer
from engine.model.logprobs import SequenceLogProbs
from engine.model.reference import LiveReference, NoReference, PrecomputedReference, frozen_scorer

#: the trainer group a scorer reads (conf/trainer/default.yaml), with small LM-head chunks
SCORER_OPTIONS = OmegaConf.merge(
    OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/trainer/default.yaml"),
    {"logit_chunk_size": 64},
)

# ---- the variants on their own (a tiny model, no DeepSpeed) ------------------------------------


@pytest.fixture(scope="module")
def tiny(compose_config, run_overrides, pair_files):
    """The tiny run's data, its initial policy (as the loop's module) and a frozen scorer."""
    data = prepare_data(
        compose_config(run_overrides(pair_files.train, pair_files.eval, None)), load_tokenizer
    )
    model = load_model(data.model_cfg, data.tokenizer, seed=0)
    common = (data.train_pairs, data.eval_pairs, 2, int(data.tokenizer.pad_token_id), "cpu")
    return data, SequenceLogProbs(model, chunk_size=64), model, common


def batch_of(data, indices):
    pairs = [data.train_pairs[i] for i in indices]
    return collate_pairs(pairs, indices, int(data.tokenizer.pad_token_id))


def test_every_variant_answers_the_same_questions(tiny, tmp_path) -> None:
    data, policy, model, common = tiny
    batch = batch_of(data, [3, 0])
    precomputed = PrecomputedReference(*common)
    precomputed.prepare(policy, tmp_path, resume=False)
    live = LiveReference(*common, scorer=frozen_scorer(copy.deepcopy(model), SCORER_OPTIONS))
    live.prepare(policy, tmp_path / "live", resume=False)
    for name in ("chosen_logps", "rejected_logps", "chosen_counts", "rejected_counts"):
        want = getattr(precomputed.train_logprobs(batch), name)
        assert torch.allclose(
            getattr(live.train_logprobs(batch), name).float(), want.float(), atol=1e-5
        )
        assert torch.allclose(
            getattr(live.eval_logprobs(), name).float(),
            getattr(precomputed.eval_logprobs(), name).float(),
            atol=1e-5,
        )
    none = NoReference(*common)
    none.prepare(policy, tmp_path / "none", resume=False)
    assert not none.train_logprobs(batch).chosen_logps.any()
    assert none.eval_logprobs().chosen_logps.shape == (5,)
    assert policy.training  # the scoring pass leaves the policy in training mode


def test_precomputed_scores_are_saved_and_read_back_on_resume(tiny, tmp_path) -> None:
    data, policy, _, common = tiny
    PrecomputedReference(*common).prepare(policy, tmp_path, resume=False)
    assert (tmp_path / reference_module.REFERENCE_FILE).is_file()

    def never(*args, **kwargs):
        raise AssertionError("a resumed run must not score or load the reference again")

    resumed = PrecomputedReference(*common, load_scorer=never)
    resumed.prepare(policy, tmp_path, resume=True)
    fresh = PrecomputedReference(*common)
    fresh.prepare(policy, tmp_path / "fresh", resume=False)
    batch = batch_of(data, [5])
    assert torch.equal(
        resumed.train_logprobs(batch).chosen_logps, fresh.train_logprobs(batch).chosen_logps
    )


# ---- through training --------------------------------------------------------------------------


@pytest.fixture
def reference_calls(monkeypatch) -> Counter:
    """Counts ``<kind>.train_logprobs`` calls (per micro batch) and ``load_separate`` (a separate
    reference model loaded) while training runs in this process."""
    calls: Counter = Counter()
    for cls in (
        reference_module.PrecomputedReference,
        reference_module.NoReference,
        reference_module.LiveReference,
    ):
        real = cls.train_logprobs

        def counted(self, batch, real=real, cls=cls):
            if type(self) is cls:
                calls[f"{cls.kind}.train_logprobs"] += 1
            return real(self, batch)

        monkeypatch.setattr(cls, "train_logprobs", counted)
    real_load = reference_module._load_separate

    def load_separate(*args, **kwargs):
        calls["load_separate"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(reference_module, "_load_separate", load_separate)
    return calls


@pytest.mark.parametrize("layout", ["default", "plain"])
def test_live_reference_equals_precomputed(
    tmp_path, train_run, metrics_rows, metrics_match, reference_calls, layout
) -> None:
    plain = (
        ["trainer.prefix_sharing=false", "trainer.padding_free=false"] if layout == "plain" else []
    )
    _, pre = train_run(tmp_path / "pre", *plain, eval=True, steps=3)
    assert reference_calls == {"precompute.train_logprobs": 3}  # one lookup per micro batch
    reference_calls.clear()
    _, live = train_run(tmp_path / "live", *plain, "reference.precompute=false", eval=True, steps=3)
    assert reference_calls == {"live.train_logprobs": 3}  # the frozen copy scored every batch
    metrics_match.rows(metrics_rows(live), metrics_rows(pre), rtol=1e-5)


def test_separate_reference_model_live_and_precomputed(
    tmp_path, train_run, metrics_rows, metrics_match, reference_calls
) -> None:
    """A trained model as the reference: both modes agree, and differ from the self-reference
    (whose step-1 rewards are exactly zero). The separate model is loaded once per run."""
    _, first = train_run(tmp_path / "first", "trainer.export=true", steps=3)
    ref = f"reference.name_or_path={first / 'final_model'}"
    _, own = train_run(tmp_path / "own", eval=True)
    assert reference_calls["load_separate"] == 0
    _, pre = train_run(tmp_path / "pre", ref, eval=True)
    assert reference_calls["load_separate"] == 1
    _, live = train_run(tmp_path / "live", ref, "reference.precompute=false", eval=True)
    assert reference_calls["load_separate"] == 2  # once for the live run too
    assert reference_calls["live.train_logprobs"] == 2
    metrics_match.rows(metrics_rows(live), metrics_rows(pre), rtol=1e-5)
    step1 = {r["step"]: r for r in metrics_rows(pre, "train/loss")}[1]
    own1 = {r["step"]: r for r in metrics_rows(own, "train/loss")}[1]
    assert own1["train/chosen_reward"] == 0.0
    assert abs(step1["train/chosen_reward"]) > 1e-4


@pytest.mark.parametrize("precompute", ["true", "false"])
def test_a_reference_free_objective_never_loads_a_reference(
    tmp_path, train_run, reference_calls, precompute
) -> None:
    """SimPO with a reference path that does not exist: nothing is loaded, nothing is scored."""
    results, run_dir = train_run(
        tmp_path / "run",
        "method=simpo",
        f"reference.name_or_path={tmp_path / 'never-loaded'}",
        f"reference.precompute={precompute}",
        "trainer.tensorboard=false",
        "trainer.export=false",
    )
    assert reference_calls == {"none.train_logprobs": 2}
    assert results["steps"] == 2 and (run_dir / reference_module.REFERENCE_FILE).is_file()


def test_a_missing_reference_path_names_the_key(tmp_path, train_run) -> None:
    with pytest.raises(FileNotFoundError, match=r"reference\.name_or_path"):
        train_run(tmp_path / "run", f"reference.name_or_path={tmp_path / 'nope'}")
