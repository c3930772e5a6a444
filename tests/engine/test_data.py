"""Tests for engine.data.loading: every source type, the three row formats, chat rendering,
truncation, bad rows in both modes, and write_jsonl's atomicity. Fixtures are written to tmp_path;
the tokenizer is a character-level one built in code (one token per printable character)."""

from __future__ import annotations

import json
import logging
import string

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from engine.data.loading import (
    BadRowError,
    DataReport,
    TokenizedPair,
    load_pairs,
    read_rows,
    write_jsonl,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Renders assistant turns as "<|bot|>" but the generation prompt as "<|assistant|>": broken.
MISMATCHED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|bot|>{% else %}"
    "<|{{ m['role'] }}|>{% endif %}{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROW = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
CONVERSATION = {
    "prompt": [{"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}


def build_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; ``<bos>`` prepended with special tokens."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(CHAT_TEMPLATE)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_lines(path, rows) -> str:
    """JSONL fixture; a str or bytes row is written verbatim (for malformed lines)."""
    text = [row if isinstance(row, str | bytes) else json.dumps(row) for row in rows]
    lines = [row if isinstance(row, bytes) else row.encode() for row in text]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def expected_plain(tokenizer, prompt: str, chosen: str, rejected: str) -> tuple:
    eos = [tokenizer.eos_token_id]
    return (
        [tokenizer.bos_token_id, *ids(tokenizer, prompt)],
        ids(tokenizer, chosen) + eos,
        ids(tokenizer, rejected) + eos,
    )


def as_tuple(pair: TokenizedPair) -> tuple:
    return pair.prompt_ids, pair.chosen_ids, pair.rejected_ids


# ---- sources -------------------------------------------------------------------------------------


def test_jsonl_standard_rows(tmp_path, tok) -> None:
    source = write_lines(tmp_path / "data.jsonl", [ROW, "", {**ROW, "chosen": " 4", "extra": 1}])
    pairs, report = load_pairs(source, tok)
    assert [as_tuple(p) for p in pairs] == [
        expected_plain(tok, "2+2=", "4", "5"),
        expected_plain(tok, "2+2=", " 4", "5"),
    ]
    # Blank lines are not rows, but line numbers are the file's own.
    assert [p.where for p in pairs] == [f"{source}: line 1", f"{source}: line 3"]
    assert report == DataReport(source, rows_read=2, pairs=2, skipped={}, truncated=0)
    assert json.loads(json.dumps(report.to_dict()))["pairs"] == 2


def test_json_list_wrapped_list_and_json_lines_named_json(tmp_path, tok) -> None:
    (tmp_path / "list.json").write_text(json.dumps([ROW, ROW]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [ROW]}))
    lines = write_lines(tmp_path / "lines.json", [ROW, ROW, ROW])
    pairs, _ = load_pairs(str(tmp_path / "list.json"), tok)
    assert len(pairs) == 2 and pairs[1].where.endswith("list.json: index 1")
    assert len(load_pairs(str(tmp_path / "wrapped.json"), tok)[0]) == 1
    assert [p.where for p in load_pairs(lines, tok)[0]][-1] == f"{lines}: line 3"


def test_parquet_with_strings_and_conversations(tmp_path, tok, chat_tok) -> None:
    plain, chat = tmp_path / "plain.parquet", tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([ROW, ROW]), plain)
    pq.write_table(pa.Table.from_pylist([CONVERSATION]), chat)
    pairs, report = load_pairs(str(plain), tok)
    assert as_tuple(pairs[0]) == expected_plain(tok, "2+2=", "4", "5")
    assert pairs[1].where == f"{plain}: index 1" and report.rows_read == 2
    chat_pairs, _ = load_pairs(str(chat), chat_tok)
    assert as_tuple(chat_pairs[0]) == as_tuple(load_pairs_of(tmp_path, chat_tok, CONVERSATION))


def load_pairs_of(tmp_path, tokenizer, *rows, **options) -> TokenizedPair:
    source = write_lines(tmp_path / "one.jsonl", rows)
    return load_pairs(source, tokenizer, **options)[0][0]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, tok) -> None:
    single = tmp_path / "single"
    datasets.Dataset.from_list([ROW, ROW]).save_to_disk(str(single))
    pairs, _ = load_pairs(str(single), tok, split="ignored for a single Dataset")
    assert len(pairs) == 2 and pairs[1].where == f"{single}: index 1"

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list([ROW] * 3),
        test=datasets.Dataset.from_list([{**ROW, "chosen": "four"}]),
    ).save_to_disk(str(splits))
    test_pairs, report = load_pairs(str(splits), tok, split="test")
    assert report.pairs == 1 and test_pairs[0].chosen_ids[:-1] == ids(tok, "four")
    assert test_pairs[0].where == f"{splits}[test]: index 0"
    assert load_pairs(str(splits), tok)[1].pairs == 3
    with pytest.raises(ValueError, match=r"no split 'dev'; available splits: train, test"):
        load_pairs(str(splits), tok, split="dev")


