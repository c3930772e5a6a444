"""Reproduce the BPO paper's tables in miniature: the sweeps, then the reports, one command.

    python -m experiments.reproduce [--table ablation,methods,scale,hypothesis,real] [--jobs N]
        [--out experiments/results] [--sweep-root multirun/reproduce] [--seeds 0,1,2]
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
- ``real`` (only when named: the ``real`` extra, about 45 minutes on 2 cores): the paper's
  pipeline on SmolLM2-135M-Instruct and reasoning-gym problems (``+experiment=real``): its start,
  its pairs (made once, before the sweep), DPO / BPO / the chosen-NLL control with LoRA.
Every table also reports its cells' convergence (accuracy against step from periodic evaluation,
steps to SFT + 10 points) and each run's cost split (startup, reference pass, training,
evaluation) from results.json's ``timings``.

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
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.runtime.fileio import atomic_write_json, atomic_write_text

PACKAGES = ("torch", "deepspeed", "transformers", "hydra-core", "numpy", "matplotlib")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def sweep_command(
    name: str, sweep_dir: Path, jobs: int, threads: int, seeds: str, extra: list[str]
) -> list[str]:
    """The ``python -m engine.train -m`` command of one sweep."""
    cmd = [
        sys.executable,
        "-m",
        "engine.train",
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


def main(argv: list[str] | None = None) -> int:
    """Run the tables' sweeps and write their reports; returns the exit status."""
    from experiments.tables.plan import DEFAULT_TABLES, TABLE_SWEEPS, plan, preparations

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
    tables = [t for t in args.table.split(",") if t]
    unknown = sorted(set(tables) - set(TABLE_SWEEPS))
    if unknown or not tables:
        parser.error(f"--table: unknown tables {unknown}; known: {', '.join(TABLE_SWEEPS)}")
    threads = max(1, cores // args.jobs)
    root = Path(args.sweep_root)
    if not args.dry_run and root.exists() and any(root.iterdir()):
        parser.error(
            f"--sweep-root {root} is not empty: move it away or pick another (runs are never "
            "overwritten)"
        )
    planned, notes = plan(tables)
    for note in notes:
        print(f"[plan] {note}", flush=True)
    seeds = len(args.seeds.split(","))
    for p in planned:
        print(
            f"[plan] {p.name}: {p.cells // len(p.grid.get('seed', [''])) * seeds} runs", flush=True
        )

    started = time.time()
    revision = git_revision()  # before the runs: the code they ran
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commands: list[str] = []
    statuses: dict[str, int] = {}
    timings: dict[str, float] = {}
    # the task's SFT model and pairs per model size (and each sweep's own data: the real
    # model's start and pairs) first, one process each with every core: jobs only read them
    for step in preparations(planned):
        name = " ".join(step)
        warm = [sys.executable, "-m", "experiments.prepare_task", *step]
        warm += task_overrides(args.overrides)
        commands.append(shlex.join(warm))
        statuses[f"prepare_task {name}"], timings[f"prepare_task {name}_s"] = _run(
            warm, args.dry_run
        )
        if statuses[f"prepare_task {name}"] != 0:
            print(f"error: preparing {name} failed; no sweep run", file=sys.stderr)
            return 1
    for p in planned:
        cmd = sweep_command(
            p.sweep.preset,
            root / p.sweep.directory,
            args.jobs,
            threads,
            args.seeds,
            [*p.overrides, *args.overrides],
        )
        commands.append(shlex.join(cmd))
        statuses[p.name], timings[f"{p.name}_s"] = _run(cmd, args.dry_run)
        if statuses[p.name] != 0:
            print(f"warning: sweep {p.name} exited with {statuses[p.name]}", file=sys.stderr)
    if args.dry_run:
        return 0

    from experiments.tables.ablation import AblationError
    from experiments.tables.report import write_table

    failed = False
    for table in tables:
        out = Path(args.out) / table
        try:
            md = write_table(table, root, out)
        except AblationError as error:
            print(f"error: table {table}: {error}", file=sys.stderr)
            failed = True
            continue
        own = {s for s in TABLE_SWEEPS[table]}
        provenance = {
            "command": "python -m experiments.reproduce " + shlex.join(argv or sys.argv[1:]),
            "table": table,
            "sweep_commands": commands,
            "exit_statuses": statuses,
            "plan_notes": notes,
            "git_revision": revision,
            "jobs": args.jobs,
            "threads_per_job": threads,
            "date_utc": date,
            "timings": {
                k: v for k, v in timings.items() if k.startswith("prepare_task") or k[:-2] in own
            }
            | {"total_s": round(time.time() - started, 1)},
            "machine": machine_info(),
        }
        atomic_write_json(out / "provenance.json", provenance, sort_keys=False)
        atomic_write_text(md, md.read_text(encoding="utf-8") + _provenance_markdown(provenance))
        print(f"wrote {out}", file=sys.stderr)
    print(f"done in {time.time() - started:.0f} s", file=sys.stderr)
    return 0 if not failed and all(s == 0 for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
