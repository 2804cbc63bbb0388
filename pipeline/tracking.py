"""Everything MLflow: one experiment per study, a parent run per study, a child run per grid cell."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config import CellConfig, StudyConfig, cell_as_dict
from pipeline.errors import ArtifactError, Terminated, TrackingError
from pipeline.outputs import (
    load_torch_file,
    read_json,
    repository_root,
    restore_weights,
    save_torch_file,
    write_json,
)

log = logging.getLogger(__name__)

# The study runs offline: MLflow's usage telemetry would only try, and fail, to reach the network.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

HEALTH_TIMEOUT_SECONDS = 5
ROLE_TAG = "vaebench.role"
STUDY_TAG = "vaebench.study"
CELL_TAG = "vaebench.cell"
GROUP_TAG = "vaebench.group"  # the cell's group of seeds (set by the report, which reads every cell)
PARENT_TAG = "vaebench.parent_run"  # experiment tag: the study's parent run
PROCESS_TAG = "vaebench.process"  # host:pid:start time of the process a run is RUNNING in
ARTIFACTS_TAG = "vaebench.artifacts"  # "incomplete" on a run whose model did not upload whole
ENDED_TAG = "vaebench.ended"
PARENT_WAIT_SECONDS = 30


def local_store() -> Path:
    return repository_root() / "mlflow.db"


def artifact_root() -> Path:
    """Where a local store keeps its artifacts."""
    return repository_root() / "mlartifacts"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a tracking server), else the SQLite store in the repository."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_store()}"


def check_store() -> None:
    """Run at the start of every stage that logs, before any work: a tracking server that does not answer
    within a few seconds fails here with one line, not after the work and minutes of retries; so does a local
    store copied or moved with its checkout."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        # MLflow's own HTTP client (its TLS and credential settings), without its minutes of retries; any
        # HTTP response, an error status included, shows the server is there. An API call rather than /health,
        # which answers anyone: a server with a login (vaebench server --auth) refuses the API without it.
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            answer = http_request(
                get_default_host_creds(uri),
                "/api/2.0/mlflow/experiments/search",
                "GET",
                params={"max_results": 1},
                max_retries=0,
                timeout=HEALTH_TIMEOUT_SECONDS,
                raise_on_status=False,
            )
        except (MlflowException, OSError) as error:
            reason = str(error).split("\n")[0]
            if "Caused by" in reason:  # urllib3's chain: keep its innermost message
                reason = re.sub(r"[\"']\)+$", "", reason.rsplit(": ", 1)[-1])
            raise TrackingError(
                f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer ({reason}); start it, "
                "or unset MLFLOW_TRACKING_URI to log to the local mlflow.db"
            ) from None
        if answer.status_code in (401, 403):
            given = "were refused" if os.environ.get("MLFLOW_TRACKING_USERNAME") else "are not set"
            raise TrackingError(
                f"the MLflow tracking server {uri} asks for a login and MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD {given} (HTTP {answer.status_code}); set them to your account's (the "
                "server's admin login is in its checkout's .vaebench/server/credentials)"
            )
    elif not os.environ.get("MLFLOW_TRACKING_URI") and local_store().is_file():
        check_local_store_belongs_here()


def check_local_store_belongs_here() -> None:
    """MLflow records absolute artifact locations, so the mlflow.db of a copied (or moved) checkout names
    the original's mlartifacts/ folder, and logging would write there. MLflow's API cannot change an
    experiment's artifact location, so such a store is refused, with the ways out."""
    from sqlalchemy.exc import SQLAlchemyError

    here = artifact_root().as_uri()
    try:
        experiments = MlflowClient(tracking_uri()).search_experiments(
            view_type=ViewType.ALL, filter_string="name LIKE 'vaebench-%'"
        )
    except (MlflowException, SQLAlchemyError) as error:
        reason = str(error).split("\n")[0]
        raise TrackingError(
            f"{local_store()} is not a readable MLflow store ({reason}); move it aside to start a new one"
        ) from None
    for experiment in experiments:
        root = experiment.artifact_location.rsplit("/", 1)[0]
        if root.endswith(f"/{artifact_root().name}") and root != here:
            raise TrackingError(
                f"{local_store()} keeps its artifacts in {root} (experiment {experiment.name}), another checkout's "
                "folder: MLflow records absolute artifact locations, so this copy would log into that checkout. "
                f"Move this checkout's mlflow.db and {artifact_root().name}/ aside to start a store of its own, or "
                "log both checkouts to one tracking server (MLFLOW_TRACKING_URI)"
            )


