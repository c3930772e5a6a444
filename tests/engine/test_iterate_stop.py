"""A stop signal in every phase of ``python -m engine.iterate`` (sampling, training, evaluation)
ends it with the requeue status (75); rerunning the same command each time continues the
pipeline and finishes with what an uninterrupted pipeline gives: the same rounds, the same
cell ``results.json`` and the same final weights. A crash leaves ``failed.json``.

As in test_stop_phases.py, each phase is caught from outside with no hook in the engine: the
test waits for the file that shows the phase has begun, freezes the process (SIGSTOP), sends
the signal and lets it go on (SIGCONT), so the signal lands in that phase on any machine.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.runtime.preemption import PREEMPTED_EXIT_CODE

#: two rounds of 8 fresh prompts, sampled in two batches and evaluated in four (16 held out)
PIPELINE = (
    "iterate.rounds=2",
    "iterate.prompts_per_round=8",
    "iterate.samples_per_prompt=8",
    "iterate.batch_prompts=4",
    "generation.batch_size=4",
    "trainer.max_steps=3",
    "trainer.micro_batch_size=1",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "trainer.tensorboard=false",
    "trainer.threads=1",
    "method=bpo",
)
RTOL = 1e-6
#: what differs between two runs of the same pipeline: the clock
TIMED = ("seconds", "wall_seconds", "rounds_seconds")


def overrides(tiny_task_overrides, out: Path) -> list[str]:
    return [*tiny_task_overrides, *PIPELINE, f"hydra.run.dir={out}"]


def start(cli, args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    log = (cwd / "output.log").open("a")
    log.write("\n==== engine.iterate\n")
    log.flush()
    return subprocess.Popen(
        [sys.executable, "-m", "engine.iterate", *args],
        cwd=cwd,
        env=cli.env(XDG_CACHE_HOME=str(cache), TORCH_EXTENSIONS_DIR=str(cwd / "ext")),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def finish(cli, proc: subprocess.Popen, cwd: Path, timeout: float = 300) -> str:
    """Wait for ``proc`` (its tree killed after ``timeout``); this run's output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        cli.kill_tree(proc.pid)
        proc.wait()
        pytest.fail(f"still running after {timeout} s:\n{(cwd / 'output.log').read_text()[-4000:]}")
    return (cwd / "output.log").read_text().rsplit("\n==== ", 1)[-1]


def stop_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """Once ``ready()``: freeze ``proc``, send SIGTERM, let it go on. Polls; no clock."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before the phase"
        assert time.monotonic() < deadline, "the phase never began"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)


def _has(path: Path, text: str = "") -> Callable[[], bool]:
    return lambda: path.is_file() and text in path.read_text()


def untimed(value):
    """``value`` without the keys that time the phases."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in TIMED}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def assert_close(actual, expected, where: str = "") -> None:
    """Equal structure; floats within RTOL (a resumed optimizer step rounds the same to ~1e-7)."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=RTOL, abs=1e-9), where
    else:
        assert actual == expected, where


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def comparable(out: Path) -> dict:
    """What must agree between two runs of one pipeline (paths made relative to ``out``)."""
    text = (out / "results.json").read_text().replace(str(out), "<out>")
    rows = (out / "rounds.jsonl").read_text().replace(str(out), "<out>").splitlines()
    return untimed({"results": json.loads(text), "rounds": [json.loads(r) for r in rows]})


#: phase -> (the file that shows it began, the stop message, what the rerun says it kept)
PHASES = {
    "sampling": (
        "round_1/pairs/parts/rank-0.jsonl",
        r"in sampling after batch round 1 of 2",
        r"1 batches to sample \(1 found done\)",
    ),
    "training": (
        "round_2/train/metrics.jsonl",
        r"after step \d \(saved\)",
        r"resuming from \S+step_\d",
    ),
    "evaluation": (
        "round_2/eval/records/.parts/arithmetic.jsonl",
        r"in evaluation after arithmetic batch round \d of 4",
        r"arithmetic: \d of 4 batches kept by an earlier run",
    ),
}


@pytest.mark.slow
def test_a_stop_in_each_phase_is_resumed_to_the_same_pipeline(tmp_path, cli, tiny_task_overrides):
    cache = tmp_path / "cache"
    expected = tmp_path / "expected"
    (tmp_path / "a").mkdir()
    proc = start(cli, overrides(tiny_task_overrides, expected), tmp_path / "a", cache)
    output = finish(cli, proc, tmp_path / "a")
    assert proc.returncode == 0, output[-4000:]

    # one pipeline stopped three times: in round 1's sampling, round 2's training and round 2's
    # evaluation; each rerun continues the phase the last one stopped in
    out = tmp_path / "out"
    args = overrides(tiny_task_overrides, out)
    (tmp_path / "b").mkdir()
    previous = None
    for phase, (began, where, _) in PHASES.items():
        text = '"train/loss"' if phase == "training" else ""  # step 1 is done
        proc = start(cli, args, tmp_path / "b", cache)
        stop_when(proc, _has(out / began, text))
        output = finish(cli, proc, tmp_path / "b")
        assert proc.returncode == PREEMPTED_EXIT_CODE, f"{phase}:\n{output[-4000:]}"
        stopped = re.findall(r"stopped (.+), on SIGTERM", output)
        assert stopped and re.fullmatch(where, stopped[-1]), f"{phase}: {stopped}"
        assert not (out / "results.json").exists() and not (out / "failed.json").exists()
        if previous is not None:
            assert re.search(PHASES[previous][2], output), f"{previous}: the rerun redid it"
        previous = phase
    proc = start(cli, args, tmp_path / "b", cache)
    output = finish(cli, proc, tmp_path / "b")
    assert proc.returncode == 0, output[-4000:]
    assert re.search(PHASES[previous][2], output), f"{previous}: the rerun redid it"

    assert_close(comparable(out), comparable(expected))
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["per_round"]] == [0, 1, 2]
    assert results["eval"]["accuracy"] == results["per_round"][-1]["accuracy"]
    assert results["method"] == "bpo" and results["seed"] == 0
    weights = load_weights(out / "round_2" / "train" / "final_model")
    expected_weights = load_weights(expected / "round_2" / "train" / "final_model")
    assert weights.keys() == expected_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, expected_weights[key], rtol=RTOL, atol=1e-7)
    assert (out / ".hydra" / "config.yaml").is_file()  # a job dir the tables' collector reads


def test_a_crash_leaves_failed_json(compose_config, tmp_path) -> None:
    from engine.iterate import run
    from engine.runtime.errors import ConfigError

    cfg = compose_config(["iterate.rounds=0", f"output_dir={tmp_path}"], config_name="iterate")
    with pytest.raises(ConfigError, match=r"iterate\.rounds"):
        run(cfg)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert "ConfigError" in failed["error"] and "iterate.rounds" in failed["error"]
    assert not (tmp_path / "results.json").exists()
