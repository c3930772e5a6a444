"""Loading the policy: any Hugging Face causal LM by path or hub id, a model bundled as a GGUF file
in a package (converted once: :mod:`engine.model.conversion`), or a tiny Llama from code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from engine.model import adapters as adapter_lib
from engine.model.conversion import resolve_model_config

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU that supports it, else float32 (CPU); or an explicit name."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; valid: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token one (its EOS, else UNK): padding is masked anyway."""
    if tokenizer.pad_token_id is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ValueError(
        "the tokenizer has no pad, eos or unk token to pad with; set one "
        "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) and resize the model's embeddings"
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, tiny: dict[str, Any]) -> LlamaConfig:
    """A small Llama config sized by ``tiny`` (hidden_size, num_layers, num_heads, ...)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(tiny["hidden_size"]),
        intermediate_size=int(tiny["intermediate_size"]),
        num_hidden_layers=int(tiny["num_layers"]),
        num_attention_heads=int(tiny["num_heads"]),
        num_key_value_heads=int(tiny.get("num_kv_heads") or tiny["num_heads"]),
        max_position_embeddings=int(tiny["max_position_embeddings"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(tiny.get("tie_word_embeddings", True)),
    )


def _check_local(key: str, source: str) -> None:
    """A source written as a filesystem path must exist (hub ids look like ``org/name``)."""
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"{key}={source!r}: no such file or directory")


def load_tokenizer(model_cfg: Any, key: str = "model") -> PreTrainedTokenizerBase:
    """The tokenizer of ``model.tokenizer`` / ``model.name_or_path``; with neither (the tiny model
    on users' data), the byte-level tokenizer built in code (:mod:`engine.data.byte_tokenizer`),
    which encodes any text and has a chat template.

    The embedded math task does not come here for its fresh tiny model: it builds its own
    tokenizer (:mod:`engine.task.tokenizer`) and trains from its cached SFT model, whose
    directory holds that tokenizer. ``key`` names the config group in error messages
    (``model``, ``reference``). A ``gguf`` model is converted first (on its first use).
    """
    model_cfg = resolve_model_config(model_cfg, key)
    field = "tokenizer" if model_cfg.get("tokenizer") else "name_or_path"
    source = model_cfg.get(field)
    if source:
        _check_local(f"{key}.{field}", str(source))
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=bool(model_cfg.get("trust_remote_code", False))
            )
        except OSError as error:
            raise OSError(f"{key}.{field}={source!r}: cannot load a tokenizer: {error}") from None
    else:
        from engine.data.byte_tokenizer import build_byte_tokenizer

        tokenizer = build_byte_tokenizer()
    ensure_pad_token(tokenizer)
    return tokenizer


def load_model(
    model_cfg: Any,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    key: str = "model",
    *,
    adapters: bool = False,
) -> PreTrainedModel:
    """The policy: ``AutoModelForCausalLM.from_pretrained(model.name_or_path)`` when set, else a
    tiny Llama with random weights (seeded) built from ``model.tiny``.

    ``adapters=True`` (the policy being trained) applies ``model.quantization`` while loading and
    returns the base wrapped in its LoRA adapters (``model.lora`` / ``model.adapter``, a peft
    ``PeftModel``: :mod:`engine.model.adapters`); without it the plain base is returned, whatever
    the adapter keys say (the SFT stage, a separate reference, the export's merge base).
    A ``gguf`` model (``model=smollm2_135m``) loads from its converted directory.
    """
    model_cfg = resolve_model_config(model_cfg, key)
    dtype = resolve_dtype(str(model_cfg.get("dtype", "auto")))
    qconfig = None
    if adapters:
        adapter_lib.validate_adapter_config(model_cfg)
        qconfig = adapter_lib.quantization_config(model_cfg, dtype)
    if model_cfg.get("name_or_path"):
        source = str(model_cfg["name_or_path"])
        _check_local(f"{key}.name_or_path", source)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=dtype,
                trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
                attn_implementation=model_cfg.get("attn_implementation") or None,
                **({"quantization_config": qconfig} if qconfig is not None else {}),
            )
        except OSError as error:
            raise OSError(f"{key}.name_or_path={source!r}: cannot load a model: {error}") from None
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(tokenizer, model_cfg["tiny"])).to(dtype)
        if qconfig is not None:
            model = adapter_lib.quantize_in_memory(model, qconfig)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table has "
            f"{model.get_input_embeddings().num_embeddings}: they do not belong together"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.get("gradient_checkpointing"):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    model.config.use_cache = False
    if qconfig is not None and not torch.cuda.is_available():
        adapter_lib.check_cpu_quantized_shapes(model)
    if qconfig is not None:  # a training load: every forward keeps its gradient
        adapter_lib.keep_4bit_layers_differentiable(model)
    if adapters and adapter_lib.adapters_enabled(model_cfg):
        model = adapter_lib.attach_adapters(model, model_cfg)
    return model
