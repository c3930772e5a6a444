"""Config keys work the way Hydra users type them, and the yaml is the one source of defaults.

- The spellings the docs show compose and reach the engine: ``model.lora.r=8`` (LoRA is a block
  with its defaults, ``r`` null = off), the whole-block form ``model.lora='{r: 16, alpha: 16}'``,
  ``model.lora=null``, and per-benchmark keys such as ``benchmark.math500.max_new_tokens=1024``.
- No code default contradicts its yaml: every ``trainer.get("<key>", <default>)`` in the engine
  has the yaml's value, the benchmark keys' yaml matches :class:`Benchmark`'s defaults, and the
  one constructor of :class:`SequenceLogProbs` reads the composed trainer group.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import engine.verifiers  # noqa: F401  (every verifier registered, the task's arithmetic too)
from engine.generation.benchmarks import Benchmark, benchmarks_from_config
from engine.model import adapters
from engine.model.logprobs import SequenceLogProbs
from engine.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("overrides", "enabled", "r", "alpha"),
    [
        ([], False, None, None),
        (["model.lora.r=8"], True, 8, 8.0),  # alpha null: = r
        (["model.lora.r=8", "model.lora.alpha=16"], True, 8, 16.0),
        (["model.lora={r: 16, alpha: 32}"], True, 16, 32.0),
        (["model.lora=null"], False, None, None),
    ],
)
def test_lora_spellings(compose_config, overrides, enabled, r, alpha) -> None:
    model = compose_config(["data=files", "data.train=x.jsonl", *overrides]).model
    adapters.validate_adapter_config(model)
    assert adapters.lora_enabled(model) is enabled
    assert adapters.adapters_enabled(model) is enabled
    if enabled:
        assert model.lora.r == r and adapters.lora_alpha(model.lora) == alpha
        assert model.lora.dropout == 0.0  # the block's default survives a partial override


def test_lora_keys_without_a_rank_are_an_error(compose_config) -> None:
    model = compose_config(["model.lora.target_modules=[q_proj]"]).model
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: is set but model.lora.r"):
        adapters.validate_adapter_config(model)


def test_per_benchmark_keys_as_the_docs_type_them(compose_config) -> None:
    cfg = compose_config(
        [
            "benchmark=[math500,arithmetic]",
            "benchmark.math500.path=m.jsonl",
            "benchmark.math500.max_new_tokens=1024",
            "benchmark.math500.limit=50",
            "benchmark.math500.prompt.system=Be brief.",
            "benchmark.arithmetic.path=a.jsonl",
            "benchmark.arithmetic.temperature=0.5",
        ]
    )
    math500, arithmetic = benchmarks_from_config(cfg.benchmark)
    assert (math500.max_new_tokens, math500.limit, math500.prompt.system) == (1024, 50, "Be brief.")
    assert math500.verifier == "math" and math500.split == "test"  # untouched defaults
    assert arithmetic.temperature == 0.5 and arithmetic.max_new_tokens == 80  # its own default
    assert arithmetic.prompt.system is None and not arithmetic.prompt.chat_template


def test_benchmark_key_defaults_are_the_dataclass_defaults() -> None:
    keys = OmegaConf.to_container(OmegaConf.load(REPO / "conf/benchmark_keys/default.yaml"))
    prompt = keys.pop("prompt")
    built = Benchmark.from_config("x", {**keys, "path": "p", "prompt": prompt})
    plain = Benchmark(name="x", path="p")
    assert built == plain
    names = {f.name for f in dataclasses.fields(Benchmark)} - {"name"}
    assert names == set(keys) | {"prompt"}  # every key of the dataclass is in the yaml


def _trainer_gets(path: Path) -> list[tuple[int, str, object]]:
    """``<name with trainer>.get("key", default)`` calls in ``path``: (line, key, default)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = ast.unparse(node.func.value)
        if node.func.attr != "get" or "trainer" not in receiver or len(node.args) != 2:
            continue
        key, default = node.args
        if isinstance(key, ast.Constant) and isinstance(default, ast.Constant):
            found.append((node.lineno, key.value, default.value))
    return found


def test_no_trainer_default_in_code_differs_from_the_yaml(compose_config) -> None:
    trainer = OmegaConf.to_container(compose_config([]).trainer)
    mismatches = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        for line, key, default in _trainer_gets(path):
            if key in trainer and trainer[key] != default:
                mismatches.append(
                    f"{path.relative_to(REPO)}:{line}: trainer.{key} falls back to {default!r}, "
                    f"the yaml says {trainer[key]!r}"
                )
    assert not mismatches, "\n".join(mismatches)


def test_the_scan_sees_a_fallback(tmp_path) -> None:
    """The scan above is not vacuous."""
    source = tmp_path / "m.py"
    source.write_text('x = cfg.trainer.get("logit_keep_mb", 0)\n')
    assert _trainer_gets(source) == [(1, "logit_keep_mb", 0)]


def test_sequence_logprobs_is_built_from_the_trainer_group(compose_config) -> None:
    trainer = compose_config(["trainer.logit_chunk_size=64"]).trainer
    module = SequenceLogProbs.from_trainer(torch.nn.Identity(), trainer, tails=True)
    assert module.chunk_size == 64
    assert module.keep_mb == float(trainer.logit_keep_mb) == 512.0
    assert module.chunked is True and module.tails is True and module.weighting is False
