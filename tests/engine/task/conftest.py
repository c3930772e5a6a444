"""Shared fixtures for the embedded task's tests: Hydra configs on a tiny budget, tiny models, and a
scripted stand-in model whose answers are known in advance.

Every test here runs with ``XDG_CACHE_HOME`` pointing into its own temporary directory, so nothing
is ever written to (or read from) the real ``~/.cache``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

from engine.task.tokenizer import build_tokenizer

#: The cheapest build there is (for the cache's behaviour, not the model's quality): 2 SFT steps
#: of a 1-layer model, a handful of problems. The model stays untrained, so it reaches no band and
#: makes no pairs; the build still completes and is cached.
CHEAP_TASK = (
    "data.problems.min_digits=1",
    "data.problems.max_digits=2",
    "data.problems.sft_problems=8",
    "data.problems.pair_prompts=3",
    "data.problems.eval_pair_prompts=2",
    "data.problems.eval_problems=4",
    "data.problems.sft_val_problems=2",
    "data.sft.steps=2",
    "data.sft.batch_size=4",
    "data.sft.eval_every=2",
    "data.pairs.samples_per_prompt=2",
    "model.tiny.hidden_size=16",
    "model.tiny.intermediate_size=32",
    "model.tiny.num_layers=1",
    "model.tiny.num_heads=2",
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Never touch the real cache: each test gets its own XDG_CACHE_HOME."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(scope="session")
def task_config(compose_config) -> Callable[..., DictConfig]:
    """``task_config(*overrides)``: the project's config (conf/config.yaml) with overrides."""

    def compose(*overrides: str) -> DictConfig:
        return compose_config(overrides)

    return compose


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory, task_config, tiny_task_overrides):
    """One real build on the tiny budget, under its own XDG_CACHE_HOME (data.cache_dir null),
    shared by the modules that need a trained SFT model: ``(cfg, task, xdg)``."""
    from engine.task.pipeline import prepare_math_task

    xdg = tmp_path_factory.mktemp("xdg-tiny")
    cfg = task_config(*tiny_task_overrides)
    assert cfg.data.cache_dir is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(xdg))
        task = prepare_math_task(cfg)
    return cfg, task, xdg


@pytest.fixture(scope="session")
def cheap_task_overrides() -> tuple[str, ...]:
    return CHEAP_TASK


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_tiny_model(tokenizer):
    """``make_tiny_model(hidden=16, layers=1, seed=0, init_std=None)``: a random tiny Llama.

    ``init_std`` re-draws every weight from N(0, init_std): a larger spread than the default
    (0.02) gives peaked, prompt-dependent outputs, so argmax ties (which make float-level
    differences visible) do not occur.
    """
    from engine.model.loading import load_model

    def make(hidden: int = 16, layers: int = 1, seed: int = 0, init_std: float | None = None):
        tiny = {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_layers": layers,
            "num_heads": 2,
            "max_position_embeddings": 128,
        }
        model = load_model({"dtype": "float32", "tiny": tiny}, tokenizer, seed=seed)
        if init_std is not None:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.dim() > 1:
                        parameter.copy_(
                            torch.randn(parameter.shape, generator=generator) * init_std
                        )
        return model

    return make


class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM whose completion of each prompt is chosen by ``respond``.

    ``respond(prompt, sample)`` gets the decoded prompt (specials removed) and, when sampling,
    a uniform draw from torch's global generator (``None`` for greedy), and returns the response
    text; the model emits its tokens, then EOS, then pads. It follows ``model.generate``'s
    contract as :func:`engine.task.sampling.generate` uses it, and records each call.
    """

    def __init__(self, tokenizer, respond: Callable[[str, float | None], str]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.respond = respond
        self.calls: list[dict] = []

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
        do_sample: bool,
        **kwargs,
    ) -> torch.Tensor:
        self.calls.append(
            {
                "input_ids": input_ids.clone(),
                "attention_mask": attention_mask.clone(),
                "do_sample": do_sample,
                "training": self.training,
                **kwargs,
            }
        )
        rows: list[list[int]] = []
        for ids in input_ids.tolist():
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            draw = float(torch.rand(())) if do_sample else None
            text = self.respond(prompt, draw)
            new = [*self.tokenizer(text, add_special_tokens=False)["input_ids"], eos_token_id]
            rows.append(new[:max_new_tokens])
        width = max(len(r) for r in rows)
        new_tokens = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new_tokens], dim=1)


@pytest.fixture
def scripted_model(tokenizer) -> Callable[[Callable[[str, float | None], str]], ScriptedModel]:
    def make(respond: Callable[[str, float | None], str]) -> ScriptedModel:
        return ScriptedModel(tokenizer, respond)

    return make
