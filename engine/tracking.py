"""Run outputs written by rank 0: ``metrics.jsonl`` (one JSON object per logged step; read back
with :func:`engine.metrics.read_metrics`), plus the trackers that ``trainer.report_to`` lists
(TensorBoard by default; Weights & Biases and MLflow through their own libraries, the
``tracking`` extra).

``MetricsLogger.from_config(run_dir, cfg, resume_step)`` is all the loop calls: it opens every
tracker the config asks for, logs the resolved config to W&B and MLflow as parameters (flattened
keys such as ``trainer.lr``), and ``log(step, metrics)`` sends every row to each of them with its
step. ``close(status)`` ends the runs as ``finished``, ``failed`` (an error: W&B exit code 1,
MLflow ``FAILED``) or ``killed`` (a stop signal or Ctrl-C: W&B ``mark_preempting`` and the requeue
status 75, MLflow ``KILLED``); used as a context manager it picks the status from how the body
ended. Only rank 0 creates one.

Where W&B and MLflow write: their own settings. W&B reads ``WANDB_PROJECT`` (default
``preference-loss-zoo``), ``WANDB_ENTITY``, ``WANDB_MODE`` (``offline`` needs no network) and
``WANDB_DIR`` (default: the run directory); MLflow reads ``MLFLOW_TRACKING_URI`` and
``MLFLOW_EXPERIMENT_NAME`` (default ``preference-loss-zoo``). A resumed run
(``trainer.resume=auto``) continues the same W&B / MLflow run: their ids are kept in the run
directory.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from engine.metrics import read_metrics
from engine.runtime.fileio import atomic_write_text
from engine.runtime.preemption import PREEMPTED_EXIT_CODE, Preempted

#: the tracker names ``trainer.report_to`` accepts (TensorBoard needs no extra)
REPORTERS = ("tensorboard", "wandb", "mlflow")
DEFAULT_PROJECT = "preference-loss-zoo"
_EXTRA_HINT = "pip install -e '.[tracking]'"
_MLFLOW_BATCH = 100  # MLflow's limit of parameters per log_batch call
#: how a run ends: ``finished``, ``failed`` (an error) or ``killed`` (a stop signal, Ctrl-C)
STATUSES = ("finished", "failed", "killed")


def ending_status(error: BaseException | None) -> str:
    """The status a run closes with when its body ended with ``error`` (None: finished)."""
    if error is None:
        return "finished"
    if isinstance(error, Preempted | KeyboardInterrupt):
        return "killed"
    return "failed"


def report_targets(trainer: Mapping[str, Any]) -> list[str]:
    """The trackers of ``trainer.report_to`` (default ``[tensorboard]``), without TensorBoard
    when the older switch ``trainer.tensorboard`` is false. Unknown names raise ``ValueError``."""
    names = trainer.get("report_to")
    if names is None:
        names = ["tensorboard"]
    elif isinstance(names, str):  # trainer.report_to=wandb on the command line
        names = [names]
    names = [str(name) for name in names]
    unknown = [name for name in names if name not in REPORTERS]
    if unknown:
        raise ValueError(
            f"trainer.report_to: unknown tracker {unknown[0]!r}; valid: {', '.join(REPORTERS)}"
        )
    if trainer.get("tensorboard") is False:
        names = [name for name in names if name != "tensorboard"]
    return list(dict.fromkeys(names))  # each once, in the given order


def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.lr": 1e-4, ...}``: nested mappings joined with dots; lists and scalars kept."""
    if isinstance(node, Mapping):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _import(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"trainer.report_to lists {module}, but the {module} package cannot be imported "
            f"({error}); install the tracking extra: {_EXTRA_HINT}"
        ) from None


class _Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, status: str = "finished") -> None: ...


class _TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def histogram(self, step: int, key: str, values: Any) -> None:
        self._writer.add_histogram(key, values, step)

    def close(self, status: str = "finished") -> None:
        self._writer.close()


def _saved_id(path: Path, resume: bool, make: Any) -> tuple[str, bool]:
    """The run id kept in ``path`` when resuming (and it exists), else a new one (saved);
    returns ``(id, continued)``."""
    if resume and path.is_file():
        return path.read_text().strip(), True
    run_id = str(make())
    atomic_write_text(path, run_id + "\n")
    return run_id, False


class _Wandb:
    def __init__(self, run_dir: Path, params: dict[str, Any], name: str, resume: bool) -> None:
        wandb = _import("wandb")
        new_id = lambda: secrets.token_hex(4)  # noqa: E731 - W&B ids: short, [a-z0-9]
        run_id, continued = _saved_id(run_dir / "wandb_run_id", resume, new_id)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
            name=name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            config=None if continued else params,  # a resumed run keeps its first config
            reinit="create_new",  # one process may train several runs (tests, notebooks)
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self, status: str = "finished") -> None:
        # W&B's contract: exit code 0 is finished, anything else failed; a run marked preempting
        # and ended with a non-zero code is one to resume (the same id comes back on resume)
        if status == "killed":
            self._run.mark_preempting()
        self._run.finish(exit_code={"finished": 0, "failed": 1}.get(status, PREEMPTED_EXIT_CODE))


