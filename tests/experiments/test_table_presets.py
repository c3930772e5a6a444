"""Every cell of every ``make reproduce`` preset composes, validates and builds its objective; the
presets open with their command; the scale table's sizes each get their own cached SFT model and
span at least 4x in parameters."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.config import build_deepspeed_config, build_objective, validate_config
from experiments.tables.plan import EXPERIMENT_DIR, SWEEPS, grid

CELLS = [
    (sweep.preset, dict(zip(axes, values, strict=True)))
    for sweep in SWEEPS.values()
    for axes in [[a for a in grid(sweep.preset) if a != "seed"]]
    for values in itertools.product(*(grid(sweep.preset)[a] for a in axes))
]


@pytest.mark.parametrize(
    ("preset", "cell"), CELLS, ids=[f"{p}:{','.join(c.values())}" for p, c in CELLS]
)
def test_every_cell_of_every_preset_composes(compose_config, preset, cell):
    pipeline = any(s.command == "engine.iterate" for s in SWEEPS.values() if s.preset == preset)
    cfg = compose_config(
        [f"+experiment={preset}", *(f"{k}={v}" for k, v in cell.items())],
        config_name="iterate" if pipeline else "config",
    )
    validate_config(cfg)
    build_objective(cfg)
    build_deepspeed_config(cfg, model_dtype=torch.float32, world_size=1)
    if pipeline:  # engine.iterate cells: evaluated once a round, by the pipeline
        from engine.iterate import check_config

        check_config(cfg)
    else:
        assert cfg.trainer.eval_every > 0  # every table's cells have convergence curves
    if cfg.data.kind == "math":  # the tiny task's tables share the recipe (real has its own)
        assert cfg.trainer.max_steps is None and cfg.trainer.epochs == 1


@pytest.mark.parametrize("preset", sorted({s.preset for s in SWEEPS.values()}))
def test_presets_open_with_their_command(preset):
    lines = (EXPERIMENT_DIR / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    head = "\n".join(lines[1:8])
    assert f"+experiment={preset}" in head, head


def test_methods_keep_their_own_beta(compose_config):
    # the recipe sets no beta: simpo keeps its 2.0, the ablation presets the paper's 0.1
    assert compose_config(["+experiment=methods", "method=simpo"]).beta == 2.0
    assert compose_config(["+experiment=hypothesis"]).trainer.optimizer == "sgd"
    assert compose_config(["+experiment=hypothesis"]).trainer.grad_clip == 0.0


def test_scale_sizes_have_their_own_task_and_span_4x(compose_config):
    from omegaconf import OmegaConf

    from engine.model.loading import load_model
    from engine.task.pipeline import cache_key
    from engine.task.tokenizer import build_tokenizer

    sizes = grid("scale")["model"]
    keys, params = set(), []
    for size in sizes:
        cfg = compose_config(["+experiment=scale", f"model={size}"])
        keys.add(cache_key(cfg))
        model = load_model(OmegaConf.merge(cfg.model, {"name_or_path": None}), build_tokenizer())
        params.append(sum(p.numel() for p in model.parameters()))
    assert len(keys) == len(sizes) >= 3
    assert max(params) >= 4 * min(params)
