"""Finding a sweep's runs and reading what they left: the one collector every table reads through.

A *job dir* is any directory holding ``.hydra/config.yaml``, ``results.json`` or ``failed.json``,
found at any depth (Hydra's ``<sweep>/<date>/<time>/<job>`` included) without descending into a
job dir (its checkpoints and models). Its :class:`Run` is "finished" (results.json), "failed"
(failed.json, or a results.json that is not a JSON object: one corrupt run is reported, with a
reason naming the file, instead of hiding the whole sweep) or "incomplete" (neither: killed, or
still running). A :class:`Cell` counts the runs of one table cell: a metric per finished seed and
the runs that did not give one.

Where a table's runs are (:class:`Sweeps`): a sweep root as ``make reproduce`` lays it out (the
table reads the folders it needs, ``SOURCES``), or one sweep directory (every run under it).

Cost: one YAML and one JSON parse per job dir; ``metrics.jsonl`` is read on first use only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.metrics import read_metrics
from experiments.tables.plan import SWEEPS
from experiments.tables.stats import Summary, summarize

__all__ = [
    "SOURCES",
    "Cell",
    "Run",
    "Sweeps",
    "TableError",
    "collect",
    "collect_runs",
    "fill_cell",
    "number",
]

#: table -> the folders under a sweep root whose runs it reads (the methods table pools the
#: ablation's runs of the same objectives, the scale table both of theirs)
SOURCES: dict[str, tuple[str, ...]] = {
    "ablation": ("ablation",),
    "methods": ("ablation", "methods"),
    "scale": ("ablation", "methods", "scale"),
    "hypothesis": ("ablation", "hypothesis"),
    "real": ("real",),
    "iterative": ("iterative",),
}


class TableError(ValueError):
    """A sweep directory, metric or option that cannot produce a table; the message says why."""


@dataclass
class Run:
    """One job of a sweep: where it is, what it ran, and how it ended."""

    path: Path
    status: str  # "finished" | "failed" | "incomplete"
    loss: str | None = None
    margin: str | None = None
    alpha: float | None = None  # gap adaptor; None for the difference margin, which ignores it
    beta: float | None = None
    seed: int | None = None
    method: str | None = None
    results: dict | None = None
    error: str | None = None
    config: dict = field(default_factory=dict)
    _metrics: list[dict] | None = field(default=None, repr=False)

    def value(self, metric: str) -> float | None:
        """The numeric value at the dotted path `metric` of results.json, or None."""
        node = self.results
        for part in metric.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return number(node)

    def metrics(self) -> list[dict]:
        """Rows of this run's metrics.jsonl ([] when absent), read once."""
        if self._metrics is None:
            path = self.path / "metrics.jsonl"
            self._metrics = read_metrics(path) if path.is_file() else []
        return self._metrics


def number(x: object) -> float | None:
    """``x`` as a float when it is a JSON number (not a bool), else None."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _is_job_dir(d: Path) -> bool:
    return any((d / n).is_file() for n in (".hydra/config.yaml", "results.json", "failed.json"))


def _find_job_dirs(root: Path) -> list[Path]:
    """Job dirs under root (root included), not descending into a job dir (checkpoints, models)."""
    if _is_job_dir(root):
        return [root]
    found = []
    # Natural order, so job 10 comes after job 9.
    for child in sorted(root.iterdir(), key=lambda p: (not p.name.isdigit(), p.name.zfill(12))):
        if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
            found += _find_job_dirs(child)
    return found


def _load_config(path: Path) -> dict:
    """The config as a plain dict, resolving interpolations when they resolve outside Hydra."""
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
        try:
            data = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # e.g. ${hydra:...} interpolations: fall back to raw values
            data = OmegaConf.to_container(cfg, resolve=False)
    except Exception as e:
        raise TableError(f"{path}: not a readable YAML config: {e}") from e
    return data if isinstance(data, dict) else {}


def _name(node: object) -> str | None:
    """`loss: {name: hinge}` or `loss: hinge` -> "hinge"."""
    if isinstance(node, dict):
        node = node.get("name")
    return node if isinstance(node, str) else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _load_run(job: Path) -> Run:
    config = _load_config(job / ".hydra" / "config.yaml")
    margin_cfg = config.get("margin")
    run = Run(
        path=job,
        status="incomplete",
        config=config,
        loss=_name(config.get("loss")),
        margin=_name(margin_cfg),
        alpha=number(margin_cfg.get("alpha")) if isinstance(margin_cfg, dict) else None,
        beta=number(config.get("beta")),
        seed=config.get("seed") if isinstance(config.get("seed"), int) else None,
        method=_name(config.get("method")),
    )
    results_path, failed_path = job / "results.json", job / "failed.json"
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError("top level is not a JSON object")
        except ValueError as e:  # JSONDecodeError is a ValueError
            run.status, run.error = "failed", f"invalid results.json ({results_path}): {e}"
        else:
            run.status, run.results = "finished", results
            # results.json records what actually ran; the config fills in what it lacks.
            run.loss = _name(results.get("loss")) or run.loss
            run.margin = _name(results.get("margin")) or run.margin
            run.method = _name(results.get("method")) or run.method
            run.beta = _first(number(results.get("beta")), run.beta)
            run.alpha = _first(number(results.get("alpha")), run.alpha)
            seed = results.get("seed")
            run.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else run.seed
    elif failed_path.is_file():
        run.status = "failed"
        try:
            failed = json.loads(failed_path.read_text(encoding="utf-8"))
            run.error = str(failed.get("error") or "unknown error")
        except (ValueError, AttributeError) as e:
            run.error = f"unreadable failed.json ({failed_path}): {e}"
    if run.margin != "balanced":
        run.alpha = None
    return run


def collect_runs(sweep_dir: str | os.PathLike) -> list[Run]:
    """All job runs found recursively under a Hydra multirun sweep directory, sorted by path.

    Raises TableError when the directory does not exist or holds no job dirs.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise TableError(f"sweep directory {root} does not exist or is not a directory")
    jobs = _find_job_dirs(root)
    if not jobs:
        raise TableError(
            f"no runs found under {root}: expected job dirs holding .hydra/config.yaml, "
            "results.json or failed.json (is this a Hydra multirun sweep dir?)"
        )
    return [_load_run(j) for j in jobs]


