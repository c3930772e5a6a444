"""The resumption check of ``engine.iterate``: stop a pipeline in each phase, rerun, same result.

    python -m experiments.resume_check --out DIR [--expected CELL_DIR] [engine.iterate overrides]

Runs ``python -m engine.iterate <overrides> hydra.run.dir=DIR/stopped`` and stops it (SIGTERM)
once in each phase: in round 1's sampling (after its first sampled batch), in round 2's training
(after its first logged step; round 1 with one round) and in the last round's evaluation (after
its first evaluated batch), rerunning the same command after each stop; the last rerun finishes.
Each stop must end with the requeue status (75) and each rerun must say it kept the work the
stop left (sampled batches, a checkpoint, evaluated batches). The finished pipeline is then
compared with an uninterrupted one: ``--expected`` (e.g. the same cell of a sweep that ran with
the same overrides), else one run here into ``DIR/expected``: the rounds (``rounds.jsonl``), the
cell's ``results.json`` (timings aside; floats within 1e-6 relative: a resumed optimizer step
rounds the same to ~1e-7) and the last round's weights.

Each phase is caught from outside, with no hook in the engine: the check waits for the file that
shows the phase has begun, freezes the process (SIGSTOP), sends the signal and lets it go on
(SIGCONT), so the signal lands in that phase on any machine. Prints one line per step and exits 0
when every check held. ``tests/engine/test_iterate_stop.py`` runs it on the shrunk task.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.runtime.distributed import without_launcher_env
from engine.runtime.preemption import PREEMPTED_EXIT_CODE

RTOL = 1e-6
#: what differs between two runs of one pipeline: the clock
TIMED = ("seconds", "wall_seconds", "rounds_seconds")


@dataclass(frozen=True)
class Phase:
    """Where to stop: the file (relative to the pipeline's directory) whose presence, holding
    ``text``, shows the phase has begun; the stop message expected; what the rerun says it kept.
    ``redone``: what the rerun would say had it redone the phase from scratch, when a stop after
    the phase's last unit leaves it nothing to say (sampling: no "batches to sample" line); it is
    looked for in the rerun's lines of round ``round`` only."""

    name: str
    began: str
    text: str
    stopped: str
    kept: str
    round: int = 1
    redone: str | None = None


def phases(rounds: int, eval_batches: int | None = None) -> list[Phase]:
    """The three stops of a pipeline of ``rounds`` rounds (sampling batches: any count)."""
    train_round = min(2, rounds)
    batches = r"\d+" if eval_batches is None else str(eval_batches)
    return [
        Phase(
            "sampling",
            "round_1/pairs/parts/rank-0.jsonl",
            "",
            r"in sampling after batch round \d+ of \d+",
            r"\d+ batches to sample \([1-9]\d* found done\)",
            1,
            r"batches to sample \(0 found done\)",
        ),
        Phase(
            "training",
            f"round_{train_round}/train/metrics.jsonl",
            '"train/loss"',  # a logged step: the stop ends this step or the next
            r"after step \d+ \(saved\)",
            r"resuming from \S+step_\d+",
        ),
        Phase(
            "evaluation",
            f"round_{rounds}/eval/records/.parts/arithmetic.jsonl",
            "",
            rf"in evaluation after \w+ batch round \d+ of {batches}",
            rf"\w+: [1-9]\d* of {batches} batches kept by an earlier run",
        ),
    ]


def child_env(**extra: str) -> dict[str, str]:
    """This environment with one thread per process and this checkout first on the path."""
    env = without_launcher_env()  # all of them: an in-process run's MASTER_PORT is still bound
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env | extra


class Pipeline:
    """``python -m engine.iterate`` runs of one command line, their output in ``log``."""

    def __init__(self, overrides: Sequence[str], out: Path, log: Path, env: dict[str, str]):
        self.args = [*overrides, f"hydra.run.dir={out}"]
        self.out, self.log, self.env = out, log, env

    def start(self) -> subprocess.Popen:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as handle:
            handle.write("\n==== engine.iterate " + " ".join(self.args) + "\n")
            handle.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "engine.iterate", *self.args],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a timeout ends it and what it started
            )

    def finish(self, proc: subprocess.Popen, timeout: float) -> str:
        """Wait for ``proc`` (killed with its group after ``timeout``); this run's output."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"still running after {timeout} s; see {self.log}") from None
        return self.log.read_text().rsplit("\n==== ", 1)[-1]


def stop_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float) -> None:
    """Once ``ready()``: freeze ``proc``, send SIGTERM, let it go on. Polls; no clock."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"the process ended ({proc.returncode}) before the phase")
        if time.monotonic() > deadline:
            raise RuntimeError("the phase never began")
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)


def what_was_kept(phase: Phase, output: str) -> str | None:
    """What the rerun's ``output`` says it kept of ``phase`` (None: it redid the phase)."""
    found = re.search(phase.kept, output)
    if found:
        return found.group(0)
    if phase.redone is None:
        return None
    start = output.find(f"round {phase.round}: sampling")  # engine.iterate's line per phase
    end = output.find(f"round {phase.round}: training", max(start, 0))
    lines = output[start:end] if start >= 0 else ""
    if start >= 0 and not re.search(phase.redone, lines):
        return "nothing left to redo (the stop came after its last unit)"
    return None


def _began(path: Path, text: str) -> Callable[[], bool]:
    return lambda: path.is_file() and text in path.read_text()


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def comparable(out: Path) -> dict[str, Any]:
    """What must agree between two runs of one pipeline (its own paths made relative)."""
    results = (out / "results.json").read_text().replace(str(out), "<out>")
    rows = (out / "rounds.jsonl").read_text().replace(str(out), "<out>").splitlines()
    return _untimed({"results": json.loads(results), "rounds": [json.loads(r) for r in rows]})


