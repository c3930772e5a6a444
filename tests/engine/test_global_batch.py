"""``trainer.global_batch``: pairs per optimizer step over all processes, from which
``grad_accum = global_batch / (micro_batch_size * world_size)`` is derived once the world size is
known (engine.config.grad_accum_steps / resolve_batch)."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from engine.config import (
    ConfigError,
    build_deepspeed_config,
    grad_accum_steps,
    resolve_batch,
    validate_config,
)


def trainer(micro: int, accum: int | None, global_batch: int | None):
    return OmegaConf.create(
        {"micro_batch_size": micro, "grad_accum": accum, "global_batch": global_batch}
    )


@pytest.mark.parametrize(
    ("micro", "accum", "global_batch", "world", "expected"),
    [
        (1, None, 8, 1, 8),  # the paper: batch 1 x accumulation 8 on one GPU
        (1, None, 8, 8, 1),  # ... and the same global batch on 8 GPUs
        (2, None, 16, 2, 4),
        (4, 2, 16, 2, 2),  # both given and consistent
        (8, None, None, 4, 1),  # neither: one micro step
        (8, 3, None, 4, 3),  # grad_accum alone, as before
    ],
)
def test_grad_accum_is_derived_from_the_global_batch(micro, accum, global_batch, world, expected):
    assert grad_accum_steps(trainer(micro, accum, global_batch), world) == expected


def test_a_global_batch_that_does_not_divide_names_the_three_numbers():
    with pytest.raises(ConfigError) as caught:
        grad_accum_steps(trainer(8, None, 12), world_size=2)
    message = str(caught.value)
    assert message.startswith("config key trainer.global_batch: 12 pairs")
    assert "micro_batch_size=8" in message and "world size 2" in message and "16" in message
    # a global batch smaller than one micro step over the world
    with pytest.raises(ConfigError, match=r"trainer\.global_batch: 4 pairs"):
        grad_accum_steps(trainer(1, None, 4), world_size=8)


def test_a_conflicting_grad_accum_is_an_error():
    with pytest.raises(ConfigError) as caught:
        grad_accum_steps(trainer(1, 8, 8), world_size=8)
    message = str(caught.value)
    assert message.startswith("config key trainer.grad_accum: 8 conflicts with")
    assert "global_batch=8, which needs 1" in message and "grad_accum=null" in message


def test_resolve_batch_fills_both_keys_and_leaves_the_input_alone(compose_config):
    cfg = compose_config(["trainer.micro_batch_size=2"])
    OmegaConf.update(cfg, "trainer.grad_accum", None)
    OmegaConf.update(cfg, "trainer.global_batch", 12, force_add=True)
    resolved = resolve_batch(cfg, world_size=3)
    assert (resolved.trainer.grad_accum, resolved.trainer.global_batch) == (2, 12)
    assert cfg.trainer.grad_accum is None  # a copy
    plain = resolve_batch(compose_config(["trainer.micro_batch_size=2"]), world_size=3)
    assert plain.trainer.global_batch == 2 * plain.trainer.grad_accum * 3


@pytest.mark.parametrize("world", [1, 2, 4])
def test_deepspeed_gets_the_global_batch(compose_config, world):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = compose_config(["trainer.micro_batch_size=2", "deepspeed=zero2"])
    OmegaConf.update(cfg, "trainer.grad_accum", None)
    OmegaConf.update(cfg, "trainer.global_batch", 16, force_add=True)
    validate_config(cfg)
    ds = build_deepspeed_config(cfg, model_dtype=torch.float32, world_size=world)
    assert ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 16 // (2 * world)
    if world == 1:  # DeepSpeed's own batch arithmetic (it reads the world size of its process)
        assert DeepSpeedConfig(ds).train_batch_size == 16


@pytest.mark.parametrize("key", ["trainer.global_batch", "trainer.grad_accum"])
@pytest.mark.parametrize("value", [0, -8, 2.5, "eight"])
def test_bad_values_name_their_key(compose_config, key, value):
    cfg = compose_config()
    OmegaConf.update(cfg, key, value, force_add=True)
    expected = rf"config key {re.escape(key)}: must be null or an integer > 0"
    with pytest.raises(ConfigError, match=expected):
        validate_config(cfg)


@pytest.mark.slow
def test_train_derives_grad_accum_from_the_global_batch(tmp_path, train_run, metrics_match):
    """global_batch=4 with micro batches of 2 in one process is grad_accum=2: the same run."""
    from engine.metrics import read_metrics

    _, derived = train_run(tmp_path / "derived", "trainer.global_batch=4", steps=3)
    _, explicit = train_run(tmp_path / "explicit", "trainer.grad_accum=2", steps=3)
    saved = OmegaConf.load(derived / "config.yaml").trainer
    assert (saved.micro_batch_size, saved.grad_accum, saved.global_batch) == (2, 2, 4)
    rows = read_metrics(derived / "metrics.jsonl")
    assert len(rows) == 3
    metrics_match.rows(rows, read_metrics(explicit / "metrics.jsonl"), rtol=1e-6)
    with pytest.raises(ConfigError, match=r"trainer\.grad_accum: 3 conflicts"):
        train_run(tmp_path / "conflict", "trainer.global_batch=4", "trainer.grad_accum=3")
