"""Resumable DeepSpeed checkpoints that a crash cannot corrupt, and the final Hugging Face export.

Layout under ``<run>/checkpoints/``: one directory per save, ``step_<N>/``, written by DeepSpeed on
every rank plus our ``rng_rank<r>.pt`` files; once every rank has finished, rank 0 writes
``step_<N>/COMPLETE`` and then replaces ``latest`` atomically (temp file + ``os.replace``). A run
killed mid-save leaves a directory without ``COMPLETE``, which resume ignores, and ``latest`` still
names the previous complete save. Older complete saves beyond ``keep`` are deleted.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import distributed as dist_utils
from engine.fileio import atomic_write_text

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d+)$")


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_steps(checkpoint_dir: Path) -> list[int]:
    """Steps of the complete saves under ``checkpoint_dir``, ascending."""
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for child in checkpoint_dir.iterdir():
        match = _TAG.match(child.name)
        if match and (child / COMPLETE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_complete_step(checkpoint_dir: Path) -> int | None:
    """The step that ``latest`` names if its save is complete, else the newest complete save."""
    latest = checkpoint_dir / LATEST
    if latest.is_file():
        match = _TAG.match(latest.read_text().strip())
        if match and (checkpoint_dir / match.group(0) / COMPLETE).is_file():
            return int(match.group(1))
    steps = complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def save_checkpoint(
    engine: Any, checkpoint_dir: Path, step: int, client_state: dict[str, Any], keep: int
) -> None:
    """Save a resumable checkpoint of ``engine`` at ``step`` (every rank must call this)."""
    tag = f"step_{step}"
    # DeepSpeed's own `latest` is written non-atomically: we keep ours instead
    engine.save_checkpoint(
        str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False
    )
    torch.save(_rng_state(), checkpoint_dir / tag / f"rng_rank{dist_utils.rank()}.pt")
    dist_utils.barrier()  # every rank's files are on disk before the save is declared complete
    if dist_utils.is_main():
        atomic_write_text(checkpoint_dir / tag / COMPLETE, f"{step}\n")
        atomic_write_text(checkpoint_dir / LATEST, f"{tag}\n")
        for old in complete_steps(checkpoint_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(checkpoint_dir / f"step_{old}", ignore_errors=True)
        # saves that never completed (a crash mid-save) are garbage once a newer one is complete
        for child in checkpoint_dir.iterdir():
            match = _TAG.match(child.name)
            if match and int(match.group(1)) < step and not (child / COMPLETE).exists():
                shutil.rmtree(child, ignore_errors=True)
    dist_utils.barrier()


def load_checkpoint(engine: Any, checkpoint_dir: Path, step: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from the save at ``step``;
    returns the client state saved with it."""
    tag = f"step_{step}"
    load_path, client_state = engine.load_checkpoint(
        str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint_dir / tag}")
    rng_file = checkpoint_dir / tag / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def export_hf_model(engine: Any, model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write the trained model in Hugging Face format (safetensors) with its tokenizer.

    Under ZeRO-3 the parameters are partitioned: they are gathered into a full 16-bit (or fp32)
    state dict on rank 0 first. The export is written to a temporary sibling directory and renamed,
    so ``out_dir`` is either absent or complete.
    """
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    state_dict = None
    if stage == 3:  # a collective: every rank takes part, rank 0 receives the full tensors
        gathered = engine._zero3_consolidated_16bit_state_dict()
        if gathered is not None:  # keys are relative to the SequenceLogProbs wrapper
            state_dict = {k.removeprefix("model."): v for k, v in gathered.items()}
    if not dist_utils.is_main():
        return
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
