"""From worker results to the benchmark table: per-run measurements, medians, ratios, markdown."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from experiments.bench.synthetic import ModelSize, pair_flops

BASELINES = ("trl-default", "trl-fast")
#: the adapter rows (experiments.bench.throughput.ADAPTERS, on their own model) and, for ours, the
#: TRL row with the same peft LoraConfig (and base quantization) it is compared with
ADAPTER_ROWS = ("ours full", "ours lora", "trl lora", "ours qlora", "trl qlora")
ADAPTER_BASELINES = {"ours lora": "trl lora", "ours qlora": "trl qlora"}


@dataclass
class Measurement:
    """One run of one variant, over its timed steps (the warm-up steps are left out)."""

    variant: str
    timed_seconds: float
    timed_pairs: int
    pairs_per_second: float
    tokens_per_second: float  # response tokens (chosen + rejected, EOS included)
    gflops_per_second: float  # nominal model FLOPs (bench_setup.pair_flops) per second
    peak_memory_mb: float  # max allocated on GPU, else peak RSS
    reference_seconds: float
    wall_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    trl_state: dict[str, Any] | None = None

    @classmethod
    def from_result(
        cls,
        variant: str,
        result: dict[str, Any],
        order: Sequence[Sequence[int]],
        pairs: Sequence[dict[str, list[int]]],
        warmup: int,
        size: ModelSize,
    ) -> Measurement:
        """``result`` of a worker; ``order[step]`` the pair indices of each step."""
        steps = result["step_seconds"]
        if len(steps) != len(order) or len(steps) <= warmup:
            raise ValueError(
                f"{variant}: {len(steps)} step times for {len(order)} steps ({warmup} warm-up)"
            )
        seconds = sum(steps[warmup:])
        timed = [pairs[i] for step in order[warmup:] for i in step]
        tokens = sum(len(p["chosen"]) + len(p["rejected"]) for p in timed)
        flops = sum(pair_flops(p, size) for p in timed)
        return cls(
            variant=variant,
            timed_seconds=seconds,
            timed_pairs=len(timed),
            pairs_per_second=len(timed) / seconds,
            tokens_per_second=tokens / seconds,
            gflops_per_second=flops / seconds / 1e9,
            peak_memory_mb=result.get("peak_gpu_mb", result["peak_rss_mb"]),
            reference_seconds=result.get("reference_seconds", 0.0),
            wall_seconds=result.get("wall_seconds", 0.0),
            step_seconds=list(steps),
            trl_state=result.get("trl_state"),
        )


@dataclass
class Row:
    """Medians over the runs of one variant, and ratios against the TRL baselines."""

    variant: str
    runs: list[float]  # pairs/s of each run
    pairs_per_second: float
    tokens_per_second: float
    peak_memory_mb: float
    mfu: float  # fraction of the measured matmul peak
    reference_seconds: float
    speedup: dict[str, float]  # baseline -> pairs/s ratio
    memory_ratio: dict[str, float]  # baseline -> peak memory ratio


def summarize(measurements: Sequence[Measurement], peak_gflops: float) -> list[Row]:
    """One row per variant (in order of first appearance), medians over its runs."""
    names = list(dict.fromkeys(m.variant for m in measurements))
    rows = []
    for name in names:
        runs = [m for m in measurements if m.variant == name]
        rows.append(
            Row(
                variant=name,
                runs=[m.pairs_per_second for m in runs],
                pairs_per_second=statistics.median(m.pairs_per_second for m in runs),
                tokens_per_second=statistics.median(m.tokens_per_second for m in runs),
                peak_memory_mb=statistics.median(m.peak_memory_mb for m in runs),
                mfu=statistics.median(m.gflops_per_second for m in runs) / peak_gflops,
                reference_seconds=statistics.median(m.reference_seconds for m in runs),
                speedup={},
                memory_ratio={},
            )
        )
    by_name = {row.variant: row for row in rows}
    for row in rows:
        for baseline in BASELINES:
            if baseline in by_name:
                base = by_name[baseline]
                row.speedup[baseline] = row.pairs_per_second / base.pairs_per_second
                row.memory_ratio[baseline] = row.peak_memory_mb / base.peak_memory_mb
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(rows: Sequence[Row], memory: str, against: str | None = None) -> list[str]:
    base = {r.variant: r for r in rows}.get(against) if against else None
    header = (
        f"| variant | pairs/s | x trl-default | x trl-fast | response tok/s | peak {memory} MiB "
        f"| {memory} / trl-fast | MFU | ref. pass s | pairs/s per run |"
    )
    if base is not None:  # work-normalized: the variants may time different pairs
        header = header.replace("| x trl-default |", f"| x {against} (MFU) |")
    lines = [header, _rule(header)]
    for r in rows:
        first = (
            _ratio(r.mfu / base.mfu) if base is not None else _ratio(r.speedup.get("trl-default"))
        )
        lines.append(
            f"| {r.variant} | {r.pairs_per_second:.2f} | {first} | "
            f"{_ratio(r.speedup.get('trl-fast'))} | {r.tokens_per_second:,.0f} | "
            f"{r.peak_memory_mb:,.0f} | {_ratio(r.memory_ratio.get('trl-fast'))} | "
            f"{100 * r.mfu:.1f}% | {r.reference_seconds:.1f} | "
            f"{', '.join(f'{x:.2f}' for x in r.runs)} |"
        )
    return lines


def _rule(header: str) -> str:
    cells = header.count("|") - 1
    return "|" + "---|" * cells


def targets(rows: Sequence[Row]) -> list[str]:
    """The issue's targets, checked: >= 1.5x trl-fast and >= 2x trl-default pairs/s, and peak
    memory no higher than trl-fast's."""
    by_name = {r.variant: r for r in rows}
    ours = by_name.get("ours")
    if ours is None or not all(b in by_name for b in BASELINES):
        return ["- (targets need the ours, trl-default and trl-fast rows)"]
    checks = [
        ("pairs/s >= 1.5x trl-fast", ours.speedup["trl-fast"], ours.speedup["trl-fast"] >= 1.5),
        (
            "pairs/s >= 2x trl-default",
            ours.speedup["trl-default"],
            ours.speedup["trl-default"] >= 2.0,
        ),
        (
            "peak memory <= trl-fast",
            ours.memory_ratio["trl-fast"],
            ours.memory_ratio["trl-fast"] <= 1.0,
        ),
    ]
    return [f"- {what}: {value:.2f}x, {'met' if ok else 'NOT met'}" for what, value, ok in checks]


