"""How fast a bad input is reported: ``python -m experiments.bench.fail_fast [--repo DIR]``.

Runs ``python -m engine.train`` (the tiny model, ``data=files``) with one bad input at a time and
measures the wall time from the process's start to its exit, checking that it failed with the
expected message. The inputs:

- ``missing_file``: ``data.train`` names a file that does not exist;
- ``empty_jsonl``: an empty ``.jsonl`` file;
- ``malformed_line``: a JSONL file whose second line is not JSON;
- ``missing_row_key``: a row without its ``rejected`` key;
- ``bad_config_value``: ``trainer.lr=-1``.

``--repo`` runs another checkout's engine (e.g. a ``git worktree`` of the revision to compare
with), with the same interpreter. Each command runs once untimed first (so a one-time build, e.g.
DeepSpeed's CPU op, is not counted; ``TORCH_EXTENSIONS_DIR`` is a directory of this run's own),
then ``--repeats`` times; the median is printed as a Markdown table. Run it under the CPU lock
(``flock /work/tools/cpu.lock ...``) so that the figures mean something.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.runtime.distributed import without_launcher_env

GOOD_ROW = {"prompt": "1+1=", "chosen": " 2", "rejected": " 3"}

#: case -> (file content or None for a missing file, extra overrides, text the error must hold)
CASES: dict[str, tuple[str | None, list[str], str]] = {
    "missing_file": (None, [], "missing.jsonl"),
    "empty_jsonl": ("", [], "empty_jsonl.jsonl"),
    "malformed_line": (json.dumps(GOOD_ROW) + '\n{"prompt": "1+2=", "chosen"\n', [], "line 2"),
    "missing_row_key": (json.dumps({"prompt": "1+1=", "chosen": " 2"}) + "\n", [], "rejected"),
    "bad_config_value": (json.dumps(GOOD_ROW) + "\n", ["trainer.lr=-1"], "trainer.lr"),
}


def run_case(repo: Path, workdir: Path, case: str) -> tuple[float, int, str]:
    """One timed run of ``case``: (seconds, exit status, the last lines of its output)."""
    content, overrides, _ = CASES[case]
    data = workdir / ("missing.jsonl" if content is None else f"{case}.jsonl")
    if content is not None:
        data.write_text(content)
    command = [
        sys.executable,
        "-m",
        "engine.train",
        "model=tiny",
        "data=files",
        f"data.train={data}",
        "data.eval=null",
        "trainer.max_steps=2",
        f"output_dir={workdir / 'runs' / case}",
        *overrides,
    ]
    env = without_launcher_env()
    env["PYTHONPATH"] = str(repo)
    env["TORCH_EXTENSIONS_DIR"] = str(workdir / "torch_extensions")
    env["HYDRA_FULL_ERROR"] = "0"
    started = time.perf_counter()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return seconds, done.returncode, (done.stdout + done.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fail_fast-") as tmp:
        workdir = Path(tmp)
        for case in args.cases.split(","):
            run_case(args.repo, workdir, case)  # untimed: one-time builds and caches
            times = []
            for _ in range(args.repeats):
                seconds, status, output = run_case(args.repo, workdir, case)
                expected = CASES[case][2]
                if status == 0 or expected not in output:
                    print(f"{case}: unexpected outcome (status {status}):\n{output}", flush=True)
                    return 1
                times.append(seconds)
            error = [line for line in output.splitlines() if expected in line][-1].strip()
            rows.append((case, statistics.median(times), error))
            print(f"{case}: {statistics.median(times):.2f} s ({times})", flush=True)
    print(
        f"\nengine at {args.repo}\n\n| bad input | seconds to the error (median of "
        f"{args.repeats}) | error |\n|---|---|---|"
    )
    for case, seconds, error in rows:
        print(f"| {case} | {seconds:.1f} | `{error[:140]}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