def test_load_dataset_on_a_local_directory(tmp_path, tok, monkeypatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [ROW, ROW])
    write_lines(folder / "test.jsonl", [ROW])
    pairs, report = load_pairs(str(folder), tok, split="train")
    assert report.pairs == 2 and pairs[0].where == f"{folder}[train]: index 0"
    assert as_tuple(pairs[0]) == expected_plain(tok, "2+2=", "4", "5")
    assert load_pairs(str(folder), tok, split="test")[1].pairs == 1


def test_unreadable_sources_name_the_path(tmp_path, tok) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_pairs(str(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type '\.csv'"):
        load_pairs(str(tmp_path / "data.csv"), tok)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON"):
        load_pairs(str(tmp_path / "broken.json"), tok)
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(ValueError, match=r"scalar\.json: expected a JSON list"):
        load_pairs(str(tmp_path / "scalar.json"), tok)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        load_pairs(str(tmp_path / "broken.parquet"), tok)


def test_read_rows_yields_rows_and_raises_on_a_malformed_line(tmp_path) -> None:
    source = write_lines(tmp_path / "data.jsonl", [ROW, "{oops"])
    rows = read_rows(source)
    assert next(rows) == (f"{source}: line 1", ROW)
    with pytest.raises(BadRowError, match=r"data\.jsonl: line 2: invalid JSON \("):
        next(rows)


# ---- formats and rendering -----------------------------------------------------------------------


def test_conversation_response_ids_are_the_template_continuation(tmp_path, chat_tok) -> None:
    row = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "five"}],
    }
    pair = load_pairs_of(tmp_path, chat_tok, row)
    prompt_text = "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>"
    assert pair.prompt_ids == ids(chat_tok, prompt_text)  # no BOS: the template owns specials
    for key, response_ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        full = chat_tok.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        assert full == prompt_text + row[key][0]["content"] + "\n"
        # Exactly the continuation, and no EOS appended (the template ends the turn).
        assert pair.prompt_ids + response_ids == ids(chat_tok, full)


def test_mixed_row_wraps_strings_as_messages(tmp_path, chat_tok) -> None:
    mixed = {**CONVERSATION, "prompt": "2+2?"}
    assert as_tuple(load_pairs_of(tmp_path, chat_tok, mixed)) == as_tuple(
        load_pairs_of(tmp_path, chat_tok, CONVERSATION)
    )


def test_strings_stay_plain_unless_wrap_strings(tmp_path, tok, chat_tok) -> None:
    plain = load_pairs_of(tmp_path, chat_tok, ROW)
    assert as_tuple(plain) == expected_plain(tok, "2+2=", "4", "5")
    wrapped = load_pairs_of(tmp_path, chat_tok, ROW, wrap_strings=True)
    assert wrapped.prompt_ids == ids(chat_tok, "<|user|>2+2=\n<|assistant|>")
    assert wrapped.chosen_ids == ids(chat_tok, "4\n")
    # Without a template wrap_strings has nothing to wrap with.
    assert as_tuple(load_pairs_of(tmp_path, tok, ROW, wrap_strings=True)) == as_tuple(plain)


def test_conversation_needs_a_chat_template(tmp_path, tok) -> None:
    with pytest.raises(ValueError, match=r"line 1: conversational row, but .* no chat_template"):
        load_pairs_of(tmp_path, tok, CONVERSATION, on_bad_row="skip")


def test_template_whose_prompt_is_not_a_prefix(tmp_path) -> None:
    broken = build_tokenizer(MISMATCHED_TEMPLATE)
    with pytest.raises(BadRowError, match=r"line 1: the chat template's rendering of prompt \+"):
        load_pairs_of(tmp_path, broken, CONVERSATION)


def test_implicit_prompt_conversations(tmp_path, chat_tok) -> None:
    row = {
        "chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
        "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"],
    }
    assert as_tuple(load_pairs_of(tmp_path, chat_tok, row)) == as_tuple(
        load_pairs_of(tmp_path, chat_tok, CONVERSATION)
    )