def adapter_table(rows: Sequence[Row], memory: str) -> list[str]:
    """The LoRA / QLoRA rows: pairs/s and peak memory, ours against TRL with the same adapters,
    and every row's memory against full fine-tuning of the same model (``ours full``)."""
    by_name = {r.variant: r for r in rows}
    full = by_name.get("ours full")
    header = (
        f"| variant | pairs/s | x TRL, same adapters | peak {memory} MiB | {memory} / TRL, same "
        f"adapters | {memory} / ours full | pairs/s per run |"
    )
    lines = [header, _rule(header)]
    for name in ADAPTER_ROWS:
        r = by_name.get(name)
        if r is None:
            continue
        base = by_name.get(ADAPTER_BASELINES.get(name, ""))
        speed = _ratio(r.pairs_per_second / base.pairs_per_second) if base else "-"
        mem = _ratio(r.peak_memory_mb / base.peak_memory_mb) if base else "-"
        vs_full = _ratio(r.peak_memory_mb / full.peak_memory_mb) if full else "-"
        lines.append(
            f"| {name} | {r.pairs_per_second:.2f} | {speed} | {r.peak_memory_mb:,.0f} | {mem} | "
            f"{vs_full} | {', '.join(f'{x:.2f}' for x in r.runs)} |"
        )
    checks = []
    for ours, trl in ADAPTER_BASELINES.items():
        if ours in by_name and trl in by_name:
            a, b = by_name[ours], by_name[trl]
            faster = a.pairs_per_second / b.pairs_per_second
            lighter = a.peak_memory_mb / b.peak_memory_mb
            checks.append(
                f"- {ours}: pairs/s {faster:.2f}x {trl} ({'met' if faster >= 1 else 'NOT met'}: "
                f"ahead of TRL), peak memory {lighter:.2f}x ({'met' if lighter <= 1 else 'NOT met'}"
                ": not above TRL)"
            )
    return [*lines, "", "Targets (medians):", *(checks or ["- (needs ours and trl rows)"])]


SWITCHES = (
    "- `prefix_sharing`: one `[prompt | chosen | rejected]` sequence per pair; the rejected "
    "tokens skip the chosen ones and their positions restart after the prompt, so the prompt "
    "runs once (arXiv 2410.20305).",
    "- `padding_free`: the micro batch packed into one row, no padding.",
    "- `block_attention`: how packed / prefix-shared rows attend. `segments`: one sdpa call per "
    "sequence block, no mask; `mask`: one dense (T, T) boolean mask, so a packed row of length "
    "L pays O(L^2) attention; `position_ids`: transformers' own packing (a dense block mask "
    "with sdpa, varlen kernels with flash-attention on GPU; no prefix sharing).",
    "- `logit_keep_mb`: MiB of LM-head softmax chunks kept from forward to backward; 0 "
    "recomputes every chunk's logits in backward (least memory, one more head matmul).",
    "- `chunked_logprobs=false`: the naive head, a full float32 (rows, T, vocab) log-softmax at "
    "every position, the way the log-probs are usually computed.",
    "- `length_grouping`: micro batches of pairs of similar length (mega-batches of the shuffled "
    "order); it saves padding only where there is padding (`padding_free=false`), and it "
    "changes which pairs share a step, so it is off by default.",
    "- `reference.precompute` (in `conf/config.yaml`): the reference log-probs computed once "
    "before training from the initial policy (no second model in memory); `false` keeps a "
    "frozen reference copy and scores every micro batch with it, as TRL does by default.",
)


def render_report(rows: Sequence[Row], context: dict[str, Any]) -> str:
    """The markdown of ``experiments/results/bench.md``: the setup, ours vs TRL, the speed
    switches, the adapter rows (each section when its rows ran) and how to read the numbers."""
    memory = "GPU" if context["machine"].get("gpu") else "RSS"
    main_names = ("ours", *BASELINES)
    switch_rows = [r for r in rows if r.variant not in (*main_names, *ADAPTER_ROWS)]
    adapter_rows = [r for r in rows if r.variant in ADAPTER_ROWS]
    lines = ["# Benchmark: this engine vs TRL's DPOTrainer", ""]
    if context.get("quick"):
        lines += ["**`--quick` smoke run: too few steps for numbers to mean anything.**", ""]
    lines += [
        *_setup(context),
        "",
        "## Ours vs TRL (medians over runs)",
        "",
        *_table([r for r in rows if r.variant in main_names], memory),
        "",
        "Targets (ours, medians):",
        *targets(rows),
        "",
    ]
    if switch_rows:
        lines += _switches_section([r for r in rows if r.variant == "ours"] + switch_rows, memory)
    if adapter_rows:
        lines += _adapters_section(
            adapter_rows, context.get("adapter_size") or context["size"], memory
        )
    lines += _how_to_read(memory, context.get("trl_state", {}))
    return "\n".join(lines) + "\n"


def _setup(context: dict[str, Any]) -> list[str]:
    """The bullet list of what was measured where: command, machine, versions, model, data,
    training and the matmul peak."""
    plan, size, machine = context["plan"], context["size"], context["machine"]
    params = size.body_params() + size.head_params()
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    peaks = context.get("peak_samples", [context["peak_gflops"]])
    return [
        f"- Command: `{context['command'].strip()}` ({_make_equivalent(context['command'])}), "
        f"{context['date']}, "
        f"{context['minutes']:.1f} min.",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, torch threads "
        f"{machine['torch_threads']}, {machine['memory_gb']} GiB"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU")
        + f"; load average before {context['load_before']}, after {context['load_after']}.",
        f"- Versions: Python {machine['python']}, {versions}.",
        f"- Model: Llama-style, hidden {size.hidden_size}, {size.num_layers} layers, "
        f"{size.num_heads} heads, MLP {size.intermediate_size}, vocab {size.vocab_size:,}, tied "
        f"embeddings ({params / 1e6:.1f}M parameters), random init (seed {plan.seed}), "
        f"{plan.dtype}.",
        f"- Data: synthetic pairs (seed {plan.pairs.seed}), prompts {plan.pairs.prompt[0]}-"
        f"{plan.pairs.prompt[1]} tokens, responses {plan.pairs.response[0]}-"
        f"{plan.pairs.response[1]}, uniform; max length {plan.max_length} (nothing truncated); "
        "both trainers see the same micro batches in the same order.",
        f"- Training: micro batch {plan.micro_batch} pairs, grad accum 1, torch AdamW lr "
        f"{plan.lr:g} (constant), clip 1.0, DPO sigmoid loss, beta {plan.beta}; "
        f"{plan.warmup} warm-up + {plan.steps} timed steps per run; {plan.runs} runs per main "
        f"variant, alternated, each in a fresh process"
        + (f"; {plan.ablation_runs} run(s) per ablation." if plan.ablations else "."),
        f"- Dense float32 matmul peak measured here: {context['peak_gflops']:.0f} GFLOP/s "
        "(4096^3, torch threads as above; the better of the readings before and after the runs: "
        + ", ".join(f"{x:.0f}" for x in peaks)
        + ").",
    ]


