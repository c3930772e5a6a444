"""Generation speed: batched Hugging Face ``generate`` (``engine.generation.backends.HFBackend``,
left padding, KV cache) against one prompt at a time, in generated tokens per second.

    python -m experiments.bench.generation            # -> experiments/results/bench_generation.md
    python -m experiments.bench.generation --quick    # a smoke run, report to the temp dir

The model is the training bench's randomly initialized Llama (``experiments.bench.synthetic``:
hidden 256, 4 layers, 32k vocabulary, word-level tokenizer), prompts are synthetic (32-128 tokens).
With random weights EOS is practically never the argmax, so every completion runs to
``--new-tokens`` and both modes generate the same number of tokens; greedy decoding, so both give
the same completions (checked). Modes alternate within each repeat; the report gives the median
tokens/s of each and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.generation.backends import HFBackend
from engine.runtime.fileio import atomic_write_text
from experiments.bench.synthetic import (
    SIZES,
    PairSpec,
    build_model_dir,
    pair_texts,
    synthetic_pairs,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"  # experiments/results


def _measure(backend: HFBackend, prompts: list[str], new_tokens: int) -> tuple[float, list[str]]:
    started = time.perf_counter()
    completions = backend.generate(prompts, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - started
    tokens = sum(
        len(backend.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions
    )
    return tokens / seconds, completions


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark and write its report; returns the report's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 16 tokens, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = 8, 16, 1
        args.batch_size = min(args.batch_size, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (
        Path(tempfile.gettempdir()) / "bench_generation.md"
        if args.quick
        else RESULTS / "bench_generation.md"
    )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = SIZES["small"]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_model_dir(Path(scratch) / "model", size, max_positions=512)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = synthetic_pairs(args.prompts, PairSpec(prompt=(32, 128), seed=1), size.vocab_size)
    prompts = [pair_texts(p)["prompt"] for p in pairs]
    batched = HFBackend(model, tokenizer, batch_size=args.batch_size)
    single = HFBackend(model, tokenizer, batch_size=1)
    _measure(batched, prompts[:2], 4)  # warm-up: first-call allocations, kernel selection
    rates: dict[str, list[float]] = {"batched": [], "one at a time": []}
    for _ in range(args.repeats):
        rate_b, out_b = _measure(batched, prompts, args.new_tokens)
        rate_s, out_s = _measure(single, prompts, args.new_tokens)
        if out_b != out_s:
            raise RuntimeError("batched and one-at-a-time greedy completions differ")
        rates["batched"].append(rate_b)
        rates["one at a time"].append(rate_s)
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    command = "python -m experiments.bench.generation " + " ".join(argv or sys.argv[1:])
    lines = [
        "# Generation speed: batched vs one prompt at a time",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, CPU {platform.processor() or 'unknown'}; device: CPU  ",
        f"Model: random Llama, hidden {size.hidden_size}, {size.num_layers} layers, vocab "
        f"{size.vocab_size}, float32; {args.prompts} prompts of 32-128 tokens, "
        f"{args.new_tokens} new tokens each (greedy), batch size {args.batch_size}, "
        f"{args.repeats} repeats (median).  ",
        f"Load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores (a shared "
        "machine: other jobs' load lowers both rates).",
        "",
        "| mode | generated tokens/s (median) | runs |",
        "|---|---|---|",
        *(
            f"| {mode} | {median[mode]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |"
            for mode, values in rates.items()
        ),
        "",
        f"Speed-up of batching: {median['batched'] / median['one at a time']:.2f}x.",
        "",
    ]
    atomic_write_text(out, "\n".join(lines))
    print("\n".join(lines))
    print(f"report: {out}")
    return out


if __name__ == "__main__":
    main()
