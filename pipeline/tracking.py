"""Everything MLflow: one experiment per study, a parent run per study, a child run per grid cell."""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import CellConfig, StudyConfig, cell_as_dict

# The study runs offline: MLflow's usage telemetry would only try, and fail, to reach the network.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_STORE = Path("mlflow.db")
ARTIFACT_ROOT = Path("mlartifacts")
ROLE_TAG = "vaebench.role"
STUDY_TAG = "vaebench.study"
CELL_TAG = "vaebench.cell"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a tracking server), else the SQLite store in the repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE.resolve()}"


def experiment_name(study: str) -> str:
    return f"vaebench-{study}"


def study_experiment(client: MlflowClient, study: str) -> str:
    name = experiment_name(study)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts beside it; a server decides its own artifact location.
    location = (ARTIFACT_ROOT / name).resolve().as_uri() if tracking_uri().startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def study_parent_run(client: MlflowClient, experiment_id: str, study: str) -> str:
    """The study's parent run, created on first use; every cell's run hangs under it."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'study'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=study, tags={ROLE_TAG: "study", STUDY_TAG: study, **source_tags()}
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def source_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"mlflow.source.git.commit": commit, "vaebench.git_commit": commit}


@contextmanager
def cell_run(config: StudyConfig, cell: CellConfig, stage: str, run_id: str | None = None):
    """An active MLflow run for one cell: `run_id` continues an earlier run, else a new child run starts.

    The run ends FINISHED when the block completes and FAILED (or KILLED) when it raises, never RUNNING.
    """
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = study_experiment(client, config.study)
    parent_id = study_parent_run(client, experiment_id, config.study)
    if run_id is not None and not _run_exists(client, run_id):
        run_id = None
    tags = {
        "mlflow.parentRunId": parent_id,
        ROLE_TAG: "cell",
        STUDY_TAG: config.study,
        CELL_TAG: cell.name,
        "vaebench.dvc_stage": stage,
        **source_tags(),
    }
    if run_id is None:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=cell.name, tags=tags)
    else:
        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags(tags)
    with run:
        yield run


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def log_cell_params(config: StudyConfig, cell: CellConfig) -> None:
    params = {f"cell.{key}": value for key, value in cell_as_dict(cell).items()}
    params |= {f"data.{key}": value for key, value in vars(config.data).items()}
    params |= {f"evaluate.{key}": value for key, value in vars(config.evaluate).items()}
    params |= {f"sample_quality.{key}": value for key, value in vars(config.sample_quality).items()}
    params["study"] = config.study
    mlflow.log_params(params)


def log_epoch(row: dict) -> None:
    mlflow.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])


def log_test_metrics(metrics: dict) -> None:
    mlflow.log_metrics({f"test_{key}": value for key, value in metrics.items()})


def log_model(model) -> None:
    import torch
    import mlflow.pytorch

    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its warning about pickle, a deliberate choice
    # Pickle rather than MLflow's default pt2 export, which traces forward() and needs an input example;
    # loading needs the `pipeline` package installed. Explicit requirements: inferring them is slow.
    mlflow.pytorch.log_model(
        model.cpu(),
        name="model",
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "vaebench"],
    )


def log_artifacts(folder: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def log_report(config: StudyConfig, folder: Path, cell_folders: dict[str, Path]) -> None:
    """The report's files on the study's parent run; each cell's figures on its own run (by run id)."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    parent_id = study_parent_run(client, study_experiment(client, config.study), config.study)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.log_artifact(parent_id, str(path), artifact_path="report")
    for run_id, cell_folder in cell_folders.items():
        if _run_exists(client, run_id):
            client.log_artifacts(run_id, str(cell_folder), artifact_path="figures")


def tune_parent_run(config: StudyConfig, tune_name: str, space: dict) -> str:
    """The tuning study's parent run in the study's experiment, created on first use; `tune_name` is the
    Optuna study name, which changes with the search space."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = study_experiment(client, config.study)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'tune' and tags.`vaebench.tune` = '{tune_name}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id, run_name=f"tune-{tune_name}", tags={ROLE_TAG: "tune", "vaebench.tune": tune_name, **source_tags()}
    )
    client.log_dict(run.info.run_id, space, "search_space.yaml")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def trial_run(config: StudyConfig, tune_name: str, number: int, parent_id: str):
    """A child run per Optuna trial: FINISHED when it completes or is pruned, FAILED when it raises."""
    import optuna

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = study_experiment(MlflowClient(), config.study)
    tags = {"mlflow.parentRunId": parent_id, ROLE_TAG: "trial", "vaebench.tune": tune_name, "optuna.trial": str(number)}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{tune_name}-trial-{number}", tags=tags)
    try:
        yield run
    except optuna.TrialPruned:
        mlflow.end_run("FINISHED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def fail_orphaned_trial_runs(config: StudyConfig, tune_name: str, numbers: list[int]) -> None:
    """Mark FAILED the MLflow runs of trials whose worker was killed (Optuna has marked those trials FAIL)."""
    if not numbers:
        return
    client = MlflowClient(tracking_uri())
    experiment_id = study_experiment(client, config.study)
    for number in numbers:
        for run in client.search_runs(
            [experiment_id],
            filter_string=f"tags.`vaebench.tune` = '{tune_name}' and tags.`optuna.trial` = '{number}' and attributes.status = 'RUNNING'",
        ):
            client.set_tag(run.info.run_id, "optuna.state", "FAIL")
            client.set_terminated(run.info.run_id, "FAILED")


def log_trial_params(sampled: dict, cell: dict) -> None:
    mlflow.log_params({f"cell.{key}": value for key, value in cell.items()})
    mlflow.set_tags({f"optuna.param.{key}": str(value) for key, value in sampled.items()})


def tag_trial_state(state: str, epoch: int, error: BaseException | None = None) -> None:
    tags = {"optuna.state": state, "optuna.last_epoch": str(epoch)}
    if error is not None:
        tags["optuna.error"] = f"{type(error).__name__}: {error}"[:5000]
    mlflow.set_tags(tags)


def log_objective(values: dict) -> None:
    mlflow.log_metrics({f"objective_{key}": value for key, value in values.items()})


def log_tune_results(parent_id: str, summary: dict, folder: Path, best_checkpoint: Path) -> None:
    """The best trial's params and model, and the tuning report, on the tuning parent run."""
    import torch

    from pipeline.config import parse_cell
    from pipeline.models import build_model

    client = MlflowClient(tracking_uri())
    best = summary["best"][0]
    # Tags, not params: a resumed study may find a better trial, and MLflow params cannot change.
    tags = {f"best.{key}": str(value) for key, value in best["params"].items()} | {"vaebench.best_trial": str(best["number"])}
    client.log_batch(
        parent_id,
        tags=[mlflow.entities.RunTag(key, value) for key, value in tags.items()],
        metrics=[mlflow.entities.Metric(f"best_{key}", value, 0, 0) for key, value in zip(summary["metrics"], best["values"])],
    )
    client.log_artifacts(parent_id, str(folder), artifact_path="tune")
    if best_checkpoint.is_file():
        saved = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
        cell = dict(saved["cell"])
        model = build_model(parse_cell(cell.pop("name"), cell, {}))
        model.load_state_dict(saved["state_dict"])
        with mlflow.start_run(run_id=parent_id):
            log_model(model)
