"""Tests for the generation backends' interface: backend selection and its errors, the prompt
format's config, the EOS set, and the vLLM backend against the Hugging Face one (run only where
vLLM and a GPU exist; it has not run on the project's CPU machine).

The Hugging Face backend's behaviour (left padding, seeded sampling, greedy determinism) is tested
on the task's tiny models in tests/engine/task/test_generation.py."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from engine.generation.backends import HFBackend, PromptFormat, _eos_ids, load_backend

TINY = {
    "name_or_path": None,
    "tokenizer": None,
    "dtype": "float32",
    "tiny": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_position_embeddings": 64,
    },
}


def test_load_backend_picks_the_backend_and_checks_its_settings() -> None:
    backend, tokenizer = load_backend({"backend": "hf", "batch_size": 3}, OmegaConf.create(TINY))
    assert isinstance(backend, HFBackend) and backend.batch_size == 3
    assert backend.tokenizer is tokenizer
    assert backend.generate(["1+1="], max_new_tokens=2)[0] is not None
    with pytest.raises(ValueError, match="unknown backend 'vlm'; valid: hf, vllm"):
        load_backend({"backend": "vlm"}, OmegaConf.create(TINY))
    with pytest.raises(ValueError, match=r"needs model\.name_or_path"):
        load_backend({"backend": "vllm"}, OmegaConf.create(TINY))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        load_backend({"backend": "hf", "batch_size": 0}, OmegaConf.create(TINY))


def test_prompt_format_from_config() -> None:
    prompt = PromptFormat.from_config({"system": "S", "user": "Q: {problem}"})
    assert prompt.messages("1+1") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q: 1+1"},
    ]
    assert PromptFormat.from_config(None) == PromptFormat()
    with pytest.raises(ValueError, match="unknown keys \\['sytem'\\]"):
        PromptFormat.from_config({"sytem": "S"})


def test_eos_ids_add_the_models_end_of_turn_tokens() -> None:
    tokenizer = SimpleNamespace(eos_token_id=2)
    plain = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    assert _eos_ids(plain, tokenizer) == 2
    chat = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))
    assert _eos_ids(chat, tokenizer) == [2, 7]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
    reason="the vLLM backend needs vllm (pip install '.[vllm]') and a GPU",
)
def test_vllm_backend_matches_hf_greedy(tmp_path) -> None:
    from engine.generation.backends import VLLMBackend
    from engine.model.loading import load_model, load_tokenizer

    config = OmegaConf.create(TINY)
    tokenizer = load_tokenizer(config)
    model = load_model(config, tokenizer, seed=0)
    # peaked weights (as tests/engine/task/test_generation.py's): an untrained model's logits are
    # nearly flat, and two engines' rounding flips near-tied argmaxes; these sit far from a tie
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = ["1+1=", "12+30=", "99-9="]
    hf = HFBackend(model.cuda(), tokenizer, "cuda").generate(prompts, max_new_tokens=8)
    vllm = VLLMBackend(str(tmp_path / "model"), tokenizer, gpu_memory_utilization=0.2)
    assert vllm.generate(prompts, max_new_tokens=8) == hf
    sampled = vllm.generate(prompts * 2, max_new_tokens=8, temperature=1.0, seed=5)
    assert vllm.generate(prompts * 2, max_new_tokens=8, temperature=1.0, seed=5) == sampled


def test_synced_gpus_reaches_generate_once(monkeypatch) -> None:
    """ZeRO-3 on several ranks generates in lockstep: the backend then decodes with
    ``model.generate`` (not the decode loop) and ``synced_gpus=True`` reaches it once (given
    twice it raised "got multiple values for keyword argument"). Without it, the loop runs and
    ``generate`` is never called."""
    backend, _ = load_backend({"backend": "hf", "batch_size": 2}, OmegaConf.create(TINY))
    seen: list[dict] = []
    original = backend.model.generate

    def recording(**kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("synced_gpus", None)  # one process: nothing to keep in step with
        return original(**kwargs)

    monkeypatch.setattr(backend.model, "generate", recording)
    assert backend.decoder == "loop"
    looped = backend.generate(["1+1=", "2+2=", "3+3="], max_new_tokens=2)
    assert seen == []
    synced = HFBackend(backend.model, backend.tokenizer, batch_size=2, synced_gpus=True)
    assert synced.decoder == "generate"
    assert synced.generate(["1+1=", "2+2=", "3+3="], max_new_tokens=2) == looped
    assert [call.get("synced_gpus") for call in seen] == [True, True]


def test_load_backend_takes_the_decoder_setting() -> None:
    backend, _ = load_backend({"backend": "hf", "decoder": "generate"}, OmegaConf.create(TINY))
    assert backend.decoder == "generate"
    assert backend.decoder_reason == "generation.decoder=generate"
    with pytest.raises(ValueError, match="unknown decoder 'static'; valid: auto, generate"):
        load_backend({"backend": "hf", "decoder": "static"}, OmegaConf.create(TINY))


def test_generated_tokens_count_each_row_up_to_its_stop() -> None:
    from engine.generation.backends import _generated

    tokens = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [7, 9, 9, 2], [2, 0, 0, 0]])
    assert _generated(tokens, 2) == 2 + 4 + 4 + 1
    assert _generated(tokens, [2, 7]) == 2 + 3 + 1 + 1