def differences(actual: Any, expected: Any, where: str = "") -> list[str]:
    """Where ``actual`` and ``expected`` differ: structure and values, floats within RTOL."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if actual.keys() != expected.keys():
            return [f"{where}: keys {sorted(actual)} != {sorted(expected)}"]
        return [d for k in expected for d in differences(actual[k], expected[k], f"{where}.{k}")]
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items != {len(expected)}"]
        return [
            d
            for i, (a, e) in enumerate(zip(actual, expected, strict=True))
            for d in differences(a, e, f"{where}[{i}]")
        ]
    if isinstance(expected, float) and isinstance(actual, int | float):
        close = abs(actual - expected) <= RTOL * abs(expected) + 1e-9
        return [] if close else [f"{where}: {actual!r} != {expected!r}"]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


def weight_differences(model_dir: Path, expected_dir: Path) -> list[str]:
    """Tensors of two exported models that differ beyond RTOL (plus 1e-7 absolute)."""
    import torch
    from safetensors.torch import load_file

    def load(d: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    ours, theirs = load(model_dir), load(expected_dir)
    if not ours or ours.keys() != theirs.keys():
        return [f"{model_dir}: tensors {len(ours)} != {len(theirs)} or names differ"]
    return [
        f"{model_dir}/{k}: max |diff| {float((v - theirs[k]).abs().max()):.3g}"
        for k, v in ours.items()
        if not torch.allclose(v, theirs[k], rtol=RTOL, atol=1e-7)
    ]


def check(
    overrides: Sequence[str],
    out: Path,
    expected: Path | None = None,
    rounds: int | None = None,
    eval_batches: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Run the check (see the module's docstring); returns the failures ([] when it held).
    ``rounds``: the pipeline's ``iterate.rounds`` (read from the overrides when they set it,
    else 3, conf/experiment/iterative.yaml's)."""
    if rounds is None:
        given = [o.split("=", 1)[1] for o in overrides if o.startswith("iterate.rounds=")]
        rounds = int(given[-1]) if given else 3
    env = env or child_env()
    failures: list[str] = []
    if expected is None:
        expected = out / "expected"
        uninterrupted = Pipeline(overrides, expected, out / "output.log", env)
        started = time.time()
        proc = uninterrupted.start()
        uninterrupted.finish(proc, timeout)
        say(f"uninterrupted: exit {proc.returncode} in {time.time() - started:.0f} s")
        if proc.returncode != 0:
            return [f"the uninterrupted pipeline failed (exit {proc.returncode}); see the log"]
    pipeline = Pipeline(overrides, out / "stopped", out / "output.log", env)
    started, last = time.time(), None
    for phase in [*phases(rounds, eval_batches), None]:
        proc = pipeline.start()
        if phase is not None:
            stop_when(proc, _began(pipeline.out / phase.began, phase.text), timeout)
        output = pipeline.finish(proc, timeout)
        found = re.findall(r"stopped (.+), on (SIG\w+)", output)
        where = found[-1][0] if found else "-"
        if last is not None:
            kept = what_was_kept(last, output)
            say(f"  rerun kept the {last.name} phase's work: {kept or 'NO'}")
            if kept is None:
                failures.append(f"the rerun after the {last.name} stop kept nothing")
        if phase is None:
            say(f"final rerun: exit {proc.returncode}")
            if proc.returncode != 0:
                failures.append(f"the final rerun failed (exit {proc.returncode})")
            break
        say(f"stop in {phase.name}: exit {proc.returncode}, stopped {where}")
        if proc.returncode != PREEMPTED_EXIT_CODE:
            failures.append(f"{phase.name}: exit {proc.returncode}, not {PREEMPTED_EXIT_CODE}")
        if not re.fullmatch(phase.stopped, where):
            failures.append(f"{phase.name}: stopped {where!r}, not in that phase")
        if (pipeline.out / "results.json").exists():
            failures.append(f"{phase.name}: results.json exists after a stop")
        last = phase
    say(f"stopped pipeline: {time.time() - started:.0f} s over {len(phases(rounds)) + 1} runs")
    if failures:
        return failures
    found = differences(comparable(pipeline.out), comparable(expected))
    found += weight_differences(
        pipeline.out / f"round_{rounds}" / "train" / "final_model",
        expected / f"round_{rounds}" / "train" / "final_model",
    )
    ours, theirs = comparable(pipeline.out)["results"], comparable(expected)["results"]
    say(
        "same result: "
        + ("yes" if not found else f"NO ({len(found)} differences)")
        + f"; per-round accuracy {[r['accuracy'] for r in ours['per_round']]} vs "
        f"{[r['accuracy'] for r in theirs['per_round']]} uninterrupted"
    )
    for line in found[:20]:
        say(f"  {line}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0 when the check held, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.resume_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="where the stopped (and expected) runs go")
    parser.add_argument("--expected", default=None, help="an uninterrupted pipeline's directory")
    parser.add_argument("overrides", nargs="*", help="engine.iterate overrides")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if (out / "stopped").exists():
        parser.error(f"{out / 'stopped'} exists: the check starts from an empty directory")
    expected = Path(args.expected).resolve() if args.expected else None
    print("$ python -m engine.iterate " + " ".join(args.overrides), flush=True)
    failures = check(args.overrides, out, expected, say=lambda s: print(s, flush=True))
    print("check: " + ("passed" if not failures else "FAILED"), flush=True)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
