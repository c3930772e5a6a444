"""The paper's data for any model, on reasoning-gym problems: the start and the on-policy pairs.

``prepare_gym(cfg)`` (``data=reasoning_gym``) returns a :class:`GymAssets`:

1. the problem sets (:mod:`engine.task.gym.problems`): ``train`` prompts for the training pairs,
   ``eval`` prompts for held-out pairs, ``test`` problems for greedy accuracy (the benchmark
   ``reasoning_gym``, ``data.benchmark.reasoning_gym``; the same block as
   ``conf/benchmark/reasoning_gym.yaml``);
2. the start: the model's own greedy accuracy on the test problems, before any training (the
   number every trained policy is compared with), with its per-problem records;
3. the pairs, made the way the BPO paper made its math pairs: ``data.pairs.samples_per_prompt``
   completions per prompt at ``temperature`` from the model, verified by the dataset's own scorer,
   a correct one (chosen) paired with a wrong one (rejected) by the rule of
   :mod:`engine.generation.pairing`, prompts rendered with the benchmark's prompt (so training,
   sampling and evaluation see the same prompt tokens).

Both are cached (:func:`engine.runtime.cache.build_once`): the problems in
``<cache_dir>/gym-problems-<key>/`` (keyed by ``data.problems``), the start and pairs in
``<cache_dir>/gym-pairs-<key>/`` (keyed by the problems, the model, the benchmark's prompt and
decoding, ``data.pairs`` and ``generation.batch_size``). Every run of a sweep shares them; the
first builds them (under a lock: parallel jobs wait, then read). The start and pairs come from the
base model (``model.name_or_path`` or its converted GGUF) in full precision: adapters, and the
4-bit base of QLoRA, are for training.

Cost: generation. On 2 CPU cores SmolLM2-135M makes roughly 100-200 new tokens per second in
batches; the summary records the seconds of each phase (``start_seconds``, ``pairs_seconds``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engine.data.loading import write_jsonl
from engine.generation.backends import HFBackend
from engine.generation.benchmarks import Benchmark
from engine.generation.evaluation import generate_and_judge, summarize
from engine.generation.pairing import PairCounts, build_pairs
from engine.runtime.cache import build_once, default_cache_root
from engine.runtime.errors import ConfigError
from engine.runtime.fileio import atomic_write_json
from engine.task.gym.problems import ProblemSpec, write_problem_sets

log = logging.getLogger(__name__)

#: bump when the format of the cached assets changes, so old entries are not reused
CACHE_VERSION = 1
#: the benchmark's name (conf/benchmark/reasoning_gym.yaml) and its block under ``data.benchmark``
BENCHMARK = "reasoning_gym"
_PAIR_KEYS = {
    "samples_per_prompt",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "batch_prompts",
}


@dataclass
class GymAssets:
    """The cached problem sets, start and pairs of one configuration."""

    problems_dir: Path
    root: Path  # the start and the pairs
    benchmark: dict[str, Any]  # the test problems as a benchmark block (its path filled in)
    summary: dict[str, Any]

    @property
    def train_file(self) -> Path:
        """Training pairs (JSONL: prompt, chosen, rejected as chat messages; answer)."""
        return self.root / "train_pairs.jsonl"

    @property
    def eval_file(self) -> Path | None:
        """Held-out pairs from the eval prompts (None when they gave none)."""
        return self.root / "eval_pairs.jsonl" if self.summary["pairs"]["eval"]["pairs"] else None


def _hash(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def benchmark_block(cfg: DictConfig, test_file: Path | None = None) -> dict[str, Any]:
    """``data.benchmark.reasoning_gym`` as a plain dict, its path set to ``test_file``."""
    block = dict(_container(OmegaConf.select(cfg, f"data.benchmark.{BENCHMARK}")) or {})
    if not block:
        raise ConfigError(
            f"config key data.benchmark.{BENCHMARK}: missing (conf/data/reasoning_gym)"
        )
    if test_file is not None:
        block["path"] = str(test_file)
    return block


def _pairs_settings(cfg: DictConfig) -> dict[str, Any]:
    pairs = dict(_container(cfg.data.pairs))
    unknown = set(pairs) - _PAIR_KEYS
    if unknown:
        raise ConfigError(
            f"config key data.pairs: unknown keys {sorted(unknown)}; valid: {sorted(_PAIR_KEYS)}"
        )
    if int(pairs["samples_per_prompt"]) < 2 or float(pairs["temperature"]) <= 0:
        raise ConfigError(
            "config key data.pairs: samples_per_prompt must be >= 2 and temperature > 0 (a pair "
            "needs a correct and a wrong sample)"
        )
    return pairs


def prepare_gym(cfg: DictConfig) -> GymAssets:
    """The problem sets, start and pairs for ``cfg`` (module docstring), built on first use."""
    from engine.model.conversion import resolve_model_config

    if cfg.model.get("adapter"):
        raise ConfigError(
            "config key model.adapter: data=reasoning_gym samples its pairs from the base model; "
            "merge the adapter first (a run's final_model/) and give it as model.name_or_path"
        )
    spec = ProblemSpec.from_config(cfg.data.problems)
    root = Path(str(cfg.data.get("cache_dir") or default_cache_root())).expanduser()
    problems_dir = build_once(
        root / f"gym-problems-{_hash({'v': CACHE_VERSION, 'problems': spec.to_dict()})}",
        lambda work: write_problem_sets(spec, work),
    )
    block = benchmark_block(cfg, problems_dir / "test.jsonl")
    Benchmark.from_config(BENCHMARK, block)  # a bad block fails before any model loads
    pairs = _pairs_settings(cfg)
    model_cfg = resolve_model_config(cfg.model)  # converts a GGUF model on first use
    model_key = {k: _container(model_cfg.get(k)) for k in ("name_or_path", "tokenizer", "dtype")}
    key = _hash(
        {
            "v": CACHE_VERSION,
            "problems": problems_dir.name,
            "model": model_key,
            "benchmark": {k: v for k, v in block.items() if k not in ("path", "limit")},
            "pairs": pairs,
            "generation_batch": int(OmegaConf.select(cfg, "generation.batch_size", default=64)),
        }
    )
    entry = build_once(
        root / f"gym-pairs-{key}", lambda work: _build(cfg, model_cfg, problems_dir, block, work)
    )
    summary = json.loads((entry / "summary.json").read_text())
    return GymAssets(problems_dir, entry, block, summary)


def _build(
    cfg: DictConfig, model_cfg: Any, problems_dir: Path, block: dict[str, Any], out: Path
) -> None:
    """Measure the start and sample the pairs into ``out`` (see the module docstring)."""
    import torch

    from engine.model.loading import load_model, load_tokenizer

    started = time.time()
    print(f"[gym] the start and pairs of {model_cfg.name_or_path} (once; cached in {out.parent})")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    batch = int(OmegaConf.select(cfg, "generation.batch_size", default=64))
    benchmark = Benchmark.from_config(BENCHMARK, block)
    backend = HFBackend(model, tokenizer, device, batch_size=batch)
    # in this process alone (no collectives: under a launcher the other ranks wait on the lock)
    start_started = time.time()
    records = generate_and_judge(
        backend,
        tokenizer,
        [(p.problem, p.gold) for p in benchmark.load()],
        prompt=benchmark.prompt,
        verifier=benchmark.verifier,
        max_new_tokens=benchmark.max_new_tokens,
        temperature=benchmark.temperature,
        top_p=benchmark.top_p,
    )
    start = {**summarize(records), "seconds": time.time() - start_started}
    write_jsonl(out / "start_records.jsonl", (asdict(r) for r in records))
    print(
        f"[gym] start: greedy accuracy {start['accuracy']:.3f} +- {start['stderr']:.3f} on "
        f"{start['n']} test problems ({start['seconds']:.0f} s)",
        flush=True,
    )
    settings = _pairs_settings(cfg)
    pair_stats = {}
    for split in ("train", "eval"):
        split_started = time.time()
        problems = Benchmark.from_config(
            BENCHMARK, {**block, "path": str(problems_dir / f"{split}.jsonl")}
        )
        rows, counts = _sample(backend, tokenizer, benchmark, problems, settings, split)
        write_jsonl(out / f"{split}_pairs.jsonl", rows)
        pair_stats[split] = {**counts.to_dict(), "seconds": time.time() - split_started}
        print(
            f"[gym] {split} pairs: {counts.pairs} from {counts.prompts} prompts (sample accuracy "
            f"{counts.sample_accuracy:.3f}, all correct {counts.all_correct_prompts}, all wrong "
            f"{counts.all_wrong_prompts}; {pair_stats[split]['seconds']:.0f} s)",
            flush=True,
        )
    atomic_write_json(
        out / "summary.json",
        {
            "start": start,
            "pairs": pair_stats,
            "settings": settings,
            "model": str(model_cfg.name_or_path),
            "problems_dir": str(problems_dir),
            "build_seconds": time.time() - started,
        },
    )


def _batch_seed(seed: int, split: str, batch: int) -> int:
    """The sampling seed of one batch: a hash of the seed, the split and the batch index."""
    return int(hashlib.sha256(f"{seed}:{split}:{batch}".encode()).hexdigest()[:15], 16)


def _sample(
    backend: HFBackend,
    tokenizer: Any,
    benchmark: Benchmark,
    problems: Benchmark,
    settings: dict[str, Any],
    split: str,
) -> tuple[list[dict[str, Any]], PairCounts]:
    """Pairs for every problem of ``problems``, ``batch_prompts`` prompts per ``generate`` call."""
    if Path(problems.path).stat().st_size == 0:  # an empty split (data.problems.sizes.eval: 0)
        return [], PairCounts()
    loaded = problems.load()
    size, k = int(settings["batch_prompts"]), int(settings["samples_per_prompt"])
    rows: list[dict[str, Any]] = []
    total = PairCounts()
    for start in range(0, len(loaded), size):
        chunk = loaded[start : start + size]
        batch_rows, counts = build_pairs(
            backend,
            tokenizer,
            [(p.problem, p.gold) for p in chunk],
            prompt=benchmark.prompt,
            verifier=benchmark.verifier,
            samples_per_prompt=k,
            temperature=float(settings["temperature"]),
            top_p=float(settings["top_p"]),
            max_new_tokens=int(settings["max_new_tokens"]),
            seed=_batch_seed(int(settings["seed"]), split, start // size),
        )
        rows += batch_rows
        total = total + counts
    return rows, total
