"""The bench's adapter rows (experiments.bench.variants.ADAPTERS): ours with LoRA / QLoRA against
TRL with the same peft ``LoraConfig``. What can be checked without running them: the rows' names and
configs, the model they share, and the report section. ``python -m experiments.bench --quick``
runs them for real."""

from __future__ import annotations

import pytest

from engine.model.adapters import (
    CPU_4BIT_IN_MULTIPLE,
    CPU_4BIT_OUT_MULTIPLE,
    validate_adapter_config,
)
from experiments.bench import synthetic as bench_setup
from experiments.bench import throughput as bench
from experiments.bench import variants
from experiments.bench.report import (
    ADAPTER_BASELINES,
    ADAPTER_ROWS,
    Measurement,
    render_report,
    summarize,
)
from experiments.bench.worker import compose_ours, ours_overrides


def test_the_adapter_rows_are_the_reports():
    assert tuple(v.name for v in variants.ADAPTERS) == ADAPTER_ROWS
    assert set(ADAPTER_BASELINES) | set(ADAPTER_BASELINES.values()) <= set(ADAPTER_ROWS)


@pytest.mark.parametrize("name", sorted(bench_setup.SIZES))
def test_the_adapter_model_fits_the_cpu_4bit_kernels(name):
    size = bench_setup.SIZES[name]
    adapted = variants.adapter_size(size)
    assert adapted.intermediate_size >= size.intermediate_size
    assert adapted.intermediate_size - size.intermediate_size < variants.ADAPTER_WIDTH_MULTIPLE
    for width in (adapted.hidden_size, adapted.intermediate_size):
        assert width % CPU_4BIT_IN_MULTIPLE == 0 and width % CPU_4BIT_OUT_MULTIPLE == 0
    assert (adapted.hidden_size, adapted.num_layers) == (size.hidden_size, size.num_layers)


def test_ours_and_trl_get_the_same_lora(bench_spec):
    """TRL's peft_config and the engine's model.lora describe one LoraConfig; QLoRA adds the
    same quantization on both sides."""
    by_name = {v.name: v for v in variants.ADAPTERS}
    for ours, trl in ADAPTER_BASELINES.items():
        cfg = compose_ours(ours_overrides(bench_spec(by_name[ours])))
        validate_adapter_config(cfg.model, cfg.deepspeed)
        lora, peft = cfg.model.lora, by_name[trl].peft
        assert (lora.r, lora.alpha, lora.dropout) == (
            peft["r"],
            peft["lora_alpha"],
            peft["lora_dropout"],
        )
        assert list(lora.target_modules) == peft["target_modules"]
        assert cfg.model.quantization == by_name[trl].quantization
        assert by_name[trl].trl == by_name["trl lora"].trl  # both with trl-fast's settings
    full = compose_ours(ours_overrides(bench_spec(by_name["ours full"])))
    assert full.model.lora.r is None and full.model.quantization is None


def test_plans_include_the_adapter_rows_unless_asked_not_to():
    assert bench.make_plan(bench.parse_args(["--quick"])).adapters
    assert not bench.make_plan(bench.parse_args(["--no-adapters"])).adapters


def test_report_has_the_adapter_section(bench_size, worker_result, report_context):
    pairs = bench_setup.synthetic_pairs(4, bench_setup.PairSpec((2, 5), (2, 4)), 50)
    order = [[0, 1], [2, 3], [0, 1]]
    timings = [
        ("ours", 1.0, 100),
        ("trl-default", 3.0, 300),
        ("trl-fast", 2.0, 200),
        ("ours full", 2.0, 400),
        ("ours lora", 1.0, 200),
        ("trl lora", 2.0, 250),
        ("ours qlora", 1.0, 100),
        ("trl qlora", 4.0, 80),
    ]
    measured = [
        Measurement.from_result(name, worker_result(s, m), order, pairs, 1, bench_size)
        for name, s, m in timings
    ]
    context = report_context()
    text = render_report(summarize(measured, 100.0), context)
    assert "## Adapters: LoRA and QLoRA, ours vs TRL with the same peft LoraConfig" in text
    # ours lora: 2 pairs/s vs TRL's 1 -> 2.00x; memory 200 vs 250 -> 0.80x; vs full 0.50x
    assert "| ours lora | 2.00 | 2.00x | 200 | 0.80x | 0.50x |" in text
    assert "| trl qlora | 0.50 | - | 80 | - | 0.20x |" in text
    assert "- ours lora: pairs/s 2.00x trl lora (met: ahead of TRL), peak memory 0.80x (met" in text
    assert (
        "- ours qlora: pairs/s 4.00x trl qlora (met: ahead of TRL), peak memory 1.25x (NOT met"
        in text
    )
    # the adapter rows are not speed switches
    switches = text.split("## Speed switches", 1)
    assert len(switches) == 1 or "ours lora" not in switches[1].split("## Adapters")[0]
