"""engine.tracking: ``metrics.jsonl`` plus the trackers of ``trainer.report_to``. W&B runs in its
offline mode (files under tmp_path) and MLflow with a file store in tmp_path: no network. Each test
reads back what the library itself wrote: the W&B run file's records and MLflow's client."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from engine.config import ConfigError, validate_config
from engine.metrics import read_metrics
from engine.tracking import MetricsLogger, flatten_config, report_targets

ROWS = [(1, {"train/loss": 0.7, "train/reward_accuracy": 0.5}), (2, {"train/loss": 0.6})]


def wandb_records(run_file: Path) -> list:
    """The records of a W&B ``run-<id>.wandb`` file (a LevelDB-style log of protobuf records:
    a 7-byte file header, then records with a 7-byte header each, split at 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of a split one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch):
    """W&B offline into tmp_path/wandb_dir, MLflow's file store at tmp_path/mlruns."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "zoo-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "zoo-test")
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


def read_wandb(wandb_dir: Path) -> tuple[dict, list[dict], str]:
    """(config, history rows, run id) of the one offline run under ``wandb_dir``."""
    [run_file] = (wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")
    config, history, run_id = {}, [], ""
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.update})
        elif kind == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return config, history, run_id


def read_mlflow(tmp_path: Path) -> tuple[dict, dict, str]:
    """(params, {metric: [(step, value)]}, status) of the one run of experiment zoo-test."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("zoo-test")
    [run] = client.search_runs([experiment.experiment_id])
    metrics = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }
    return run.data.params, metrics, run.info.status


def test_report_targets_and_flattening():
    assert report_targets({}) == ["tensorboard"]
    assert report_targets({"report_to": ["wandb", "tensorboard", "wandb"]}) == [
        "wandb",
        "tensorboard",
    ]
    assert report_targets({"report_to": "mlflow"}) == ["mlflow"]  # report_to=mlflow on the CLI
    assert report_targets({"report_to": ["tensorboard"], "tensorboard": False}) == []
    with pytest.raises(ValueError, match="unknown tracker 'comet'; valid: tensorboard, wandb"):
        report_targets({"report_to": ["comet"]})
    nested = {"trainer": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 0}
    assert flatten_config(nested) == {"trainer.lr": 0.1, "trainer.betas": [0.9, 0.99], "seed": 0}


def test_an_unknown_tracker_fails_validation(compose_config):
    cfg = compose_config(["trainer.report_to=[tensorboard,comet]"])
    with pytest.raises(ConfigError, match=r"trainer\.report_to: unknown tracker 'comet'"):
        validate_config(cfg)


def test_tensorboard_is_the_default(compose_config, tmp_path):
    cfg = compose_config()
    assert list(cfg.trainer.report_to) == ["tensorboard"]
    logger = MetricsLogger.from_config(tmp_path, cfg)
    for step, metrics in ROWS:
        logger.log(step, metrics)
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "wandb_run_id").exists() and not (tmp_path / "mlflow_run_id").exists()


def test_wandb_and_mlflow_get_the_config_and_every_row(compose_config, offline_trackers):
    tmp_path = offline_trackers
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config(["trainer.report_to=[wandb,mlflow]", "trainer.lr=0.25", "seed=3"])
    logger = MetricsLogger.from_config(run_dir, cfg)
    for step, metrics in ROWS:
        logger.log(step, metrics)
    logger.close()

    assert not (run_dir / "tensorboard").exists()  # not listed
    config, history, run_id = read_wandb(tmp_path / "wandb_dir")
    assert run_id == (run_dir / "wandb_run_id").read_text().strip()
    assert config["trainer.lr"] == 0.25 and config["seed"] == 3
    assert config["trainer.report_to"] == ["wandb", "mlflow"]
    assert config["loss.name"] == "logistic"
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    assert logged == [metrics for _, metrics in ROWS]
    assert [row["_step"] for row in history] == [1, 2]

    params, metrics, status = read_mlflow(tmp_path)
    assert params["trainer.lr"] == "0.25" and params["seed"] == "3"
    assert params["trainer.adam_betas"] == "[0.9, 0.999]"
    flat = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    assert set(params) == set(flat)  # every key, more than MLflow's 100 per call
    assert metrics == {
        "train/loss": [(1, 0.7), (2, 0.6)],
        "train/reward_accuracy": [(1, 0.5)],
    }
    assert status == "FINISHED"


def test_a_resumed_run_continues_the_same_runs(compose_config, offline_trackers):
    tmp_path = offline_trackers
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_config(["trainer.report_to=[mlflow]"])
    first = MetricsLogger.from_config(run_dir, cfg)
    first.log(1, {"train/loss": 0.7})
    first.close()
    resumed_cfg = compose_config(["trainer.report_to=[mlflow]", "trainer.resume=auto"])
    resumed = MetricsLogger.from_config(run_dir, resumed_cfg, resume_step=1)
    resumed.log(2, {"train/loss": 0.6})
    resumed.close()
    params, metrics, status = read_mlflow(tmp_path)  # one run (read_mlflow unpacks exactly one)
    assert params["trainer.resume"] == "None"  # the first config, not overwritten
    assert metrics == {"train/loss": [(1, 0.7), (2, 0.6)]} and status == "FINISHED"


