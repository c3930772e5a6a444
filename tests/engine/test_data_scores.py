"""The optional per-response score columns (``score_chosen`` / ``score_rejected``, as
UltraFeedback's rows carry them) that ODPO's offsets read: kept on each pair, both or neither."""

from __future__ import annotations

import json

import pytest

from engine.data.loading import BadRowError, load_pairs
from experiments.bench.synthetic import build_tokenizer

ROW = {"prompt": "t5 t6", "chosen": " t7", "rejected": " t8"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(20)


def write(tmp_path, rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_scores_are_kept_and_absent_scores_are_none(tmp_path, tokenizer):
    rows = [{**ROW, "score_chosen": 8.5, "score_rejected": 3}, ROW]
    pairs, _ = load_pairs(write(tmp_path, rows), tokenizer)
    assert (pairs[0].score_chosen, pairs[0].score_rejected) == (8.5, 3.0)
    assert (pairs[1].score_chosen, pairs[1].score_rejected) == (None, None)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"score_chosen": 8.0}, "has score_chosen but no score_rejected"),
        ({"score_rejected": 1.0}, "has score_rejected but no score_chosen"),
        ({"score_chosen": "8", "score_rejected": 1.0}, "score_chosen must be a finite number"),
        ({"score_chosen": 8.0, "score_rejected": True}, "score_rejected must be a finite number"),
        ({"score_chosen": float("inf"), "score_rejected": 1.0}, "finite"),
    ],
)
def test_bad_scores_name_the_row_and_column(tmp_path, tokenizer, extra, fragment):
    source = write(tmp_path, [ROW, {**ROW, **extra}])
    with pytest.raises(BadRowError, match=fragment) as info:
        load_pairs(source, tokenizer)
    assert info.value.where == f"{source}: line 2"
    assert info.value.reason == "bad_score"
    pairs, report = load_pairs(source, tokenizer, on_bad_row="skip")
    assert len(pairs) == 1 and report.skipped == {"bad_score": 1}
