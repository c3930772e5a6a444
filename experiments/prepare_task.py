"""Build (or find in the cache) a sweep's data without training: the embedded task's SFT model
and pairs (``data=math``), or a model's start and pairs on reasoning-gym problems
(``data=reasoning_gym``, e.g. ``+experiment=real``).

    python -m experiments.prepare_task [hydra overrides, e.g. data.sft.steps=800]

Sweeps call this first so that their parallel jobs all start from a warm cache. Prints the
cache directory and the starting model's held-out accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def main(argv: list[str] | None = None) -> int:
    """Compose the config from ``argv`` overrides and prepare its task; returns the exit status."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("hydra")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if cfg.data.kind == "reasoning_gym":
        from engine.task.gym.pipeline import prepare_gym

        assets = prepare_gym(cfg)
        start, pairs = assets.summary["start"], assets.summary["pairs"]["train"]
        print(
            f"[gym] ready in {assets.root}: start accuracy {start['accuracy']:.3f} +- "
            f"{start['stderr']:.3f} (n={start['n']}), {pairs['pairs']} train pairs; test "
            f"problems: {assets.benchmark['path']}"
        )
        return 0
    if cfg.data.kind != "math":
        print(
            f"data={cfg.data.kind}: nothing to prepare (data=math and reasoning_gym build theirs)"
        )
        return 0
    from engine.task.pipeline import prepare_math_task

    task = prepare_math_task(cfg)
    sft = task.sft_summary
    print(
        f"[task] ready in {task.root}: SFT step {sft['chosen_step']}, held-out greedy accuracy "
        f"{sft['accuracy']:.3f} +- {sft['accuracy_stderr']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
