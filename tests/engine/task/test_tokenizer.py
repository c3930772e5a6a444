"""Tests for the task's char-level tokenizer: one token per character, exact round trips."""

import pytest
from transformers import AutoTokenizer

from engine.task.arithmetic import generate_problems, solution
from engine.task.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer

PROBLEMS = generate_problems(300, seed=0)
TEXTS = [p.prompt + solution(p) for p in PROBLEMS] + [ALPHABET, " a b ", "  ", "\n1 \n", ""]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_vocabulary_and_special_tokens(tok) -> None:
    assert len(tok) == len(SPECIAL_TOKENS) + len(ALPHABET) < 64
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert None not in ids and len(ids) == 4
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS
    assert tok.padding_side == "right"
    assert not tok.chat_template


def test_alphabet_covers_the_task(tok) -> None:
    used = {c for p in generate_problems(2000, seed=1) for c in p.prompt + solution(p)}
    assert used <= set(ALPHABET)
    assert tok.unk_token_id not in tok(ALPHABET, add_special_tokens=False)["input_ids"]


def test_one_token_per_character_and_bos(tok) -> None:
    for text in TEXTS:
        plain = tok(text, add_special_tokens=False)["input_ids"]
        assert plain == [tok.convert_tokens_to_ids(c) for c in text]
        assert tok(text)["input_ids"] == [tok.bos_token_id, *plain]


@pytest.mark.parametrize("text", [t for t in TEXTS if "a" not in t])
def test_decode_inverts_encode(tok, text: str) -> None:
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_unknown_characters_become_unk(tok) -> None:
    assert tok("a1", add_special_tokens=False)["input_ids"] == [
        tok.unk_token_id,
        tok("1")["input_ids"][1],
    ]


def test_right_padding(tok) -> None:
    batch = tok(["12+3=", "1"], padding=True)
    assert batch["input_ids"][1][2:] == [tok.pad_token_id] * 4
    assert batch["attention_mask"][1] == [1, 1, 0, 0, 0, 0]


def test_save_pretrained_round_trip(tok, tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert loaded.padding_side == "right"
    for text in TEXTS:
        for special in (True, False):
            ids = tok(text, add_special_tokens=special)["input_ids"]
            assert loaded(text, add_special_tokens=special)["input_ids"] == ids
        assert loaded.decode(tok(text)["input_ids"], skip_special_tokens=True) == (
            text.replace("a", "")
        )
