"""One measurement of ``experiments.bench.throughput``, in its own process (so its peak RSS is its
own):

    python -m experiments.bench.worker SPEC.json RESULT.json

``SPEC.json`` names the trainer (``ours``: ``engine.train.train`` on a composed Hydra config, the
real loop on DeepSpeed; ``trl``: ``trl.DPOTrainer.train``), the model directory, the train file,
the steps and the settings (built by ``experiments.bench.variants.Plan.run_spec``). ``RESULT.json``
gets the wall time of every optimizer step, the time of the reference log-prob pass before
training, the process's peak memory, and each step's loss and mean chosen / rejected rewards
(``step_metrics``, what the TRL agreement test compares).
A spec with ``runs`` (a list of specs of one trainer) runs each in turn in this one process and
writes the list of their results (the agreement test's many short runs share one start-up).

Step times, both sides alike: from the end of one optimizer step (after its logging) to the end
of the next, so data collation, forward, backward, optimizer step and per-step bookkeeping all
count. Ours reads them back from ``metrics.jsonl`` (``log_every=1``: pairs / pairs_per_second of
each one-step window); TRL's come from a ``TrainerCallback``.

The reference pass: ours is the ``reference`` phase of ``results.json``'s ``timings`` (the
scoring of every pair before the first update and the saving of those scores; ~0 for a live
reference, which scores inside the steps); TRL's is its ``_precompute_ref_logps`` (0 when it
does not precompute). Nothing of the engine is patched or wrapped to time it.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _peak_memory_mb() -> dict[str, float]:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def ours_overrides(spec: dict[str, Any]) -> list[str]:
    """Hydra overrides of a bench run of ``engine.train``: the shared settings, then the
    variant's own ``overrides``."""
    return [
        "model=hf",
        f"model.name_or_path={spec['model_dir']}",
        f"model.dtype={spec['dtype']}",
        "data=files",
        f"data.train={spec['train_file']}",
        "data.eval=null",
        f"data.max_length={spec['max_length']}",
        "data.max_prompt_length=null",
        "deepspeed=zero0",
        "loss=logistic",
        "margin=difference",
        f"beta={spec['beta']}",
        f"seed={spec['seed']}",
        f"output_dir={spec['run_dir']}",
        f"trainer.max_steps={spec['steps']}",
        f"trainer.micro_batch_size={spec['micro_batch']}",
        "trainer.grad_accum=1",
        f"trainer.lr={spec['lr']}",
        "trainer.lr_schedule=constant",
        "trainer.warmup_ratio=0.0",
        "trainer.weight_decay=0.0",
        "trainer.grad_clip=1.0",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.export=false",
        *spec.get("overrides", []),
    ]


def compose_ours(overrides: list[str]) -> Any:
    """The composed config of ``engine.train`` for ``overrides``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``engine.train.train``; the step times from its ``metrics.jsonl``, the reference
    pass from its ``results.json`` ``timings`` (``reference_s``)."""
    from engine.metrics import read_metrics
    from engine.train import train

    results = train(compose_ours(ours_overrides(spec)))  # what results.json holds
    rows = [row for row in read_metrics(Path(spec["run_dir"]) / "metrics.jsonl") if "step" in row]
    seconds = [
        spec["micro_batch"] / row["train/pairs_per_second"]
        for row in rows
        if row.get("train/pairs_per_second")
    ]
    steps = [
        {key: row[f"train/{key}"] for key in ("loss", "chosen_reward", "rejected_reward")}
        for row in rows
        if "train/loss" in row
    ]
    return {
        "step_seconds": seconds,
        "reference_seconds": results["timings"]["reference_s"],
        "step_metrics": steps,
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with ``trl.DPOTrainer.train`` on the same pairs, in the same order."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    reference_seconds = 0.0
    steps: list[dict[str, float]] = []

    class TimedDPOTrainer(DPOTrainer):  # measures the reference pass, changes nothing
        def _precompute_ref_logps(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal reference_seconds
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                reference_seconds += time.perf_counter() - start

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # records each training step's loss and mean rewards unrounded (the logged history
            # rounds the loss to 4 decimals); with grad_accum 1 one call is one step
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                metrics = self._metrics["train"]
                steps.append(
                    {
                        "loss": float((loss[0] if return_outputs else loss).detach()),
                        "chosen_reward": metrics["rewards/chosen"][-1],
                        "rejected_reward": metrics["rewards/rejected"][-1],
                    }
                )
            return loss

    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    settings = _trl_settings(spec)
    model, peft_config = _trl_adapters(spec, settings)
    timer = StepTimes()
    trainer = TimedDPOTrainer(
        model=model,
        args=DPOConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        callbacks=[timer],
        peft_config=peft_config,
    )
    trainer.train()
    return {
        "step_seconds": [b - a for a, b in itertools.pairwise(timer.marks)],
        "reference_seconds": reference_seconds,
        "step_metrics": steps,
        "trl_state": _trl_state(trainer, with_adapters=peft_config is not None),
    }


def _trl_state(trainer: Any, with_adapters: bool) -> dict[str, Any]:
    """What TRL actually ran with, for the report."""
    model = trainer.model
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = {
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "reference_model": trainer.ref_model is not None,
        "precompute_ref_log_probs": bool(trainer.precompute_ref_logps),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "autocast_bf16": bool(trainer.args.bf16),
        "optimizer": type(optimizer).__name__,
    }
    if with_adapters:
        state["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return state


def _trl_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """``DPOConfig``'s arguments: what the bench fixes for every trainer (batch, steps, AdamW,
    constant lr, clipping, precision, max length, the sequential order), then the variant's own
    (``spec["trl"]``)."""
    import torch

    return {
        "output_dir": spec["run_dir"],
        "per_device_train_batch_size": spec["micro_batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["steps"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "beta": spec["beta"],
        "loss_type": ["sigmoid"],
        "max_length": spec["max_length"],
        "bf16": spec["dtype"] == "bfloat16",
        "fp16": False,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": spec["seed"],
        # the file is already in the engine's training order: both see the same micro batches
        "train_sampling_strategy": "sequential",
        "model_init_kwargs": {"dtype": "float32"},
        **spec.get("trl", {}),
    }


def _trl_adapters(spec: dict[str, Any], settings: dict[str, Any]) -> tuple[Any, Any]:
    """TRL's model argument and ``peft_config`` for an adapter row: the same ``LoraConfig`` as
    the engine's ``model.lora``, and for QLoRA the base loaded with the engine's own
    ``BitsAndBytesConfig`` (engine.model.adapters.quantization_config), so both quantize alike."""
    if not spec.get("peft"):
        return spec["model_dir"], None
    from peft import LoraConfig

    peft_config = LoraConfig(**spec["peft"], bias="none", task_type="CAUSAL_LM")
    if not spec.get("quantization"):
        return spec["model_dir"], peft_config
    import torch
    from transformers import AutoModelForCausalLM

    from engine.model.adapters import quantization_config

    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=dtype,
        quantization_config=quantization_config({"quantization": spec["quantization"]}, dtype),
    )
    settings.pop("model_init_kwargs", None)  # TRL refuses them with a loaded model
    return model, peft_config


def main(argv: list[str] | None = None) -> int:
    spec_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))

    def run(one: dict[str, Any]) -> dict[str, Any]:
        return run_ours(one) if one["kind"] == "ours" else run_trl(one)

    if "runs" in spec:
        results: Any = [run(one) for one in spec["runs"]]
    else:
        results = run(spec)
        results.update(_peak_memory_mb())
        results["wall_seconds"] = time.perf_counter() - started
    Path(result_path).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
