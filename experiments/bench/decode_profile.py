"""Where the decode loop's time goes, and how far each step is from this machine's floor.

    python -m experiments.bench.decode_profile --task-model DIR  # -> experiments/results/
    python -m experiments.bench.decode_profile --quick           # a smoke run, to the temp dir

The cases are :mod:`experiments.bench.generation`'s (the task's model, the bench's 4 x 256
Llama, SmolLM2-135M), decoded by the loop (:mod:`engine.generation.decoding`). Each case runs
three times: a warm-up, a timed pass (every per-token step timed with ``perf_counter``) and a
pass under ``torch.profiler`` (CPU, FLOPs counted), whose operator self times inside the steps
are split into

- matmuls (``aten::mm`` / ``addmm`` / ``bmm``): their FLOPs over their time, against the
  machine's float32 matmul rate (:func:`experiments.bench.synthetic.matmul_peak_gflops`);
- attention (the ``scaled_dot_product`` kernels): the bytes of the key/value cache the steps read
  (every layer's filled columns, keys and values) over their time, against the machine's copy
  bandwidth (:func:`copy_bandwidth_gbs`, a 256 MiB tensor copied: bytes read + written);
- every other operator (norms, rotary, cache writes, activations, the head's copy);
- the rest of the profiled step: Python between the operators, and the profiler's own cost.

The floor of a step is what the step cannot do without on this machine: its matmul FLOPs at the
matmul rate (or its weights read at the copy bandwidth, if that is longer) plus its cache read at
the copy bandwidth. ``step / floor`` bounds what any decoder (``generate``, a compiled loop, a C++
one) could gain on these steps here. Costs: seconds per case (SmolLM2: about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.generation import decoding
from engine.generation.backends import HFBackend
from engine.runtime.fileio import atomic_write_text
from experiments.bench.generation import (
    RESULTS,
    Case,
    built_cases,
    case_names,
    command_line,
    machine_line,
)

#: the profiler's operator names counted as matmuls and as the attention kernel
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION = "scaled_dot_product"
#: the name the profiled steps are recorded under
STEP = "decode_profile.step"


@dataclass
class Profile:
    """One case's measurements (times in seconds, sizes in bytes)."""

    case: Case
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)  # the timed pass, per step
    pass_seconds: float = 0.0  # the timed pass, whole call (tokenizing, prefill, steps)
    tokens: int = 0
    kv_bytes: int = 0  # key/value cache bytes the steps' attention read, all steps
    weight_bytes: int = 0  # the matmul weights one step reads
    profiled_step: float = 0.0  # the profiled pass: time inside the steps
    matmul: float = 0.0
    matmul_flops: float = 0.0
    attention: float = 0.0
    other: float = 0.0


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth at torch's thread count (GB/s): a ``mib`` MiB float32
    tensor copied into another, bytes read + written, best of ``repeats`` after a warm-up."""
    source = torch.randn(mib * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best / 1e9


def _weight_bytes(model: Any) -> int:
    """The bytes of the weights one step multiplies by (the untied input embedding is a lookup)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    if not model.config.tie_word_embeddings:
        embedding = model.get_input_embeddings().weight
        total -= embedding.numel() * embedding.element_size()
    return total


@contextlib.contextmanager
def _watched_steps(profile: Profile, record: bool) -> Iterator[None]:
    """``decoding._step`` wrapped meanwhile: each call timed, its cache read counted and, with
    ``record``, recorded under :data:`STEP` for the profiler."""
    original = decoding._step

    def step(*args: Any) -> torch.Tensor:
        cache, column = args[4], args[5]
        profile.kv_bytes += sum(
            2 * keys[:, :, : column + 1].numel() * keys.element_size() for keys in cache.keys
        )
        started = time.perf_counter()
        with torch.profiler.record_function(STEP) if record else contextlib.nullcontext():
            logits = original(*args)
        profile.step_seconds.append(time.perf_counter() - started)
        return logits

    decoding._step = step
    try:
        yield
    finally:
        decoding._step = original


def _decode(case: Case) -> tuple[float, int]:
    """The loop over the case's prompts: (seconds, generated tokens)."""
    backend = HFBackend(case.model, case.tokenizer, batch_size=case.rows, decoder="auto")
    if backend.decoder != "loop":
        raise RuntimeError(f"{case.name}: the loop is unavailable ({backend.decoder_reason})")
    started = time.perf_counter()
    backend.generate(
        case.prompts,
        max_new_tokens=case.max_new_tokens,
        temperature=case.temperature,
        seed=1,
        add_special_tokens=case.add_special_tokens,
    )
    return time.perf_counter() - started, backend.generated_tokens


