"""The paper-scale configs: conf/model/{qwen2_5_math_7b,qwen2_5_math_1_5b,llama3_1_8b_instruct},
conf/data/math_pairs, conf/experiment/paper_ablation and conf/hydra/launcher/{local_parallel,slurm}.

Nothing here downloads: the configs are composed with Hydra's API and checked against the BPO
paper's numbers (arXiv 2506.03557; docs/paper_scale.md), and each paper model's architecture is
trained for two steps on CPU, shrunk to a random 2-layer model with a char-level tokenizer built in
code, under ZeRO-3 in one process, on chat-format and string-format pairs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from engine.config import (
    ConfigError,
    build_deepspeed_config,
    build_objective,
    grad_accum_steps,
    validate_config,
)
from engine.data.batching import StepSampler
from engine.data.loading import load_pairs

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

PAPER_MODELS = {  # config name -> (hub id, HF model_type, LM head tied to the embeddings)
    "qwen2_5_math_7b": ("Qwen/Qwen2.5-Math-7B", "qwen2", False),
    "qwen2_5_math_1_5b": ("Qwen/Qwen2.5-Math-1.5B", "qwen2", True),
    "llama3_1_8b_instruct": ("meta-llama/Llama-3.1-8B-Instruct", "llama", False),
}
PAPER_LOSSES = ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
PAPER_MARGINS = ("difference", "balanced")


def yaml_keys(path: Path) -> set[str]:
    return set(yaml.safe_load(path.read_text()))


# ---- composing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_model_config_composes(compose_config, name: str) -> None:
    hub_id, architecture, _ = PAPER_MODELS[name]
    cfg = compose_config([f"model={name}", "data=math_pairs", "data.train=pairs.jsonl"])
    validate_config(cfg)
    model = cfg.model
    # the keys of model=hf, plus the architecture the shrunk tests build
    assert set(model) == yaml_keys(CONF / "model" / "hf.yaml") | {"architecture"}
    assert model.name_or_path == hub_id
    assert model.tokenizer is None
    assert model.dtype == "bfloat16"
    assert model.trust_remote_code is False
    assert model.gradient_checkpointing is True
    assert model.tiny is None
    assert model.architecture == architecture
    assert architecture in CONFIG_MAPPING  # a model_type transformers knows without remote code


def test_math_pairs_data_config(compose_config) -> None:
    cfg = compose_config(["data=math_pairs"])
    assert set(cfg.data) == yaml_keys(CONF / "data" / "files.yaml")
    assert cfg.data.kind == "files"
    assert OmegaConf.is_missing(cfg.data, "train")
    with pytest.raises(ConfigError, match=r"data\.train"):  # the user must name a file
        validate_config(cfg)
    cfg = compose_config(["data=math_pairs", "data.train=pairs.jsonl", "data.eval=held_out.jsonl"])
    validate_config(cfg)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 256)
    assert (cfg.data.train, cfg.data.eval, cfg.data.on_bad_row) == (
        "pairs.jsonl",
        "held_out.jsonl",
        "error",
    )


def test_paper_ablation_needs_a_train_file(compose_config) -> None:
    cfg = compose_config(["+experiment=paper_ablation", "benchmark=[]"])
    with pytest.raises(ConfigError, match=r"data\.train"):
        validate_config(cfg)


def test_paper_ablation_defaults_to_the_headline_model(compose_config) -> None:
    cfg = compose_config(["+experiment=paper_ablation", "data.train=pairs.jsonl"])
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert cfg.data.kind == "files"
    assert cfg.method.name is None  # plain loss x margin cells, no extra terms


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_ablation_resolves_the_paper_hyperparameters(compose_config, name: str) -> None:
    cfg = compose_config(
        ["+experiment=paper_ablation", f"model={name}", "data.train=pairs.jsonl", "benchmark=[]"]
    )
    validate_config(cfg)
    assert cfg.model.name_or_path == PAPER_MODELS[name][0]  # the command line's model= wins
    assert cfg.model.dtype == "bfloat16"
    assert cfg.beta == pytest.approx(0.1)
    assert cfg.margin.alpha == pytest.approx(0.3)
    trainer = cfg.trainer
    assert trainer.lr == pytest.approx(5e-6)
    assert trainer.lr_schedule == "constant"
    assert trainer.warmup_ratio == pytest.approx(0.03)
    assert trainer.max_steps is None and trainer.epochs == 2
    assert (trainer.micro_batch_size, trainer.grad_accum, trainer.global_batch) == (1, None, 8)
    assert [grad_accum_steps(trainer, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 256)
    # the paper's QLoRA (+experiment=paper_bpo's recipe), one GPU per cell
    assert cfg.model.quantization == "4bit" and (cfg.model.lora.r, cfg.model.lora.alpha) == (16, 16)
    assert cfg.deepspeed.zero_optimization.stage == 0

    # what DeepSpeed gets: bf16, the paper's global batch of 8 (1 x 8 on one GPU, and 1 x 1 on
    # 8 GPUs, grad_accum derived from trainer.global_batch)
    ds = build_deepspeed_config(cfg, model_dtype=torch.bfloat16, world_size=1)
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["train_batch_size"] == 8
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(5e-6)
    on_eight = build_deepspeed_config(cfg, torch.bfloat16, world_size=8)
    assert (on_eight["train_batch_size"], on_eight["gradient_accumulation_steps"]) == (8, 1)
    # 2 epochs: with 28k pairs at global batch 8, 3500 steps per epoch
    assert 2 * StepSampler(28_000, 1, 8, 1, seed=0).steps_per_epoch == 7_000


def test_paper_ablation_lr_schedule_is_warmup_then_constant(compose_config) -> None:
    from engine.train import _lr_schedule

    cfg = compose_config(["+experiment=paper_ablation", "data.train=pairs.jsonl"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.trainer.lr)
    schedule = _lr_schedule(optimizer, cfg.trainer, total_steps=1000)
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] < lrs[15] < lrs[29] < 5e-6  # linear warmup over 3% of 1000 steps
    assert lrs[30:] == [pytest.approx(5e-6)] * 970  # then constant


def test_paper_ablation_sweeps_the_12_cells(compose_config) -> None:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_config(
        ["+experiment=paper_ablation", "data.train=pairs.jsonl"], return_hydra_config=True
    )
    params = cfg.hydra.sweeper.params
    assert set(params) == {"loss", "margin"}
    assert params.loss.split(",") == list(PAPER_LOSSES)
    assert params.margin.split(",") == list(PAPER_MARGINS)
    assert cfg.hydra.sweep.dir.startswith("multirun/paper_ablation/")

    # the jobs the basic sweeper makes of it, and what each of them composes to
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert len(batch) == 12
    cells = set()
    for job in batch:
        cell = compose_config(["+experiment=paper_ablation", "data.train=pairs.jsonl", *job])
        build_objective(cell)  # every cell is a valid objective at the paper's beta and alpha
        assert cell.margin.alpha == pytest.approx(0.3) and cell.trainer.lr == pytest.approx(5e-6)
        cells.add((cell.loss.name, cell.margin.name))
    assert cells == {(loss, margin) for loss in PAPER_LOSSES for margin in PAPER_MARGINS}


def test_local_parallel_launcher_config(compose_config) -> None:
    """The launcher instantiates, and joblib accepts its options as the plugin passes them."""
    from hydra.utils import instantiate
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel

    cfg = compose_config(["hydra/launcher=local_parallel"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "JoblibLauncher"
    options = dict(launcher.joblib)
    assert options["n_jobs"] == 2 and options["prefer"] == "processes"
    options["backend"] = "loky"  # what the plugin hard-codes
    process_joblib_cfg(options)
    assert Parallel(**options).n_jobs == 2


@pytest.mark.parametrize(
    ("launcher", "gpus", "tasks", "mem"), [("slurm", 1, 1, 128), ("slurm_8gpu", 8, 8, 512)]
)
def test_slurm_launcher_configs_render_an_sbatch_script(
    compose_config, tmp_path: Path, monkeypatch, launcher: str, gpus: int, tasks: int, mem: int
) -> None:
    """Build the submitit executor exactly as hydra's SlurmLauncher.launch does (unknown keys are
    rejected there) and check the sbatch header it would submit."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"  # submitit refuses to build a SLURM executor without srun on PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = compose_config(
        [
            f"hydra/launcher={launcher}",
            "hydra.launcher.partition=gpu",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.job.name=train",
        ],
        return_hydra_config=True,
    )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=folder, slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m engine.train", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        f"#SBATCH --gpus-per-node={gpus}",
        f"#SBATCH --ntasks-per-node={tasks}",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --mem={mem}GB",
        "#SBATCH --time=1440",
        "#SBATCH --nodes=1",
    ):
        assert line in script
    assert f"{tmp_path / 'sweep'}/.submitit/" in script


