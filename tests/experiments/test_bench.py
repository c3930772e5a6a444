"""The benchmark harness's logic, without running a benchmark: data, tokenization, order, FLOPs,
the statistics, the plan and the report (``experiments/bench/``)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from experiments.bench import synthetic as bench_setup
from experiments.bench import throughput as bench
from experiments.bench import variants
from experiments.bench.report import Measurement, render_report, summarize, targets
from experiments.bench.synthetic import EOS_ID, PairSpec


def test_synthetic_pairs_are_seeded_and_in_range():
    spec = PairSpec(prompt=(3, 9), response=(2, 6), seed=4)
    pairs = bench_setup.synthetic_pairs(40, spec, vocab_size=50)
    assert pairs == bench_setup.synthetic_pairs(40, spec, vocab_size=50)
    assert pairs != bench_setup.synthetic_pairs(40, PairSpec((3, 9), (2, 6), seed=5), 50)
    for pair in pairs:
        assert 3 <= len(pair["prompt"]) <= 9
        for key in ("chosen", "rejected"):
            assert pair[key][-1] == EOS_ID and 2 <= len(pair[key]) <= 7
            assert all(4 <= t < 50 for t in pair[key][:-1])
        assert pair["chosen"] != pair["rejected"]


def test_text_rows_tokenize_back_to_the_ids_for_both_trainers(tmp_path):
    """Ours reads the JSONL with engine.data.loading.load_pairs; TRL tokenizes prompt + response +
    EOS and splits at the prompt: both must give the synthetic ids."""
    from engine.data.loading import load_pairs

    tokenizer = bench_setup.build_tokenizer(60)
    pairs = bench_setup.synthetic_pairs(6, PairSpec((2, 5), (2, 4), seed=1), 60)
    path = bench_setup.write_pairs(tmp_path / "pairs.jsonl", pairs)
    loaded, _ = load_pairs(str(path), tokenizer, max_length=100)
    for got, want in zip(loaded, pairs, strict=True):
        assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == (
            want["prompt"],
            want["chosen"],
            want["rejected"],
        )
        row = bench_setup.pair_texts(want)
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
        assert prompt_ids == want["prompt"] and full[len(prompt_ids) :] == want["chosen"]


def test_pair_flops_by_hand(bench_size):
    pair = {"prompt": [5] * 3, "chosen": [6, EOS_ID], "rejected": [EOS_ID]}
    body = 2 * (4 * 64 + 3 * 8 * 16 + 2 * 8) + 8  # two layers + final norm
    head = 50 * 8
    attention = 6 * 8 * 2 * (5 * 6 + 4 * 5)  # T = 5 and 4
    want = 6 * body * (2 * 3 + 2 + 1) + 6 * head * 3 + attention
    assert bench_setup.pair_flops(pair, bench_size) == want


def test_training_order_is_the_engines_and_covers_the_epoch():
    pairs = bench_setup.synthetic_pairs(12, PairSpec((2, 5), (2, 4)), 50)
    trainer = {"micro_batch_size": 3, "grad_accum": 1}
    order = bench_setup.training_order(pairs, trainer, steps=4, seed=0)
    assert sorted(i for step in order for i in step) == list(range(12))
    assert order == bench_setup.training_order(pairs, trainer, steps=4, seed=0)
    grouped = bench_setup.training_order(
        pairs, {**trainer, "length_grouping": True, "padding_free": False}, steps=4, seed=0
    )
    assert sorted(i for step in grouped for i in step) == list(range(12)) and grouped != order


def test_measurements_medians_ratios_and_targets(bench_size, worker_result):
    pairs = bench_setup.synthetic_pairs(6, PairSpec((2, 5), (2, 4)), 50)
    order = [[0, 1], [2, 3], [4, 5]]
    runs = [
        ("ours", worker_result(0.5, 100)),
        ("trl-default", worker_result(4.0, 400)),
        ("trl-fast", worker_result(2.0, 300)),
        ("ours", worker_result(1.0, 120)),
        ("ours", worker_result(0.25, 110)),
        ("trl-fast", worker_result(2.0, 300)),
    ]
    measured = [Measurement.from_result(n, r, order, pairs, 1, bench_size) for n, r in runs]
    first = measured[0]
    assert first.timed_pairs == 4 and first.timed_seconds == 1.0  # the warm-up step is left out
    tokens = sum(len(pairs[i]["chosen"]) + len(pairs[i]["rejected"]) for i in (2, 3, 4, 5))
    assert first.tokens_per_second == tokens
    rows = {r.variant: r for r in summarize(measured, peak_gflops=1.0)}
    assert list(rows) == ["ours", "trl-default", "trl-fast"]
    assert rows["ours"].runs == [4.0, 2.0, 8.0] and rows["ours"].pairs_per_second == 4.0
    assert rows["ours"].peak_memory_mb == 110
    assert rows["ours"].speedup == {"trl-default": 8.0, "trl-fast": 4.0}
    assert rows["ours"].memory_ratio["trl-fast"] == pytest.approx(110 / 300)
    assert targets(list(rows.values())) == [
        "- pairs/s >= 1.5x trl-fast: 4.00x, met",
        "- pairs/s >= 2x trl-default: 8.00x, met",
        "- peak memory <= trl-fast: 0.37x, met",
    ]
    with pytest.raises(ValueError, match="step times"):
        Measurement.from_result("ours", worker_result(1.0, 1.0), order[:2], pairs, 1, bench_size)


def test_gpu_memory_wins_over_rss(bench_size, worker_result):
    pairs = bench_setup.synthetic_pairs(2, PairSpec((2, 5), (2, 4)), 50)
    m = Measurement.from_result(
        "ours", worker_result(1.0, 100, peak_gpu_mb=7.0), [[0], [1], [0]], pairs, 1, bench_size
    )
    assert m.peak_memory_mb == 7.0


def test_schedule_alternates_the_main_variants():
    plan = variants.Plan(runs=2, ablation_runs=1)
    order = [v.name for v in variants.schedule(plan, variants.MAIN, variants.ABLATIONS[:2])]
    assert order[:6] == ["ours", "trl-default", "trl-fast"] * 2
    assert order[6:] == [v.name for v in variants.ABLATIONS[:2]]
    no_switches = variants.Plan(ablations=False)
    assert len(variants.schedule(no_switches, variants.MAIN, variants.ABLATIONS)) == 9


def test_quick_plan_and_overrides():
    plan = bench.make_plan(bench.parse_args(["--quick", "--steps", "3"]))
    assert (plan.runs, plan.steps, plan.ablations) == (1, 3, False)
    assert plan.num_pairs == (plan.warmup + 3) * plan.micro_batch
    with pytest.raises(SystemExit):
        bench.make_plan(bench.parse_args(["--runs", "0"]))


def test_every_ablation_composes_with_the_engine_config(bench_spec):
    """A renamed switch in conf/trainer/default.yaml must not silently break the bench."""
    from experiments.bench.worker import compose_ours, ours_overrides

    for variant in (*variants.MAIN, *variants.ABLATIONS):
        if variant.kind == "ours":
            cfg = compose_ours(ours_overrides(bench_spec(variant)))
            assert cfg.trainer.micro_batch_size == 2 and cfg.trainer.log_every == 1
            assert cfg.trainer.max_steps == 3 and cfg.data.max_length == 64
            assert cfg.model.name_or_path == "/m" and cfg.deepspeed.zero_optimization.stage == 0
            for override in variant.overrides:  # the switch itself reached the config
                key, value = override.split("=", 1)
                assert str(OmegaConf.select(cfg, key)).lower() == value, override


def test_the_run_spec_carries_the_plan_and_the_variant():
    plan = variants.Plan(micro_batch=3, warmup=1, steps=4, lr=2e-5, threads=2)
    trl = next(v for v in variants.MAIN if v.name == "trl-fast")
    spec = plan.run_spec(trl, "/model", "/pairs.jsonl", "/run")
    assert (spec["kind"], spec["steps"], spec["micro_batch"]) == ("trl", 5, 3)
    assert (spec["lr"], spec["threads"], spec["model_dir"]) == (2e-5, 2, "/model")
    assert spec["trl"] == trl.trl and spec["overrides"] == [] and spec["peft"] == {}
    assert "threads" not in variants.Plan().run_spec(trl, "/m", "/t", "/r")


def test_report_renders(tmp_path, bench_size, worker_result, report_context):
    pairs = bench_setup.synthetic_pairs(4, PairSpec((2, 5), (2, 4)), 50)
    order = [[0, 1], [2, 3], [0, 1]]
    measured = [
        Measurement.from_result(name, worker_result(s, m), order, pairs, 1, bench_size)
        for name, s, m in [
            ("ours", 1.0, 100),
            ("trl-default", 3.0, 300),
            ("trl-fast", 2.0, 200),
            ("ours padding_free=false", 1.5, 110),
        ]
    ]
    context = report_context(
        machine=bench.machine_info(), trl_state={"trl-fast": {"gradient_checkpointing": False}}
    )
    text = render_report(summarize(measured, 100.0), context)
    assert "| ours | 2.00 | 3.00x | 2.00x |" in text
    assert "| ours padding_free=false | 1.33 | 0.67x |" in text  # same pairs: MFU ratio = pairs/s
    assert "trl-fast ran with: gradient_checkpointing=False" in text
    assert "`python -m experiments.bench --quick` (`make bench ARGS='--quick'`)" in text
    context["command"] = "python -m experiments.bench "
    assert "(`make bench`)" in render_report(summarize(measured, 100.0), context)
    out = tmp_path / "bench.md"
    bench.atomic_write_text(out, text)
    assert out.read_text() == text and not list(tmp_path.glob(".*tmp"))


def test_reports_of_different_kinds_go_to_different_files(tmp_path):
    def out(*argv, cuda=False, workdir=None):
        args = bench.parse_args(list(argv))
        return bench.default_out(bench.make_plan(args), args.quick, workdir, cuda=cuda)

    results = bench.RESULTS
    assert out() == results / "bench.md"
    assert out("--size", "large") == results / "bench_large.md"
    assert out("--dtype", "bfloat16", cuda=True) == results / "bench_bfloat16_cuda.md"
    assert out("--size", "large", "--dtype", "bfloat16") == results / "bench_large_bfloat16.md"
    # smoke numbers never land next to the measured ones
    assert out("--quick", workdir=tmp_path) == tmp_path / "bench-quick.md"
    assert out("--quick").parent != results
