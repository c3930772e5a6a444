"""What ``python -m experiments.bench`` measures: the variants (ours with the shipped defaults,
TRL's ``DPOTrainer`` two ways, ours with one speed switch flipped, the LoRA / QLoRA rows), the
plan (model size, batch, steps, runs) and, from both, the worker spec of one run
(:meth:`Plan.run_spec`, the one place that spec is built).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from experiments.bench.synthetic import ModelSize, PairSpec

__all__ = [
    "ABLATIONS",
    "ADAPTERS",
    "ADAPTER_WIDTH_MULTIPLE",
    "LORA",
    "MAIN",
    "QUICK",
    "Plan",
    "Variant",
    "adapter_size",
    "schedule",
]


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


def adapter_size(size: ModelSize) -> ModelSize:
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
    pairs: PairSpec = field(default_factory=PairSpec)
    threads: int | None = None  # torch threads of each worker (None: torch's default)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def num_pairs(self) -> int:
        """One epoch is exactly the run: every pair is trained on once."""
        return self.total_steps * self.micro_batch

    def run_spec(
        self, variant: Variant, model_dir: str | Path, train_file: str | Path, run_dir: str | Path
    ) -> dict[str, Any]:
        """The worker's SPEC.json for one run of ``variant`` (``experiments.bench.worker``): this
        plan's settings shared by every run, the variant's own, and where the model, the pairs
        and the run's outputs are."""
        spec = {
            "kind": variant.kind,
            "model_dir": str(model_dir),
            "train_file": str(train_file),
            "run_dir": str(run_dir),
            "dtype": self.dtype,
            "max_length": self.max_length,
            "beta": self.beta,
            "seed": self.seed,
            "steps": self.total_steps,
            "micro_batch": self.micro_batch,
            "lr": self.lr,
            "overrides": list(variant.overrides),
            "trl": dict(variant.trl),
            "peft": dict(variant.peft),
            "quantization": variant.quantization,
        }
        if self.threads is not None:
            spec["threads"] = self.threads
        return spec


QUICK = {"micro_batch": 2, "warmup": 1, "steps": 2, "runs": 1, "ablations": False, "real": False}


def schedule(plan: Plan, variants: Sequence[Variant], ablations: Sequence[Variant]) -> list:
    """The run order: the main variants alternated ``runs`` times, then the ablations."""
    order = [v for _ in range(plan.runs) for v in variants]
    if plan.ablations:
        order += [v for _ in range(plan.ablation_runs) for v in ablations]
    return order