def experiment_name(study: str) -> str:
    return f"vaebench-{study}"


def study_experiment(client: MlflowClient, study: str) -> str:
    """The study's experiment, created on first use together with the study's parent run."""
    name = experiment_name(study)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts beside it; a server decides its own artifact location.
    location = (artifact_root() / name).as_uri() if tracking_uri().startswith("sqlite:") else None
    try:
        experiment_id = client.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # another shard created it a moment ago
    # Only the process whose create_experiment succeeded (the store's unique name decides) creates the
    # parent, so shards starting together on several machines never make two.
    _create_parent_run(client, experiment_id, study)
    return experiment_id


def _create_parent_run(client: MlflowClient, experiment_id: str, study: str) -> str:
    """The study's parent run, named in the experiment's tag."""
    run = client.create_run(experiment_id, run_name=study, tags={ROLE_TAG: "study", STUDY_TAG: study, **source_tags()})
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_experiment_tag(experiment_id, PARENT_TAG, run.info.run_id)
    return run.info.run_id


def study_parent_run(client: MlflowClient, experiment_id: str, study: str) -> str:
    """The study's parent run, which every cell's run hangs under: the one named in the experiment's tag,
    else (its creator has not tagged it yet, or a store from before the tag) the first parent run, waiting
    a little for the process that is creating it."""
    deadline = time.monotonic() + PARENT_WAIT_SECONDS
    while time.monotonic() < deadline:
        parent = client.get_experiment(experiment_id).tags.get(PARENT_TAG)
        if parent:
            return parent
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        time.sleep(0.5)
    return _create_parent_run(client, experiment_id, study)  # its creator died before creating it


def ensure_study(config: StudyConfig) -> str:
    """The study's experiment and parent run, created now if missing; the parent's id."""
    client = MlflowClient(tracking_uri())
    return study_parent_run(client, study_experiment(client, config.study), config.study)


def source_tags() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"mlflow.source.git.commit": commit, "vaebench.git_commit": commit}


@contextmanager
def cell_run(
    config: StudyConfig, cell: CellConfig, stage: str, run_id: str | None = None, system_metrics: bool = False
):
    """An active MLflow run for one cell: `run_id` continues an earlier run, else a new child run starts.
    `system_metrics` samples CPU, memory (and GPU) use while the block runs.

    The run ends FINISHED when the block completes, KILLED when interrupted (Ctrl-C, SIGTERM) and FAILED
    when it raises, never RUNNING. Runs of the same cell left RUNNING by a killed process end KILLED.
    """
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = study_experiment(client, config.study)
    parent_id = study_parent_run(client, experiment_id, config.study)
    end_orphaned_runs(client, experiment_id, cell.name, keep=run_id)
    tags = {
        "mlflow.parentRunId": parent_id,
        ROLE_TAG: "cell",
        STUDY_TAG: config.study,
        CELL_TAG: cell.name,
        "vaebench.dvc_stage": stage,
        PROCESS_TAG: process_tag(),
        **source_tags(),
    }
    if run_id is None:
        run = mlflow.start_run(
            experiment_id=experiment_id, run_name=cell.name, tags=tags, log_system_metrics=system_metrics
        )
    else:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        mlflow.set_tags(tags)
    with ending(run):
        yield run


ended_runs: list[tuple[str, str]] = []  # (run id, status) of the runs this process ended, for its last words


@contextmanager
def ending(run, finished: tuple[type[BaseException], ...] = ()):
    """End the active run by how the block ends: FINISHED (also for the `finished` exceptions), KILLED
    when interrupted, FAILED when it raises."""
    try:
        yield run
    except finished:
        _end(run, "FINISHED")
        raise
    except (KeyboardInterrupt, Terminated):
        _end(run, "KILLED")
        raise
    except BaseException:
        _end(run, "FAILED")
        raise
    _end(run, "FINISHED")


