"""A bad input fails before anything slow starts: ``python -m engine.train`` with each of the
bad inputs that ``experiments/bench/fail_fast.py`` times (a missing file, an empty JSONL file, a
malformed line, a row without a key, a bad config value) reports it without having imported
DeepSpeed or transformers' model classes and without starting a process group (the run directory
holds only ``failed.json``). What it costs in seconds is the benchmark's business; this checks
the order."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments.bench.fail_fast import CASES


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_reported_before_deepspeed_and_the_model_classes(case, tmp_path, cli):
    content, overrides, expected = CASES[case]
    data = tmp_path / ("missing.jsonl" if content is None else f"{case}.jsonl")
    if content is not None:
        data.write_text(content)
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "engine.train",
        "model=tiny",
        "data=files",
        f"data.train={data}",
        "data.eval=null",
        f"output_dir={tmp_path / 'run'}",
        *overrides,
    ]
    done = subprocess.run(command, cwd=tmp_path, env=cli.env(), capture_output=True, text=True)
    assert done.returncode == 1 and expected in done.stderr, done.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "engine.config" in imported  # -X importtime did report (engine.train is __main__)
    assert not {"deepspeed", "transformers.modeling_utils"} & imported
    # config.yaml is written once the process group started; the failure is reported
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["failed.json"]