def _switches_section(rows: Sequence[Row], memory: str) -> list[str]:
    """``ours`` beside each speed-switch row, compared by work per second."""
    return [
        "## Speed switches: `ours` with one switch flipped",
        "",
        "Each row flips the named switch(es) (`trainer.*`: `conf/trainer/default.yaml`) "
        "from the shipped default. `x ours (MFU)` compares work per second (nominal FLOPs/s, "
        "see MFU below) with the `ours` row: length grouping reorders the pairs, so its timed "
        "steps hold other pairs than the `ours` run's and pairs/s alone would mislead.",
        "",
        *_table(rows, memory, "ours"),
        "",
        "The switches (all exact: tests/engine/test_optimizations.py):",
        "",
        *SWITCHES,
        "",
    ]


def _adapters_section(rows: Sequence[Row], adapters: ModelSize, memory: str) -> list[str]:
    """The LoRA / QLoRA rows on their own model (``adapters``), ours against TRL."""
    return [
        "## Adapters: LoRA and QLoRA, ours vs TRL with the same peft LoraConfig",
        "",
        f"Their own model: the one above with MLP width {adapters.intermediate_size} "
        f"(bitsandbytes' CPU 4-bit kernels need widths in multiples of 64), "
        f"{(adapters.body_params() + adapters.head_params()) / 1e6:.1f}M parameters. LoRA "
        "r 16, alpha 16, no dropout, on q/k/v/o/gate/up/down (ours: `model.lora`; TRL: "
        "`DPOTrainer(peft_config=LoraConfig(...))` with trl-fast's settings, its reference "
        "the base with the adapters disabled, precomputed). QLoRA: the base in 4-bit NF4 with "
        "double quantization, the same `BitsAndBytesConfig` on both sides. `ours full` trains "
        "every weight of the same model: the memory column against it is full fine-tuning vs "
        "LoRA vs QLoRA at this size.",
        "",
        *adapter_table(rows, memory),
        "",
    ]


def _how_to_read(memory: str, trl_state: dict[str, dict[str, Any]]) -> list[str]:
    """What each column means, and what TRL actually ran with."""
    lines = [
        "## How to read this",
        "",
        "- pairs/s and response tok/s: pairs (and their chosen + rejected tokens) of the timed "
        "steps over the wall time of those steps, from the end of the previous optimizer step to "
        "the end of this one (collation, forward, backward, optimizer step, bookkeeping).",
        f"- peak {memory}: the peak resident set size of the run's process, everything included "
        "(imports, model, reference pass, training)."
        if memory == "RSS"
        else "- peak GPU: torch.cuda.max_memory_allocated over the whole run.",
        "- ref. pass s: time of the reference log-prob pass before training (ours: always, "
        "one forward over the train pairs, and saving its scores: the `reference` phase of "
        "results.json's `timings`; trl-fast: `precompute_ref_log_probs`; trl-default scores "
        "with a second model inside every step instead). Not in the timed steps.",
        "- MFU: nominal model FLOPs of the timed pairs per second over the measured matmul peak. "
        "Per pair: 6 x body params x (2 x prompt + chosen + rejected) + 6 x vocab x hidden x "
        "(chosen + rejected) + causal attention 6 x hidden x layers x T(T+1) per sequence: the "
        "work the DPO objective needs from the plain concatenated forward. Every trainer is "
        "credited the same FLOPs per pair, so MFU ratios equal throughput ratios: TRL's extra "
        "head work at prompt and padding positions is not counted, and ours is credited the "
        "prompt it runs only once.",
        "- trl-default runs TRL's defaults except what the bench fixes for all (float32, "
        "`adamw_torch`, batch, lr, steps, max length); TRL's own default precision is bf16 "
        "autocast.",
    ]
    for name, state in trl_state.items():
        lines.append(f"- {name} ran with: " + ", ".join(f"{k}={v}" for k, v in state.items()))
    return lines


def _make_equivalent(command: str) -> str:
    """The ``make`` spelling of a ``python -m experiments.bench ...`` command line."""
    args = command.strip().removeprefix("python -m experiments.bench").strip()
    return f"`make bench ARGS='{args}'`" if args else "`make bench`"
