"""Reproduce the BPO paper's tables in miniature: the sweeps, then the reports, one command.

    python -m experiments.reproduce [--table ablation,methods,scale,hypothesis,real,iterative]
        [--jobs N] [--out experiments/results] [--sweep-root multirun/reproduce] [--seeds 0,1,2]
        [--dry-run] [extra hydra overrides for every job...]

Tables (``--table``, default the first four), each written to ``<out>/<table>/``:
- ``ablation``: six losses x {difference, balanced at alpha 0.3}, the chosen-NLL control, alpha
  in {0.1, 0.5, 1.0} for logistic and hinge (``+experiment=ablation``, ``ablation_control``,
  ``ablation_alpha``);
- ``methods``: every named method from the same SFT model (``+experiment=methods``), the paper's
  rows first with its numbers, paired differences against DPO;
- ``scale``: DPO vs BPO at three sizes of the tiny model, each from its own SFT model
  (``+experiment=scale``), paired gains;
- ``hypothesis``: the ablation's balanced cells under plain SGD (``+experiment=hypothesis``)
  beside the same cells under AdamW, with the margin and gradient-weight diagnostics;
- ``real`` (only when named: the ``real`` extra, about 18 minutes on 2 cores): the paper's
  pipeline on SmolLM2-135M-Instruct and reasoning-gym problems (``+experiment=real``): its start,
  its pairs (made once, before the sweep), DPO / BPO / the chosen-NLL control with LoRA;
- ``iterative`` (only when named: about 25 minutes on 2 cores): three rounds of on-policy pairs
  -> training -> evaluation from the task's SFT model with DPO, BPO and the chosen-NLL control,
  one ``engine.iterate`` pipeline per cell (``+experiment=iterative``), per-round accuracy and
  paired gains against DPO.
Every engine.train table also reports its cells' convergence (accuracy against step from
periodic evaluation, steps to SFT + 10 points) and each run's cost split (startup, reference
pass, training, evaluation) from results.json's ``timings``; the iterative table its cost per
round and phase.

Runs are never repeated: a cell one sweep already runs (the methods table's dpo, slic and bpo are
the ablation's logistic x difference, hinge x difference and hinge x balanced runs) is dropped from
the other sweeps' grids when both run (``Sweep.covered_by``), and the tables pool runs by objective.
The task's SFT models and pairs are built first, one process per model size, so parallel jobs only
read the cache. Jobs run with Hydra's joblib launcher, ``--jobs`` at a time with ``cores // jobs``
torch threads each. A failing job does not stop the others; its cell is marked in the table and
the exit status is 1. Each table's directory gets ``provenance.json`` (commands, machine,
versions, date, code revision, timings).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.runtime.fileio import atomic_write_json, atomic_write_text
from engine.runtime.machine import cpu_name

if TYPE_CHECKING:
    from experiments.tables.plan import PlannedSweep

PACKAGES = ("torch", "deepspeed", "transformers", "hydra-core", "numpy", "matplotlib")


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_revision() -> str | None:
    """The commit the code ran at, with ``-dirty`` when the working tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, OS, Python and package versions."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def sweep_command(
    name: str,
    sweep_dir: Path,
    jobs: int,
    threads: int,
    seeds: str,
    extra: list[str],
    command: str = "engine.train",
) -> list[str]:
    """The ``python -m <command> -m`` command of one sweep (``engine.train``, or
    ``engine.iterate`` for pipelines of rounds)."""
    cmd = [
        sys.executable,
        "-m",
        command,
        "-m",
        f"+experiment={name}",
        f"hydra.sweep.dir={sweep_dir}",
        f"trainer.threads={threads}",
        f"seed={seeds}",
    ]
    if jobs > 1:
        cmd += ["hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={jobs}"]
    return cmd + extra


