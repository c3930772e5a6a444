"""Resumable DeepSpeed checkpoints that a crash cannot corrupt and resume verifies, and the final
Hugging Face export.

Layout under ``<run>/checkpoints/``: one directory per save, ``step_<N>/``, written by DeepSpeed on
every rank plus our ``rng_rank<r>.pt`` files. Once every rank has finished, the ranks checksum the
save's files (each rank a share of them), and rank 0 writes ``step_<N>/COMPLETE``, a JSON manifest
of every file's relative path, size and sha256, then replaces ``latest`` atomically (temp file +
``os.replace``). A run killed mid-save leaves a directory without ``COMPLETE``, which resume
ignores, and ``latest`` still names the previous complete save. Older complete saves beyond
``keep`` are deleted; saves of later steps (left by a timeline that resume abandoned) are not.

Resume (:func:`latest_verified_step`) re-checks the sizes and checksums: a save with a missing,
truncated or altered file is skipped with a warning naming the file, and the previous complete save
is tried. sha256 is hashlib's fastest digest here (SHA-NI): about 0.5 GB/s per core on the 2-core
dev machine, so saving and resuming pay about 2 s per GB of checkpoint (the save's share is split
over the ranks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.runtime import distributed as dist_utils
from engine.runtime.fileio import atomic_write_text

log = logging.getLogger("engine.checkpoint")

COMPLETE = "COMPLETE"
LATEST = "latest"
DIGEST = "sha256"  # hashlib name, recorded in each manifest: changing it breaks no old save
MANIFEST_FORMAT = 2  # format 1: COMPLETE held only the step number (no file list)
_TAG = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """Complete checkpoints exist, but none of them passes verification."""


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


def _resume_candidates(checkpoint_dir: Path) -> list[int]:
    """Complete saves in the order resume tries them: the one ``latest`` names first (it is the
    current timeline's newest), then the others, newest first."""
    steps = complete_steps(checkpoint_dir)[::-1]
    latest = checkpoint_dir / LATEST
    if latest.is_file():
        match = _TAG.match(latest.read_text().strip())
        if match and int(match.group(1)) in steps:
            steps.remove(int(match.group(1)))
            steps.insert(0, int(match.group(1)))
    return steps


def latest_complete_step(checkpoint_dir: Path) -> int | None:
    """The step that ``latest`` names if its save is complete, else the newest complete save
    (no verification: see :func:`latest_verified_step`)."""
    candidates = _resume_candidates(checkpoint_dir)
    return candidates[0] if candidates else None


# ---- manifests: what COMPLETE records, and checking a save against it ---------------------------


def _file_digest(path: Path, algorithm: str = DIGEST) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def _save_files(step_dir: Path) -> list[str]:
    """Relative POSIX paths of the files of a save (everything but its COMPLETE marker), sorted."""
    return sorted(
        path.relative_to(step_dir).as_posix()
        for path in step_dir.rglob("*")
        if path.is_file() and path.name != COMPLETE
    )


def describe_files(step_dir: Path, relative_paths: list[str]) -> dict[str, dict[str, Any]]:
    """``{path: {"size": bytes, "sha256": hex}}`` for files of ``step_dir`` (reads them whole)."""
    return {
        rel: {"size": (step_dir / rel).stat().st_size, DIGEST: _file_digest(step_dir / rel)}
        for rel in relative_paths
    }


def manifest_text(step: int, files: dict[str, dict[str, Any]]) -> str:
    """The JSON a COMPLETE marker holds: the step, the digest's name and every file's entry."""
    manifest = {"format": MANIFEST_FORMAT, "step": step, "digest": DIGEST, "files": files}
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """The manifest in ``step_dir/COMPLETE``; ``None`` for a marker of the old format (just the
    step number: complete, but unverifiable). A marker that is neither raises ``ValueError``."""
    text = (step_dir / COMPLETE).read_text()
    if text.strip().isdigit():
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{step_dir / COMPLETE}: not a manifest ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{step_dir / COMPLETE}: not a manifest (no 'files' mapping)")
    return manifest


def verify_files(step_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the save in ``step_dir`` against its manifest, one line per bad file
    (``"<file>: missing"``, ``": size ... (truncated)"``, ``": sha256 differs ... (altered)"``);
    empty when every recorded file is present with its size and checksum. Files the manifest
    does not list are ignored (DeepSpeed never reads them)."""
    algorithm = manifest.get("digest", DIGEST)
    problems = []
    for rel, expected in sorted(manifest["files"].items()):
        path = step_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            how = "truncated" if size < expected["size"] else "longer than saved"
            problems.append(f"{rel}: size {size} bytes, saved with {expected['size']} ({how})")
        elif _file_digest(path, algorithm) != expected[algorithm]:
            problems.append(f"{rel}: {algorithm} differs from the one saved (altered)")
    return problems


def latest_verified_step(checkpoint_dir: Path) -> int | None:
    """The save to resume from: the newest complete one (see :func:`latest_complete_step`) whose
    files all match their recorded size and checksum; ``None`` when there is no complete save.

    A damaged save is skipped with a warning that names the file and what failed, and the
    previous complete save is tried. A save whose COMPLETE predates manifests (format 1) is
    accepted with a warning: it cannot be checked. Raises :class:`CheckpointError`, naming
    ``checkpoint_dir``, when complete saves exist but none verifies. Reads every file of the
    saves it checks (about 2 s per GB here): call it on one rank and broadcast the answer.
    """
    failures = []
    for step in _resume_candidates(checkpoint_dir):
        step_dir = checkpoint_dir / f"step_{step}"
        try:
            manifest = read_manifest(step_dir)
        except (OSError, ValueError) as error:
            problems = [f"{COMPLETE}: {error}"]
        else:
            if manifest is None:
                log.warning(
                    "%s was saved before checkpoints recorded checksums: resuming from it "
                    "unverified",
                    step_dir,
                )
                return step
            problems = verify_files(step_dir, manifest)
            if not problems:
                return step
        log.warning(
            "not resuming from the damaged checkpoint %s: %s; trying the previous complete one",
            step_dir,
            "; ".join(problems),
        )
        failures.append(f"step_{step}: {'; '.join(problems)}")
    if failures:
        raise CheckpointError(
            f"no complete checkpoint under {checkpoint_dir} verifies ({' | '.join(failures)}); "
            "move the damaged saves away to resume from an older one, or start fresh with "
            "trainer.resume=null in a new output_dir"
        )
    return None


def find_verified_step(checkpoint_dir: Path) -> int | None:
    """:func:`latest_verified_step` for every rank: rank 0 reads and checks the saves (once, not
    once per rank) and broadcasts the step, or the :class:`CheckpointError` every rank raises."""
    answer: int | str | None = None
    if dist_utils.is_main():
        try:
            answer = latest_verified_step(checkpoint_dir)
        except CheckpointError as error:
            answer = str(error)
    answer = dist_utils.broadcast_object(answer)
    if isinstance(answer, str):
        raise CheckpointError(answer)
    return answer


# ---- saving -------------------------------------------------------------------------------------


def _gather_on_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``None`` elsewhere)."""
    if dist_utils.world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * dist_utils.world_size() if dist_utils.is_main() else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def save_checkpoint(
    ds_engine: Any, checkpoint_dir: Path, step: int, client_state: dict[str, Any], keep: int
) -> None:
    """Save a resumable, verifiable checkpoint of ``engine`` at ``step`` (every rank must call
    this). ``keep`` > 0 keeps that many complete saves up to ``step`` (this one included)."""
    tag = f"step_{step}"
    step_dir = checkpoint_dir / tag
    if dist_utils.is_main() and step_dir.exists():
        # a save of this step from an abandoned timeline (resume fell back past it): start empty,
        # so the manifest lists exactly what this save writes
        shutil.rmtree(step_dir)
    dist_utils.barrier()
    # DeepSpeed's own `latest` is written non-atomically: we keep ours instead
    # frozen parameters (an adapter run's base) are rebuilt from their source on resume, never
    # saved: ZeRO-1/2 would store a 4-bit base that bitsandbytes' CPU kernels have repacked, which
    # no longer fits a fresh model's shape; full fine-tuning has none, so nothing changes there
    ds_engine.save_checkpoint(
        str(checkpoint_dir),
        tag=tag,
        client_state=client_state,
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    torch.save(_rng_state(), step_dir / f"rng_rank{dist_utils.rank()}.pt")
    dist_utils.barrier()  # every rank's files are on disk before they are listed
    # checksums: rank 0 lists the files (one view of a shared filesystem), each rank reads a share
    files = dist_utils.broadcast_object(_save_files(step_dir) if dist_utils.is_main() else None)
    shares = _gather_on_main(
        describe_files(step_dir, files[dist_utils.rank() :: dist_utils.world_size()])
    )
    if dist_utils.is_main():
        entries = {rel: entry for share in shares for rel, entry in share.items()}
        atomic_write_text(step_dir / COMPLETE, manifest_text(step, entries))
        atomic_write_text(checkpoint_dir / LATEST, f"{tag}\n")
        _delete_old_saves(checkpoint_dir, step, keep)
    dist_utils.barrier()


def _delete_old_saves(checkpoint_dir: Path, step: int, keep: int) -> None:
    """After the save at ``step`` completed: keep the ``keep - 1`` newest complete saves before it
    (``keep`` <= 0: all of them) and delete saves before it that never completed. Saves after
    ``step`` belong to an abandoned timeline and are left to be overwritten."""
    older = [s for s in complete_steps(checkpoint_dir) if s < step]
    doomed = older[: max(0, len(older) - (keep - 1))] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(checkpoint_dir / f"step_{old}", ignore_errors=True)
    # saves that never completed (a crash mid-save) are garbage once a newer one is complete
    for child in checkpoint_dir.iterdir():
        match = _TAG.match(child.name)
        if match and int(match.group(1)) < step and not (child / COMPLETE).exists():
            shutil.rmtree(child, ignore_errors=True)


def load_checkpoint(ds_engine: Any, checkpoint_dir: Path, step: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG from the save at ``step``;
    returns the client state saved with it."""
    tag = f"step_{step}"
    load_path, client_state = ds_engine.load_checkpoint(
        str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint_dir / tag}")
    rng_file = checkpoint_dir / tag / f"rng_rank{dist_utils.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}


def export_hf_model(ds_engine: Any, model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write the trained model in Hugging Face format (safetensors) with its tokenizer.

    Under ZeRO-3 the parameters are partitioned: they are gathered into a full 16-bit (or fp32)
    state dict on rank 0 first. The export is written to a temporary sibling directory and renamed,
    so ``out_dir`` is either absent or complete.
    """
    stage = dist_utils.zero_stage(ds_engine)
    state_dict = None
    if stage == 3:  # a collective: every rank takes part, rank 0 receives the full tensors
        gathered = ds_engine._zero3_consolidated_16bit_state_dict()
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
