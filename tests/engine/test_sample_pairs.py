"""Tests for verified pair sampling: the pairing rule on scripted samples, chat-format rows, batch
seeds, the work log's reading rules, and bad inputs (k < 2, temperature 0, an empty prompts file,
a prompts file without its answer field).

The end-to-end run on the embedded task's SFT model (with an interrupted run resumed) is in
tests/engine/task/test_evaluate_and_pairs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from engine.generation.backends import PromptFormat
from engine.generation.pairing import PairCounts, build_pairs
from engine.runtime.distributed import without_launcher_env
from engine.sample_pairs import batch_seed, read_parts, sample_pairs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class CyclingBackend:
    """Sample i of a prompt is ``answers[prompt][i % len]``; it records its calls."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[dict] = []

    def generate(self, prompts, **options) -> list[str]:
        self.calls.append({"prompts": list(prompts), **options})
        seen: dict[str, int] = {}
        out = []
        for prompt in prompts:
            index = seen.get(prompt, 0)
            seen[prompt] = index + 1
            options_for_prompt = self.answers[prompt]
            out.append(options_for_prompt[index % len(options_for_prompt)])
        return out


ANSWERS = {
    "1+1=": ["#### 2", "#### 3", "#### 2", "#### 4"],  # both kinds: a pair
    "2+2=": ["#### 4"],  # all correct
    "3+3=": ["#### 5", "#### 7"],  # all wrong
    "4+4=": ["#### 8", ""],  # correct, and only an empty wrong one: no pair (all correct)
    "5+5=": ["#### 10", "#### 11"],
}
GOLDS = {"1+1=": "2", "2+2=": "4", "3+3=": "6", "4+4=": "8", "5+5=": "10"}


def _pairs(seed: int, backend=None):
    backend = backend or CyclingBackend(ANSWERS)
    rows, counts = build_pairs(
        backend,
        None,
        list(GOLDS.items()),
        prompt=PromptFormat(chat_template=False),
        verifier="arithmetic",
        samples_per_prompt=4,
        temperature=1.0,
        max_new_tokens=9,
        seed=seed,
    )
    return rows, counts, backend


def test_the_pairing_rule() -> None:
    rows, counts, backend = _pairs(seed=1)
    (call,) = backend.calls
    assert call["prompts"] == [p for p in GOLDS for _ in range(4)]  # k in a row, prompt order
    assert call["temperature"] == 1.0 and call["seed"] == 1 and call["max_new_tokens"] == 9
    assert [row["prompt"] for row in rows] == ["1+1=", "5+5="]
    first = rows[0]
    assert first["chosen"] == "#### 2" and first["rejected"] in {"#### 3", "#### 4"}
    assert first["answer"] == "2"
    assert rows[1] == {"prompt": "5+5=", "chosen": "#### 10", "rejected": "#### 11", "answer": "10"}
    assert counts == PairCounts(
        prompts=5,
        samples=20,
        correct_samples=2 + 4 + 0 + 2 + 2,
        pairs=2,
        all_correct_prompts=2,
        all_wrong_prompts=1,
        timeouts=0,
    )
    assert counts.to_dict()["sample_accuracy"] == 10 / 20
    # the rejected answer is drawn with the seed: some seed picks each wrong answer
    picked = {_pairs(seed)[0][0]["rejected"] for seed in range(20)}
    assert picked == {"#### 3", "#### 4"}
    assert _pairs(seed=1)[0] == rows


def test_chat_prompts_give_conversational_rows(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from engine.data.loading import load_pairs, write_jsonl
    from engine.task.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}#{% endif %}"
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    backend = CyclingBackend({"1+1=|#": ["#### 2", "#### 3"]})
    rows, _ = build_pairs(
        backend,
        tokenizer,
        [("1+1=", "2")],
        prompt=PromptFormat(),
        verifier="arithmetic",
        samples_per_prompt=2,
        temperature=1.0,
        max_new_tokens=9,
        seed=0,
    )
    assert backend.calls[0]["add_special_tokens"] is False  # the template wrote the prompt
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "1+1="}],
            "chosen": [{"role": "assistant", "content": "#### 2"}],
            "rejected": [{"role": "assistant", "content": "#### 3"}],
            "answer": "2",
        }
    ]
    write_jsonl(tmp_path / "pairs.jsonl", rows)  # data=files renders them with the same template
    (pair,), _ = load_pairs(str(tmp_path / "pairs.jsonl"), tokenizer, max_length=64)
    assert tokenizer.decode(pair.prompt_ids) == "1+1=|#"


