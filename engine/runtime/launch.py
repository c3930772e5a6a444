"""How the commands start: the Hydra entry point they share, joining a launcher's process group,
and the one output directory every rank agrees on.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.runtime import distributed as dist_utils

#: the project's Hydra config directory (absolute: a command module is not ``__main__``'s package)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def init_if_launched() -> None:
    """Join the process group when a launcher started several processes (``WORLD_SIZE`` > 1);
    a single process stays without one (no DeepSpeed import, no port)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist_utils.init_distributed()


def hydra_entry(config_name: str, function: Callable[[Any], Any]) -> None:
    """``python -m engine.<command>``: compose ``conf/<config_name>.yaml`` with the command line
    and call ``function(cfg)``.

    The deepspeed launcher appends ``--local_rank=N``, which Hydra would reject: it is taken off
    the command line (``LOCAL_RANK`` says the same). Ranks other than 0 (under a launcher) make no
    run directory and no log files of their own: rank 0's output directory is broadcast
    (:func:`resolve_output_dir`). The process leaves through :func:`leave`, whether the command
    succeeded, failed or stopped for a requeue.
    """
    import hydra

    for arg in list(sys.argv[1:]):
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            sys.argv.remove(arg)
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv += [
            "hydra.output_subdir=null",
            "hydra.run.dir=.",
            "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled",
        ]

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def main(cfg: Any) -> None:
        function(cfg)

    try:
        main()  # every job of a sequential multirun
    except SystemExit as leaving:
        leave(leaving.code)
        raise
    except Exception:  # HYDRA_FULL_ERROR=1 lets a job's error through
        if dist_utils.launched_world_size() > 1:
            traceback.print_exc()  # leave() exits before Python would print it
        leave(1)
        raise
    leave(0)


def leave(code: int | str | None) -> None:
    """The end of a command's process, with exit status ``code`` (``sys.exit``'s argument).

    The process group, if one was made, is destroyed (:func:`engine.runtime.distributed.shutdown`).
    Under a launcher (``WORLD_SIZE`` > 1) the process then exits here, after the exit handlers
    (``atexit``: log handlers, trackers) and a flush of its output, without the interpreter's
    teardown: gloo's threads can outlive the destroyed group (other objects still hold it), and
    freeing them during teardown aborts a rank that has finished its work ("terminate called
    without an active exception", SIGABRT), which the launcher reports as a failed job. A process
    of its own returns, and Python exits as usual.
    """
    dist_utils.shutdown()
    if dist_utils.launched_world_size() <= 1:
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what Python does with sys.exit("message")
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def chosen_output_dir(cfg: Any, fallback: str) -> Path:
    """This process's choice of output directory, without a collective: ``cfg.output_dir``, else
    Hydra's run directory, else ``fallback`` (called outside ``@hydra.main``); absolute."""
    run_dir = cfg.get("output_dir")
    if not run_dir:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else fallback
    return Path(str(run_dir)).resolve()


def resolve_output_dir(cfg: Any, fallback: str) -> Path:
    """:func:`chosen_output_dir` of rank 0 on every rank (a collective), created by rank 0."""
    path = Path(dist_utils.broadcast_object(str(chosen_output_dir(cfg, fallback))))
    if dist_utils.is_main():
        path.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    return path


def write_failed(cfg: Any, error: BaseException, fallback: str) -> None:
    """``failed.json`` (the error and its traceback) in this process's own choice of output
    directory (:func:`chosen_output_dir`), found without a collective: the other ranks may be
    dead or stuck. A sweep's summary lists the cell; reporting never masks the real error."""
    from engine.runtime.fileio import atomic_write_json

    try:
        path = chosen_output_dir(cfg, fallback)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            path / "failed.json",
            {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()},
        )
    except Exception:  # reporting must never mask the real error
        pass
