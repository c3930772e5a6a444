"""Throughput benchmark: this engine against TRL's ``DPOTrainer``, side by side in one run.

    make bench                         # = python -m experiments.bench -> results/bench.md
    python -m experiments.bench --quick            # a one-minute smoke run (not for numbers)
    python -m experiments.bench --size large       # hidden 512, 8 layers -> results/bench_large.md
    python -m experiments.bench --runs 5 --steps 12 --out /tmp/bench.md

Both trainers get the same randomly initialized Llama (saved once, loaded by both), the same
synthetic pairs (fixed seed; prompts 64-256 tokens, responses 16-256), in the same order (the
file TRL reads is in the engine's training order and TRL samples it sequentially, so step i is
the same micro batch on both sides), the same micro batch, precision, AdamW, learning rate,
gradient clipping, steps and max length. Each measurement is a fresh subprocess
(``experiments.bench.worker``), so peak RSS is per run; runs alternate (ours, trl-default,
trl-fast, ours, ...), and the first ``--warmup`` steps of every run are not timed.

Variants:
- ``ours``: ``engine.train.train`` with the config defaults (all speed switches as shipped).
- ``trl-default``: ``DPOConfig`` defaults (a reference model scoring every step, gradient
  checkpointing) except what the bench fixes for everyone: float32 (TRL's own default is bf16
  autocast), ``adamw_torch``, batch, lr, steps, max length.
- ``trl-fast``: TRL's fastest honest settings: ``precompute_ref_log_probs=True``,
  ``gradient_checkpointing=False``.
- the ablations: ``ours`` with one speed switch flipped each (``conf/trainer/default.yaml``).
- the adapter rows (``ADAPTERS``; ``--no-adapters`` skips them): ours with LoRA and with QLoRA
  (``model.lora`` / ``model.quantization=4bit``) beside TRL's ``DPOTrainer`` with the same peft
  ``LoraConfig`` as its ``peft_config`` (and the same 4-bit base), plus ours with every weight
  trained, all on one model whose MLP width bitsandbytes' CPU kernels accept (``adapter_size``).

The report (``experiments/results/bench.md``, written atomically) has medians over runs of pairs/s,
response tokens/s, peak memory (RSS on CPU, max allocated on GPU), their ratios against TRL, and
MFU against this machine's measured dense float32 matmul rate (see ``bench_setup.pair_flops``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.runtime.distributed import without_launcher_env
from engine.runtime.fileio import atomic_write_text
from experiments.bench import synthetic as setup
from experiments.bench.report import Measurement, render_report, summarize

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration."""

    name: str
    kind: str  # "ours" | "trl"
    overrides: tuple[str, ...] = ()  # ours: Hydra overrides
    trl: dict[str, Any] = field(default_factory=dict)  # trl: DPOConfig settings
    note: str = ""
    peft: dict[str, Any] = field(default_factory=dict)  # trl: a peft LoraConfig (peft_config)
    quantization: str | None = None  # trl: the base loaded in 4bit / 8bit (bitsandbytes)


MAIN = (
    Variant("ours", "ours", note="engine.train, config defaults"),
    Variant("trl-default", "trl", note="DPOConfig defaults (fp32)"),
    Variant(
        "trl-fast",
        "trl",
        trl={"precompute_ref_log_probs": True, "gradient_checkpointing": False},
        note="precompute_ref_log_probs, no gradient checkpointing",
    ),
)

ABLATIONS = (
    Variant("ours prefix_sharing=false", "ours", ("trainer.prefix_sharing=false",)),
    Variant("ours padding_free=false", "ours", ("trainer.padding_free=false",)),
    Variant(
        "ours padding_free=false length_grouping=true",
        "ours",
        ("trainer.padding_free=false", "trainer.length_grouping=true"),
    ),
    Variant("ours length_grouping=true", "ours", ("trainer.length_grouping=true",)),
    Variant("ours block_attention=mask", "ours", ("trainer.block_attention=mask",)),
    Variant(
        "ours block_attention=position_ids",
        "ours",
        ("trainer.block_attention=position_ids", "trainer.prefix_sharing=false"),
        note="needs prefix_sharing=false",
    ),
    Variant(
        "ours reference.precompute=false",
        "ours",
        ("reference.precompute=false",),
        note="a frozen reference copy scored at every step (TRL's default)",
    ),
    Variant("ours logit_keep_mb=0", "ours", ("trainer.logit_keep_mb=0",)),
    Variant("ours chunked_logprobs=false", "ours", ("trainer.chunked_logprobs=false",)),
    Variant(
        "ours, every switch off",
        "ours",
        (
            "trainer.prefix_sharing=false",
            "trainer.padding_free=false",
            "trainer.logit_keep_mb=0",
            "trainer.logit_chunk_size=1024",
        ),
        note="padded rows, head recomputed in backward",
    ),
)