def _end(run, status: str) -> None:
    mlflow.end_run(status)
    ended_runs.append((run.info.run_id, status))


def process_tag() -> str:
    """This process, as a later process on this host can tell whether it is still there (a pid alone may
    have been reused)."""
    import socket

    import psutil

    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"


def process_gone(tag: str) -> bool:
    """Whether the process a PROCESS_TAG names has ended; a process on another host is never judged gone."""
    import socket

    import psutil

    host, pid, started = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" != started
    except psutil.NoSuchProcess:
        return True


def end_abandoned_runs(study: str) -> list[str]:
    """End KILLED every run of the study still RUNNING whose process on this host is gone (killed, and its
    stage then restored by DVC from its cache, so never run again to end it). Returns their ids."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name(study))
    if experiment is None:
        return []
    ended = []
    for run in client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"):
        tag = run.data.tags.get(PROCESS_TAG)
        if tag and process_gone(tag):
            client.set_tag(run.info.run_id, ENDED_TAG, "left RUNNING by a process that is gone; ended by a later stage")
            client.set_terminated(run.info.run_id, "KILLED")
            log.info(
                "ended the MLflow run %s (%s) left RUNNING by a killed process", run.info.run_id, run.info.run_name
            )
            ended.append(run.info.run_id)
    return ended


def end_orphaned_runs(client: MlflowClient, experiment_id: str, cell: str, keep: str | None) -> None:
    """Runs of the cell still RUNNING were left by a killed process (its checkpoint was then discarded, or
    it died evaluating): end them KILLED, so that nothing stays RUNNING for good."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{CELL_TAG}` = '{cell}' and attributes.status = 'RUNNING'"
    )
    for run in found:
        if run.info.run_id != keep:
            client.set_tag(run.info.run_id, ENDED_TAG, "left RUNNING by a killed process; ended by a later run")
            client.set_terminated(run.info.run_id, "KILLED")
            log.info("%s: ended the MLflow run %s left RUNNING by a killed process", cell, run.info.run_id)


def run_exists(run_id: str) -> bool:
    mlflow.set_tracking_uri(tracking_uri())
    return _run_exists(MlflowClient(), run_id)


def recorded_run(run_file: Path, stage: str) -> str:
    """The id of the run a train stage recorded in `run_file`, after checking the tracking store has it."""
    if not run_file.is_file():
        raise ArtifactError(f"{run_file} is missing; train the cell first: dvc repro {stage}")
    try:
        run_id = read_json(run_file)["run_id"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{run_file} is not a run record; retrain the cell: dvc repro -f {stage}") from None
    local_store_gone = not os.environ.get("MLFLOW_TRACKING_URI") and not local_store().is_file()
    if local_store_gone or not run_exists(run_id):
        raise TrackingError(
            f"the MLflow run {run_id} recorded in {run_file} is not in the tracking store {tracking_uri()} "
            f"(deleted, or logged to another store); point MLFLOW_TRACKING_URI at that store, or retrain: dvc repro "
            f"-f {stage}"
        )
    return run_id


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def log_cell_params(config: StudyConfig, cell: CellConfig, prepared: dict) -> None:
    """The cell's settings and the prepared data's split (from the prepare stage's summary)."""
    params = {f"cell.{key}": value for key, value in cell_as_dict(cell).items()}
    params |= {f"data.{split}_size": count for split, count in prepared["images"].items()}
    params["data.split_seed"] = prepared["split_seed"]
    params["data.binarize"] = prepared.get("binarize", "none")
    params["study"] = config.study
    params["threads"] = config.threads  # the CPU threads it computed with: part of what makes its numbers
    mlflow.log_params(params)


def log_settings(settings: dict[str, object]) -> None:
    """Params of the active run. MLflow params cannot change: a value that differs from the one logged
    before (the cell evaluated again with other settings) goes to a tag `current.<param>` instead."""
    client = MlflowClient()
    run = client.get_run(mlflow.active_run().info.run_id)
    logged = run.data.params
    mlflow.log_params({key: value for key, value in settings.items() if key not in logged})
    for key, value in settings.items():
        if key in logged and logged[key] != str(value):
            mlflow.set_tag(f"current.{key}", str(value))
        elif f"current.{key}" in run.data.tags:  # evaluated again with the value first logged
            client.delete_tag(run.info.run_id, f"current.{key}")


def prepared_dataset(prepared: dict, source: Path):
    """The prepared MNIST splits as an MLflow dataset: named by their sizes, with a digest of the raw files'
    checksums, the split sizes and seed, and the binarization (the same digest means the same images in the same
    splits)."""
    import hashlib
    import json

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    sizes = prepared["images"]
    digest = hashlib.sha256(json.dumps(prepared, sort_keys=True).encode()).hexdigest()[:16]
    name = f"mnist-{sizes['train']}-{sizes['val']}-{sizes['test']}"
    if prepared.get("binarize") == "dynamic":
        name += "-binarized"
    return MetaDataset(LocalArtifactDatasetSource(str(source.resolve())), name=name, digest=digest)


DATASET_RACE = ("dataset_pk", "UNIQUE constraint failed: datasets")  # PostgreSQL's and SQLite's words


def log_dataset(dataset, context: str) -> None:
    """mlflow.log_input. Two machines logging the same data set to one server at the same moment both insert
    it, and the server refuses the second with a unique-key violation; logging again links the one that now
    exists."""
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        if not any(words in str(error) for words in DATASET_RACE):
            raise
        log.info("the data set %s was logged by another process at the same moment; linking it", dataset.name)
        mlflow.log_input(dataset, context=context)


def log_epoch(row: dict) -> None:
    mlflow.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])


