"""Config files written as deltas compose to what they held when each repeated its base's keys:
data=math and data=math_pairs extend data=files, the paper model presets extend model=hf, zero3
extends zero2 and zero3_offload extends zero3. The expected values are the composed configs from
before the files became deltas; every DeepSpeed key and every data=math key carries a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"

FILES = {
    "kind": "files",
    "train": "???",
    "eval": None,
    "split": "train",
    "eval_split": "test",
    "max_length": 512,
    "max_prompt_length": 256,
    "on_bad_row": "error",
    "limit": None,
    "eval_limit": None,
}
MATH_PAIRS = {**FILES, "max_length": 2048, "max_prompt_length": 256}
MATH_LOADER = {
    **FILES,
    "kind": "math",
    "train": None,
    "eval_split": "train",
    "max_length": 160,
    "max_prompt_length": 32,
}
PAPER_MODEL = {
    "tokenizer": None,
    "dtype": "bfloat16",
    "trust_remote_code": False,
    "attn_implementation": "sdpa",
    "gradient_checkpointing": True,
    "tiny": None,
}
PAPER_MODELS = {
    "qwen2_5_math_7b": {"name_or_path": "Qwen/Qwen2.5-Math-7B", "architecture": "qwen2"},
    "qwen2_5_math_1_5b": {"name_or_path": "Qwen/Qwen2.5-Math-1.5B", "architecture": "qwen2"},
    "llama3_1_8b_instruct": {
        "name_or_path": "meta-llama/Llama-3.1-8B-Instruct",
        "architecture": "llama",
    },
}
SHARDED = {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 50_000_000}
STAGE3 = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_gather_16bit_weights_on_model_save": True,
}
ZERO = {
    "zero0": {"stage": 0},
    "zero1": {"stage": 1},
    "zero2": {"stage": 2, **SHARDED, "allgather_bucket_size": 50_000_000},
    "zero3": {"stage": 3, **SHARDED, **STAGE3},
    "zero3_offload": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}
# keys a file gained from its base that it did not set before; each is harmless, and said why
GAINED = {
    "zero3": {"allgather_bucket_size"},  # stages 1-2 only: stage 3 ignores it
    # DeepSpeed's own defaults for the stage3 keys; reduce_bucket_size 5e7 instead of DeepSpeed's
    # 5e8: smaller reduction buffers, which is what an offload run short of GPU memory wants
    "zero3_offload": {
        "allgather_bucket_size",
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
    },
}


def container(cfg, key: str) -> dict:
    return OmegaConf.to_container(cfg[key], resolve=False)


def subset(actual: dict, expected: dict) -> dict:
    """Entries of ``expected`` that ``actual`` lacks or holds with another value."""
    return {k: v for k, v in expected.items() if k not in actual or actual[k] != v}


def test_math_pairs_extends_files(compose_config):
    assert container(compose_config(["data=math_pairs"]), "data") == MATH_PAIRS
    assert container(compose_config(["data=files"]), "data") == FILES
    own = yaml.safe_load((CONF / "data" / "math_pairs.yaml").read_text())
    assert own["defaults"][0] == "files"
    assert set(own) - {"defaults"} == {"max_length", "max_prompt_length"}  # only what differs


def test_math_extends_files_and_keeps_its_task_keys(compose_config):
    data = container(compose_config(["data=math"]), "data")
    assert {k: data[k] for k in MATH_LOADER} == MATH_LOADER
    assert set(data) == set(MATH_LOADER) | {"cache_dir", "problems", "sft", "pairs"}
    assert data["problems"]["task_seed"] == 1234 and data["sft"]["accuracy_band"] == [0.35, 0.6]


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_model_presets_extend_hf(compose_config, name):
    model = container(compose_config([f"model={name}"]), "model")
    expected = {**PAPER_MODEL, **PAPER_MODELS[name]}
    assert not subset(model, expected)
    hf = container(compose_config(["model=hf", "model.name_or_path=x"]), "model")
    assert set(model) == set(hf) | {"architecture"}  # whatever hf gains, the presets inherit
    own = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    assert own["defaults"][0] == "hf" and "tokenizer" not in own and "tiny" not in own


@pytest.mark.parametrize("name", sorted(ZERO))
def test_deepspeed_files_compose_to_their_old_settings(compose_config, name):
    zero = container(compose_config([f"deepspeed={name}"]), "deepspeed")["zero_optimization"]
    assert not subset(zero, ZERO[name])
    assert set(zero) - set(ZERO[name]) == GAINED.get(name, set())
    if name == "zero3_offload":
        offload = container(compose_config([f"deepspeed={name}"]), "deepspeed")
        assert offload["zero_force_ds_cpu_optimizer"] is False


def test_zero_files_share_their_communication_settings():
    for name, base in (("zero3", "zero2"), ("zero3_offload", "zero3")):
        own = yaml.safe_load((CONF / "deepspeed" / f"{name}.yaml").read_text())
        assert own["defaults"][0] == base
        assert not set(SHARDED) & set(own["zero_optimization"])  # written once, in zero2


KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w]*\s*:")


@pytest.mark.parametrize(
    "path",
    [CONF / "data" / "math.yaml", *sorted((CONF / "deepspeed").glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_key_has_a_comment(path):
    bare = [
        line.strip()
        for line in path.read_text().splitlines()
        if KEY_LINE.match(line) and "#" not in line and line.strip() != "defaults:"
    ]
    assert not bare, f"{path.name}: keys without a comment: {bare}"