def test_implicit_prompt_strings_cut_at_the_last_shared_whitespace(tmp_path, tok) -> None:
    row = {"chosen": "The sum is 12", "rejected": "The sum is 13"}
    pair = load_pairs_of(tmp_path, tok, row)
    assert as_tuple(pair) == expected_plain(tok, "The sum is", " 12", " 13")


def test_columns_mapping(tmp_path, tok) -> None:
    row = {"question": "2+2=", "good": "4", "bad": "5", "chosen": 0}
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    pair = load_pairs_of(tmp_path, tok, row, columns=mapping)
    assert as_tuple(pair) == expected_plain(tok, "2+2=", "4", "5")
    with pytest.raises(ValueError, match=r"unknown fields \['answer'\]"):
        load_pairs_of(tmp_path, tok, row, columns={"answer": "x"})


# ---- truncation ----------------------------------------------------------------------------------


def test_prompt_keeps_its_end_and_responses_are_cut_on_the_right(tmp_path, tok) -> None:
    rows = [{"prompt": "abcdefgh", "chosen": "12345", "rejected": "123xy"}, ROW]
    source = write_lines(tmp_path / "data.jsonl", rows)
    pairs, report = load_pairs(source, tok, max_length=9, max_prompt_length=5)
    assert pairs[0].prompt_ids == ids(tok, "defgh")  # keep_end drops the BOS too
    assert pairs[0].chosen_ids == ids(tok, "1234")  # EOS cut with the tail
    assert pairs[0].rejected_ids == ids(tok, "123x")
    assert as_tuple(pairs[1]) == expected_plain(tok, "2+2=", "4", "5")  # fits: untouched
    assert (report.truncated, report.pairs) == (1, 2)


@pytest.mark.parametrize(
    ("row", "options", "reason", "message"),
    [
        (
            {"prompt": "abcdef", "chosen": "1", "rejected": "2"},
            {"max_length": 8, "min_response_tokens": 2},
            "prompt_too_long",
            r"prompt is 7 tokens, leaving 1 of max_length=8",
        ),
        (
            {"prompt": "abc", "chosen": "12x", "rejected": "12y"},
            {"max_length": 6},
            "identical_after_truncation",
            r"identical after truncation to 2 response tokens",
        ),
    ],
)
def test_truncation_bad_rows(tmp_path, tok, row, options, reason, message) -> None:
    source = write_lines(tmp_path / "data.jsonl", [ROW, row])
    with pytest.raises(BadRowError, match=rf"data\.jsonl: line 2: .*{message}"):
        load_pairs(source, tok, **options)
    _, report = load_pairs(source, tok, on_bad_row="skip", **options)
    assert report.skipped == {reason: 1} and report.pairs == 1


# ---- bad rows ------------------------------------------------------------------------------------

BAD_ROWS = [
    (
        b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}',  # Latin-1, not UTF-8
        "invalid_utf8",
        r"not valid UTF-8 \(byte 0xe9 at column 16\)",
    ),
    ('{"prompt": "a", "chosen": ', "invalid_json", r"invalid JSON \("),
    ("[1, 2]", "not_an_object", r"expected a JSON object, got list"),
    (
        {"prompt": "a", "chosen": "b"},
        "missing_key",
        r"missing key 'rejected' \(row has keys: prompt, chosen\)",
    ),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "wrong_type", r"'chosen' must be a string"),
    ({"prompt": "a", "chosen": "b", "rejected": None}, "wrong_type", r"got null"),
    (
        {"prompt": "a", "chosen": [{"role": "assistant"}], "rejected": "b"},
        "wrong_type",
        r"'chosen'\[0\] must be a message",
    ),
    ({"prompt": "  ", "chosen": "b", "rejected": "c"}, "empty_prompt", r"empty prompt"),
    ({"prompt": "a", "chosen": "b", "rejected": "\n"}, "empty_response", r"empty 'rejected'"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "identical_responses", r"are identical"),
    ({"chosen": "yes", "rejected": "no"}, "no_shared_prompt", r"add a 'prompt' column"),
    ({"chosen": "a b", "rejected": "a b"}, "identical_responses", r"are identical"),
    (
        {"chosen": [{"role": "user", "content": "x"}], "rejected": "a b"},
        "wrong_type",
        r"must both be strings or both conversations",
    ),
]


@pytest.mark.parametrize(("row", "reason", "message"), BAD_ROWS)
def test_bad_row_errors_name_file_and_line(tmp_path, chat_tok, row, reason, message) -> None:
    source = write_lines(tmp_path / "data.jsonl", [ROW, ROW, row, ROW])
    with pytest.raises(BadRowError, match=rf"data\.jsonl: line 3: .*{message}") as caught:
        load_pairs(source, chat_tok)
    assert caught.value.reason == reason and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("row", "reason", "message"), BAD_ROWS)