#: LoRA r 16, alpha 16 (the paper's) on every linear layer of the decoder blocks, no dropout:
#: ours through model.lora, TRL through the same peft LoraConfig as its peft_config
LORA = {
    "r": 16,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
_OURS_LORA = (
    f"model.lora={{r: {LORA['r']}, alpha: {LORA['lora_alpha']}, dropout: {LORA['lora_dropout']}, "
    f"target_modules: [{', '.join(LORA['target_modules'])}], modules_to_save: null}}"
)
#: TRL's fastest honest settings (trl-fast's) for its adapter rows too
_TRL_FAST = {"precompute_ref_log_probs": True, "gradient_checkpointing": False}

ADAPTERS = (
    Variant("ours full", "ours", note="all weights, on the adapter rows' model"),
    Variant("ours lora", "ours", (_OURS_LORA,), note="model.lora: r 16, alpha 16"),
    Variant(
        "trl lora",
        "trl",
        trl=_TRL_FAST,
        peft=LORA,
        note="peft_config = the same LoraConfig; reference = adapters disabled (precomputed)",
    ),
    Variant(
        "ours qlora",
        "ours",
        (_OURS_LORA, "model.quantization=4bit"),
        note="4-bit NF4 base, double quantization",
    ),
    Variant(
        "trl qlora",
        "trl",
        trl=_TRL_FAST,
        peft=LORA,
        quantization="4bit",
        note="the same LoraConfig on the same BitsAndBytesConfig base",
    ),
)
# bitsandbytes' CPU 4-bit kernels need layer widths that are multiples of 64
# (engine.model.adapters.CPU_4BIT_IN_MULTIPLE): the adapter rows use the bench size with its MLP
# width rounded up to one (small 688 -> 704, large 1376 -> 1408), for ours and TRL alike
ADAPTER_WIDTH_MULTIPLE = 64


def adapter_size(size: setup.ModelSize) -> setup.ModelSize:
    """The model of the adapter rows: ``size`` with an MLP width the 4-bit CPU kernels run."""
    width = -(-size.intermediate_size // ADAPTER_WIDTH_MULTIPLE) * ADAPTER_WIDTH_MULTIPLE
    return replace(size, intermediate_size=width)


@dataclass
class Plan:
    """What one bench run measures."""

    size: str = "small"
    micro_batch: int = 4
    warmup: int = 2
    steps: int = 8  # timed steps per run
    runs: int = 3  # runs of each main variant
    ablation_runs: int = 1
    ablations: bool = True
    adapters: bool = True  # the LoRA / QLoRA rows (ADAPTERS), runs times each
    real: bool = True  # the real-model row (experiments.bench.real_model; the real extra)
    dtype: str = "float32"
    lr: float = 1e-5
    beta: float = 0.1
    seed: int = 0
    max_length: int = 512
    pairs: setup.PairSpec = field(default_factory=setup.PairSpec)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def num_pairs(self) -> int:
        """One epoch is exactly the run: every pair is trained on once."""
        return self.total_steps * self.micro_batch


QUICK = {"micro_batch": 2, "warmup": 1, "steps": 2, "runs": 1, "ablations": False, "real": False}


def schedule(plan: Plan, variants: Sequence[Variant], ablations: Sequence[Variant]) -> list:
    """The run order: the main variants alternated ``runs`` times, then the ablations."""
    order = [v for _ in range(plan.runs) for v in variants]
    if plan.ablations:
        order += [v for _ in range(plan.ablation_runs) for v in ablations]
    return order


def trainer_settings(plan: Plan, overrides: Sequence[str]) -> dict[str, Any]:
    """The ``trainer`` group a bench run of engine.train composes (with a variant's overrides)."""
    from omegaconf import OmegaConf

    from experiments.bench.worker import compose_ours

    cfg = compose_ours(
        [
            "data=files",
            "data.train=unused",
            f"trainer.micro_batch_size={plan.micro_batch}",
            "trainer.grad_accum=1",
            *overrides,
        ]
    )
    return OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[return-value]


def _worker_env() -> dict[str, str]:
    env = without_launcher_env()
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    return env


def run_one(spec: dict[str, Any], workdir: Path, tag: str, timeout: float) -> dict[str, Any]:
    """Run one worker subprocess; its output goes to ``workdir/logs/<tag>.log``."""
    (workdir / "logs").mkdir(exist_ok=True)
    spec_path = workdir / f"{tag}.spec.json"
    result_path = workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / "logs" / f"{tag}.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.bench.worker", str(spec_path), str(result_path)],
            cwd=REPO,
            env=_worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"bench worker {tag} failed (exit {proc.returncode}):\n{tail}")
    shutil.rmtree(spec["run_dir"], ignore_errors=True)  # checkpoints: not needed, not small
    return json.loads(result_path.read_text())