def log_test_metrics(metrics: dict, dataset=None) -> None:
    """On the active run, and linked to the run's logged decoder model (MLflow's logged-model metrics)."""
    model_id = logged_model_id(mlflow.active_run().info.run_id, "decoder")
    mlflow.log_metrics({f"test_{key}": value for key, value in metrics.items()}, model_id=model_id, dataset=dataset)


def log_stage_seconds(stage: str, seconds: dict[str, float]) -> None:
    """A stage's wall time by part, as metrics `seconds_<stage>_<part>` of the active run only (not of the
    models it logged, as mlflow.log_metrics would make them)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        mlflow.active_run().info.run_id,
        metrics=[Metric(f"seconds_{stage}_{part}", value, now, 0) for part, value in seconds.items()],
    )


def logged_model_id(run_id: str, name: str) -> str | None:
    """The latest model named `name` that the run logged (a cell trained again logs it again)."""
    run = MlflowClient().get_run(run_id)
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    return found[0].model_id if found else None


MODEL_ARTIFACT = "model"
WEIGHTS_FILE = "state_dict.pt"
CELL_FILE = "cell.json"


def log_model(model, cell: CellConfig) -> None:
    """The model as run artifacts under model/: its weights (a state dict of tensors) and its cell. Not a
    pickle of the module: loading one (load_logged_model) reads tensors only and runs no code from the file."""

    with tempfile.TemporaryDirectory() as scratch, incomplete_if_failing():
        folder = Path(scratch)
        save_torch_file({key: value.cpu() for key, value in model.state_dict().items()}, folder / WEIGHTS_FILE)
        write_json(folder / CELL_FILE, cell_as_dict(cell))
        mlflow.log_artifacts(str(folder), artifact_path=MODEL_ARTIFACT)


@contextmanager
def incomplete_if_failing():
    """Tag the active run's artifacts incomplete when the block fails (a full disk, a server gone mid-upload):
    the run then ends FAILED, and load_logged_model refuses it."""
    try:
        yield
    except BaseException:
        try:
            mlflow.set_tag(ARTIFACTS_TAG, "incomplete")
        except Exception:  # the store itself may be what failed; the run still ends FAILED
            log.warning("could not tag the run's artifacts incomplete")
        raise


def log_networks(model, cell: CellConfig) -> None:
    """The decoder (z to images) and, where the family has one, the encoder (images to codes) as MLflow
    PyTorch models: exported with torch.export (MLflow's pt2 format, no pickle), with a signature and an
    input example, needing torch alone (`mlflow.pytorch.load_model(uri)` works without this package)."""
    from importlib.metadata import version

    import torch
    from mlflow.models import infer_signature

    from pipeline.models.serving import serving_networks

    requirements = [f"torch=={version('torch')}"]
    for name, (network, example) in serving_networks(model).items():
        with torch.no_grad(), incomplete_if_failing():
            output = network(example)
        mlflow.pytorch.log_model(
            network,
            name=name,
            serialization_format="pt2",
            input_example=example.numpy(),
            signature=infer_signature(example.numpy(), output.numpy()),
            pip_requirements=requirements,
            tags={CELL_TAG: cell.name},
        )


def load_logged_model(run_id: str, device: str = "cpu"):
    """The model a run logged with log_model, rebuilt by this package's code from its cell and weights."""
    from pipeline.config import parse_cell
    from pipeline.models import build_model

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"no MLflow run {run_id} in {tracking_uri()}; check the run id and MLFLOW_TRACKING_URI"
        ) from None
    if run.data.tags.get(ARTIFACTS_TAG) == "incomplete" or run.info.status != "FINISHED":
        raise ArtifactError(
            f"the MLflow run {run_id} ended {run.info.status} and its model is not whole; use a run that finished, "
            "or train the cell again"
        )
    with tempfile.TemporaryDirectory() as scratch:
        try:
            folder = Path(client.download_artifacts(run_id, MODEL_ARTIFACT, scratch))
        except (MlflowException, OSError):
            raise ArtifactError(
                f"the MLflow run {run_id} holds no model ({MODEL_ARTIFACT}/ is missing from its artifacts); use a run "
                "of a train stage, or train the cell again"
            ) from None
        try:
            cell = dict(read_json(folder / CELL_FILE))
        except (OSError, ValueError):
            raise ArtifactError(
                f"the model of MLflow run {run_id} has no readable {CELL_FILE}; train the cell again"
            ) from None
        cell.pop("init_from", None)  # what a fine-tuned model started from does not change its network
        cell["device"] = "cpu"  # where it trained does not matter here
        model = build_model(parse_cell(cell.pop("name"), cell, {}))
        weights = folder / WEIGHTS_FILE
        stage = f"train@<the cell of run {run_id}>"
        restore_weights(model, load_torch_file(weights, stage, device), weights, "train")
    return model.to(device).eval()


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
        else:
            log.warning(
                "report: the MLflow run %s of %s is not in the tracking store; its figures are only in %s",
                run_id,
                cell_folder.name,
                cell_folder,
            )


