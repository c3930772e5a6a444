"""Picking and grouping runs for the reproduce tables (methods, scale, hypothesis, convergence).

Runs are :class:`experiments.tables.collect.Run` values (from its :func:`collect`). The tables
pool runs from several sweeps, so a cell is defined by what ran, never by which sweep ran it:

- :func:`method_of`: a run's named method; a plain loss x margin run counts as the method whose
  definition it is (``losses.METHODS``: logistic x difference at beta 0.1 is ``dpo``, hinge x
  balanced at alpha 0.3 is ``bpo``), so the ablation's cells fill the methods and scale tables.
- :func:`size_of`: the tiny model's architecture (hidden size, layers), from the run's config.
- :func:`optimizer_of`: ``adamw`` or ``sgd``.
- :func:`cell`: one :class:`experiments.tables.collect.Cell` of a metric over runs, one run per
  seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from experiments.tables.collect import Cell, Run, fill_cell

__all__ = [
    "METRIC",
    "Size",
    "cell",
    "group",
    "method_of",
    "optimizer_of",
    "percent",
    "sft_accuracy",
    "size_of",
]

#: the tables' metric: greedy accuracy on the task's held-out problems (a fraction in results.json)
METRIC = "eval.accuracy"


#: the baseline and the reference-free control of the real-model and iterative tables
BASELINE, CONTROL = "dpo", "chosen_nll"
#: their methods' order: the difference margin first, then the balanced one
METHOD_ORDER = ("dpo", "slic", "bpo")


def method_order(names: Sequence[str]) -> list[str]:
    """``names`` in table order: :data:`METHOD_ORDER`'s, then the others by name, the control
    (:data:`CONTROL`) last."""
    known = [n for n in METHOD_ORDER if n in names]
    rest = sorted(n for n in names if n not in METHOD_ORDER and n != CONTROL)
    return known + rest + ([CONTROL] if CONTROL in names else [])


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def method_of(run: Run) -> str | None:
    """The run's named method; for a plain loss x margin run, the first method of
    ``losses.METHODS`` that is exactly that objective (same loss, margin, beta and alpha, no extra
    option, no length normalisation); None when none is."""
    if run.method is not None:
        return run.method
    from losses import METHODS

    for name, method in METHODS.items():
        extra = set(method.defaults) - {"beta", "alpha"}
        if (
            method.loss == run.loss
            and method.margin == run.margin
            and not method.length_normalized
            and not extra
            and _close(method.defaults.get("beta"), run.beta)
            and (method.margin != "balanced" or _close(method.defaults.get("alpha"), run.alpha))
        ):
            return name
    return None


@dataclass(frozen=True, order=True)
class Size:
    """The tiny model's architecture, the scale table's row key."""

    hidden_size: int
    num_layers: int

    @property
    def label(self) -> str:
        """``hidden 64, 3 layers``."""
        return f"hidden {self.hidden_size}, {self.num_layers} layers"


def size_of(run: Run) -> Size | None:
    """The run's tiny architecture from its config (None: not the tiny model, or unknown)."""
    model = run.config.get("model")
    tiny = model.get("tiny") if isinstance(model, dict) else None
    if not isinstance(tiny, dict) or (isinstance(model, dict) and model.get("name_or_path")):
        return None
    hidden, layers = tiny.get("hidden_size"), tiny.get("num_layers")
    if not (isinstance(hidden, int) and isinstance(layers, int)):
        return None
    return Size(hidden, layers)


def optimizer_of(run: Run) -> str:
    """``trainer.optimizer`` of the run (``adamw`` when the config predates the option)."""
    trainer = run.config.get("trainer")
    name = trainer.get("optimizer") if isinstance(trainer, dict) else None
    return name if isinstance(name, str) else "adamw"


def percent(runs: Sequence[Run], metric: str = METRIC) -> bool:
    """True when ``metric`` is an accuracy in [0, 1] in every finished run (shown in percent)."""
    values = [v for r in runs if (v := r.value(metric)) is not None]
    return "accuracy" in metric.rsplit(".", 1)[-1] and all(0.0 <= v <= 1.0 for v in values)


def cell(runs: Iterable[Run], metric: str = METRIC, scale: float = 100.0) -> Cell:
    """The cell of ``runs``: ``metric`` x ``scale`` per finished run, one run per seed (the first
    by path; a repeated seed, e.g. from pooling a sweep twice, is not counted twice)."""
    out, seen = Cell(), set()
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.seed is not None and run.seed in seen:
            continue
        seen.add(run.seed)
        fill_cell(out, run, metric, scale)
    return out


def group(runs: Iterable[Run], key: Callable[[Run], Hashable | None]) -> dict[Hashable, list[Run]]:
    """Runs by ``key(run)`` in first-seen order; runs whose key is None are left out."""
    groups: dict[Hashable, list[Run]] = {}
    for run in runs:
        k = key(run)
        if k is not None:
            groups.setdefault(k, []).append(run)
    return groups


def sft_accuracy(runs: Iterable[Run]) -> float | None:
    """The SFT starting point's accuracy (percent), the mean of the runs' ``sft.accuracy``."""
    values = [v for r in runs if (v := r.value("sft.accuracy")) is not None]
    return 100.0 * sum(values) / len(values) if values else None
