"""Every yaml under conf/ composes into a config that the engine accepts.

Config groups are discovered from the directories under conf/ (nested ones such as
``hydra/launcher`` included), so a new group or option is tested without editing this file.
Composition loads no model and reads no data: required ``???`` values (``data.train`` of
``data=files``, a model path, ...) are filled with placeholders.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from engine.config import (
    ConfigError,
    build_deepspeed_config,
    build_objective,
    grad_accum_steps,
    validate_config,
)
from engine.model.loading import resolve_dtype
from losses import LOSSES, MARGINS, PAIR_LOSSES, PreferenceLoss

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PLACEHOLDER = "/nonexistent/placeholder"


def discover_options() -> list[tuple[str, str]]:
    """(group, option) for every yaml in every directory below conf/ (not conf/ itself)."""
    options = []
    for directory in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        group = directory.relative_to(CONF_DIR).as_posix()
        options += [(group, path.stem) for path in sorted(directory.glob("*.yaml"))]
    return options


OPTIONS = discover_options()


def without_hydra(cfg):
    """A copy of ``cfg`` without its ``hydra`` node (Hydra fills its ``???`` values at run time)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def compose_option(compose_config, group: str, option: str):
    """The config with ``group=option`` (``+group=option`` for groups not in the defaults), its
    ``???`` values filled with placeholders; the hydra node is kept for ``hydra/...`` groups."""
    hydra_group = group.startswith("hydra/")

    def attempt(overrides: list[str]):
        return compose_config(overrides, return_hydra_config=hydra_group)

    selection = f"{group}={option}"
    try:
        cfg = attempt([selection])
    except ConfigCompositionException as error:
        if "No match in the defaults list" not in str(error):
            raise
        selection = f"+{group}={option}"
        cfg = attempt([selection])
    missing = sorted(OmegaConf.missing_keys(without_hydra(cfg)))
    if missing:  # values the user must give on the command line: any string composes
        cfg = attempt([selection, *(f"{key}={PLACEHOLDER}" for key in missing)])
    return cfg, selection, missing


def test_conf_has_the_design_groups():
    groups = {group for group, _ in OPTIONS}
    assert {"loss", "margin", "method", "model", "data", "deepspeed", "trainer"} <= groups
    # loss=<name> selects a loss of the margin or a per-side objective
    assert {o for g, o in OPTIONS if g == "loss"} == set(LOSSES) | set(PAIR_LOSSES)
    assert {o for g, o in OPTIONS if g == "margin"} == set(MARGINS)


