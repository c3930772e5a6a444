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

Variants (:mod:`experiments.bench.variants`):
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
MFU against this machine's measured dense float32 matmul rate (see
``experiments.bench.synthetic.pair_flops``).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.runtime.distributed import without_launcher_env
from engine.runtime.fileio import atomic_write_text
from experiments.bench import synthetic as setup
from experiments.bench.report import Measurement, render_report, summarize
from experiments.bench.variants import (
    ABLATIONS,
    ADAPTERS,
    MAIN,
    QUICK,
    Plan,
    adapter_size,
    schedule,
)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"


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
    parser.add_argument(
        "--only-real",
        action="store_true",
        help="only the SmolLM2-135M row (--runs of each variant, default 2), written to --out",
    )
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


@dataclass
class Inputs:
    """What every run of one bench reads: the model (and the adapter rows' own), the synthetic
    pairs in the engine's file and in TRL's (ours' training order), and each variant's order."""

    model_dir: Path
    adapters_dir: Path | None
    pairs: list[dict[str, list[int]]]
    train_file: Path
    trl_file: Path
    order: dict[str, list[list[int]]]  # variant -> pair indices per step


def prepare_inputs(plan: Plan, size: setup.ModelSize, workdir: Path) -> Inputs:
    """The shared model, pairs and orders, built once in ``workdir``; the engine's loader must
    read the pairs back to their synthetic ids."""
    model_dir = setup.build_model_dir(workdir / "model", size, max_positions=plan.max_length)
    pairs = setup.synthetic_pairs(plan.num_pairs, plan.pairs, size.vocab_size)
    train_file = setup.write_pairs(workdir / "train.jsonl", pairs)
    check_tokenization(model_dir, train_file, pairs)
    adapters_dir = None
    if plan.adapters:
        adapters_dir = setup.build_model_dir(
            workdir / "model_adapters", adapter_size(size), plan.max_length
        )
    order = {}  # from the engine's own sampler, with each variant's switches
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
    return Inputs(model_dir, adapters_dir, pairs, train_file, trl_file, order)


def measure(
    plan: Plan, inputs: Inputs, size: setup.ModelSize, workdir: Path, timeout: float
) -> list[Measurement]:
    """Every scheduled run, each in a fresh worker process, in order (the main variants and the
    adapter rows alternated, the speed switches after the main ones)."""
    runs = schedule(plan, MAIN, ABLATIONS)
    if plan.adapters:  # alternated like the main variants
        runs += [v for _ in range(plan.runs) for v in ADAPTERS]
    measurements = []
    for n, variant in enumerate(runs, 1):
        tag = f"{n:02d}-" + re.sub(r"[^A-Za-z0-9_-]+", "_", variant.name)  # Hydra-safe
        on_adapter_model = variant in ADAPTERS
        spec = plan.run_spec(
            variant,
            inputs.adapters_dir if on_adapter_model else inputs.model_dir,
            inputs.train_file if variant.kind == "ours" else inputs.trl_file,
            workdir / "runs" / tag,
        )
        print(f"[{n}/{len(runs)}] {variant.name}", flush=True)
        m = Measurement.from_result(
            variant.name,
            run_one(spec, workdir, tag, timeout),
            inputs.order[variant.name],
            inputs.pairs,
            plan.warmup,
            adapter_size(size) if on_adapter_model else size,
        )
        measurements.append(m)
        print(
            f"    {m.pairs_per_second:.2f} pairs/s, {m.tokens_per_second:.0f} response tok/s, "
            f"peak {m.peak_memory_mb:.0f} MiB",
            flush=True,
        )
    return measurements


def real_only(args: argparse.Namespace, command: str) -> int:
    """``--only-real``: the real-model row alone (:mod:`experiments.bench.real_model`), with this
    bench's worker launcher, trainer settings and adapter configs; the section goes to ``--out``."""
    from experiments.bench import real_model

    if args.out is None:
        raise SystemExit("--only-real needs --out (the Markdown section)")
    runs = real_model.RealPlan.runs if args.runs is None else args.runs
    if runs < 1:
        raise SystemExit("--runs must be >= 1")
    ours, trl = (next(v for v in ADAPTERS if v.name == n) for n in real_model.VARIANTS)
    harness = real_model.Harness(run_one, trainer_settings, ours.overrides, trl.trl, trl.peft)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-real-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    text = real_model.section(real_model.RealPlan(runs=runs), harness, workdir, args.timeout)
    machine = machine_info()
    text += (
        f"\nCommand: `{command}`; {machine['cpu']}, {machine['cores']} cores; "
        f"{(time.time() - started) / 60:.1f} min; "
        f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.\n"
    )
    atomic_write_text(args.out, text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.only_real:
        return real_only(args, command)
    plan = make_plan(args)
    size = setup.SIZES[plan.size]
    started = time.time()
    load_before = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        inputs = prepare_inputs(plan, size, workdir)
        print(f"measuring the float32 matmul peak ({workdir})", flush=True)
        peaks = [setup.matmul_peak_gflops()]
        measurements = measure(plan, inputs, size, workdir, args.timeout)
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
        "adapter_size": adapter_size(size),
        "variants": {v.name: v for v in (*MAIN, *ABLATIONS, *ADAPTERS)},
        "quick": args.quick,
        "trl_state": {m.variant: m.trl_state for m in measurements if m.trl_state},
    }
    report = render_report(summarize(measurements, peak_gflops), context) + real_section
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
