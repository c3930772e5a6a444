"""The exported ``final_model/``: a plain Hugging Face model (safetensors) and tokenizer that load
with the Auto classes from a local path, generate, and hold exactly the trained weights, under
ZeRO-0 and under ZeRO-3 (whose partitioned parameters must be gathered before saving)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from engine.data.loading import load_pairs
from engine.model.loading import load_model, load_tokenizer
from engine.model.logprobs import reference_token_logps

STEPS = 3
STAGES = ["zero0", "zero3"]


@pytest.fixture(scope="module", params=STAGES)
def trained(request, tmp_path_factory, train_run):
    """A three-step run with eval pairs (lr 1e-3, so that the weights move visibly)."""
    stage = request.param
    results, run_dir = train_run(
        tmp_path_factory.mktemp(stage) / "run",
        f"deepspeed={stage}",
        "trainer.lr=1e-3",
        "trainer.tensorboard=false",
        eval=True,
        steps=STEPS,
    )
    return stage, results, run_dir


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys are relative to the engine's wrapper module (``model.`` + HF name)."""
    return {k.removeprefix("model."): v for k, v in state.items()}


def checkpoint_weights(stage: str, run_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the last DeepSpeed checkpoint, read without the engine."""
    checkpoints = run_dir / "checkpoints"
    tag = f"step_{STEPS}"
    if stage == "zero0":
        states = torch.load(
            checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        return strip_prefix(states["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return strip_prefix(get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag))


@pytest.mark.slow
def test_final_model_loads_and_generates(trained):
    _, _, run_dir = trained
    final = run_dir / "final_model"
    assert (final / "model.safetensors").is_file()
    assert not (run_dir / "final_model.tmp").exists()

    tokenizer = AutoTokenizer.from_pretrained(final)
    engine_tokenizer = load_tokenizer(OmegaConf.create({"name_or_path": None, "tokenizer": None}))
    prompt = "12+34="
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == engine_tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == prompt
    assert tokenizer.pad_token_id == engine_tokenizer.pad_token_id

    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, LlamaForCausalLM)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert out.shape == (1, ids.shape[1] + 5)
    assert torch.equal(out[0, : ids.shape[1]], ids[0])
    assert int(out.max()) < len(tokenizer)
    assert isinstance(tokenizer.decode(out[0, ids.shape[1] :]), str)


@pytest.mark.slow
def test_final_model_holds_the_trained_weights(trained):
    stage, _, run_dir = trained
    exported = load_file(run_dir / "final_model" / "model.safetensors")
    saved = checkpoint_weights(stage, run_dir)
    assert exported, "empty export"
    missing = exported.keys() - saved.keys()
    assert not missing, f"exported tensors missing from the checkpoint: {sorted(missing)}"
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, saved[name].to(tensor.dtype)), name

    # and they are not the initial weights: loading the export gives the trained model
    config = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = load_tokenizer(config.model)
    initial = load_model(config.model, tokenizer, seed=int(config.seed)).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "final_model").state_dict()
    assert loaded.keys() == initial.keys()
    moved = max((loaded[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)


def summed_logps(model, pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair summed response log-probs, with the plain full-softmax path."""
    chosen, rejected = [], []
    for pair in pairs:
        for response, out in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
            ids = torch.tensor([pair.prompt_ids + response])
            token_logps = reference_token_logps(model, ids, torch.ones_like(ids))[0]
            out.append(token_logps[len(pair.prompt_ids) - 1 :].sum())
    return torch.stack(chosen).double(), torch.stack(rejected).double()


@pytest.mark.slow
def test_final_model_reproduces_the_eval_metrics(trained):
    _, results, run_dir = trained
    config = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final_model")
    pairs, _ = load_pairs(
        config.data.eval,
        tokenizer,
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
    )
    assert len(pairs) == 5
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final_model").eval()
    initial = load_model(config.model, tokenizer, seed=int(config.seed)).eval()
    with torch.no_grad():
        chosen, rejected = summed_logps(final, pairs, tokenizer.pad_token_id)
        ref_chosen, ref_rejected = summed_logps(initial, pairs, tokenizer.pad_token_id)
    beta = float(config.beta)
    expected = {
        "chosen_logp": chosen.mean().item(),
        "rejected_logp": rejected.mean().item(),
        "chosen_reward": (beta * (chosen - ref_chosen)).mean().item(),
        "rejected_reward": (beta * (rejected - ref_rejected)).mean().item(),
    }
    got = {k: results["eval"][k] for k in expected}
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # reward accuracy counts pairs whose margin is above 0: batched and unbatched scoring differ
    # by rounding, so a pair within it of 0 may count either way (none does on the machines
    # measured, and then the bounds are equal)
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    surely, possibly = (margins > 1e-5).double().mean(), (margins > -1e-5).double().mean()
    assert surely <= results["eval"]["reward_accuracy"] <= possibly
    assert results["eval"]["chosen_reward"] != 0.0
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["eval"] == results["eval"]


@pytest.mark.slow
def test_zero3_export_equals_zero0_export(tmp_path, train_run):
    runs = {}
    for stage in STAGES:
        _, run_dir = train_run(
            tmp_path / stage,
            f"deepspeed={stage}",
            "trainer.lr=1e-3",
            "trainer.tensorboard=false",
            steps=STEPS,
        )
        runs[stage] = load_file(run_dir / "final_model" / "model.safetensors")
    assert runs["zero3"].keys() == runs["zero0"].keys()
    # Adam turns float noise in near-zero gradients into lr-sized steps for a few elements, so
    # compare the updates as a whole: ZeRO-3's must be ZeRO-0's up to a small fraction
    config = OmegaConf.load(tmp_path / "zero0" / "config.yaml")
    tokenizer = load_tokenizer(config.model)
    initial = load_model(config.model, tokenizer, seed=int(config.seed)).state_dict()
    for name, tensor in runs["zero0"].items():
        torch.testing.assert_close(runs["zero3"][name], tensor, rtol=0, atol=2e-4)
        update = (tensor - initial[name]).norm()
        difference = (runs["zero3"][name] - tensor).norm()
        assert update > 0, f"{name} did not train"
        assert difference <= 1e-2 * update, f"{name}: {difference} vs update {update}"
