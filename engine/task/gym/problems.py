"""reasoning-gym problem sets: seeded, disjoint train / eval / test splits of named datasets.

reasoning-gym (the ``real`` extra, pure Python, offline) generates procedural problems with gold
answers and a scorer per dataset (``dataset.score_answer(answer, entry)``). A
:class:`ProblemSpec` names the datasets, each with its options (the dataset's config fields, e.g.
``chain_sum: {min_terms: 2, max_digits: 2}``) and a weight, the size of each split and a seed:

- each dataset's share of a split is its weight's share (largest remainders, so the sizes add up);
- each dataset draws its entries from one seeded stream (seed derived from the spec's seed and the
  dataset's name), **test first, then eval, then train**: changing the train size never changes
  the held-out problems;
- a question already drawn (in any split, from any dataset) is skipped, so the splits are
  disjoint as texts; a dataset whose options allow too few distinct questions is an error naming
  it.

Rows (:func:`write_problem_sets` writes one JSONL file per split; a benchmark reads them):
``problem`` (the question), ``answer`` (the dataset's oracle answer, for people), ``gold`` (what
the ``reasoning_gym`` verifier needs: a JSON text of the dataset's name, its options and the whole
entry, so the dataset's own ``score_answer`` can judge any completion later) and ``dataset``.

Cost: milliseconds per thousand problems for the arithmetic datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.data.loading import write_jsonl
from engine.runtime.errors import ConfigError

#: what to install for reasoning-gym data and verification
EXTRA = "pip install -e '.[real]' (make install installs it)"
#: the splits, in the order they are drawn (held-out first)
SPLITS = ("test", "eval", "train")
#: draws per wanted problem before a dataset counts as exhausted (duplicates are skipped)
_DRAWS_PER_PROBLEM = 20


def require_reasoning_gym() -> Any:
    """The ``reasoning_gym`` module, or a :class:`ConfigError` naming the extra."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(
            f"data=reasoning_gym and the reasoning_gym verifier need reasoning-gym; install the "
            f"extra: {EXTRA}"
        ) from None
    return reasoning_gym


@dataclass(frozen=True)
class DatasetSpec:
    """One reasoning-gym dataset: its registered name, options and weight in the mix."""

    name: str
    options: Mapping[str, Any]
    weight: float = 1.0


