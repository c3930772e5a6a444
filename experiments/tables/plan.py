"""Which sweeps ``make reproduce`` runs for which tables, each cell once.

A :class:`Sweep` is a ``+experiment=`` preset (its grid is the preset's ``hydra.sweeper.params``)
run into a directory under the sweep root. ``TABLE_SWEEPS`` says which sweeps a table needs;
:func:`plan` takes the union for the requested tables and, where another planned sweep already
runs some of a sweep's cells (``covered_by``), drops those values from its grid with a command-line
override of that axis (Hydra's command line replaces a sweeper parameter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_TABLES",
    "SWEEPS",
    "TABLE_SWEEPS",
    "PlannedSweep",
    "Sweep",
    "grid",
    "plan",
    "preparations",
    "task_models",
]

EXPERIMENT_DIR = Path(__file__).resolve().parents[2] / "conf" / "experiment"


@dataclass(frozen=True)
class Sweep:
    """A preset, where its runs go (relative to the sweep root), and the values of its axes that
    other sweeps run already: ``{other sweep: {axis: values}}``."""

    preset: str
    directory: str
    covered_by: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    #: overrides that prepare this sweep's data before it runs (``experiments.prepare_task``);
    #: empty: the embedded task of each ``model=`` of its grid
    prepare: tuple[str, ...] = ()
    #: the command module whose ``-m`` runs the preset's cells (``engine.iterate``: one pipeline
    #: of rounds per cell)
    command: str = "engine.train"


SWEEPS: dict[str, Sweep] = {
    "ablation": Sweep("ablation", "ablation/ablation"),
    "ablation_control": Sweep("ablation_control", "ablation/ablation_control"),
    "ablation_alpha": Sweep("ablation_alpha", "ablation/ablation_alpha"),
    # the methods whose objective is an ablation cell (experiments.tables.select.method_of)
    "methods": Sweep(
        "methods",
        "methods",
        {
            "ablation": {"method": ("dpo", "slic", "bpo")},
            "ablation_control": {"method": ("chosen_nll",)},
        },
    ),
    # model=tiny's dpo and bpo are the methods' (or the ablation's) runs
    "scale": Sweep(
        "scale", "scale", {"ablation": {"model": ("tiny",)}, "methods": {"model": ("tiny",)}}
    ),
    "hypothesis": Sweep("hypothesis", "hypothesis"),
    # its own model and data (data=reasoning_gym): prepared with the preset, not with model=
    "real": Sweep("real", "real", prepare=("+experiment=real",)),
    # one engine.iterate pipeline (sample -> train -> evaluate, three rounds) per cell
    "iterative": Sweep("iterative", "iterative", command="engine.iterate"),
}

#: table -> the sweeps it needs, in the order they run
TABLE_SWEEPS: dict[str, tuple[str, ...]] = {
    "ablation": ("ablation", "ablation_control", "ablation_alpha"),
    "methods": ("methods",),
    "scale": ("scale",),
    "hypothesis": ("ablation", "hypothesis"),
    "real": ("real",),
    "iterative": ("iterative",),
}
#: the tables ``make reproduce`` runs when none is named (``real`` needs the real extra and its
#: own 18 minutes on 2 cores, measured: ``--table real``; ``iterative`` its own 12: ``--table
#: iterative``)
DEFAULT_TABLES = ("ablation", "methods", "scale", "hypothesis")


def grid(preset: str) -> dict[str, list[str]]:
    """The preset's sweep grid: axis -> values, read from its yaml."""
    from omegaconf import OmegaConf

    path = EXPERIMENT_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset {path}")
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default=None) or {}
    return {str(k): [v.strip() for v in str(val).split(",")] for k, val in params.items()}


@dataclass
class PlannedSweep:
    """A sweep to run: its name, preset, directory, and the overrides that trim its grid."""

    name: str
    sweep: Sweep
    overrides: list[str]
    grid: dict[str, list[str]]

    @property
    def cells(self) -> int:
        """Jobs in the trimmed grid (seeds included as the preset gives them)."""
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n


def plan(tables: Sequence[str]) -> tuple[list[PlannedSweep], list[str]]:
    """The sweeps for ``tables`` (each once, in order) with their trims, and notes on what was
    trimmed or skipped."""
    unknown = [t for t in tables if t not in TABLE_SWEEPS]
    if unknown:
        raise ValueError(f"unknown tables {unknown}; known: {', '.join(TABLE_SWEEPS)}")
    names = list(dict.fromkeys(s for t in tables for s in TABLE_SWEEPS[t]))
    planned, notes = [], []
    for name in names:
        sweep = SWEEPS[name]
        axes = grid(sweep.preset)
        overrides = []
        for other, covered in sweep.covered_by.items():
            if other not in names:
                continue
            for axis, values in covered.items():
                kept = [v for v in axes.get(axis, []) if v not in values]
                if kept != axes.get(axis, []):
                    notes.append(f"{name}: {axis}={','.join(values)} comes from the {other} runs")
                    axes[axis] = kept
        if any(not values for values in axes.values()):
            notes.append(f"{name}: every cell is run by another sweep; not run")
            continue
        for axis, values in axes.items():
            if values != grid(sweep.preset).get(axis):
                overrides.append(f"{axis}={','.join(values)}")
        planned.append(PlannedSweep(name, sweep, overrides, axes))
    return planned, notes


def task_models(planned: Sequence[PlannedSweep]) -> list[str]:
    """The ``model=`` options whose task (SFT model and pairs) the planned sweeps train from."""
    models = []
    for p in planned:
        if p.sweep.prepare:
            continue
        for m in p.grid.get("model", ["tiny"]):
            if m not in models:
                models.append(m)
    return models


def preparations(planned: Sequence[PlannedSweep]) -> list[list[str]]:
    """The ``experiments.prepare_task`` overrides to run before the sweeps, each once: one per
    ``model=`` of the embedded task (:func:`task_models`), then each sweep's own ``prepare``."""
    steps = [[f"model={m}"] for m in task_models(planned)]
    for p in planned:
        if p.sweep.prepare and list(p.sweep.prepare) not in steps:
            steps.append(list(p.sweep.prepare))
    return steps
