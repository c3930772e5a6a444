"""The decode loop of :class:`engine.generation.backends.HFBackend`: ``generate``'s output at the
model's own cost per token.

``model.generate`` spends most of a small model's step outside the model: it rebuilds the
attention mask, runs a list of logits processors and stopping criteria and grows the KV cache by
concatenation every token. :func:`decode` does what greedy decoding and sampling need and nothing
else:

- the prompt (left padded) goes through the model's own forward once (the prefill, exactly as
  ``generate`` calls it); its keys and values are copied into a cache preallocated for the whole
  generation (prompt + ``max_new_tokens`` columns per layer), which every step fills one column
  of, in place;
- each step runs the decoder layers' own modules (norms, projections, MLP, the model's attention
  function) on one token per row, with the rotary table computed once for every position, the
  padding mask built once and sliced, and the attention over the columns filled so far;
- the next token: ``argmax``, or ``transformers``' own temperature and top-p warpers and
  ``torch.multinomial``; rows that produced a stop token get the pad token from then on (they are
  still computed, as ``generate`` computes them), and the loop ends when every row has stopped.

Every operation is the one ``generate`` performs, on tensors of the same shapes and values, so the
logits are bitwise equal to ``generate``'s and the random numbers are drawn in the same order: the
same greedy tokens and, with the same seed, the same samples (tests/engine/test_decoding.py checks
both on Llama and Qwen2 models). Models the loop does not know (:func:`unsupported` says why) keep
``generate``.

Cost per step: the model's matmuls and attention plus about ten small tensor operations per layer
(measured against ``generate`` by ``python -m experiments.bench.generation``). Memory: the cache,
2 x layers x rows x kv_heads x (prompt + max_new_tokens) x head_dim values, allocated once per call.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from engine.model.adapters import unwrap

#: architectures whose decoder layer the loop replays (norm, attention with rotary embeddings,
#: residual, norm, MLP, residual); others keep ``generate``
ARCHITECTURES = ("llama", "qwen2")
#: generation-config keys that would add a logits processor or a stopping criterion to
#: ``generate`` (beyond what the backend sets): the loop runs only while they keep their defaults
_PROCESSOR_KEYS = (
    "guidance_scale",
    "sequence_bias",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "top_h",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "watermarking_config",
    "renormalize_logits",
    "max_time",
    "stop_strings",
)
#: rope types whose frequencies do not depend on the sequence length (a table computed once holds)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported(model: Any) -> str | None:
    """Why :func:`decode` cannot stand in for ``model.generate`` on ``model`` (then the backend
    calls ``generate``), or None when it can."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        name = model_type or type(model).__name__
        return f"architecture {name!r} (the loop knows {', '.join(ARCHITECTURES)})"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} is not a causal LM with model.layers and lm_head"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (the loop runs sdpa and eager)"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "layers with sliding or other non-full attention"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"rope type {rope!r} (its frequencies change with the sequence length)"
    changed = _non_default_processors(getattr(base, "generation_config", None))
    if changed:
        return f"generation_config sets {', '.join(changed)} (generate applies it; the loop not)"
    return None


def _non_default_processors(generation_config: Any) -> list[str]:
    if generation_config is None:
        return []
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    return [
        key
        for key in _PROCESSOR_KEYS
        if getattr(generation_config, key, None) != getattr(defaults, key, None)
    ]