class _MLflow:
    def __init__(self, run_dir: Path, params: dict[str, Any], name: str, resume: bool) -> None:
        _import("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment_id = _experiment_id(client, experiment)

        def new_run() -> str:
            return client.create_run(experiment_id, run_name=name).info.run_id

        self._run_id, continued = _saved_id(run_dir / "mlflow_run_id", resume, new_run)
        if continued:  # MLflow refuses to change a logged parameter: keep the first config
            client.update_run(self._run_id, status="RUNNING")
            return
        items = [Param(key, _param_text(value)) for key, value in params.items()]
        for start in range(0, len(items), _MLFLOW_BATCH):
            client.log_batch(self._run_id, params=items[start : start + _MLFLOW_BATCH])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(key, value, now, step) for key, value in metrics.items()]
        self._client.log_batch(self._run_id, metrics=rows)

    def close(self, status: str = "finished") -> None:
        mlflow_status = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}[status]
        self._client.set_terminated(self._run_id, status=mlflow_status)


def _experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created if needed (parallel sweep jobs may race to
    create it: the loser finds the winner's)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


_TRACKERS = {"wandb": _Wandb, "mlflow": _MLflow}


def _is_eval_row(row: Mapping[str, Any]) -> bool:
    return any(key.startswith("eval/") for key in row)


def _run_name(cfg: Any, run_dir: Path) -> str:
    """``bpo seed 0 (17-02-11)`` or ``hinge x balanced seed 0 (3)``: the objective and where."""
    method = (cfg.get("method") or {}).get("name")
    objective = method or f"{cfg.loss.name} x {cfg.margin.name}"
    return f"{objective} seed {cfg.get('seed')} ({run_dir.name})"


class MetricsLogger:
    """Append-only metrics sink. Only rank 0 should create one.

    Args:
        run_dir: the run directory.
        resume_step: on resume, rows logged after this step (by the killed run, past its last
            checkpoint) are dropped first, so the file reads as one uninterrupted run.
        eval_pending: the checkpoint resumed from was saved before its step's evaluation was
            logged (the run redoes it): that step's evaluation rows are dropped too.
        tensorboard: also write TensorBoard events under ``run_dir/tensorboard``.
        trackers: more destinations of every row (objects with ``log(step, metrics)`` and
            ``close()``), e.g. the W&B and MLflow runs that :meth:`from_config` opens.
    """

    def __init__(
        self,
        run_dir: Path,
        resume_step: int | None = None,
        tensorboard: bool = True,
        trackers: Sequence[_Tracker] = (),
        eval_pending: bool = False,
    ):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("step", 0) < resume_step
                or (r.get("step", 0) == resume_step and not (eval_pending and _is_eval_row(r)))
            ]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run in a reused directory starts a fresh log
        self._file = self.path.open("a")
        self._trackers = list(trackers)
        if tensorboard:
            self._trackers.insert(0, _TensorBoard(run_dir))

    @classmethod
    def from_config(
        cls, run_dir: Path, cfg: Any, resume_step: int | None = None, eval_pending: bool = False
    ) -> MetricsLogger:
        """The logger ``cfg`` (the resolved run config) asks for: ``metrics.jsonl`` plus every
        tracker of ``trainer.report_to``; W&B and MLflow get ``cfg`` as flattened parameters."""
        names = report_targets(cfg.trainer)
        trackers: list[_Tracker] = []
        try:
            if any(name in _TRACKERS for name in names):
                from omegaconf import OmegaConf

                params = flatten_config(OmegaConf.to_container(cfg, resolve=True))
                name = _run_name(cfg, run_dir)
                for tracker in names:
                    if tracker in _TRACKERS:
                        trackers.append(
                            _TRACKERS[tracker](run_dir, params, name, resume_step is not None)
                        )
        except BaseException as error:
            for tracker in trackers:  # never leave a half-opened set of runs behind
                tracker.close(ending_status(error))
            raise
        return cls(
            run_dir,
            resume_step,
            tensorboard="tensorboard" in names,
            trackers=trackers,
            eval_pending=eval_pending,
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one row (flushed at once, so a crash loses at most the row being written) and
        send it to every tracker with its step."""
        row = {"step": step}
        row.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        values = {key: float(value) for key, value in metrics.items()}
        for tracker in self._trackers:
            tracker.log(step, values)

    def histogram(self, step: int, key: str, values: Any) -> None:
        """A histogram of ``values`` (a tensor or array) at ``step``, for the trackers that draw
        histograms (TensorBoard); not written to metrics.jsonl."""
        for tracker in self._trackers:
            if hasattr(tracker, "histogram"):
                tracker.histogram(step, key, values)

    def close(self, status: str = "finished") -> None:
        """Flush and close the file, and end every tracker's run with ``status`` (one of
        :data:`STATUSES`)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._file.close()
        for tracker in self._trackers:
            tracker.close(status)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        """Close with the status of how the body ended (:func:`ending_status`)."""
        self.close(ending_status(error))