def _inside_steps(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == STEP:
            return True
        parent = parent.cpu_parent
    return False


def _split(profile: Profile, events: Any) -> None:
    """Fill the profiled pass's figures from its events (self times, in seconds)."""
    for event in events:
        if event.name == STEP:
            profile.profiled_step += event.cpu_time_total / 1e6
            continue
        if not _inside_steps(event):
            continue
        seconds = event.self_cpu_time_total / 1e6
        if event.name in MATMULS:
            profile.matmul += seconds
            profile.matmul_flops += event.flops or 0
        elif ATTENTION in event.name:
            profile.attention += seconds
        else:
            profile.other += seconds


def profile_case(case: Case) -> Profile:
    """A warm-up, a timed pass and a profiled pass of the loop over ``case``."""
    profile = Profile(case, weight_bytes=_weight_bytes(case.model))
    _decode(case)  # warm-up: first-call allocations, kernel selection
    with _watched_steps(profile, record=False):
        profile.pass_seconds, profile.tokens = _decode(case)
    profile.steps = len(profile.step_seconds)
    if profile.steps == 0:
        raise RuntimeError(f"{case.name}: every row stopped at its first token: no step to profile")
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        torch.profiler.profile(activities=activities, with_flops=True) as profiler,
        _watched_steps(Profile(case), record=True),  # its own counts: the timed pass's stay
    ):
        _decode(case)
    _split(profile, profiler.events())
    return profile


def report(profiles: list[Profile], peak: float, bandwidth: float, command: str) -> str:
    """The Markdown report."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        "# Where the decode loop's time goes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}; device: CPU  ",
        f"Float32 matmul rate (best of two, 4096^3): {peak:,.0f} GFLOP/s; copy bandwidth (256 MiB, "
        f"read + written): {bandwidth:,.1f} GB/s. Load average at the end (1, 5, 15 min): {load}.",
        "",
        "Timed pass (no profiler): the loop's tokens/s over the whole call and the median step. "
        "Profiled pass: the steps' time split by operator self time; `rest` is Python between "
        "the operators plus the profiler's own cost. Floor: the step's matmul FLOPs at the matmul "
        "rate (or its weights at the copy bandwidth, if longer) + its cache read at the copy "
        "bandwidth.",
        "",
        "| case | rows | steps | loop tokens/s | steps' share of the call | median step (ms) "
        "| matmuls | attention | other ops | rest | floor (ms) | step / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        step = statistics.median(p.step_seconds)
        share = {
            name: 100 * seconds / p.profiled_step
            for name, seconds in (("matmul", p.matmul), ("attention", p.attention))
        }
        other = 100 * p.other / p.profiled_step
        rest = 100 - share["matmul"] - share["attention"] - other
        matmul_rate = p.matmul_flops / p.matmul / 1e9 if p.matmul else 0.0
        kv_rate = p.kv_bytes / p.attention / 1e9 if p.attention else 0.0
        floor = max(
            p.matmul_flops / p.steps / (peak * 1e9), p.weight_bytes / (bandwidth * 1e9)
        ) + p.kv_bytes / p.steps / (bandwidth * 1e9)
        lines.append(
            f"| {p.case.name} | {p.case.rows} | {p.steps} | {p.tokens / p.pass_seconds:,.0f} "
            f"| {100 * sum(p.step_seconds) / p.pass_seconds:.0f}% | {1e3 * step:.2f} "
            f"| {share['matmul']:.0f}% at {matmul_rate:,.0f} GFLOP/s "
            f"({100 * matmul_rate / peak:.0f}% of peak) "
            f"| {share['attention']:.0f}% at {kv_rate:,.1f} GB/s "
            f"({100 * kv_rate / bandwidth:.0f}% of copy) "
            f"| {other:.0f}% | {rest:.0f}% | {1e3 * floor:.2f} | {step / floor:.1f}x |"
        )
    lines += ["", "Models:", ""]
    for p in profiles:
        lines.append(
            f"- {p.case.name}: {p.case.note}; {p.matmul_flops / p.steps / 1e6:,.0f} MFLOP of "
            f"matmuls and {p.kv_bytes / p.steps / 2**20:,.1f} MiB of cache read per step, "
            f"{p.weight_bytes / 2**20:,.1f} MiB of matmul weights"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    """Profile the loop on the chosen cases and write the report; returns its path."""
    from experiments.bench.synthetic import matmul_peak_gflops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="task,small,smollm2", help="comma-separated")
    parser.add_argument("--task-model", type=Path, default=None, help="a task sft_model/ dir")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small batches")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    default = Path(tempfile.gettempdir()) if args.quick else RESULTS
    out = args.out or default / "decode_profile.md"
    names = case_names(args.cases)
    peaks, bandwidths = [matmul_peak_gflops()], [copy_bandwidth_gbs()]
    profiles: list[Profile] = []
    for built in built_cases(names, args.task_model, args.quick):
        for case in built:
            profiles.append(profile_case(case))
            print(f"{case.name}: profiled", flush=True)
    peaks.append(matmul_peak_gflops())
    bandwidths.append(copy_bandwidth_gbs())
    text = report(
        profiles,
        max(peaks),
        max(bandwidths),
        command_line("experiments.bench.decode_profile", argv),
    )
    atomic_write_text(out, text)
    print(text)
    print(f"report: {out}")
    return out


if __name__ == "__main__":
    main()
