"""LoRA / QLoRA through the real loop (``engine.train.train`` and ``python -m engine.train``): the
exports of a run, adapter-only checkpoints, the reference variants with adapters, torchrun against
one process, and a SIGKILL-then-resume that ends where an uninterrupted run ends.

Tolerances: ``EXACT`` where the same operations run in the same order; ``RTOL`` (1e-4) for two
processes against one (float reassociation across ranks, as in test_distributed.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from engine.model import adapters
from engine.model.loading import load_model, load_tokenizer
from engine.model.reference import REFERENCE_FILE

LORA = "model.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: null, modules_to_save: null}"
RTOL = 1e-4
ATOL = 1e-6
#: two processes against one: rewards are beta x differences of float32 log-prob sums of a few
#: hundred nats (the byte-level tokenizer), summed in another order across ranks: ~1e-5 absolute
DISTRIBUTED_ATOL = 1e-5


@pytest.fixture(scope="module", params=[None, "4bit"], ids=["lora", "qlora"])
def adapter_run(request, tmp_path_factory, train_run):
    quantization = request.param
    results, run_dir = train_run(
        tmp_path_factory.mktemp(f"run-{quantization}") / "run",
        LORA,
        f"model.quantization={quantization or 'null'}",
        "trainer.lr=1e-2",
        "trainer.tensorboard=false",
        eval=True,
        steps=3,
    )
    return quantization, results, run_dir


@pytest.mark.slow
def test_a_run_with_adapters_writes_the_adapter_and_the_merged_model(adapter_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, results, run_dir = adapter_run
    assert all(
        torch.isfinite(torch.tensor(v)) for v in results["train"].values() if isinstance(v, float)
    )
    adapter = load_file(run_dir / "final_adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_" in k and t.numel() for k, t in adapter.items())
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")
    config = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = load_tokenizer(config.model)
    base = load_model(config.model, tokenizer, seed=int(config.seed))  # unquantized
    unmerged = PeftModel.from_pretrained(base, str(run_dir / "final_adapter"))
    merged_state, unmerged_state = merged.state_dict(), unmerged.merge_and_unload().state_dict()
    assert merged_state.keys() == unmerged_state.keys()
    for name, tensor in merged_state.items():
        torch.testing.assert_close(tensor, unmerged_state[name], rtol=0, atol=0)
    # checkpoints hold the adapters only (the base is rebuilt from its source on resume)
    module = torch.load(
        next((run_dir / "checkpoints").glob("step_3/*model_states.pt")), weights_only=False
    )["module"]
    assert module and all(".lora_" in k for k in module)


@pytest.mark.slow
@pytest.mark.parametrize("objective", [(), ("method.ld_alpha=0.5",)], ids=["dpo", "ld_dpo"])
def test_the_live_reference_of_fresh_adapters_is_the_policy_with_them_disabled(
    tmp_path, train_run, metrics_rows, metrics_match, objective
):
    """reference.precompute=false scores each micro batch with the adapters switched off, no
    copy of the model: the same numbers as the precomputed pass of the initial policy (also for
    LD-DPO, whose reference scores carry the tails past the shorter response)."""
    options = (LORA, "trainer.lr=1e-2", "trainer.tensorboard=false", *objective)
    _, pre_dir = train_run(tmp_path / "pre", *options, eval=True, steps=3)
    live, live_dir = train_run(
        tmp_path / "live", *options, "reference.precompute=false", eval=True, steps=3
    )
    train_logprobs, _ = torch.load(live_dir / REFERENCE_FILE, weights_only=False)
    assert train_logprobs is None  # the live path ran: nothing precomputed for training
    metrics_match.rows(metrics_rows(live_dir), metrics_rows(pre_dir), rtol=1e-6, atol=ATOL)
    assert live["train"]["chosen_reward"] != 0.0


@pytest.mark.slow
def test_continuing_an_adapter_references_the_policy_with_that_adapter(
    tmp_path, train_run, adapter_run, metrics_rows, metrics_match
):
    """Starting from model.adapter, pi_ref is base + that adapter (LLaMA-Factory #8459): the first
    step's rewards are exactly 0, precomputed or live."""
    quantization, _, first_dir = adapter_run
    if quantization:
        pytest.skip("one adapter kind is enough here")
    adapter = first_dir / "final_adapter"
    options = (f"model.adapter={adapter}", "trainer.lr=1e-2", "trainer.tensorboard=false")
    _, pre_dir = train_run(tmp_path / "pre", *options, eval=True, steps=2)
    _, live_dir = train_run(
        tmp_path / "live", *options, "reference.precompute=false", eval=True, steps=2
    )
    for run in (pre_dir, live_dir):
        first = metrics_rows(run, "train/loss")[0]
        assert first["train/chosen_reward"] == 0.0 and first["train/rejected_reward"] == 0.0
    metrics_match.rows(metrics_rows(live_dir), metrics_rows(pre_dir), rtol=1e-6, atol=ATOL)
    # and the reference is not the bare base: the base scores the pairs differently
    config = OmegaConf.load(pre_dir / "config.yaml")
    tokenizer = load_tokenizer(config.model)
    train_logprobs, _ = torch.load(pre_dir / REFERENCE_FILE, weights_only=False)
    from engine.data.loading import load_pairs
    from tests.engine.test_adapters import scored

    pairs, _ = load_pairs(config.data.train, tokenizer, max_length=config.data.max_length)
    base = load_model(config.model, tokenizer, seed=int(config.seed))
    assert adapters.adapters_enabled(config.model)
    pair = pairs[0]
    ids = torch.tensor([pair.prompt_ids + pair.chosen_ids])
    response = torch.tensor([[0] * len(pair.prompt_ids) + [1] * len(pair.chosen_ids)])
    base_logp = scored(
        base, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response}
    )[0]
    assert abs(float(base_logp) - float(train_logprobs.chosen_logps[0])) > 1e-3


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_with_lora_match_one(
    tmp_path, pair_files, cli, metrics_rows, metrics_match, stage, runs
):
    one = tmp_path / "one"
    proc = cli.run([*runs.distributed_overrides(pair_files, 4, "zero2"), LORA], cwd=one)
    assert proc.returncode == 0, cli.describe(proc)
    two = tmp_path / "two"
    proc = cli.run([*runs.distributed_overrides(pair_files, 2, stage), LORA], cwd=two, nproc=2)
    assert proc.returncode == 0, cli.describe(proc)
    one_dir, two_dir = runs.only_run_dir(one), runs.only_run_dir(two)
    assert json.loads((two_dir / "results.json").read_text())["world_size"] == 2
    metrics_match.rows(
        metrics_rows(two_dir), metrics_rows(one_dir), rtol=RTOL, atol=DISTRIBUTED_ATOL
    )
    # the adapter gathered from both ranks' shards is the one-process adapter
    expected = load_file(one_dir / "final_adapter" / "adapter_model.safetensors")
    got = load_file(two_dir / "final_adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=5e-5)


#: QLoRA on a CPU: bitsandbytes' 4-bit layers repack their weights (block scales rounded to
#: bf16) at an inference pass and unpack them at a training one, so the base's outputs depend on
#: the passes run so far; a resumed run skips the reference pass, and its losses drift from the
#: uninterrupted run's by ~1e-4 relative (measured at the default lr). LoRA resumes bit for bit.
#: Rewards are beta x (policy - reference) of sums of hundreds of nats: such a drift moves them by
#: ~1e-3 absolute, and flips reward signs, so the fractions of pairs on one side of a threshold
#: (reward accuracy, chosen reward below zero, chosen below the reference: over 2 pairs, one flip
#: is 0.5) move by whole pairs; QLoRA compares the losses, log-probs and gradient weights only.
RESUME_TOLERANCE = {None: (0.0, 0.0), "4bit": (1e-3, 1e-3)}
REWARD_METRICS = (
    *(
        f"{split}/{name}"
        for split in ("train", "eval")
        for name in (
            "reward_accuracy",
            "chosen_reward_below_zero",
            "chosen_reward",
            "rejected_reward",
            "margin",
        )
    ),
    "train/chosen_below_reference",  # the gradient-weight diagnostics' sign fraction
)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [None, "4bit"], ids=["lora", "qlora"])
def test_sigkill_and_resume_with_adapters_matches_uninterrupted(
    tmp_path, base_overrides, cli, metrics_rows, metrics_match, quantization, runs
):
    extra = (LORA, f"model.quantization={quantization or 'null'}")
    rtol, atol = RESUME_TOLERANCE[quantization]
    whole = tmp_path / "whole" / "run"
    proc = cli.run(runs.resume_overrides(base_overrides, whole, *extra), cwd=whole.parent)
    assert proc.returncode == 0, cli.describe(proc)

    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir(parents=True)
    runs.run_and_kill(runs.resume_overrides(base_overrides, run_dir, *extra), 4, run_dir.parent)
    assert not (run_dir / "final_adapter").exists()
    resumed = cli.run(
        runs.resume_overrides(base_overrides, run_dir, *extra, "trainer.resume=auto"),
        cwd=run_dir.parent,
    )
    assert resumed.returncode == 0, cli.describe(resumed)
    assert "resuming from" in resumed.stdout + resumed.stderr
    ignore = REWARD_METRICS if quantization else ()
    metrics_match.rows(
        metrics_rows(run_dir), metrics_rows(whole), rtol=rtol, atol=atol, ignore=ignore
    )
    if not quantization:
        metrics_match.results(runs.results(run_dir), runs.results(whole), rtol=0, atol=0)
    assert [r["step"] for r in metrics_rows(run_dir, "train/loss")][-1] == runs.resume_steps
    for name in ("final_adapter/adapter_model.safetensors", "final_model/model.safetensors"):
        got, want = load_file(run_dir / name), load_file(whole / name)
        assert got.keys() == want.keys(), name
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, rtol=rtol, atol=atol)
