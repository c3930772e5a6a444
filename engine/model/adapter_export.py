"""The exports of a run with adapters: ``final_adapter/`` (PEFT format: loads with
``PeftModel.from_pretrained`` on the base) and ``final_model/`` (the adapter merged into the
unquantized base, Hugging Face format: what ``from_pretrained`` and evaluation load).

Under ZeRO-3 the adapter tensors are gathered first (peft #453, TRL #4416: saved ungathered they
are empty). Each directory is written to a temporary sibling and renamed: absent or complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.runtime import distributed as dist_utils


def trainable_state_dict(ds_engine: Any, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable tensors (adapters and modules_to_save) by parameter name, full size, on CPU,
    on rank 0 (None elsewhere): what ``PeftModel.save_pretrained(state_dict=...)`` takes.

    Under ZeRO-3 each rank holds a shard of every parameter: reading them outside a gather saves
    empty tensors (peft #453, TRL #4416), so they are gathered first (a collective: every rank
    must call this).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stage = dist_utils.zero_stage(ds_engine)
    gather: Any = contextlib.nullcontext()
    if stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        if not dist_utils.is_main():
            return None
        full = {n: p.detach().to("cpu", copy=True) for n, p in named}
    empty = [k for k, v in full.items() if v.numel() == 0]
    if empty or not full:
        raise RuntimeError(f"the adapter state to export is empty or has empty tensors: {empty}")
    return full


def _write_dir(out_dir: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary sibling, then rename: ``out_dir`` is absent or complete."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def merge_adapter(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """``base`` (unquantized, in the model's dtype) with the PEFT adapter at ``adapter_dir``
    merged into its weights: a plain Hugging Face model."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(adapter_dir), autocast_adapter_dtype=False)
    return merged.merge_and_unload()


def export_adapters(
    ds_engine: Any,
    model: nn.Module,
    tokenizer: Any,
    run_dir: Path,
    load_base: Callable[[], nn.Module],
) -> None:
    """Write ``run_dir/final_adapter/`` (PEFT format: loads with ``PeftModel.from_pretrained``
    on the base) and ``run_dir/final_model/`` (the adapter merged into the unquantized base that
    ``load_base()`` returns, Hugging Face format). Every rank must call this (ZeRO-3 gathers);
    rank 0 writes. The base is reloaded rather than dequantized: merging into 4-bit weights would
    round the merged weights to 4 bits."""
    state = trainable_state_dict(ds_engine, model)
    if state is None:  # not rank 0
        return

    def write_adapter(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    adapter_dir = run_dir / "final_adapter"
    _write_dir(adapter_dir, write_adapter)
    merged = merge_adapter(load_base(), adapter_dir)

    def write_model(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _write_dir(run_dir / "final_model", write_model)