@dataclass(frozen=True)
class ProblemSpec:
    """Which datasets, how many problems per split, and the seed (module docstring)."""

    datasets: tuple[DatasetSpec, ...]
    sizes: Mapping[str, int]
    seed: int

    @classmethod
    def from_config(cls, block: Any, key: str = "data.problems") -> ProblemSpec:
        """From ``{seed, sizes: {train, eval, test}, datasets: {name: {weight, options}}}``;
        bad values are a :class:`ConfigError` naming the key."""
        block = dict(block)
        unknown = set(block) - {"seed", "sizes", "datasets"}
        if unknown:
            raise ConfigError(f"config key {key}: unknown keys {sorted(unknown)}")
        sizes = dict(block.get("sizes") or {})
        if set(sizes) != set(SPLITS):
            raise ConfigError(
                f"config key {key}.sizes: needs exactly {', '.join(SPLITS)}, got {sorted(sizes)}"
            )
        for split, size in sizes.items():
            if not (isinstance(size, int) and size >= 0) or (split != "eval" and size < 1):
                raise ConfigError(
                    f"config key {key}.sizes.{split}: must be an integer >= 1 (eval: >= 0), "
                    f"got {size!r}"
                )
        datasets = []
        for name, entry in dict(block.get("datasets") or {}).items():
            entry = dict(entry or {})
            extra = set(entry) - {"weight", "options"}
            if extra:
                raise ConfigError(
                    f"config key {key}.datasets.{name}: unknown keys {sorted(extra)}; "
                    "valid: weight, options"
                )
            weight = entry.get("weight", 1.0)
            if not (isinstance(weight, int | float) and weight > 0):
                raise ConfigError(
                    f"config key {key}.datasets.{name}.weight: must be > 0, got {weight!r}"
                )
            datasets.append(DatasetSpec(str(name), dict(entry.get("options") or {}), weight))
        if not datasets:
            raise ConfigError(f"config key {key}.datasets: name at least one reasoning-gym dataset")
        seed = block.get("seed")
        if not isinstance(seed, int):
            raise ConfigError(f"config key {key}.seed: must be an integer, got {seed!r}")
        return cls(tuple(datasets), sizes, seed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (what cache keys hash)."""
        return {
            "seed": self.seed,
            "sizes": dict(self.sizes),
            "datasets": [
                dataclasses.asdict(d) | {"options": dict(d.options)} for d in self.datasets
            ],
        }

    def shares(self, split: str) -> list[int]:
        """Problems of ``split`` per dataset: weights' shares, largest remainders rounded up."""
        total = sum(d.weight for d in self.datasets)
        exact = [self.sizes[split] * d.weight / total for d in self.datasets]
        counts = [math.floor(x) for x in exact]
        order = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
        for i in order[: self.sizes[split] - sum(counts)]:
            counts[i] += 1
        return counts


def _dataset_seed(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def make_dataset(name: str, options: Mapping[str, Any], seed: int = 0, size: int = 1) -> Any:
    """``reasoning_gym.create_dataset(name, seed=, size=, **options)`` with clear errors: an
    unknown dataset lists the known ones, an unknown or invalid option names the dataset."""
    gym = require_reasoning_gym()
    from reasoning_gym.factory import DATASETS

    key = f"data.problems.datasets.{name}"
    if name not in DATASETS:
        raise ConfigError(
            f"config key {key}: reasoning-gym has no dataset {name!r}; it has: "
            + ", ".join(sorted(DATASETS))
        )
    fields = {f.name for f in dataclasses.fields(DATASETS[name][1])} - {"seed", "size"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"config key {key}.options: {unknown} are not options of {name}; its options: "
            + ", ".join(sorted(fields))
        )
    try:
        return gym.create_dataset(name, seed=seed, size=size, **dict(options))
    except (AssertionError, ValueError, TypeError) as error:
        raise ConfigError(
            f"config key {key}.options: {name} rejects {dict(options)}: {error}"
        ) from None


@lru_cache(maxsize=64)
def scorer(name: str, options_json: str) -> Any:
    """The dataset instance whose ``score_answer`` judges entries of ``name`` with these options
    (one per process and configuration)."""
    return make_dataset(name, json.loads(options_json))


def gold_text(name: str, options: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """The ``gold`` field of a row: everything ``score_answer`` may read, as JSON text."""
    return json.dumps(
        {"dataset": name, "options": dict(options), "entry": entry},
        sort_keys=True,
        ensure_ascii=False,
        default=_jsonable,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_gold(gold: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(dataset, options, entry)`` from a ``gold`` field; anything else is a ``ValueError``."""
    try:
        data = json.loads(gold)
        return str(data["dataset"]), dict(data["options"]), dict(data["entry"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"not a reasoning_gym gold answer (JSON with dataset, options, entry): {gold[:80]!r} "
            f"({error}); the problem files of data=reasoning_gym have it in their 'gold' field"
        ) from None


def draw_problem_sets(spec: ProblemSpec) -> dict[str, list[dict[str, Any]]]:
    """The rows of every split (module docstring), each split in dataset order."""
    seen: set[str] = set()
    sets: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for position, dataset in enumerate(spec.datasets):
        wanted = {split: spec.shares(split)[position] for split in SPLITS}
        limit = _DRAWS_PER_PROBLEM * sum(wanted.values()) + 100
        source = make_dataset(
            dataset.name, dataset.options, seed=_dataset_seed(spec.seed, dataset.name), size=limit
        )
        options_json = json.dumps(dict(dataset.options), sort_keys=True)
        index = 0
        for split in SPLITS:
            taken = 0
            while taken < wanted[split]:
                if index >= limit:
                    raise ConfigError(
                        f"config key data.problems.datasets.{dataset.name}: only {len(seen)} "
                        f"distinct questions in {limit} draws with options "
                        f"{dict(dataset.options)}, fewer than the {sum(wanted.values())} wanted; "
                        "widen the options or lower data.problems.sizes"
                    )
                entry = source[index]
                index += 1
                if entry["question"] in seen:
                    continue
                seen.add(entry["question"])
                gold = gold_text(dataset.name, dataset.options, entry)
                _check_round_trip(dataset.name, options_json, gold, entry)
                sets[split].append(
                    {
                        "problem": entry["question"],
                        "answer": str(entry["answer"]),
                        "gold": gold,
                        "dataset": dataset.name,
                    }
                )
                taken += 1
    return sets


def _check_round_trip(name: str, options_json: str, gold: str, entry: Mapping[str, Any]) -> None:
    """The oracle answer, scored through the JSON ``gold``, must get the full score: a dataset
    whose entries do not survive JSON cannot be judged from its problem files."""
    _, _, decoded = read_gold(gold)
    score = scorer(name, options_json).score_answer(str(entry["answer"]), decoded)
    if score < 1.0:
        raise ConfigError(
            f"config key data.problems.datasets.{name}: its oracle answer scores {score} once the "
            "entry is stored as JSON; this dataset cannot be judged from problem files"
        )


def write_problem_sets(spec: ProblemSpec, out: Path) -> dict[str, Path]:
    """Write ``<out>/<split>.jsonl`` for every split (atomically); returns their paths."""
    sets = draw_problem_sets(spec)
    paths = {}
    for split, rows in sets.items():
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], rows)
    return paths