# ---- the paper's architectures, shrunk, trained for two steps on CPU -----------------------------

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Qwen's ChatML (the Qwen2.5-Math tokenizers ship one) and Llama 3.1's layout, minus their system
# prompt logic. The Llama template writes BOS itself, as the real one does.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tokenizer(architecture: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per byte), so that it survives
    ``AutoTokenizer.from_pretrained`` of a qwen2 directory, which swaps in Qwen2Tokenizer's
    byte-level pipeline. Special tokens and chat layout of the real one: Qwen (no BOS, EOS and pad
    <|endoftext|>, ChatML) or Llama 3.1 (BOS <|begin_of_text|>, EOS <|eot_id|>, no pad token)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIALS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if architecture == "llama":
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=bos,
            eos_token="<|eot_id|>",
            additional_special_tokens=SPECIALS[1:],
        )
        tokenizer.chat_template = LLAMA3
    else:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|endoftext|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=SPECIALS[1:],
        )
        tokenizer.chat_template = CHATML
    return tokenizer


def build_shrunk_model(compose_config, name: str, out_dir: Path) -> Path:
    """The architecture of conf/model/<name>.yaml at hidden 32, 2 layers, 4 heads / 2 KV heads,
    with random weights and a tokenizer fixture, saved in Hugging Face format to ``out_dir``."""
    cfg = compose_config([f"model={name}"])
    architecture = cfg.model.architecture
    tokenizer = build_tokenizer(architecture)
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer) + 4,  # room to spare, as real checkpoints pad their vocab
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=PAPER_MODELS[name][2],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


