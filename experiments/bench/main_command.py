"""The main command's first and warm runs, timed for one or more checkouts side by side.

    python -m experiments.bench.main_command --checkout before=/path/to/old --checkout after=.
    # -> experiments/results/main_command.md

For each checkout, one after the other: ``python -m engine.train loss=hinge margin=balanced``
(``make train``) on an empty cache (``XDG_CACHE_HOME`` a fresh directory: the run builds the
embedded task: SFT, validation, held-out accuracy, 8 x 1,700 samples) and then again on the cache
it made (warm), each under ``/usr/bin/time -v`` for the wall time and the peak resident memory of
the process and its children. Every checkout runs with this interpreter (``sys.executable``) and
``PYTHONPATH`` pointing at it, so all share one build of DeepSpeed's CPU communication op: it is
built first, into a fresh ``TORCH_EXTENSIONS_DIR``, and timed on its own (a compiler's memory would
otherwise be the peak of whichever run built it). Run it on a quiet machine (``flock
/work/tools/cpu.lock ...`` on the shared one): the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.runtime.fileio import atomic_write_text
from engine.runtime.machine import cpu_name

RESULTS = Path(__file__).resolve().parents[1] / "results"
COMMAND = ["-m", "engine.train", "loss=hinge", "margin=balanced"]


def timed(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict[str, float]:
    """Run ``argv`` under ``/usr/bin/time -v``: wall seconds, peak RSS (MiB), exit status."""
    report = log.with_suffix(".time")
    with log.open("w") as out:
        status = subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(report), *argv],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    text = report.read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if wall is None or rss is None:
        raise RuntimeError(f"{report}: no wall time or peak memory in /usr/bin/time's report")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = 60 * seconds + float(part)
    return {"seconds": seconds, "peak_mib": int(rss.group(1)) / 1024, "status": status}


def run_checkout(label: str, checkout: Path, work: Path, env: dict[str, str]) -> dict:
    """Cold then warm run of the main command in ``checkout``."""
    cache = work / label / "xdg"
    cache.mkdir(parents=True)
    env = {**env, "PYTHONPATH": str(checkout), "XDG_CACHE_HOME": str(cache)}
    figures: dict = {"checkout": str(checkout), "revision": _revision(checkout)}
    for run in ("cold", "warm"):
        run_dir = work / label / f"run-{run}"
        argv = [sys.executable, *COMMAND, f"hydra.run.dir={run_dir}"]
        figures[run] = timed(argv, env, checkout, work / label / f"{run}.log")
        results = run_dir / "results.json"
        if results.is_file():
            data = json.loads(results.read_text())
            figures[run]["timings"] = data.get("timings", {})
            figures[run]["sft_step"] = data.get("sft", {}).get("chosen_step")
            figures[run]["eval_accuracy"] = data.get("eval", {}).get("accuracy")
        summary = next(cache.glob("preference-loss-zoo/math-*/summary.json"), None)
        if run == "cold" and summary is not None:
            built = json.loads(summary.read_text())
            figures["build_seconds"] = built["build_seconds"]
            figures["pairs"] = {k: v["pairs"] for k, v in built["pairs"].items()}
        print(f"{label} {run}: {figures[run]['seconds']:.1f} s, {figures[run]['peak_mib']:.0f} MiB")
    return figures


def _revision(checkout: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()[:80]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(figures: dict[str, dict], op: dict[str, float], command: str) -> str:
    """The Markdown report."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        "# The main command: first (cold) and warm runs",
        "",
        f"Command: `{command}`  ",
        f"Measured: `{sys.executable.split('/')[-1]} -m engine.train loss=hinge margin=balanced` "
        "(`make train`), cold (empty `XDG_CACHE_HOME`) then warm, checkouts one after the other, "
        "each under `/usr/bin/time -v` (wall time; peak resident memory of the process tree).  ",
        f"Machine: {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, Linux "
        f"{platform.release()}; load average at the end (1, 5, 15 min): {load}.  ",
        f"DeepSpeed's CPU communication op, built once beforehand (not in the figures below): "
        f"{op['seconds']:.1f} s, {op['peak_mib']:.0f} MiB peak (the compiler).",
        "",
        "| checkout | cold (s) | cold peak (MiB) | warm (s) | warm peak (MiB) | task build (s) "
        "| SFT step | pairs (train / eval) | eval accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, f in figures.items():
        pairs = f.get("pairs", {})
        accuracy = f["cold"].get("eval_accuracy")
        lines.append(
            f"| {label} (`{f['revision'].split()[0]}`) | {f['cold']['seconds']:.1f} "
            f"| {f['cold']['peak_mib']:.0f} | {f['warm']['seconds']:.1f} "
            f"| {f['warm']['peak_mib']:.0f} | {f.get('build_seconds', float('nan')):.1f} "
            f"| {f['cold'].get('sft_step')} | {pairs.get('train')} / {pairs.get('eval')} "
            f"| {accuracy if accuracy is None else f'{accuracy:.3f}'} |"
        )
    lines += ["", "Phases of each run (`results.json` `timings`, seconds):", ""]
    for label, f in figures.items():
        for run in ("cold", "warm"):
            timings = ", ".join(f"{k} {v:.1f}" for k, v in f[run].get("timings", {}).items())
            lines.append(f"- {label}, {run}: {timings}")
    lines += ["", "Revisions:", ""]
    lines += [f"- {label}: {f['revision']} ({f['checkout']})" for label, f in figures.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    """Build the op, run every checkout cold and warm, write the report; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkout",
        action="append",
        required=True,
        help="label=path of a checkout (repeat; measured in the order given)",
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: temp)")
    parser.add_argument("--out", type=Path, default=RESULTS / "main_command.md")
    args = parser.parse_args(argv)
    checkouts = {}
    for item in args.checkout:
        label, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"--checkout {item!r}: expected label=<existing directory>")
        checkouts[label] = Path(path).resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="main_command-"))
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(work / "torch_extensions"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    first = next(iter(checkouts.values()))
    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    single = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "WORLD_SIZE": "1"}
    op = timed(
        [sys.executable, "-c", "import deepspeed; deepspeed.init_distributed(verbose=False)"],
        {**env, **single, "LOCAL_RANK": "0", "PYTHONPATH": str(first)},
        first,
        work / "op_build.log",
    )
    if op["status"] != 0:
        raise SystemExit(f"building DeepSpeed's CPU op failed: see {work / 'op_build.log'}")
    print(f"op build: {op['seconds']:.1f} s, {op['peak_mib']:.0f} MiB", flush=True)
    figures = {label: run_checkout(label, path, work, env) for label, path in checkouts.items()}
    command = "python -m experiments.bench.main_command " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = report(figures, op, command.strip())
    atomic_write_text(args.out, text)
    print(text)
    print(f"report: {args.out} ({time.time() - started:.0f} s in all; logs in {work})")
    return args.out


if __name__ == "__main__":
    main()