def registered_model_name(study: str) -> str:
    return f"vaebench-{study}-decoder"


def log_study_results(
    config: StudyConfig, best: list[tuple[str, str, str, float]], run_ids: dict[str, str], groups: dict[str, str]
) -> None:
    """The study's numbers on its parent run (how many cells are evaluated, each headline metric's best value
    and, as a tag, its cell), with its end time set now so that the UI's duration spans the study; each
    evaluated cell's group of seeds as a tag of its run (the UI's group-by on it averages the seeds). The best
    cell's decoder on each headline metric is registered under vaebench-<study>-decoder with the alias
    best-<metric>, which moves when another cell becomes the best. `best`: (metric, alias, cell, value) rows;
    `run_ids` and `groups` by evaluated cell."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    parent_id = study_parent_run(client, study_experiment(client, config.study), config.study)
    # log_report warned of the cells whose run is not in the store
    runs = {cell: run_id for cell, run_id in run_ids.items() if _run_exists(client, run_id)}
    for cell, run_id in runs.items():
        client.set_tag(run_id, GROUP_TAG, groups[cell])
    now = int(time.time() * 1000)
    metrics = {"cells_evaluated": float(len(run_ids))} | {f"best_{metric}": value for metric, _, _, value in best}
    client.log_batch(
        parent_id,
        metrics=[mlflow.entities.Metric(key, value, now, 0) for key, value in metrics.items()],
        tags=[mlflow.entities.RunTag(f"vaebench.best_{metric}", cell) for metric, _, cell, _ in best],
    )
    for _, alias, cell, _ in best:
        if cell in runs:
            register_best(client, registered_model_name(config.study), alias, runs[cell], cell)
    client.set_terminated(parent_id, "FINISHED", end_time=now)


def register_best(client: MlflowClient, name: str, alias: str, run_id: str, cell: str) -> None:
    """Point `alias` at the cell's logged decoder, registering it as a new version the first time."""
    model_id = logged_model_id(run_id, "decoder")
    if model_id is None:
        log.warning(
            "report: the run %s of %s logged no decoder model; the alias %s of %s is left as it is",
            run_id,
            cell,
            alias,
            name,
        )
        return
    source = f"models:/{model_id}"
    version = next((v for v in client.search_model_versions(f"name = '{name}'") if v.source == source), None)
    if version is None:
        version = mlflow.register_model(source, name, tags={CELL_TAG: cell})
    client.set_registered_model_alias(name, alias, version.version)
    log.info("report: %s@%s is version %s (%s)", name, alias, version.version, cell)


