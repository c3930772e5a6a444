"""From the composed Hydra config to what the loop needs: checks, objective, DeepSpeed config.

Checks run before anything is built, so a bad value fails in a second with the key's name, not
after a model has loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from engine.data.loading import ON_BAD_ROW
from engine.data.packing import BLOCK_ATTENTION
from engine.runtime.errors import ConfigError, require
from engine.tracking import report_targets
from losses import PreferenceLoss

#: keys of ``cfg.method`` passed to :class:`losses.PreferenceLoss` as extra options
OBJECTIVE_EXTRAS = PreferenceLoss.EXTRAS

#: ``trainer.optimizer``: AdamW (the default) or plain SGD (``trainer.momentum``, default 0)
OPTIMIZERS = ("adamw", "sgd")

_POSITIVE_INTS = ("micro_batch_size", "log_every", "logit_chunk_size")
_NON_NEGATIVE_INTS = ("eval_every", "save_every", "keep_checkpoints")
# null = the default (grad_accum: derived from global_batch, else 1; global_batch: not set)
_OPTIONAL_POSITIVE_INTS = (
    "max_steps",
    "threads",
    "length_grouping_megabatch",
    "grad_accum",
    "global_batch",
)
#: on/off keys of ``trainer`` (absent = the built-in default) and of ``reference``
_TRAINER_SWITCHES = (
    "chunked_logprobs",
    "prefix_sharing",
    "padding_free",
    "length_grouping",
    "progress_bar",
    "tensorboard",
    "export",
)
_SCHEDULES = ("constant", "linear", "cosine")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key (missing ``???`` values included)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    require(
        not missing,
        missing[0] if missing else "",
        "is required (it is ??? in the config); set it on the command line",
    )
    trainer = cfg.trainer
    for key in _POSITIVE_INTS:
        value = trainer.get(key)
        require(
            isinstance(value, int) and value > 0,
            f"trainer.{key}",
            f"must be an integer > 0, got {value!r}",
        )
    for key in _NON_NEGATIVE_INTS:
        value = trainer.get(key)
        require(
            isinstance(value, int) and value >= 0,
            f"trainer.{key}",
            f"must be an integer >= 0, got {value!r}",
        )
    for key in _OPTIONAL_POSITIVE_INTS:
        value = trainer.get(key)
        require(
            value is None or (isinstance(value, int) and value > 0),
            f"trainer.{key}",
            f"must be null or an integer > 0, got {value!r}",
        )
    if trainer.get("max_steps") is None:
        epochs = trainer.get("epochs")
        require(
            isinstance(epochs, int) and epochs > 0,
            "trainer.epochs",
            f"must be an integer > 0 when max_steps is null, got {epochs!r}",
        )
    lr = trainer.get("lr")
    require(
        isinstance(lr, int | float) and lr > 0, "trainer.lr", f"must be a number > 0, got {lr!r}"
    )
    require(
        trainer.get("lr_schedule") in _SCHEDULES,
        "trainer.lr_schedule",
        f"must be one of {', '.join(_SCHEDULES)}, got {trainer.get('lr_schedule')!r}",
    )
    warmup = trainer.get("warmup_ratio")
    require(
        isinstance(warmup, int | float) and 0 <= warmup < 1,
        "trainer.warmup_ratio",
        f"must be in [0, 1), got {warmup!r}",
    )
    require(
        trainer.get("resume") in (None, "auto"),
        "trainer.resume",
        f"must be null or auto, got {trainer.get('resume')!r}",
    )
    _validate_switches(cfg)
    try:
        report_targets(trainer)
    except ValueError as error:
        raise ConfigError(f"config key {error}") from None
    data = cfg.data
    require(
        data.get("on_bad_row") in ON_BAD_ROW,
        "data.on_bad_row",
        f"must be one of {', '.join(ON_BAD_ROW)}, got {data.get('on_bad_row')!r}",
    )
    max_length = data.get("max_length")
    require(
        isinstance(max_length, int) and max_length > 1,
        "data.max_length",
        f"must be an integer > 1, got {max_length!r}",
    )
    max_prompt = data.get("max_prompt_length")
    require(
        max_prompt is None or (isinstance(max_prompt, int) and 0 < max_prompt < max_length),
        "data.max_prompt_length",
        f"must be null or an integer in (0, data.max_length={max_length}), got {max_prompt!r}",
    )


def _validate_switches(cfg: DictConfig) -> None:
    """The speed switches and the reference keys: a typo (``prefix_sharing=ture``) must not
    silently pick the other path."""
    trainer = cfg.trainer
    for key in _TRAINER_SWITCHES:
        value = trainer.get(key)
        require(
            value is None or isinstance(value, bool),
            f"trainer.{key}",
            f"must be true or false, got {value!r}",
        )
    optimizer = trainer.optimizer
    require(
        optimizer in OPTIMIZERS,
        "trainer.optimizer",
        f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}",
    )
    block = trainer.get("block_attention")
    require(
        block is None or block in BLOCK_ATTENTION,
        "trainer.block_attention",
        f"must be one of {', '.join(BLOCK_ATTENTION)}, got {block!r}",
    )
    keep = trainer.get("logit_keep_mb")
    require(
        keep is None or (isinstance(keep, int | float) and keep >= 0),
        "trainer.logit_keep_mb",
        f"must be a number of MiB >= 0, got {keep!r}",
    )
    reference = cfg.get("reference") or {}
    precompute = reference.get("precompute")
    require(
        precompute is None or isinstance(precompute, bool),
        "reference.precompute",
        f"must be true or false, got {precompute!r}",
    )
    shard_pairs = reference.get("shard_pairs")
    require(
        shard_pairs is None or (isinstance(shard_pairs, int) and shard_pairs > 0),
        "reference.shard_pairs",
        f"must be an integer > 0, got {shard_pairs!r}",
    )
    path = reference.get("name_or_path")
    require(
        path is None or (isinstance(path, str) and path.strip() != ""),
        "reference.name_or_path",
        f"must be null (the initial policy) or a model directory / hub id, got {path!r}",
    )


def grad_accum_steps(trainer: Any, world_size: int) -> int:
    """Micro steps per optimizer step: ``trainer.grad_accum``, or derived from
    ``trainer.global_batch`` (pairs per optimizer step over all processes) as
    ``global_batch / (micro_batch_size * world_size)``.

    Raises :class:`ConfigError` when the global batch does not split into whole micro steps, or
    when ``grad_accum`` is also set and gives another global batch. With neither set: 1.
    """
    micro = int(trainer.micro_batch_size)
    accum = trainer.get("grad_accum")
    global_batch = trainer.get("global_batch")
    if global_batch is None:
        return 1 if accum is None else int(accum)
    global_batch = int(global_batch)
    per_micro_step = micro * world_size
    require(
        global_batch % per_micro_step == 0,
        "trainer.global_batch",
        f"{global_batch} pairs do not split into micro steps of trainer.micro_batch_size={micro} "
        f"x world size {world_size} = {per_micro_step} pairs; use a multiple of {per_micro_step} "
        "or another micro batch",
    )
    derived = global_batch // per_micro_step
    require(
        accum is None or int(accum) == derived,
        "trainer.grad_accum",
        f"{accum} conflicts with trainer.global_batch={global_batch}, which needs {derived} "
        f"(= {global_batch} / (micro_batch_size {micro} x world size {world_size})); set one "
        "of them (trainer.grad_accum=null derives it)",
    )
    return derived


def resolve_batch(cfg: DictConfig, world_size: int) -> DictConfig:
    """A copy of ``cfg`` whose ``trainer.grad_accum`` is the number of micro steps for this world
    size (:func:`grad_accum_steps`) and ``trainer.global_batch`` the pairs per optimizer step that
    follow; everything downstream reads the two as plain integers. Call it once the world size
    is known."""
    accum = grad_accum_steps(cfg.trainer, world_size)
    resolved = cfg.copy()
    with open_dict(resolved):
        resolved.trainer.grad_accum = accum
        resolved.trainer.global_batch = int(cfg.trainer.micro_batch_size) * accum * world_size
    return resolved


def build_objective(cfg: DictConfig) -> PreferenceLoss:
    """The :class:`losses.PreferenceLoss` described by loss, margin, beta and method."""
    method = cfg.method
    extras = {key: method.get(key) for key in OBJECTIVE_EXTRAS if method.get(key) is not None}
    try:
        return PreferenceLoss(
            loss=cfg.loss.name,
            margin=cfg.margin.name,
            beta=float(cfg.beta),
            alpha=float(cfg.margin.alpha),
            length_normalized=bool(method.get("length_normalized", False)),
            **extras,
        )
    except (KeyError, ValueError, TypeError) as error:
        raise ConfigError(
            f"the objective (loss / margin / beta / margin.alpha / method.*): {error}"
        ) from None


def build_deepspeed_config(
    cfg: DictConfig, model_dtype: torch.dtype, world_size: int
) -> dict[str, Any]:
    """The ``deepspeed=<stage>`` group merged with the trainer's batch, optimizer and precision."""
    trainer = cfg.trainer
    ds: dict[str, Any] = OmegaConf.to_container(cfg.deepspeed, resolve=True)  # type: ignore[assignment]
    ds.pop("description", None)
    accum = grad_accum_steps(trainer, world_size)
    ds["train_micro_batch_size_per_gpu"] = int(trainer.micro_batch_size)
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = int(trainer.micro_batch_size) * accum * world_size
    ds["gradient_clipping"] = float(trainer.grad_clip)
    if trainer.optimizer == "sgd":
        # torch.optim.SGD (DeepSpeed takes any torch.optim name): the update keeps the gradient's
        # scale, which Adam divides away (the ablation's hypothesis test compares the two)
        ds["optimizer"] = {
            "type": "SGD",
            "params": {
                "lr": float(trainer.lr),
                "momentum": float(trainer.momentum),
                "weight_decay": float(trainer.weight_decay),
            },
        }
        ds["zero_allow_untested_optimizer"] = True
    else:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": float(trainer.lr),
                "betas": [float(b) for b in trainer.adam_betas],
                "eps": 1e-8,
                "weight_decay": float(trainer.weight_decay),
                # torch's AdamW on CPU: same update, and no JIT build of DeepSpeed's fused_adam
                # op (about 40 s on a fresh machine); on GPU DeepSpeed's fused kernel is used
                "torch_adam": not torch.cuda.is_available(),
            },
        }
    ds["bf16"] = {"enabled": model_dtype == torch.bfloat16}
    ds["fp16"] = {"enabled": model_dtype == torch.float16}
    ds.setdefault("steps_per_print", 10**9)  # the engine logs; keep DeepSpeed's own printing quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds
