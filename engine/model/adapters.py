"""LoRA and QLoRA adapters on the policy, built on peft and bitsandbytes (the ``adapters`` extra).

``model.lora`` (``r`` null = full fine-tuning), ``model.quantization`` (null | 4bit | 8bit) and
``model.adapter`` (continue from a PEFT adapter directory) describe them. This module checks
those keys (:func:`validate_adapter_config`), gives :func:`engine.model.loading.load_model` the
quantization config to load the base with and wraps the loaded base (:func:`attach_adapters`),
switches the adapters off for a live reference (:func:`adapters_disabled`), and keeps the
adapters alone in checkpoints (:func:`checkpoint_adapters_only`). The exports of a run
(``final_adapter/`` and the merged ``final_model/``) are :mod:`engine.model.adapter_export`'s.

Only the adapter parameters (and ``modules_to_save``) require gradients; the engine hands only
those to the optimizer, so the base weights stay bit-identical. Everything trainable is kept in the
model's dtype: peft would otherwise upcast adapters to float32 on a bf16 base, and a ZeRO-3 bf16
engine cannot flatten a mix of dtypes (TRL #6089). DeepSpeed keeps float32 master copies of the
trainable parameters anyway.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.runtime.errors import ConfigError

log = logging.getLogger(__name__)

#: what to install for model.lora / model.quantization
EXTRA = "pip install -e '.[adapters]'"
QUANTIZATIONS = (None, "4bit", "8bit")
#: bitsandbytes' CPU 4-bit kernels pack weights in blocks: every quantized layer needs
#: out_features % 32 == 0 ("N must be divisible by block_n") and in_features % 64 == 0 (one
#: absmax per 64-value block of a row). GPUs have no such limit.
CPU_4BIT_OUT_MULTIPLE = 32
CPU_4BIT_IN_MULTIPLE = 64
#: never adapted: the output head (and tied embeddings) stay as they are
_HEADS = ("lm_head",)


def lora_enabled(model_cfg: Any) -> bool:
    """True when ``model.lora.r`` is set: fresh LoRA adapters of that rank. ``model.lora``
    null, or its ``r`` null (the yaml's default), is full fine-tuning."""
    lora = model_cfg.get("lora")
    return lora is not None and hasattr(lora, "get") and lora.get("r") is not None


def adapters_enabled(model_cfg: Any) -> bool:
    """True when the policy trains adapters (``model.lora.r`` or ``model.adapter`` set)."""
    return lora_enabled(model_cfg) or bool(model_cfg.get("adapter"))


def lora_alpha(lora: Any) -> float:
    """``model.lora.alpha``, or ``r`` when it is null (the adapters' scale alpha / r is 1)."""
    alpha = lora.get("alpha")
    return float(lora.r if alpha is None else alpha)


def _require_package(name: str, key: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"config key {key}: needs the {name} package; install it with {EXTRA}")


def validate_adapter_config(
    model_cfg: Any, deepspeed_cfg: Any = None, cuda: bool | None = None
) -> None:
    """Raise :class:`engine.config.ConfigError` naming the first bad adapter key.

    Checks model.lora (r > 0, alpha > 0, dropout in [0, 1), target_modules / modules_to_save
    lists of names), model.quantization, model.adapter (a PEFT adapter directory), the packages
    they need, and whether the ZeRO stage in ``deepspeed_cfg`` (the ``deepspeed=`` group) can
    run them on this device (``cuda``: None = ask torch).
    """
    lora = model_cfg.get("lora")
    if lora is not None and not hasattr(lora, "get"):
        raise ConfigError(f"config key model.lora: must be null or a mapping, got {lora!r}")
    if lora is not None and lora.get("r") is None:
        chosen = [k for k in ("alpha", "target_modules", "modules_to_save") if lora.get(k)]
        if chosen:
            raise ConfigError(
                f"config key model.lora.{chosen[0]}: is set but model.lora.r is null, which "
                "leaves LoRA off (full fine-tuning); set model.lora.r=<rank> to train adapters"
            )
    if lora_enabled(model_cfg):
        r = lora.get("r")
        if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
            raise ConfigError(f"config key model.lora.r: must be an integer > 0, got {r!r}")
        alpha = lora.get("alpha")
        if alpha is not None and not (
            isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha > 0
        ):
            raise ConfigError(
                f"config key model.lora.alpha: must be null (= r) or a number > 0, got {alpha!r}"
            )
        dropout = lora.get("dropout", 0.0)
        if not (isinstance(dropout, int | float) and 0 <= dropout < 1):
            raise ConfigError(f"config key model.lora.dropout: must be in [0, 1), got {dropout!r}")
        for key in ("target_modules", "modules_to_save"):
            names = lora.get(key)
            if names is not None and (
                isinstance(names, str) or not all(isinstance(n, str) and n for n in names)
            ):
                raise ConfigError(
                    f"config key model.lora.{key}: must be null or a list of module names "
                    f"(e.g. [q_proj, v_proj]), got {names!r}"
                )
    quantization = model_cfg.get("quantization")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"config key model.quantization: must be null, 4bit or 8bit, got {quantization!r}"
        )
    adapter = model_cfg.get("adapter")
    if adapter is not None:
        path = Path(str(adapter)).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"config key model.adapter: {str(adapter)!r} is not a PEFT adapter directory "
                "(no adapter_config.json in it); give a final_adapter/ of an earlier run"
            )
    if quantization is not None and not adapters_enabled(model_cfg):
        raise ConfigError(
            f"config key model.quantization: {quantization} weights cannot be trained; quantized "
            "training needs adapters: set model.lora (QLoRA) or model.adapter"
        )
    if adapters_enabled(model_cfg):
        _require_package("peft", "model.lora" if lora_enabled(model_cfg) else "model.adapter")
    if quantization is not None:
        _require_package("bitsandbytes", "model.quantization")
    zero = (deepspeed_cfg or {}).get("zero_optimization") or {}
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    if quantization == "4bit" and zero.get("stage") == 3 and not on_gpu:
        raise ConfigError(
            "config key model.quantization: 4bit with a ZeRO-3 deepspeed config on a CPU: "
            "bitsandbytes' CPU kernels repack each 4-bit weight in place at its first forward, "
            "and ZeRO-3 regathers the unpacked shard afterwards: the frozen base's outputs "
            "change from step to step (measured here). Use deepspeed=zero0, zero1 or zero2 (a "
            "4-bit base is small), or quantization=8bit; on GPUs 4bit with ZeRO-3 is allowed"
        )


def quantization_config(model_cfg: Any, dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` for ``model.quantization`` (None when unset).

    4bit is QLoRA's: NF4 with double quantization, computing in the model's dtype and storing the
    packed weights in it too, so that ZeRO-3 can flatten and partition them with the rest.
    """
    quantization = model_cfg.get("quantization")
    if quantization is None:
        return None
    _require_package("bitsandbytes", "model.quantization")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def quantize_in_memory(model: nn.Module, qconfig: Any) -> nn.Module:
    """Quantize a model built in code (the tiny model): transformers quantizes only while
    loading, so it goes through a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="engine-quantize-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return type(model).from_pretrained(tmp, quantization_config=qconfig, dtype=model.dtype)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct leaf names of the linear layers that LoRA can adapt (the output head
    excluded), e.g. ``['down_proj', 'gate_proj', 'k_proj', ...]``."""
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf not in _HEADS:  # bnb layers subclass Linear
            names.add(leaf)
    return sorted(names)


def check_cpu_quantized_shapes(model: nn.Module) -> None:
    """On a CPU, every 4-bit layer must fit bitsandbytes' CPU kernels (see the constants); say
    which layers do not, before a forward fails deep inside bitsandbytes."""
    bad = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ != "Params4bit":
            continue
        out_features, in_features = module.out_features, module.in_features
        if out_features % CPU_4BIT_OUT_MULTIPLE or in_features % CPU_4BIT_IN_MULTIPLE:
            bad.append(f"{name} ({in_features} -> {out_features})")
    if bad:
        raise ConfigError(
            "config key model.quantization: bitsandbytes' CPU 4-bit kernels need every quantized "
            f"layer's output width divisible by {CPU_4BIT_OUT_MULTIPLE} and input width by "
            f"{CPU_4BIT_IN_MULTIPLE}; these are not: {', '.join(bad[:6])}"
            + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            + " (for model.tiny pick sizes such as hidden_size 128, intermediate_size 384; on a "
            "GPU there is no such limit)"
        )


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights in a model that will be trained;
    returns the number of 4-bit layers.

    On a CPU with AVX512-BF16, a ``Linear4bit`` repacks its weight into its CPU kernels' layout
    at the first forward in eval mode without gradients (the reference pass, an evaluation), and
    from then on every forward, training ones included, runs that kernel, which has no autograd:
    the gradient through the frozen base weight to the layer's input is silently dropped (torch
    only warns "an autograd kernel was not registered"), so every adapter below the last layer
    trains on a wrong gradient, and saving repacks the weight back with requantized scales.
    Without the repacking every forward dequantizes and multiplies, with autograd.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _lora_config(model: nn.Module, lora: Any) -> Any:
    from peft import LoraConfig

    available = linear_layer_names(model)
    targets = lora.get("target_modules")
    targets = list(available) if targets is None else [str(t) for t in targets]
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ConfigError(
            f"config key model.lora.target_modules: {unknown} are not linear layers of this "
            f"model; its linear layers are: {', '.join(available)}"
        )
    to_save = lora.get("modules_to_save")
    if to_save is not None:
        leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in to_save if m not in leaves]
        if missing:
            raise ConfigError(
                f"config key model.lora.modules_to_save: {missing} are not modules of this model "
                "(give leaf names such as lm_head or embed_tokens)"
            )
    return LoraConfig(
        r=int(lora.r),
        lora_alpha=lora_alpha(lora),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets,
        modules_to_save=list(to_save) if to_save is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapters(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Wrap the loaded (maybe quantized) base: fresh LoRA adapters from ``model.lora``, or the
    PEFT adapter at ``model.adapter`` (trainable, its own adapter_config.json deciding r, alpha and
    targets). Returns the ``PeftModel``; only adapter parameters require gradients, all in the
    model's dtype, and only they are in its state dict (:func:`checkpoint_adapters_only`)."""
    from peft import PeftModel, get_peft_model

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    model.requires_grad_(False)
    if model_cfg.get("adapter"):
        if lora_enabled(model_cfg):
            log.info("model.adapter is set: its adapter_config.json replaces model.lora")
        peft_model = PeftModel.from_pretrained(
            model,
            str(Path(str(model_cfg.adapter)).expanduser()),
            is_trainable=True,
            autocast_adapter_dtype=False,
        )
    else:
        peft_model = get_peft_model(
            model, _lora_config(model, model_cfg.lora), autocast_adapter_dtype=False
        )
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError("config key model.lora: the adapters have no trainable parameters")
    checkpoint_adapters_only(peft_model)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info(
        "adapters: %d trainable parameters of %d (%.3f%%)",
        trainable,
        total,
        100.0 * trainable / max(total, 1),
    )
    return peft_model


def checkpoint_adapters_only(model: nn.Module) -> None:
    """Make ``model``'s state dict (and so every DeepSpeed checkpoint of a module holding it) the
    trainable tensors only, and let loading such a state dict leave the frozen base as it is.

    The base is rebuilt bit for bit from ``model.name_or_path`` on resume, so saving it at every
    checkpoint is waste (15 GB for a bf16 7B base, against ~160 MB of r 16 adapters). For a 4-bit
    base it is harmful: taking the state dict of a bitsandbytes layer whose weights its CPU
    kernels have repacked unpacks them in place, and the base's outputs moved by 1e-2 after one
    checkpoint save (measured here). So modules holding only frozen tensors are never asked for
    their state: their ``_save_to_state_dict`` is skipped, and their keys are not missing on load.
    """
    base = unwrap(model)
    keep = {n for n, p in base.named_parameters() if p.requires_grad}
    frozen = [n for n in base.state_dict(keep_vars=True) if n not in keep]

    def skip(destination: dict, prefix: str, keep_vars: bool) -> None:
        return None

    for module in base.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own and not any(t.requires_grad for t in own):
            module._save_to_state_dict = skip  # instance attribute: shadows the class's method

    def allow_missing_frozen(module: nn.Module, incompatible: Any) -> None:
        missing = incompatible.missing_keys
        missing[:] = [k for k in missing if not any(k.endswith(name) for name in frozen)]

    base.register_load_state_dict_post_hook(allow_missing_frozen)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a ``PeftModel`` (its LoRA layers injected in place, so the
    forward still runs the adapters); any other model as it is. :class:`engine.model.logprobs.
    SequenceLogProbs` needs this one: it calls the transformer body and the head itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and _is_peft(model) else model


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model without its adapters (a live reference of fresh adapters: the initial
    policy is exactly the base, since LoRA's B matrices start at zero). No copy of the model."""
    if not _is_peft(model):
        raise TypeError("adapters_disabled needs the PeftModel that attach_adapters returned")
    with model.disable_adapter():
        yield


def disabled_adapter_scorer(
    model: nn.Module, trainer: Any, tails: bool = False
) -> Callable[[Any], Any]:
    """A live reference for fresh adapters (``reference.precompute=false``): ``batch -> (logps,
    counts)`` of the policy itself with its adapters disabled, under ``torch.no_grad``. Shares the
    policy's modules (no copy; under ZeRO-3 they gather their shards as in the policy's forward).
    ``tails``: also LD-DPO's tail log-probs, as :func:`engine.model.reference.frozen_scorer`
    returns.
    """
    from engine.model.logprobs import SequenceLogProbs

    scorer = SequenceLogProbs.from_trainer(unwrap(model), trainer, tails=tails)

    @torch.no_grad()
    def forward(batch: Any) -> Any:
        with adapters_disabled(model):
            return scorer(**batch.model_inputs())

    return forward
