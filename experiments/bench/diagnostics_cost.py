"""What the gradient-weight diagnostics cost: ``python -m experiments.bench.diagnostics_cost``.

Trains with ``engine.train.train`` on the benchmark's synthetic pairs and randomly initialised
Llama (``experiments/bench/synthetic.py``; no download) with ``trainer.log_every=1``, so every step
is a logged step and pays for the diagnostics (the worst case; the default logs every 10th step).
The time spent in :class:`engine.gradient_weights.GradientDiagnostics` (computing the weights and
writing the TensorBoard histograms; ``results.json``'s ``timings.diagnostics_s``) is divided by the
loop's total step time, read back from ``metrics.jsonl``. Prints one line per model size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from experiments.bench import synthetic as bench_setup
from experiments.bench.synthetic import ModelSize, PairSpec
from experiments.bench.variants import Plan, Variant

SIZES = {
    "tiny": ModelSize(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, vocab_size=512
    ),
    "small": bench_setup.SIZES["small"],
}
#: ours as the bench runs it (every step logged), with the TensorBoard histograms written too
LOGGED = Variant("ours, histograms", "ours", ("trainer.tensorboard=true",))


def measure(size_name: str, steps: int, micro_batch: int, workdir: Path) -> dict[str, float]:
    """Train ``steps`` steps; return the diagnostics' seconds (``results.json`` ``timings``:
    ``diagnostics_s``), the steps' seconds (``metrics.jsonl``) and the ratio."""
    from engine.metrics import read_metrics
    from engine.train import train
    from experiments.bench.worker import compose_ours, ours_overrides

    size = SIZES[size_name]
    plan = Plan(micro_batch=micro_batch, warmup=0, steps=steps, max_length=256)
    model_dir = bench_setup.build_model_dir(workdir / "model", size, max_positions=plan.max_length)
    pairs = bench_setup.synthetic_pairs(
        plan.num_pairs, PairSpec(prompt=(32, 96), response=(16, 96)), size.vocab_size
    )
    train_file = bench_setup.write_pairs(workdir / "train.jsonl", pairs)
    spec = plan.run_spec(LOGGED, model_dir, train_file, workdir / "run")
    diagnostics = train(compose_ours(ours_overrides(spec)))["timings"]["diagnostics_s"]
    rows = [r for r in read_metrics(workdir / "run" / "metrics.jsonl") if "train/loss" in r]
    step_seconds = sum(micro_batch / r["train/pairs_per_second"] for r in rows)
    return {
        "diagnostics_seconds": diagnostics,
        "step_seconds": step_seconds,
        "fraction": diagnostics / step_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args(argv)
    for name in args.sizes:
        with tempfile.TemporaryDirectory(prefix="diag-cost-") as workdir:
            found = measure(name, args.steps, args.micro_batch, Path(workdir))
        print(
            f"{name}: diagnostics {found['diagnostics_seconds'] * 1e3:.1f} ms over "
            f"{args.steps} logged steps of {found['step_seconds']:.2f} s in all: "
            f"{100 * found['fraction']:.2f}% of step time",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
