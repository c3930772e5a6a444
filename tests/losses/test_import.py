"""Import smoke tests for losses, each in a fresh interpreter (other tests' imports don't count)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from losses import LOSSES, METHODS

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ["deepspeed", "hydra", "omegaconf", "transformers", "datasets", "accelerate"]

IMPORT_CHECK = f"""
import sys
import losses
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, f"importing losses imported {{heavy}}"
from losses import (
    hinge, savage, logistic, squared, exponential, truncated_quadratic,
    preference_loss, PreferenceLoss, LOSSES, MARGINS, METHODS,
)
import torch
assert callable(preference_loss) and issubclass(PreferenceLoss, torch.nn.Module)
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, f"the public names imported {{heavy}}"
print("ok")
"""


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_import_is_light_and_exports_public_names():
    result = run_python("-c", IMPORT_CHECK)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_python_m_losses_prints_every_loss_and_method():
    result = run_python("-m", "losses")
    assert result.returncode == 0, result.stderr
    for name in [*LOSSES, *METHODS]:
        assert name in result.stdout, name
    assert not re.search(r"\bnan\b", result.stdout, re.IGNORECASE)