class _Cache:
    """Keys and values of every layer, ``(rows, kv_heads, columns, head_dim)``, preallocated for
    the prompt and every new token; filled column by column."""

    def __init__(self, prefill: Any, columns: int) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in prefill.layers:
            rows, heads, filled, dim = layer.keys.shape
            keys = layer.keys.new_empty(rows, heads, columns, dim)
            values = layer.values.new_empty(rows, heads, columns, dim)
            keys[:, :, :filled] = layer.keys
            values[:, :, :filled] = layer.values
            self.keys.append(keys)
            self.values.append(values)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _step(
    base: Any,
    tokens: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: _Cache,
    column: int,
    mask: torch.Tensor | None,
    attention: Any,
) -> torch.Tensor:
    """One token per row through the decoder (``transformers``' decoder layer, op for op): the
    next-token logits in float32, ``(rows, vocab)``. ``cos`` / ``sin``: ``(rows, 1, 1,
    head_dim)``; ``column``: the cache column this token fills."""
    inner = base.model
    hidden = inner.embed_tokens(tokens[:, None])  # (rows, 1, hidden)
    rows = hidden.shape[0]
    for index, layer in enumerate(inner.layers):
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (rows, 1, -1, attn.head_dim)
        query = attn.q_proj(hidden).view(shape).transpose(1, 2)
        key = attn.k_proj(hidden).view(shape).transpose(1, 2)
        value = attn.v_proj(hidden).view(shape).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        keys, values = cache.keys[index], cache.values[index]
        keys[:, :, column] = key[:, :, 0]
        values[:, :, column] = value[:, :, 0]
        out, _ = attention(
            attn,
            query,
            keys[:, :, : column + 1],
            values[:, :, : column + 1],
            mask,
            dropout=0.0,
            scaling=attn.scaling,
        )
        hidden = residual + attn.o_proj(out.reshape(rows, 1, -1).contiguous())
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    hidden = inner.norm(hidden)
    return base.lm_head(hidden)[:, -1].to(copy=True, dtype=torch.float32)


def _warpers(temperature: float, top_p: float) -> list[Any]:
    """``generate``'s sampling warpers for these settings, in its order (top-k is off)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The new tokens of every row, ``(rows, steps)``, as ``model.generate(input_ids,
    attention_mask=attention_mask, max_new_tokens=..., eos_token_id=..., pad_token_id=...,
    do_sample=temperature > 0, temperature=..., top_k=0, top_p=...)`` returns them after the
    prompt: rows that stopped early are padded with ``pad_token_id``; ``steps`` is at most
    ``max_new_tokens``. Prompts are left padded. Sampling draws from torch's global generator
    (seed it before the call), in ``generate``'s order. The model must pass :func:`unsupported`.
    """
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    base = unwrap(model)
    config = base.config
    rows, prompt_length = input_ids.shape
    device = input_ids.device
    # prefill: the model's own forward over the prompt, as generate calls it (positions count
    # real tokens; no mask at all when nothing is padded; the LM head at the last position only)
    padded = not bool(attention_mask.all())
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    prefill = DynamicCache(config=config)
    logits = (
        base(
            input_ids=input_ids,
            attention_mask=attention_mask if padded else None,
            position_ids=positions,
            past_key_values=prefill,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
        )
        .logits[:, -1]
        .to(copy=True, dtype=torch.float32)
    )
    columns = prompt_length + max_new_tokens
    cache = _Cache(prefill, columns)
    del prefill
    # per call, not per step: the rotary table of every position, the padding mask of every column
    rotary = base.model.rotary_emb
    cos_table, sin_table = rotary(
        cache.keys[0], torch.arange(columns, device=device)[None]
    )  # (1, columns, head_dim) each, in the model's dtype
    cos_table, sin_table = cos_table[0], sin_table[0]
    mask = None
    if padded:
        mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool, device=device)
        mask[:, 0, 0, :prompt_length] = attention_mask.bool()
    # the attention function the model's own layers call (sdpa, or its module's eager one)
    eager = importlib.import_module(type(base.model.layers[0].self_attn).__module__)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        config._attn_implementation, eager.eager_attention_forward
    )
    warpers = _warpers(temperature, top_p) if temperature > 0 else []
    stops = torch.tensor(list(eos_token_ids), device=device)
    unfinished = torch.ones(rows, dtype=torch.long, device=device)
    position = positions[:, -1]
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        # the next token: generate's selection, then pads for the rows that have stopped
        if temperature > 0:
            for warper in warpers:
                logits = warper(None, logits)
            tokens = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(logits, dim=-1)
        tokens = tokens * unfinished + pad_token_id * (1 - unfinished)
        new_tokens.append(tokens)
        unfinished = unfinished & ~torch.isin(tokens, stops)
        if step + 1 == max_new_tokens or not bool(unfinished.any()):  # generate's two stops
            break
        # one step: every row's token in the next cache column, at its own next position
        column = prompt_length + step
        position = position + 1
        logits = _step(
            base,
            tokens,
            cos_table[position][:, None, None],  # (rows, 1, 1, head_dim)
            sin_table[position][:, None, None],
            cache,
            column,
            mask[..., : column + 1] if mask is not None else None,
            attention,
        )
    return torch.stack(new_tokens, dim=1)