@pytest.mark.parametrize("module", ["wandb", "mlflow"])
def test_a_missing_library_names_the_extra(compose_config, tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    cfg = compose_config([f"trainer.report_to=[{module}]"])
    with pytest.raises(ImportError, match=rf"report_to lists {module}.*\.\[tracking\]"):
        MetricsLogger.from_config(tmp_path, cfg)


@pytest.mark.slow
def test_a_training_run_reports_to_every_tracker(offline_trackers, train_run):
    tmp_path = offline_trackers
    results, run_dir = train_run(
        tmp_path / "run", "trainer.report_to=[tensorboard,wandb,mlflow]", steps=2
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    config, history, _ = read_wandb(tmp_path / "wandb_dir")
    assert [row["_step"] for row in history] == [1, 2]
    assert history[-1]["train/loss"] == pytest.approx(results["train"]["loss"])
    assert config["trainer.grad_accum"] == 1 and config["trainer.global_batch"] == 2  # resolved
    params, metrics, status = read_mlflow(tmp_path)
    assert params["data.kind"] == "files" and params["trainer.max_steps"] == "2"
    assert [step for step, _ in metrics["train/loss"]] == [1, 2] and status == "FINISHED"


def wandb_attempts(wandb_dir: Path) -> list[dict]:
    """Per offline W&B run file, in start order: its run id, exit code and whether it was marked
    preempting (each attempt of a resumed run writes a file of its own, with the same id)."""
    attempts = []
    for run_file in sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        found = {"run_id": None, "exit_code": None, "preempting": False, "steps": []}
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found["run_id"] = record.run.run_id
            elif kind == "exit":
                found["exit_code"] = record.exit.exit_code
            elif kind == "preempting":
                found["preempting"] = True
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                found["steps"].append(row["_step"])
        attempts.append(found)
    return attempts


def test_a_stopped_then_failed_run_closes_its_tracker_runs_and_resumes_the_same_ones(
    offline_trackers, compose_config, base_overrides, monkeypatch
):
    """A stop signal in the loop ends the W&B run as preempting with the requeue status and the
    MLflow run as KILLED; an error as exit code 1 / FAILED; each rerun continues the same runs,
    which end FINISHED with every step logged once."""
    import signal

    import engine.loop
    import engine.train
    from engine.runtime.preemption import PREEMPTED_EXIT_CODE, Preempted

    tmp_path = offline_trackers
    cfg = compose_config(
        [
            *base_overrides(tmp_path / "run", eval=True, steps=4),
            "trainer.report_to=[wandb,mlflow]",
            "trainer.tensorboard=false",
            "trainer.save_every=0",
            "trainer.resume=auto",
        ]
    )
    real_step, calls = engine.loop.train_step, []

    def stopped_at_step_two(parts, batch, diagnose=False):  # SIGTERM from "outside" at step 2
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return real_step(parts, batch, diagnose)

    monkeypatch.setattr(engine.loop, "train_step", stopped_at_step_two)
    with pytest.raises(Preempted, match="after step 2"):
        engine.train.train(cfg)
    _, _, status = read_mlflow(tmp_path)
    assert status == "KILLED"
    [stopped] = wandb_attempts(tmp_path / "wandb_dir")
    assert stopped["exit_code"] == PREEMPTED_EXIT_CODE and stopped["preempting"]

    monkeypatch.setattr(engine.loop, "train_step", real_step)

    def broken_export(*args, **kwargs):
        raise RuntimeError("the disk is full")

    real_export = engine.train._export
    monkeypatch.setattr(engine.train, "_export", broken_export)
    with pytest.raises(RuntimeError, match="the disk is full"):
        engine.train.train(cfg)
    _, _, status = read_mlflow(tmp_path)  # the same single run
    assert status == "FAILED"
    failed = wandb_attempts(tmp_path / "wandb_dir")[-1]
    assert failed["exit_code"] == 1 and not failed["preempting"]

    monkeypatch.setattr(engine.train, "_export", real_export)
    engine.train.train(cfg)
    _, metrics, status = read_mlflow(tmp_path)
    assert status == "FINISHED"
    assert [step for step, _ in metrics["train/loss"]] == [1, 2, 3, 4]  # each step once
    attempts = wandb_attempts(tmp_path / "wandb_dir")
    assert len(attempts) == 3 and len({a["run_id"] for a in attempts}) == 1
    assert attempts[-1]["exit_code"] == 0
    logged = [step for attempt in attempts for step in attempt["steps"]]
    assert sorted(set(logged)) == [1, 2, 3, 4]