QUESTIONS = [(12, 34), (5, 7), (40, 2), (99, 1), (23, 23), (8, 61), (70, 15), (3, 300)]


def chat_rows() -> list[dict]:
    """Conversational rows (TRL's format): message lists, with a system turn."""
    return [
        {
            "prompt": [
                {"role": "system", "content": "Please reason step by step."},
                {"role": "user", "content": f"What is {a}+{b}?"},
            ],
            "chosen": [{"role": "assistant", "content": f"{a}+{b}={a + b}. \\boxed{{{a + b}}}"}],
            "rejected": [
                {"role": "assistant", "content": f"{a}+{b}={a + b + 1}. \\boxed{{{a + b + 1}}}"}
            ],
        }
        for a, b in QUESTIONS
    ]


def string_rows() -> list[dict]:
    """Standard rows: plain strings (rendered without a chat template)."""
    return [
        {
            "prompt": f"Question: What is {a}+{b}?\nAnswer:",
            "chosen": f" {a}+{b}={a + b}. \\boxed{{{a + b}}}",
            "rejected": f" {a}+{b}={a - b}. \\boxed{{{a - b}}}",
        }
        for a, b in QUESTIONS
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shrunk_models(tmp_path_factory: pytest.TempPathFactory, compose_config) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shrunk")
    return {name: build_shrunk_model(compose_config, name, root / name) for name in PAPER_MODELS}


@pytest.fixture
def restore_process_state():
    """Undo what train() leaves in this process: torch's thread count and the rendezvous variables
    (RANK, WORLD_SIZE, MASTER_PORT, ...) that init_distributed sets for a world of one. Left set,
    they leak into subprocesses started later (a sweep's jobs would all bind that MASTER_PORT)."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_shrunk_tokenizers_render_like_the_config_comments_say(
    name: str, shrunk_models: dict[str, Path], tmp_path: Path
) -> None:
    """The rendering the model configs document: chat rows through the template with exactly one
    BOS (Llama: the template's; Qwen: none), string rows as plain text + EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shrunk_models[name])
    chat, _ = load_pairs(write_rows(tmp_path / "chat.jsonl", chat_rows()[:1]), tokenizer)
    text, _ = load_pairs(write_rows(tmp_path / "text.jsonl", string_rows()[:1]), tokenizer)
    chat_pair, text_pair = chat[0], text[0]
    bos = tokenizer.bos_token_id
    if PAPER_MODELS[name][1] == "llama":
        assert chat_pair.prompt_ids.count(bos) == 1 and chat_pair.prompt_ids[0] == bos
        assert text_pair.prompt_ids[0] == bos
        assert chat_pair.chosen_ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    else:
        assert bos is None
        assert tokenizer.decode(chat_pair.prompt_ids).startswith("<|im_start|>system\n")
        assert tokenizer.decode(text_pair.prompt_ids) == string_rows()[0]["prompt"]
        assert tokenizer.decode(chat_pair.chosen_ids).endswith("<|im_end|>\n")
    assert text_pair.chosen_ids[-1] == tokenizer.eos_token_id


def _finite_numbers(node: object) -> list[float]:
    if isinstance(node, dict):
        return [x for value in node.values() for x in _finite_numbers(value)]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return [float(node)]
    return []


@pytest.mark.parametrize("data_format", ["chat", "string"])
@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_shrunk_paper_model_trains_under_zero3(
    compose_config,
    metrics_rows,
    name: str,
    data_format: str,
    shrunk_models: dict[str, Path],
    tmp_path: Path,
    restore_process_state: None,
) -> None:
    """Two optimizer steps of +experiment=paper_ablation with the model swapped for its shrunk
    copy: chat rows in the config's own bf16, string rows in float32; ZeRO-3 in one process."""
    from engine.train import train

    model_dir = shrunk_models[name]
    rows = chat_rows() if data_format == "chat" else string_rows()
    pairs = write_rows(tmp_path / f"{data_format}.jsonl", rows)
    dtype = "bfloat16" if data_format == "chat" else "float32"
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            "+experiment=paper_ablation",
            "benchmark=[]",  # no benchmark files here (the paper's five need generation)
            f"model={name}",
            f"model.name_or_path={model_dir}",
            f"model.dtype={dtype}",
            "deepspeed=zero3",
            "model.quantization=null",  # full fine-tuning (the documented option) under ZeRO-3
            "model.lora=null",
            "loss=hinge",
            "margin=balanced",
            f"data.train={pairs}",
            f"data.eval={pairs}",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=2",
            "trainer.global_batch=4",  # 2 micro steps of 2 pairs
            "trainer.log_every=1",
            "trainer.threads=1",
            "trainer.progress_bar=false",
            "trainer.tensorboard=false",
            f"output_dir={run_dir}",
        ]
    )
    initial = {
        k: v.clone()
        for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()
    }

    results = train(cfg)

    # results.json: the run that was asked for, with finite metrics
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert (results["loss"], results["margin"], results["steps"]) == ("hinge", "balanced", 2)
    assert results["beta"] == pytest.approx(0.1) and results["alpha"] == pytest.approx(0.3)
    assert results["world_size"] == 1
    assert results["data"]["train"]["pairs"] == len(rows)
    for part in ("train", "eval"):
        for key in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy"):
            assert math.isfinite(results[part][key]), (part, key)
    assert all(math.isfinite(x) for x in _finite_numbers(results))
    metrics = metrics_rows(run_dir)
    assert [row["step"] for row in metrics if "train/loss" in row] == [1, 2]
    assert all(math.isfinite(x) for row in metrics for x in _finite_numbers(row))
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.deepspeed.zero_optimization.stage == 3
    assert saved.model.name_or_path == str(model_dir)

    # final_model/: the trained weights gathered from the ZeRO-3 partitions, loadable by HF
    final = run_dir / "final_model"
    exported_config = json.loads((final / "config.json").read_text())
    assert exported_config["model_type"] == PAPER_MODELS[name][1]
    weights = load_file(final / "model.safetensors")
    expected = set(initial) - ({"lm_head.weight"} if PAPER_MODELS[name][2] else set())
    assert expected <= set(weights)
    want_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    for key in expected:
        assert weights[key].shape == initial[key].shape, key  # not an empty ZeRO-3 placeholder
        assert weights[key].dtype == want_dtype, key
        assert torch.isfinite(weights[key].float()).all(), key
    if dtype == "float32":  # Adam moves every weight with a gradient by ~lr; visible in fp32
        changed = [k for k in expected if not torch.equal(weights[k], initial[k])]
        assert "model.norm.weight" in changed
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert (
        type(reloaded).__name__
        == type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))).__name__
    )
    assert (final / "tokenizer.json").is_file()