def check_tokenization(model_dir: Path, train_file: Path, pairs: list[dict]) -> None:
    """The engine's loader must read the text rows back to exactly the synthetic ids (TRL's
    tokenization of the same rows is checked by tests/experiments/test_bench.py)."""
    from transformers import AutoTokenizer

    from engine.data.loading import load_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    loaded, _ = load_pairs(str(train_file), tokenizer, max_length=10**6)
    for i, (got, want) in enumerate(zip(loaded, pairs, strict=True)):
        if (got.prompt_ids, got.chosen_ids, got.rejected_ids) != (
            want["prompt"],
            want["chosen"],
            want["rejected"],
        ):
            raise RuntimeError(f"pair {i}: the tokenizer does not reproduce the synthetic ids")


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, load, versions: the context the numbers belong to."""
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_gb = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for name in ("torch", "transformers", "trl", "deepspeed", "accelerate", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
    return info


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (not for numbers)")
    parser.add_argument("--size", choices=sorted(setup.SIZES), default="small")
    parser.add_argument("--micro-batch", type=int, help="pairs per step (default 4)")
    parser.add_argument("--warmup", type=int, help="untimed steps per run (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 8)")
    parser.add_argument("--runs", type=int, help="runs of each main variant (default 3)")
    parser.add_argument("--ablation-runs", type=int, help="runs of each ablation (default 1)")
    parser.add_argument("--no-ablations", action="store_true", help="no speed-switch rows")
    parser.add_argument("--no-adapters", action="store_true", help="no LoRA / QLoRA rows")
    parser.add_argument("--no-real", action="store_true", help="no SmolLM2-135M row")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--out",
        type=Path,
        help="the markdown report (default: "
        "experiments/results/bench[_large][_bfloat16][_cuda].md; "
        "with --quick, bench-quick.md in --workdir or the temp dir, so smoke numbers never "
        "replace measured ones)",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--workdir", type=Path, help="keep model, data and logs here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    return parser.parse_args(argv)


def default_out(
    plan: Plan, quick: bool, workdir: Path | None = None, cuda: bool | None = None
) -> Path:
    """Where the report goes without ``--out``: one file per size, precision and device under
    ``experiments/results/``, so a run never overwrites another kind's measured numbers; a
    ``--quick`` smoke run writes into ``--workdir`` (or the temp dir) instead."""
    if quick:
        return (workdir or Path(tempfile.gettempdir())) / "bench-quick.md"
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    name = "bench"
    if plan.size != "small":
        name += f"_{plan.size}"
    if plan.dtype != "float32":
        name += f"_{plan.dtype}"
    if cuda:
        name += "_cuda"
    return RESULTS / f"{name}.md"


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan(size=args.size, dtype=args.dtype)
    if args.quick:
        for key, value in QUICK.items():
            setattr(plan, key, value)
    for key in ("micro_batch", "warmup", "steps", "runs", "ablation_runs"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    if args.no_ablations:
        plan.ablations = False
    if args.no_adapters:
        plan.adapters = False
    if args.no_real:
        plan.real = False
    if min(plan.micro_batch, plan.steps, plan.runs) < 1 or plan.warmup < 0:
        raise SystemExit("micro batch, steps and runs must be >= 1, warmup >= 0")
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    command = "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    size = setup.SIZES[plan.size]
    started = time.time()
    load_before = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        # ---- the shared model, pairs and order ------------------------------------------------
        model_dir = setup.build_model_dir(workdir / "model", size, max_positions=plan.max_length)
        pairs = setup.synthetic_pairs(plan.num_pairs, plan.pairs, size.vocab_size)
        train_file = setup.write_pairs(workdir / "train.jsonl", pairs)
        check_tokenization(model_dir, train_file, pairs)
        adapters_size = adapter_size(size)
        adapters_dir = (
            setup.build_model_dir(workdir / "model_adapters", adapters_size, plan.max_length)
            if plan.adapters
            else None
        )
        order = {}  # variant -> pair indices per step, from the engine's own sampler
        for variant in (*MAIN, *ABLATIONS):
            if variant.kind == "ours":
                order[variant.name] = setup.training_order(
                    pairs, trainer_settings(plan, variant.overrides), plan.total_steps, plan.seed
                )
        ours_order = [i for step in order["ours"] for i in step]
        trl_file = setup.write_pairs(workdir / "train_trl.jsonl", [pairs[i] for i in ours_order])
        for variant in (*MAIN, *ADAPTERS):  # TRL reads its file sequentially: ours' batches
            if variant.kind == "trl" or variant in ADAPTERS:
                order[variant.name] = order["ours"]
        print(f"measuring the float32 matmul peak ({workdir})", flush=True)
        peaks = [setup.matmul_peak_gflops()]

        # ---- the runs, alternated -------------------------------------------------------------
        shared = {
            "model_dir": str(model_dir),
            "dtype": plan.dtype,
            "max_length": plan.max_length,
            "beta": plan.beta,
            "seed": plan.seed,
            "steps": plan.total_steps,
            "micro_batch": plan.micro_batch,
            "lr": plan.lr,
        }
        measurements: list[Measurement] = []
        runs = schedule(plan, MAIN, ABLATIONS)
        if plan.adapters:  # alternated like the main variants
            runs += [v for _ in range(plan.runs) for v in ADAPTERS]
        for n, variant in enumerate(runs, 1):
            tag = f"{n:02d}-" + re.sub(r"[^A-Za-z0-9_-]+", "_", variant.name)  # Hydra-safe
            on_adapter_model = variant in ADAPTERS
            spec = {
                **shared,
                "kind": variant.kind,
                "train_file": str(train_file if variant.kind == "ours" else trl_file),
                "run_dir": str(workdir / "runs" / tag),
                "overrides": list(variant.overrides),
                "trl": variant.trl,
                "peft": variant.peft,
                "quantization": variant.quantization,
            }
            if on_adapter_model:
                spec["model_dir"] = str(adapters_dir)
            print(f"[{n}/{len(runs)}] {variant.name}", flush=True)
            result = run_one(spec, workdir, tag, args.timeout)
            measurements.append(
                Measurement.from_result(
                    variant.name,
                    result,
                    order[variant.name],
                    pairs,
                    plan.warmup,
                    adapters_size if on_adapter_model else size,
                )
            )
            m = measurements[-1]
            print(
                f"    {m.pairs_per_second:.2f} pairs/s, {m.tokens_per_second:.0f} response tok/s, "
                f"peak {m.peak_memory_mb:.0f} MiB",
                flush=True,
            )
        peaks.append(setup.matmul_peak_gflops())  # again: a busy machine reads low
        real_section = ""
        if plan.real:  # SmolLM2-135M-Instruct, ours vs TRL with LoRA (its own section)
            from experiments.bench import real_model

            ours, trl = (next(v for v in ADAPTERS if v.name == n) for n in real_model.VARIANTS)
            harness = real_model.Harness(
                run_one, trainer_settings, ours.overrides, trl.trl, trl.peft
            )
            real_plan = real_model.RealPlan(runs=min(plan.runs, real_model.RealPlan.runs))
            real_section = "\n" + real_model.section(real_plan, harness, workdir, args.timeout)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    peak_gflops = max(peaks)
    rows = summarize(measurements, peak_gflops)
    context = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "minutes": (time.time() - started) / 60,
        "peak_gflops": peak_gflops,
        "peak_samples": peaks,
        "plan": plan,
        "size": size,
        "adapter_size": adapters_size,
        "variants": {v.name: v for v in (*MAIN, *ABLATIONS, *ADAPTERS)},
        "quick": args.quick,
        "trl_state": {m.variant: m.trl_state for m in measurements if m.trl_state},
    }
    report = render_report(rows, context) + real_section
    out = args.out or default_out(plan, args.quick, args.workdir)
    atomic_write_text(out, report)
    if args.json:
        atomic_write_text(
            args.json, json.dumps([m.__dict__ for m in measurements], indent=1, default=str)
        )
    print(report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