def tune_parent_run(config: StudyConfig, tune_name: str, space: dict) -> str:
    """The tuning study's parent run in the study's experiment, created on first use; `tune_name` is the
    Optuna study name, which changes with the search space."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment_id = study_experiment(client, config.study)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'tune' and tags.`vaebench.tune` = '{tune_name}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=f"tune-{tune_name}",
        tags={ROLE_TAG: "tune", "vaebench.tune": tune_name, **source_tags()},
    )
    client.log_dict(run.info.run_id, space, "search_space.yaml")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextmanager
def trial_run(config: StudyConfig, tune_name: str, number: int, parent_id: str):
    """A child run per Optuna trial: FINISHED when it completes or is pruned, KILLED when interrupted, FAILED
    when it raises."""
    import optuna

    mlflow.set_tracking_uri(tracking_uri())
    experiment_id = study_experiment(MlflowClient(), config.study)
    tags = {
        "mlflow.parentRunId": parent_id,
        ROLE_TAG: "trial",
        "vaebench.tune": tune_name,
        "optuna.trial": str(number),
        PROCESS_TAG: process_tag(),
    }
    run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{tune_name}-trial-{number}", tags=tags)
    with ending(run, finished=(optuna.TrialPruned,)):
        yield run


def end_killed_trial_run(run_id: str) -> None:
    """The MLflow run of a trial whose worker was killed (Optuna has marked the trial FAIL) ends FAILED; one
    killed after its run ended but before Optuna heard of it keeps its status and is tagged FAIL too."""
    client = MlflowClient(tracking_uri())
    if not _run_exists(client, run_id):
        return
    client.set_tag(run_id, "optuna.state", "FAIL")
    client.set_tag(run_id, ENDED_TAG, "its worker stopped sending heartbeats; Optuna marked the trial FAIL")
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FAILED")


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


def log_tune_results(parent_id: str, summary: dict, folder: Path, best_run_id: str | None, step: int) -> None:
    """The best trial's params, values and model (copied from its trial run), and the tuning report, on the
    tuning parent run. A resumed study may find a better trial: the best_* metrics get a new step (the
    number of trials so far), and the tags and the model are replaced."""
    client = MlflowClient(tracking_uri())
    best = summary["best"][0]
    # Tags, not params: MLflow params cannot change.
    tags = {f"best.{key}": str(value) for key, value in best["params"].items()}
    tags |= {"vaebench.best_trial": str(best["number"]), "vaebench.best_run": best_run_id or ""}
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        tags=[mlflow.entities.RunTag(key, value) for key, value in tags.items()],
        metrics=[
            mlflow.entities.Metric(f"best_{key}", value, now, step)
            for key, value in zip(summary["metrics"], best["values"])
        ],
    )
    client.log_artifacts(parent_id, str(folder), artifact_path="tune")
    if best_run_id and _run_exists(client, best_run_id):
        with tempfile.TemporaryDirectory() as scratch:
            model = client.download_artifacts(best_run_id, MODEL_ARTIFACT, scratch)
            client.log_artifacts(parent_id, model, artifact_path=MODEL_ARTIFACT)
    else:
        log.warning(
            "the best trial's MLflow run %s is not in the tracking store; its model is not on the tuning run",
            best_run_id,
        )