def test_bad_rows_are_counted_when_skipped(tmp_path, chat_tok, row, reason, message) -> None:
    source = write_lines(tmp_path / "data.jsonl", [ROW, row, ROW])
    pairs, report = load_pairs(source, chat_tok, on_bad_row="skip")
    assert [p.where for p in pairs] == [f"{source}: line 1", f"{source}: line 3"]
    assert (report.rows_read, report.pairs, report.skipped) == (3, 2, {reason: 1})


def test_json_file_that_is_not_utf8_names_line_and_offset(tmp_path, tok) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "\xff"}]')
    offset = path.read_bytes().index(b"\xff")
    for mode in ("error", "skip"):  # a JSON file cannot be parsed around the bad byte
        with pytest.raises(
            ValueError,
            match=rf"data\.json: line 3: not valid UTF-8 \(byte 0xff at byte offset "
            rf"{offset}, column 13\)",
        ):
            load_pairs(str(path), tok, on_bad_row=mode)


def test_json_lines_named_json_skip_their_non_utf8_line(tmp_path, tok) -> None:
    path = tmp_path / "lines.json"
    row = json.dumps(ROW).encode()
    path.write_bytes(row + b'\n{"prompt": "\xff"}\n' + row)
    with pytest.raises(BadRowError, match=r"lines\.json: line 2: not valid UTF-8"):
        load_pairs(str(path), tok)
    _, report = load_pairs(str(path), tok, on_bad_row="skip")
    assert (report.rows_read, report.pairs, report.skipped) == (3, 2, {"invalid_utf8": 1})


def test_bad_rows_in_other_sources_are_named_by_index(tmp_path, tok) -> None:
    (tmp_path / "data.json").write_text(json.dumps([ROW, {"prompt": "a"}]))
    with pytest.raises(BadRowError, match=r"data\.json: index 1: missing key 'chosen'"):
        load_pairs(str(tmp_path / "data.json"), tok)


def test_skip_mode_logs_one_summary_and_counts_reasons(tmp_path, tok, caplog) -> None:
    rows = [ROW, "{", "{", {"prompt": "a", "chosen": "b", "rejected": "b"}, ROW]
    source = write_lines(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="engine.data.loading"):
        _, report = load_pairs(source, tok, on_bad_row="skip")
    assert report.skipped == {"invalid_json": 2, "identical_responses": 1}
    [record] = caplog.records
    assert "skipped 3 of 5 rows" in record.getMessage()
    assert "invalid_json: 2" in record.getMessage()


def test_no_pairs_left_is_an_error(tmp_path, tok) -> None:
    source = write_lines(tmp_path / "data.jsonl", ["{", "{"])
    with pytest.raises(ValueError, match=r"data\.jsonl: no preference pairs \(2 rows read; "):
        load_pairs(source, tok, on_bad_row="skip")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"no preference pairs \(0 rows read\)"):
        load_pairs(str(tmp_path / "empty.jsonl"), tok)


def test_option_validation_and_limit(tmp_path, tok) -> None:
    source = write_lines(tmp_path / "data.jsonl", [ROW, ROW, "{"])
    with pytest.raises(ValueError, match=r"on_bad_row must be one of error, skip; got 'ignore'"):
        load_pairs(source, tok, on_bad_row="ignore")
    # The malformed third line is never read: limit stops the reading.
    pairs, report = load_pairs(source, tok, limit=2)
    assert (len(pairs), report.rows_read) == (2, 2)
    with pytest.raises(ValueError, match="limit"):
        load_pairs(source, tok, limit=0)


# ---- write_jsonl ---------------------------------------------------------------------------------


def test_write_jsonl_round_trips(tmp_path, tok) -> None:
    path = tmp_path / "sub" / "out.jsonl"
    rows = [ROW, {"prompt": "é ✓", "chosen": "x", "rejected": "y"}]
    write_jsonl(path, rows)
    assert [row for _, row in read_rows(str(path))] == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_jsonl_leaves_the_target_untouched_on_error(tmp_path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")

    def rows():
        yield ROW
        raise RuntimeError("generator failed mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        write_jsonl(path, rows())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind
    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "new.jsonl", [{"x": object()}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_hub_name_failure_names_the_source(tok, monkeypatch) -> None:
    def unreachable(name, split):
        raise ConnectionError(f"cannot reach {name}")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=r"org/prefs: not a local file .* cannot reach org/prefs"):
        load_pairs("org/prefs", tok, split="test")
