"""Benchmarks as configuration: where the problems are, how a row gives a problem and its gold
answer, the prompt, the verifier and the decoding.

A benchmark is one yaml in ``conf/benchmark/`` (``math500``, ``aime24``, ``amc23``,
``minerva_math``, ``olympiadbench``; a user's own benchmark is one more file), selected as a list:
``benchmark=[math500,aime24]``, with its file given as ``benchmark.math500.path=<source>``. A source
is what ``engine.data.loading.read_rows`` reads: a JSONL / JSON / Parquet file, a ``datasets``
``save_to_disk`` directory, or a hub name where the network allows.

Keys (the defaults are the BPO paper's evaluation: its system line, the model's chat template,
greedy decoding, 2048 new tokens, math-verify):

- ``path`` (required), ``split`` (for sources with splits), ``limit`` (first N problems);
- ``problem_field``: the column holding the problem, or a list of candidates (the first one
  holding text wins: AMC 2023 copies name it ``problem`` or ``question``);
- ``answer_field`` and ``answer_format``: ``plain`` (the field is the answer; numbers such as
  AMC's ``27.0`` are read as text), ``last_boxed`` (the last ``\\boxed{}`` of the field: Minerva's
  ``solution``) or ``dollar_list`` (a list of ``$...$`` strings, joined with ``, ``:
  OlympiadBench's ``final_answer``);
- ``verifier`` (a name in ``engine.generation.verifiers.VERIFIERS``), ``prompt`` (``system``,
``user``,
  ``chat_template``: :class:`engine.generation.backends.PromptFormat`), ``max_new_tokens``,
  ``temperature``, ``top_p``.

A row without its problem or answer field stops with an error naming the file, the row and the
field; so does a Minerva solution without a ``\\boxed{}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.data.loading import read_rows
from engine.generation.backends import PromptFormat
from engine.generation.math_answers import last_boxed
from engine.generation.verifiers import VERIFIERS

#: the system line of the BPO paper's prompt (Qwen2.5-Math's chain-of-thought prompt)
PAPER_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}"
ANSWER_FORMATS = ("plain", "last_boxed", "dollar_list")
_KEYS = {
    "path",
    "split",
    "limit",
    "problem_field",
    "answer_field",
    "answer_format",
    "verifier",
    "prompt",
    "max_new_tokens",
    "temperature",
    "top_p",
}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: its text, its gold answer, and the row it came from."""

    problem: str
    gold: str
    where: str  # "file: line N" / "file: index N"


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's configuration (see the module docstring for the keys)."""

    name: str
    path: str
    split: str = "test"
    limit: int | None = None
    problem_field: tuple[str, ...] = ("problem",)
    answer_field: str = "answer"
    answer_format: str = "plain"
    verifier: str = "math"
    prompt: PromptFormat = field(default_factory=lambda: PromptFormat(system=PAPER_SYSTEM))
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> Benchmark:
        """Checked construction from a config block; unknown keys and bad values are errors."""
        cfg = dict(cfg)
        unknown = set(cfg) - _KEYS
        if unknown:
            raise ValueError(
                f"benchmark {name}: unknown keys {sorted(unknown)}; "
                f"valid: {', '.join(sorted(_KEYS))}"
            )
        if cfg.get("path") in (None, "", "???"):
            raise ValueError(f"benchmark {name}: no path; set benchmark.{name}.path=<file or dir>")
        fields = cfg.pop("problem_field", "problem")
        prompt = cfg.pop("prompt", None)
        options = {key: value for key, value in cfg.items() if value is not None}
        benchmark = cls(
            name=name,
            problem_field=(fields,) if isinstance(fields, str) else tuple(fields),
            prompt=PromptFormat.from_config({"system": PAPER_SYSTEM, **dict(prompt or {})}),
            **{key: str(value) if key == "path" else value for key, value in options.items()},
        )
        if benchmark.answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"benchmark {name}: answer_format {benchmark.answer_format!r}; "
                f"valid: {', '.join(ANSWER_FORMATS)}"
            )
        VERIFIERS[benchmark.verifier]  # an unknown verifier: the error lists the known ones
        if benchmark.max_new_tokens < 1 or benchmark.temperature < 0:
            raise ValueError(f"benchmark {name}: max_new_tokens must be >= 1, temperature >= 0")
        return benchmark

    def load(self) -> list[Problem]:
        """The problems, in file order (the first ``limit``); an empty source is an error."""
        problems = []
        for where, row in read_rows(self.path, split=self.split):
            problems.append(Problem(self._problem(where, row), self._gold(where, row), where))
            if self.limit is not None and len(problems) >= self.limit:
                break
        if not problems:
            raise ValueError(f"{self.path}: no problems (benchmark {self.name})")
        return problems

    def _problem(self, where: str, row: Mapping[str, Any]) -> str:
        # the first candidate with text (a Parquet file mixing layouts has nulls in the others)
        column = next((name for name in self.problem_field if isinstance(row.get(name), str)), None)
        if column is None or not row[column].strip():
            raise ValueError(
                f"{where}: benchmark {self.name}: no problem text in field "
                f"{' or '.join(map(repr, self.problem_field))} (row has keys: {', '.join(row)})"
            )
        return row[column]

    def _gold(self, where: str, row: Mapping[str, Any]) -> str:
        if row.get(self.answer_field) is None:
            raise ValueError(
                f"{where}: benchmark {self.name}: missing answer field {self.answer_field!r} "
                f"(row has keys: {', '.join(row)})"
            )
        value = row[self.answer_field]
        if self.answer_format == "last_boxed":
            boxed = last_boxed(str(value))
            if boxed is None:
                raise ValueError(
                    f"{where}: benchmark {self.name}: field {self.answer_field!r} has no "
                    "\\boxed{} answer (answer_format last_boxed)"
                )
            return boxed
        if self.answer_format == "dollar_list":
            items = value if isinstance(value, list) else [value]
            return ", ".join(str(item).strip().strip("$").strip() for item in items)
        return str(value).strip()


def benchmarks_from_config(cfg: Any) -> list[Benchmark]:
    """The benchmarks of a ``benchmark`` config group selection (name -> block), in its order."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # a missing path stays "???"
    return [Benchmark.from_config(name, block) for name, block in dict(cfg or {}).items()]
