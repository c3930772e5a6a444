"""The byte-level tokenizer of the tiny model on users' data: every UTF-8 string round-trips, the
chat template renders TRL's conversational rows, and ``model=tiny data=files`` trains on both TRL
formats, exports, and reloads offline with the Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from engine.data.byte_tokenizer import NUM_BYTES, ROLE_TOKENS, SPECIAL_TOKENS, build_byte_tokenizer
from engine.data.loading import load_pairs
from engine.model.loading import load_tokenizer

SAMPLES = [
    "plain ASCII, with  two spaces\tand a tab\n",
    "émigré façade naïve",
    "😀 👩‍👩‍👧 🇫🇷",  # 4-byte code points, a ZWJ sequence, a flag
    "中文：预训练 日本語のテキスト 한국어",
    "\x00\x7f\u200b\ufeff",  # NUL, DEL, zero-width space, BOM
    "",
]
# Pairs in both TRL formats, with text the task's 23-token tokenizer could not encode.
STANDARD = [
    {"prompt": f"Q{i}: 你好 😀, what is {i}+{i}?", "chosen": f" {2 * i} ✓", "rejected": f" {i} ✗"}
    for i in range(8)
]
CONVERSATIONAL = [
    {
        "prompt": [
            {"role": "system", "content": "Réponds brièvement."},
            {"role": "user", "content": row["prompt"]},
        ],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
    for row in STANDARD
]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_vocabulary_special_tokens_and_template(tok) -> None:
    assert len(tok) == len(SPECIAL_TOKENS) + NUM_BYTES
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.unk_token_id is None  # nothing is unknown
    assert tok.padding_side == "right"
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    for token in ROLE_TOKENS:  # one id each, also inside rendered text
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("text", SAMPLES)
def test_samples_round_trip_one_token_per_byte(tok, text: str) -> None:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert all(len(SPECIAL_TOKENS) <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


BYTE_TOKENIZER = build_byte_tokenizer()  # hypothesis runs outside pytest's fixtures


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_every_string_round_trips(text: str) -> None:
    tok = BYTE_TOKENIZER
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_chat_template_prompt_is_a_prefix_of_the_conversation(tok) -> None:
    prompt = CONVERSATIONAL[0]["prompt"]
    rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        prompt + CONVERSATIONAL[0]["chosen"], tokenize=False, add_generation_prompt=False
    )
    system, user = "<|system|>Réponds brièvement.<eos>", "<|user|>Q0: 你好 😀, what is 0+0?<eos>"
    assert rendered == f"<bos>{system}{user}<|assistant|>"
    assert full == rendered + " 0 ✓<eos>"
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_both_formats_load_as_pairs(tok, tmp_path) -> None:
    for name, rows in (("standard", STANDARD), ("conversational", CONVERSATIONAL)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        pairs, report = load_pairs(str(path), tok)
        assert report.pairs == len(rows) and not report.skipped
        first = pairs[0]
        if name == "standard":
            assert tok.decode(first.prompt_ids) == "<bos>" + STANDARD[0]["prompt"]
            assert tok.decode(first.chosen_ids) == " 0 ✓<eos>"
        else:
            assert tok.convert_tokens_to_ids("<|user|>") in first.prompt_ids
            assert tok.decode(first.chosen_ids) == " 0 ✓<eos>"


def test_load_tokenizer_builds_it_for_the_tiny_model() -> None:
    tokenizer = load_tokenizer(OmegaConf.create({"name_or_path": None, "tokenizer": None}))
    assert tokenizer.get_vocab() == build_byte_tokenizer().get_vocab()
    assert tokenizer.chat_template


def test_save_and_reload_offline(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.chat_template == tok.chat_template
    text = "".join(SAMPLES)
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
    )


@pytest.mark.slow
@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_tiny_model_trains_exports_and_reloads_offline(tmp_path, train_run, rows) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    results, run_dir = train_run(
        tmp_path / "run",
        f"data.train={data}",
        f"data.eval={data}",
        "trainer.tensorboard=false",
        "trainer.lr=1e-3",
    )
    assert results["data"]["train"]["pairs"] == len(rows)
    assert torch.isfinite(torch.tensor(results["eval"]["loss"]))
    final = run_dir / "final_model"
    # a fresh interpreter with the hub switched off: only the files in final_model/ are used
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "msgs = [{'role': 'user', 'content': '你好 😀'}]\n"
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt',"
        " return_dict=True)['input_ids']\n"
        "out = model.generate(ids, max_new_tokens=4, do_sample=False,"
        " pad_token_id=tok.pad_token_id)\n"
        "print(len(tok), tok.decode(ids[0]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(final)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split(maxsplit=1) == [
        str(len(SPECIAL_TOKENS) + NUM_BYTES),
        "<bos><|user|>你好 😀<eos><|assistant|>\n",
    ]
    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, LlamaForCausalLM)
    assert model.get_input_embeddings().num_embeddings == len(SPECIAL_TOKENS) + NUM_BYTES