def collect(dirs: Iterable[str | os.PathLike]) -> list[Run]:
    """The runs under every directory of ``dirs`` that exists (a table pools several sweeps)."""
    runs: list[Run] = []
    for d in dirs:
        if Path(d).is_dir():
            runs += collect_runs(d)
    return runs


@dataclass(frozen=True)
class Sweeps:
    """Where a table's runs are: ``path`` is a sweep root as ``make reproduce`` lays it out
    (``is_root``: each table reads its ``SOURCES`` folders under it), or one sweep directory (each
    table reads every run under it)."""

    path: Path
    is_root: bool

    @classmethod
    def find(cls, path: str | os.PathLike) -> Sweeps:
        """``path`` as a sweep root when one of ``make reproduce``'s sweep folders under it
        (:data:`experiments.tables.plan.SWEEPS`: ``ablation/ablation``, ``methods``, ...) holds
        job dirs, else as one sweep. So ``multirun/reproduce`` is a root, and
        ``multirun/reproduce/ablation`` or a sweep of one's own is one sweep."""
        path = Path(path)
        if not path.is_dir():
            raise TableError(f"sweep directory {path} does not exist or is not a directory")
        folders = (path / sweep.directory for sweep in SWEEPS.values())
        return cls(path, any(d.is_dir() and _find_job_dirs(d) for d in folders))

    def dirs(self, table: str) -> list[Path]:
        """The directories whose runs ``table`` reads."""
        return [self.path / s for s in SOURCES[table]] if self.is_root else [self.path]

    def runs(self, table: str) -> list[Run]:
        """The runs ``table`` reads (:func:`collect` over :meth:`dirs`)."""
        return collect(self.dirs(table))

    def describe(self, table: str) -> str:
        """How ``path`` is read for ``table``, for the command's console line."""
        if not self.is_root:
            return f"{self.path}: one sweep, every run under it"
        return f"{self.path}: a sweep root, its folders {', '.join(SOURCES[table])}"


@dataclass
class Cell:
    """The runs of one table cell: metric values (display units) per finished seed, and the rest."""

    values: list[float] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    failed: int = 0
    incomplete: int = 0
    no_metric: int = 0  # finished runs whose results.json lacks the metric

    @property
    def summary(self) -> Summary:
        """Mean, sample std and n over the finished runs."""
        return summarize(self.values)

    @property
    def empty(self) -> bool:
        """True when no run at all belongs to this cell."""
        return not (self.values or self.failed or self.incomplete or self.no_metric)

    def by_seed(self) -> dict[int, float]:
        """Value per seed, averaging repeated seeds; runs without a seed are left out."""
        groups: dict[int, list[float]] = {}
        for s, v in zip(self.seeds, self.values, strict=True):
            if s is not None:
                groups.setdefault(s, []).append(v)
        return {s: sum(v) / len(v) for s, v in groups.items()}


def fill_cell(cell: Cell, run: Run, metric: str, scale: float) -> None:
    """Count ``run`` into ``cell``: its metric x ``scale`` (and seed) when it finished with the
    metric, else as failed, incomplete or without the metric."""
    if run.status == "failed":
        cell.failed += 1
    elif run.status == "incomplete":
        cell.incomplete += 1
    elif (v := run.value(metric)) is None:
        cell.no_metric += 1
    else:
        cell.values.append(v * scale)
        cell.seeds.append(run.seed)
