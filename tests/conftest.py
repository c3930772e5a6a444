"""Suite-wide fixtures and the helpers every test shares: composing the project's Hydra config
(``compose_config``), the overrides of a small training run (``run_overrides``) and reading a
run's ``metrics.jsonl`` (``metrics_rows``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.runtime.distributed import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture(autouse=True)
def _isolated_rendezvous_env() -> Iterator[None]:
    """An in-process ``train()`` sets the rendezvous variables for its world of one; a later test
    that starts torchrun or a subprocess must not inherit them (its port is still bound here)."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def compose(
    overrides: Sequence[str] = (), return_hydra_config: bool = False, config_name: str = "config"
) -> Any:
    """``conf/<config_name>.yaml`` (default: training's ``config``) composed with ``overrides``
    (Hydra's compose API; ``hydra.*`` kept when ``return_hydra_config``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )


@pytest.fixture(scope="session")
def compose_config() -> Callable[..., Any]:
    """``compose_config(overrides=(), return_hydra_config=False, config_name="config")``: the
    composed config."""
    return compose


def tiny_run_overrides(
    train: str | Path,
    eval: str | Path | None,
    run_dir: Path | None,
    *,
    steps: int = 2,
) -> list[str]:
    """A ``steps``-step run of the tiny model on the pair files ``train`` / ``eval`` (None: no
    eval pairs), two pairs per micro batch, every step logged; in ``run_dir`` when given.
    Later overrides win, so a test appends what it changes."""
    overrides = [
        "model=tiny",
        "data=files",
        f"data.train={train}",
        f"data.eval={eval}" if eval is not None else "data.eval=null",
        f"trainer.max_steps={steps}",
        "trainer.micro_batch_size=2",
        "trainer.log_every=1",
        "trainer.progress_bar=false",
        "trainer.threads=1",
    ]
    if run_dir is not None:
        overrides.append(f"output_dir={run_dir}")
    return overrides


@pytest.fixture(scope="session")
def run_overrides() -> Callable[..., list[str]]:
    """``run_overrides(train, eval, run_dir, steps=2)``: a small run's overrides."""
    return tiny_run_overrides


def read_run_metrics(run: Path, key: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``run``'s ``metrics.jsonl`` (``run`` is the run directory or the file), read
    by the engine's reader; only the rows that have ``key`` when given (e.g. ``train/loss``)."""
    from engine.metrics import read_metrics

    path = Path(run)
    rows = read_metrics(path / "metrics.jsonl" if path.is_dir() else path)
    return [r for r in rows if key is None or key in r]


@pytest.fixture(scope="session")
def metrics_rows() -> Callable[..., list[dict[str, Any]]]:
    """``metrics_rows(run_dir, key=None)``: a run's metrics rows (those with ``key``)."""
    return read_run_metrics


#: the embedded task shrunk to seconds (the task's tests, the end-to-end run, the reproduce smoke
#: test): 1-digit problems (155 distinct prompts exist; the sets take 136 of them), a 2-layer
#: model, SFT evaluated every 25 steps until a quarter of the validation answers are right (about
#: 100 steps), then 8 samples for each of 16 prompts, which gives a correct and a wrong answer for
#: most of them
TINY_TASK = (
    "data.problems.min_digits=1",
    "data.problems.max_digits=1",
    "data.problems.sft_problems=80",
    "data.problems.pair_prompts=16",
    "data.problems.eval_pair_prompts=8",
    "data.problems.eval_problems=16",
    "data.problems.sft_val_problems=16",
    "data.sft.steps=200",
    "data.sft.batch_size=32",
    "data.sft.lr=3e-3",
    "data.sft.eval_every=25",
    "data.sft.accuracy_band=[0.25,0.7]",
    "data.pairs.samples_per_prompt=8",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=192",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=4",
)


@pytest.fixture(scope="session")
def tiny_task_overrides() -> tuple[str, ...]:
    """The overrides of the embedded task shrunk to seconds (:data:`TINY_TASK`)."""
    return TINY_TASK