def _provenance_markdown(p: dict[str, Any]) -> str:
    m = p["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    timings = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in p["timings"].items())
    lines = [
        "",
        "## Provenance",
        "",
        f"- Command: `{p['command']}` (`make reproduce`), {p['date_utc']}, "
        f"code at `{p['git_revision']}`",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu'] or 'none'}; {m['os']}; Python {m['python']}",
        f"- Versions: {versions}",
        f"- Parallelism: {p['jobs']} jobs x {p['threads_per_job']} torch thread(s)",
        f"- Wall time: {timings}",
        f"- Exit statuses: {p['exit_statuses']}",
        *[f"- Note: {n}" for n in p.get("plan_notes", [])],
        "- Commands:",
        *[f"  - `{c}`" for c in p["sweep_commands"]],
    ]
    return "\n".join(lines) + "\n"


def task_overrides(overrides: list[str]) -> list[str]:
    """The overrides that describe the task (for ``prepare_task``): sweeps over a key
    (``method=dpo,bpo``) choose cells, not the task, and one process cannot take them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o for o, p in zip(overrides, parsed, strict=True) if not p.is_sweep_override()]


def _run(cmd: list[str], dry_run: bool) -> tuple[int, float]:
    """Run ``cmd`` (printed first); its exit status and wall seconds (0, 0 on a dry run)."""
    print("$", shlex.join(cmd), flush=True)
    if dry_run:
        return 0, 0.0
    t0 = time.time()
    status = subprocess.call(cmd)
    return status, round(time.time() - t0, 1)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: jobs, known tables, and a sweep root that holds no runs yet."""
    from experiments.tables.plan import DEFAULT_TABLES, TABLE_SWEEPS

    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__.split("\n")[0]
    )
    cores = os.cpu_count() or 1
    parser.add_argument("--jobs", type=int, default=cores, help=f"parallel jobs (default {cores})")
    parser.add_argument("--out", default="experiments/results", help="reports: <out>/<table>/")
    parser.add_argument("--sweep-root", default="multirun/reproduce", help="where the runs go")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3)")
    parser.add_argument(
        "--table",
        default=",".join(DEFAULT_TABLES),
        help=f"comma-separated tables of {','.join(TABLE_SWEEPS)} (default "
        f"{','.join(DEFAULT_TABLES)})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands, run nothing, write nothing"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.tables = [t for t in args.table.split(",") if t]
    unknown = sorted(set(args.tables) - set(TABLE_SWEEPS))
    if unknown or not args.tables:
        parser.error(f"--table: unknown tables {unknown}; known: {', '.join(TABLE_SWEEPS)}")
    args.threads = max(1, cores // args.jobs)
    args.root = Path(args.sweep_root)
    if not args.dry_run and args.root.exists() and any(args.root.iterdir()):
        parser.error(
            f"--sweep-root {args.root} is not empty: move it away or pick another (runs are never "
            "overwritten)"
        )
    return args


@dataclass
class SweepLog:
    """What ran: the code's revision, when, and each step's command line, exit status and wall
    seconds (by step name), for the tables' provenance."""

    revision: str | None = field(default_factory=git_revision)  # taken before the runs
    date: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    started: float = field(default_factory=time.time)
    commands: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, cmd: list[str], dry_run: bool) -> int:
        """Run ``cmd`` as step ``name`` (see :func:`_run`) and record it; its exit status."""
        self.commands.append(shlex.join(cmd))
        self.statuses[name], self.timings[f"{name}_s"] = _run(cmd, dry_run)
        return self.statuses[name]


def _run_sweeps(args: argparse.Namespace, planned: list[PlannedSweep]) -> SweepLog | None:
    """The task's SFT model and pairs per model size (and each sweep's own data: the real
    model's start and pairs), one process each with every core (so the jobs only read them), then
    every planned sweep. None when a preparation failed (no sweep runs then)."""
    from experiments.tables.plan import preparations

    ran = SweepLog()
    for step in preparations(planned):
        name = " ".join(step)
        warm = [sys.executable, "-m", "experiments.prepare_task", *step]
        if ran.run(f"prepare_task {name}", warm + task_overrides(args.overrides), args.dry_run):
            print(f"error: preparing {name} failed; no sweep run", file=sys.stderr)
            return None
    for p in planned:
        cmd = sweep_command(
            p.sweep.preset,
            args.root / p.sweep.directory,
            args.jobs,
            args.threads,
            args.seeds,
            [*p.overrides, *args.overrides],
            p.sweep.command,
        )
        if status := ran.run(p.name, cmd, args.dry_run):
            print(f"warning: sweep {p.name} exited with {status}", file=sys.stderr)
    return ran


def _write_tables(
    args: argparse.Namespace, argv: list[str] | None, ran: SweepLog, notes: list[str]
) -> bool:
    """Each table's report, with its provenance (``provenance.json`` and a Markdown section);
    False when a table could not be written."""
    from experiments.tables.collect import Sweeps, TableError
    from experiments.tables.plan import TABLE_SWEEPS
    from experiments.tables.report import write_table

    ok = True
    for table in args.tables:
        out = Path(args.out) / table
        try:
            md = write_table(table, Sweeps(args.root, is_root=True), out)
        except TableError as error:
            print(f"error: table {table}: {error}", file=sys.stderr)
            ok = False
            continue
        own = set(TABLE_SWEEPS[table])
        provenance = {
            "command": "python -m experiments.reproduce " + shlex.join(argv or sys.argv[1:]),
            "table": table,
            "sweep_commands": ran.commands,
            "exit_statuses": ran.statuses,
            "plan_notes": notes,
            "git_revision": ran.revision,
            "jobs": args.jobs,
            "threads_per_job": args.threads,
            "date_utc": ran.date,
            "timings": {
                k: v
                for k, v in ran.timings.items()
                if k.startswith("prepare_task") or k[:-2] in own
            }
            | {"total_s": round(time.time() - ran.started, 1)},
            "machine": machine_info(),
        }
        atomic_write_json(out / "provenance.json", provenance, sort_keys=False)
        atomic_write_text(md, md.read_text(encoding="utf-8") + _provenance_markdown(provenance))
        print(f"wrote {out}", file=sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    """Run the tables' sweeps and write their reports; returns the exit status."""
    from experiments.tables.plan import plan

    args = _parse_args(argv)
    planned, notes = plan(args.tables)
    for note in notes:
        print(f"[plan] {note}", flush=True)
    seeds = len(args.seeds.split(","))
    for p in planned:
        runs = p.cells // len(p.grid.get("seed", [""])) * seeds
        print(f"[plan] {p.name}: {runs} runs", flush=True)

    ran = _run_sweeps(args, planned)
    if ran is None:
        return 1
    if args.dry_run:
        return 0
    ok = _write_tables(args, argv, ran, notes)
    print(f"done in {time.time() - ran.started:.0f} s", file=sys.stderr)
    return 0 if ok and all(s == 0 for s in ran.statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
