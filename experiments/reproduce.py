"""Reproduce the BPO ablation in miniature: three Hydra sweeps, then the table and plots.

    python -m experiments.reproduce [--jobs N] [--out experiments/results/ablation]
        [--sweep-root multirun/reproduce] [--seeds 0,1,2] [extra hydra overrides...]

Runs, on the embedded math task (its SFT model and pairs are built once, before the sweeps):
1. ``+experiment=ablation``: six losses x {difference, balanced at alpha 0.3} x seeds;
2. ``+experiment=ablation_control``: the chosen-NLL control (no rejected term) x seeds;
3. ``+experiment=ablation_alpha``: logistic and hinge, balanced at alpha 0.1 / 0.5 / 1.0 x seeds.

Jobs run in parallel with Hydra's joblib launcher, ``--jobs`` at a time with
``cores // jobs`` torch threads each, so they never oversubscribe the cores. A sweep whose jobs
fail does not stop the others; failed cells are marked in the table and the exit status is 1.
The report (``ablation.md``, ``ablation.csv``, PNGs) and ``provenance.json`` (command, machine,
versions, date, timings) are written to ``--out``; each file atomically.
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

from engine.fileio import atomic_write_json, atomic_write_text

SWEEPS = ("ablation", "ablation_control", "ablation_alpha")
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
        f"- Sweep exit statuses: {p['exit_statuses']}",
        "- Sweeps:",
        *[f"  - `{c}`" for c in p["sweep_commands"]],
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the sweeps and write the report; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce", description=__doc__.split("\n")[0]
    )
    cores = os.cpu_count() or 1
    parser.add_argument("--jobs", type=int, default=cores, help=f"parallel jobs (default {cores})")
    parser.add_argument("--out", default="experiments/results/ablation", help="report directory")
    parser.add_argument("--sweep-root", default="multirun/reproduce", help="where the runs go")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3)")
    parser.add_argument("--only", default=",".join(SWEEPS), help="comma-separated sweeps to run")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    unknown = set(args.only.split(",")) - set(SWEEPS)
    if unknown:
        parser.error(f"--only: unknown sweeps {sorted(unknown)}; known: {', '.join(SWEEPS)}")
    threads = max(1, cores // args.jobs)
    root = Path(args.sweep_root)
    if root.exists() and any(root.iterdir()):
        parser.error(
            f"--sweep-root {root} is not empty: move it away or pick another (runs are never "
            "overwritten)"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    revision = git_revision()  # before the runs: the code they ran
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    # the task's SFT model and pairs first, in one process: parallel jobs then only read the cache
    warm = [sys.executable, "-m", "experiments.prepare_task", *args.overrides]
    print("$", shlex.join(warm), flush=True)
    t0 = time.time()
    prepare_status = subprocess.call(warm)
    timings: dict[str, Any] = {"prepare_task_s": round(time.time() - t0, 1)}
    statuses = {"prepare_task": prepare_status}
    commands = [shlex.join(warm)]
    if prepare_status != 0:
        print("error: building the task failed; no sweep was run", file=sys.stderr)
        return 1
    for name in args.only.split(","):
        cmd = sweep_command(name, root / name, args.jobs, threads, args.seeds, args.overrides)
        commands.append(shlex.join(cmd))
        print("$", commands[-1], flush=True)
        t0 = time.time()
        statuses[name] = subprocess.call(cmd)
        timings[f"{name}_s"] = round(time.time() - t0, 1)
        if statuses[name] != 0:
            print(f"warning: sweep {name} exited with {statuses[name]}", file=sys.stderr)

    from experiments.ablation import AblationError, write_report

    try:
        md = write_report(root, out)
    except AblationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    timings["total_s"] = round(time.time() - started, 1)
    provenance = {
        "command": "python -m experiments.reproduce " + shlex.join(argv or sys.argv[1:]),
        "sweep_commands": commands,
        "exit_statuses": statuses,
        "git_revision": revision,
        "jobs": args.jobs,
        "threads_per_job": threads,
        "date_utc": date,
        "timings": timings,
        "machine": machine_info(),
    }
    atomic_write_json(out / "provenance.json", provenance, sort_keys=False)
    atomic_write_text(md, md.read_text(encoding="utf-8") + _provenance_markdown(provenance))
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {out} in {timings['total_s']:.0f} s", file=sys.stderr)
    return 0 if all(s == 0 for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