def test_defaults_compose_and_validate(compose_config):
    cfg = compose_config()
    validate_config(cfg)
    objective = build_objective(cfg)
    assert isinstance(objective, PreferenceLoss)
    assert (cfg.loss.name, cfg.margin.name, cfg.model.tiny is not None) == (
        "logistic",
        "difference",
        True,
    )
    assert cfg.data.kind == "math"  # the default needs no download and no user file
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(compose_config, group, option):
    cfg, selection, _ = compose_option(compose_config, group, option)
    if group.startswith("hydra/"):
        node = OmegaConf.select(cfg, group.replace("/", "."))
        assert node is not None and node.get("_target_"), f"{selection}: no {group} node"
        cfg = without_hydra(cfg)
    if group in ("loss", "margin"):
        assert cfg[group].name == option
    if group == "method":
        assert cfg.method.name == (None if option == "none" else option)

    validate_config(cfg)
    objective = build_objective(cfg)
    assert isinstance(objective, PreferenceLoss)
    # every per-batch input an objective may ask for (KTO's mismatched log-ratios, ODPO's
    # scores with chosen > rejected, ...), so each option's objective runs
    inputs = {name: torch.tensor([-0.5]) for name in PreferenceLoss.INPUTS}
    inputs.update(score_chosen=torch.tensor([2.0]), score_rejected=torch.tensor([1.0]))
    out = objective(
        torch.tensor([-1.0]),
        torch.tensor([-2.0]),
        torch.tensor([-1.5]),
        torch.tensor([-1.5]),
        **inputs,
    )
    assert torch.isfinite(out.losses).all()

    dtype = resolve_dtype(str(cfg.model.dtype))
    ds = build_deepspeed_config(cfg, model_dtype=dtype, world_size=1)
    micro, accum = int(cfg.trainer.micro_batch_size), grad_accum_steps(cfg.trainer, 1)
    assert ds["train_batch_size"] == micro * accum
    assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)
    assert ds["bf16"]["enabled"] == (dtype == torch.bfloat16)
    assert "description" not in ds
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own schema check (unknown keys, batch arithmetic)
    assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
    assert parsed.train_batch_size == micro * accum


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_stage_files_set_their_stage(compose_config, stage):
    cfg = compose_config([f"deepspeed=zero{stage}"])
    ds = build_deepspeed_config(cfg, model_dtype=torch.float32, world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 4 * int(cfg.trainer.micro_batch_size)
    assert ds["gradient_clipping"] == float(cfg.trainer.grad_clip)
    assert ds["optimizer"]["params"]["lr"] == float(cfg.trainer.lr)


def test_deepspeed_config_follows_the_trainer(compose_config):
    cfg = compose_config(
        [
            "deepspeed=zero2",
            "trainer.micro_batch_size=3",
            "trainer.grad_accum=5",
            "trainer.lr=0.25",
            "trainer.weight_decay=0.5",
            "trainer.grad_clip=2.5",
        ]
    )
    ds = build_deepspeed_config(cfg, model_dtype=torch.bfloat16, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 30
    assert ds["gradient_clipping"] == 2.5
    assert ds["optimizer"]["params"]["lr"] == 0.25
    assert ds["optimizer"]["params"]["weight_decay"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_sgd_optimizer_keeps_the_gradient_scale(compose_config):
    cfg = compose_config(["trainer.optimizer=sgd", "trainer.momentum=0.5", "trainer.lr=0.25"])
    validate_config(cfg)
    ds = build_deepspeed_config(cfg, model_dtype=torch.float32, world_size=1)
    assert ds["optimizer"] == {
        "type": "SGD",
        "params": {"lr": 0.25, "momentum": 0.5, "weight_decay": 0.0},
    }
    from deepspeed.runtime.config import DeepSpeedConfig

    assert DeepSpeedConfig(ds).optimizer_name == "SGD"  # DeepSpeed takes torch.optim.SGD
    assert compose_config([])["trainer"]["optimizer"] == "adamw"
    with pytest.raises(ConfigError, match=r"trainer\.optimizer.*adamw, sgd.*'lion'"):
        validate_config(compose_config(["trainer.optimizer=lion"]))


def test_user_values_reach_the_objective(compose_config):
    cfg = compose_config(["loss=hinge", "margin=balanced", "margin.alpha=0.3", "beta=0.5"])
    objective = build_objective(cfg)
    assert objective.options["loss"] == "hinge"
    assert objective.options["margin"] == "balanced"
    assert objective.options["alpha"] == 0.3
    assert objective.beta == 0.5
    # hinge(beta * min(r_w, -alpha r_l)) by hand: r_w = 1, r_l = -2 -> min(1, 0.6) = 0.6
    out = objective(
        torch.tensor([0.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])
    )
    assert out.losses.item() == pytest.approx(1 - 0.5 * 0.6)


def test_files_data_requires_train(compose_config):
    cfg = compose_config(["data=files"])
    with pytest.raises(ConfigError, match=r"data\.train.*required"):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("trainer.grad_accum=-1", "trainer.grad_accum"),
        ("trainer.log_every=0", "trainer.log_every"),
        ("trainer.save_every=-1", "trainer.save_every"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.lr=0", "trainer.lr"),
        ("trainer.lr_schedule=sometimes", "trainer.lr_schedule"),
        ("trainer.warmup_ratio=1.0", "trainer.warmup_ratio"),
        ("trainer.resume=yes", "trainer.resume"),
        ("data.on_bad_row=ignore", "data.on_bad_row"),
        ("data.max_length=1", "data.max_length"),
        ("data.max_prompt_length=160", "data.max_prompt_length"),  # not < max_length (160)
        ("trainer.prefix_sharing=ture", "trainer.prefix_sharing"),  # a typo is not "on"
        ("trainer.padding_free=1", "trainer.padding_free"),
        ("trainer.chunked_logprobs=no", "trainer.chunked_logprobs"),
        ("trainer.length_grouping=yes", "trainer.length_grouping"),
        ("trainer.export=maybe", "trainer.export"),
        ("trainer.block_attention=flash", "trainer.block_attention"),
        ("trainer.logit_keep_mb=-1", "trainer.logit_keep_mb"),
        ("trainer.length_grouping_megabatch=0", "trainer.length_grouping_megabatch"),
        ("trainer.threads=0", "trainer.threads"),
        ("reference.precompute=no", "reference.precompute"),  # "no" is a string to Hydra
        ("reference.name_or_path=''", "reference.name_or_path"),
    ],
)
def test_bad_values_name_their_key(compose_config, override, key):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=f"config key {re.escape(key)}:"):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["beta=0"], "beta"),
        (["beta=-0.1"], "beta"),
        (["margin=balanced", "margin.alpha=0"], "alpha"),
        (["margin=balanced", "margin.alpha=1.5"], "alpha"),
        (["loss.name=nonexistent"], "nonexistent"),
        (["margin.name=nonexistent"], "nonexistent"),
    ],
)
def test_bad_objective_values_fail_when_built(compose_config, overrides, needle):
    cfg = compose_config(overrides)
    validate_config(cfg)  # objective values are checked by building the objective
    with pytest.raises(ConfigError, match=needle):
        build_objective(cfg)
