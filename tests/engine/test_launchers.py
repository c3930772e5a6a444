"""The deepspeed launcher runs the same command as torchrun (it appends --local_rank=N)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runtime.distributed import without_launcher_env

ROOT = Path(__file__).resolve().parents[2]

PAIRS = [
    ("12+34=", "2+4+0=6 c0|1+3+0=4 c0|#### 46", "2+4+0=7 c0|1+3+0=4 c0|#### 47"),
    ("58+27=", "8+7+0=5 c1|5+2+1=8 c0|#### 85", "8+7+0=5 c0|5+2+0=7 c0|#### 75"),
    ("91-45=", "1-5-0=6 b1|9-4-1=4 b0|#### 46", "1-5-0=4 b0|9-4-0=5 b0|#### 54"),
    ("63+19=", "3+9+0=2 c1|6+1+1=8 c0|#### 82", "3+9+0=2 c0|6+1+0=7 c0|#### 72"),
]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_two_processes(tmp_path: Path, metrics_rows) -> None:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not installed next to this python")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    out = tmp_path / "run"
    env = {**without_launcher_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            launcher,
            "--num_gpus",
            "2",
            "--master_port",
            "29517",
            "--module",
            "engine.train",
            "model=tiny",
            "data=files",
            f"data.train={data}",
            "deepspeed=zero2",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=1",
            "trainer.log_every=1",
            "trainer.progress_bar=false",
            "trainer.tensorboard=false",
            "trainer.export=false",
            f"output_dir={out}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["steps"] == 2
    rows = metrics_rows(out)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