def test_batch_seeds_differ_and_do_not_depend_on_anything_else() -> None:
    seeds = {batch_seed(0, b) for b in range(100)} | {batch_seed(1, b) for b in range(100)}
    assert len(seeds) == 200
    assert batch_seed(3, 7) == batch_seed(3, 7) and 0 <= batch_seed(3, 7) < 2**60


def test_read_parts_ignores_a_half_written_last_line_only(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    entry = {"batch": 0, "rows": [], "counts": {}}
    (parts / "rank-0.jsonl").write_text(json.dumps(entry) + "\n" + '{"batch": 1, "ro')
    (parts / "rank-1.jsonl").write_text(json.dumps({**entry, "batch": 3}) + "\n")
    assert sorted(read_parts(parts)) == [0, 3]
    (parts / "rank-1.jsonl").write_text('{"batch": 3\n' + json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match=r"rank-1\.jsonl: line 1: not a finished batch"):
        read_parts(parts)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sample_pairs", overrides=["model=tiny", *overrides])


def test_bad_inputs(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    out = f"output_dir={tmp_path / 'out'}"
    with pytest.raises(ValueError, match=r"samples_per_prompt=1: needs >= 2"):
        sample_pairs(_compose(f"prompts.path={good}", "samples_per_prompt=1", out))
    with pytest.raises(ValueError, match=r"temperature=0.0: sampling needs temperature > 0"):
        sample_pairs(_compose(f"prompts.path={good}", "temperature=0.0", out))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems"):
        sample_pairs(_compose(f"prompts.path={empty}", out))
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"no_answer\.jsonl: line 1: .*missing answer field"):
        sample_pairs(_compose(f"prompts.path={no_answer}", out))
    with pytest.raises(ValueError, match="no path"):
        sample_pairs(_compose(out))
    with pytest.raises(ValueError, match=r"prompts\.temperature: set temperature=\.\.\."):
        sample_pairs(_compose(f"prompts.path={good}", "+prompts.temperature=0.5", out))
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_split_the_batches_and_give_the_result_of_one(tmp_path: Path) -> None:
    """The same command under torchrun with two processes: each rank samples its batches, rank 0
    writes the files, and everything equals a one-process run (random tiny weights: no pair is
    made, but every count and every sample's verdict is compared through the work log)."""
    import subprocess
    import sys

    from engine.task.arithmetic import generate_problems

    repo = CONF_DIR.parent
    source = tmp_path / "q.jsonl"
    problems = generate_problems(5, seed=2, min_digits=1, max_digits=2)
    source.write_text(
        "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
    )
    env = without_launcher_env()
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    reports = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        command = [
            sys.executable,
            *(torchrun if nproc > 1 else []),
            "-m",
            "engine.sample_pairs",
            "model=tiny",
            f"prompts.path={source}",
            "prompts.problem_field=prompt",
            "prompts.verifier=arithmetic",
            "prompts.prompt.system=null",
            "prompts.prompt.user='{problem}'",
            "samples_per_prompt=2",
            "max_new_tokens=6",
            "batch_prompts=2",
            f"output_dir={out}",
        ]
        proc = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        reports[nproc] = json.loads((out / "report.json").read_text())
        reports[nproc].pop("pairs_file")
    assert reports[2] == reports[1]
    assert reports[1]["prompts"] == 5 and reports[1]["samples"] == 10
    batches = {
        nproc: {
            b: entry["counts"]
            for b, entry in read_parts(tmp_path / f"out{nproc}" / "parts").items()
        }
        for nproc in (1, 2)
    }
    assert batches[2] == batches[1] and sorted(batches[1]) == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "out2" / "parts").glob("rank-*")) == [
        "rank-0.jsonl",
        "rank-1.jsonl",
    ]
