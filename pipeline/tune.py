"""Stage `tune`: search a cell's hyperparameters with Optuna, every trial an MLflow run.

The Optuna study lives in RDB storage (SQLite in the repository by default; any database URL, such as a
shared PostgreSQL, with --storage or VAEBENCH_OPTUNA_STORAGE), so it resumes after a crash, and workers
on one machine or several share it. Each worker runs Optuna's own loop (`study.optimize`) until the study
holds `n_trials` trials that completed or were pruned; a trial that raises is marked FAIL and does not
count. A running trial records heartbeats: the trial of a killed worker is marked FAIL once its heartbeat
is older than the grace period, and queued again with the same parameters. Workers that start trials at
the same moment can overshoot `n_trials` by at most workers - 1.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
import time
import warnings
from functools import partial
from pathlib import Path

import optuna
import yaml
from mlflow.exceptions import MlflowException
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from pipeline import engine, tracking
from pipeline.config import PARAMS_FILE, StudyConfig, cell_as_dict, load_study
from pipeline.data import images_to_tensor, load_prepared
from pipeline.errors import TrackingError, VaebenchError
from pipeline.memory import check_memory
from pipeline.outputs import repository_root, staged_dir, write_json
from pipeline.paths import PREPARED_FILE
from pipeline.stage_params import TUNE_PARAMS, check_unchanged
from pipeline.tuning.search_space import TuneSpace, check_space_fits, load_space, make_pruner, make_sampler, with_values

log = logging.getLogger(__name__)
STORAGE_ENV = "VAEBENCH_OPTUNA_STORAGE"
REPORT_DIR = Path("reports") / "tune"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials n_trials asks for; a FAIL is replaced
RUN_ID_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # host:pid of the worker that runs the trial
PARENT_ATTR = "mlflow_parent_run"  # study user attribute: the tuning parent run
PARENT_WAIT_SECONDS = 30


def storage_url(override: str | None = None) -> str:
    return override or os.environ.get(STORAGE_ENV) or f"sqlite:///{repository_root() / 'optuna.db'}"


def open_storage(url: str, space: TuneSpace) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a worker marks the trial of a killed worker FAIL, ends its MLflow run
    FAILED and queues the same parameters again."""
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=space.heartbeat_interval,
                grace_period=space.grace_period,
                heartbeat_stale_trial_callback=retry_stale_trial,
                engine_kwargs={"connect_args": {"timeout": 60}}
                if url.startswith("sqlite")
                else {"pool_pre_ping": True},
            )
        except Exception as error:  # SQLAlchemy's errors for a database that is not there or refuses us
            if type(error).__module__.startswith(("sqlalchemy", "psycopg")):
                reason = str(error).strip().splitlines()[0]
                raise TrackingError(
                    f"the Optuna storage {url} cannot be opened ({reason}); start the database or fix "
                    f"--storage / {STORAGE_ENV}"
                ) from None
            raise


def retry_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The trial's worker died (Optuna has marked it FAIL): the same parameters run again, and its MLflow
    run ends FAILED."""
    optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, trial)
    log.warning("trial %d: its worker stopped sending heartbeats; marked FAIL and queued again", trial.number)
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        try:
            tracking.end_killed_trial_run(run_id)
        except (MlflowException, OSError) as error:
            log.warning("trial %d: could not end its MLflow run %s (%s)", trial.number, run_id, error)


class TrialFailed(Exception):
    """A trial's own error (a diverging or invalid sampled cell): the trial is FAIL and the study goes on.
    An error of the tracking store is not one: it stops the worker."""


def study_name(space: TuneSpace) -> str:
    return f"{space.name}-{space.fingerprint}"


def trial_cell(config: StudyConfig, space: TuneSpace, trial: optuna.Trial):
    sampled = {param.name: param.suggest(trial) for param in space.params}
    return with_values(config.cell(space.base_cell), space.cell_values(sampled))


def run_trial(config: StudyConfig, space: TuneSpace, data: dict, parent_id: str, trial: optuna.Trial):
    """The objective: train one sampled cell, reporting the validation objective after every epoch for
    pruning; the trained model is logged on the trial's MLflow run, where any machine can fetch it."""
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")  # also: the trial has started
    try:
        return train_trial(config, space, data, parent_id, trial)
    except (optuna.TrialPruned, MlflowException, TrackingError):
        raise
    except Exception as error:
        trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:5000])
        raise TrialFailed(f"{type(error).__name__}: {error}") from error


def train_trial(config: StudyConfig, space: TuneSpace, data: dict, parent_id: str, trial: optuna.Trial):
    cell = trial_cell(config, space, trial)
    check_memory(cell, len(data["train"]), data["train"].device, val_images=len(data["val"]))
    training = engine.start_training(cell, data["train"].device, binarize=data["binarize"])
    with tracking.trial_run(config, study_name(space), trial.number, parent_id) as run:
        trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
        tracking.log_trial_params(trial.params, cell_as_dict(cell))
        epoch = 0
        try:
            for row in engine.epochs(training, data["train"], data["val"]):
                epoch = row["epoch"]
                tracking.log_epoch(row)
                if len(space.metrics) == 1:
                    trial.report(row[space.metrics[0]], epoch)
                    if trial.should_prune():
                        tracking.tag_trial_state("PRUNED", epoch)
                        raise optuna.TrialPruned(f"pruned after epoch {epoch}")
        except optuna.TrialPruned:
            raise
        except Exception as error:
            tracking.tag_trial_state("FAIL", epoch, error)
            raise
        engine.finish_training(training, data["train"])
        tracking.log_model(training.model, cell)
        tracking.tag_trial_state("COMPLETE", epoch)
        values = tuple(row[metric] for metric in space.metrics)
        tracking.log_objective(dict(zip(space.metrics, values)))
    return values if len(values) > 1 else values[0]


class StopAfterFailures:
    """Stop this worker's loop once as many of its trials failed as were asked for: the search space, not
    chance, is wrong. Failures of earlier runs and of killed workers do not count."""

    def __init__(self, limit: int):
        self.limit = limit
        self.failed = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and "error" in trial.user_attrs:
            self.failed += 1
        if self.failed >= self.limit:
            study.stop()


def counts(study: optuna.Study) -> dict[TrialState, int]:
    states = [trial.state for trial in study.get_trials(deepcopy=False)]
    return {state: states.count(state) for state in TrialState}


def worker(params_file: str, space_file: str, url: str, parent_id: str, index: int) -> None:
    """Run trials with Optuna's loop until the study holds n_trials counted trials, then wait for the
    trials still running (on other workers, or left by a killed one, which fail after the grace period and
    are queued again for this loop)."""
    logging.basicConfig(level=logging.INFO, format="[vaebench] %(message)s")
    config, space = load_study(params_file), load_space(space_file)
    engine.set_threads(config.threads)  # each trial computes as a train stage does, so its numbers match one
    storage = open_storage(url, space)
    # A different seed per worker and per resumption, so no two samplers replay the same sequence.
    existing = len(optuna.load_study(study_name=study_name(space), storage=storage).trials)
    study = optuna.load_study(
        study_name=study_name(space),
        storage=storage,
        pruner=make_pruner(space),
        sampler=make_sampler(space, seed_offset=1000 * index + existing),
    )
    device = engine.resolve_device(config.cell(space.base_cell).device)
    arrays = load_prepared(PREPARED_FILE)
    data = {
        "train": images_to_tensor(arrays["train_images"], device),
        "val": images_to_tensor(arrays["val_images"], device),
        "binarize": config.data.binarize == "dynamic",
    }
    objective = partial(run_trial, config, space, data, parent_id)
    failures = StopAfterFailures(space.n_trials)
    callbacks = [MaxTrialsCallback(space.n_trials, states=COUNTED), failures]
    while True:
        found = counts(study)
        if found[TrialState.COMPLETE] + found[TrialState.PRUNED] < space.n_trials or found[TrialState.WAITING]:
            study.optimize(objective, callbacks=callbacks, catch=(TrialFailed,), gc_after_trial=False)
            if failures.failed >= space.n_trials:
                raise VaebenchError(
                    f"{failures.failed} trials of {space.name} failed here (their errors are in MLflow "
                    "and in the Optuna trials' user attribute 'error'); fix the search space"
                )
        elif found[TrialState.RUNNING]:
            wait_for_running(study, space, found[TrialState.RUNNING])
        else:
            return


def wait_for_running(study: optuna.Study, space: TuneSpace, running: int) -> None:
    """Wait one heartbeat interval for trials running elsewhere; fail those of killed workers (no heartbeat
    for the grace period, or killed before their first one) and queue them again."""
    log.info(
        "waiting for %d running trial(s): another worker's, or a killed worker's, failed after %d s without a "
        "heartbeat",
        running,
        space.grace_period,
    )
    time.sleep(space.heartbeat_interval)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    # Optuna judges only trials with a heartbeat; a worker killed between taking a trial and starting it
    # (the objective's first line sets WORKER_ATTR) leaves one without.
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=space.grace_period)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR not in trial.user_attrs and trial.datetime_start is not None and trial.datetime_start < cutoff:
            study.tell(trial.number, state=TrialState.FAIL)
            retry_stale_trial(study, study.get_trials(deepcopy=False)[trial.number])


def tune(
    config: StudyConfig,
    space: TuneSpace,
    space_file: str,
    params_file: str = str(PARAMS_FILE),
    storage: str | None = None,
    workers: int | None = None,
) -> dict:
    workers = workers or space.workers
    url = storage_url(storage)
    check_space_fits(space, config.cell(space.base_cell))  # every check before a study or a run exists
    tracking.check_store()
    parent_id = tune_parent_run(config, space, open_storage(url, space))
    cores = len(os.sched_getaffinity(0))
    if workers * config.threads > cores:
        log.warning(
            "%d workers x %d threads (the study's threads) exceed this machine's %d cores: trials will share them",
            workers,
            config.threads,
            cores,
        )
    log.info("tuning %s: %d trials in total, %d worker(s), storage %s", space.name, space.n_trials, workers, url)
    if workers == 1:
        worker(params_file, space_file, url, parent_id, 0)
    else:
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=worker, args=(params_file, space_file, url, parent_id, i)) for i in range(workers)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(process.exitcode != 0 for process in processes):
            raise VaebenchError(f"a tuning worker exited with an error; re-run to resume study {space.name}")
    study = optuna.load_study(study_name=study_name(space), storage=open_storage(url, space))
    return export_results(config, space, study, parent_id)


def tune_parent_run(config: StudyConfig, space: TuneSpace, storage: optuna.storages.RDBStorage) -> str:
    """The tuning study's MLflow parent run, named in the Optuna study's user attributes. Only the worker
    whose create_study succeeds (the storage's unique study name decides) creates it, so workers that start
    together on several machines never make two."""
    try:
        study = optuna.create_study(study_name=study_name(space), storage=storage, directions=list(space.directions))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name(space), storage=storage)
        # Its creator sets the attribute before any trial starts: wait while the study has none.
        deadline = time.monotonic() + PARENT_WAIT_SECONDS
        while PARENT_ATTR not in study.user_attrs and not study.trials and time.monotonic() < deadline:
            time.sleep(0.5)
        if PARENT_ATTR in study.user_attrs:
            return study.user_attrs[PARENT_ATTR]
    # This worker created the study; or the study predates the attribute, or its creator died: find or
    # create the run by its tags.
    parent_id = tracking.tune_parent_run(config, study_name(space), space.source)
    study.set_user_attr(PARENT_ATTR, parent_id)
    return parent_id


def export_results(config: StudyConfig, space: TuneSpace, study: optuna.Study, parent_id: str) -> dict:
    from pipeline.tuning.plots import best_trials, plot_study

    states = [trial.state.name for trial in study.trials]
    best = best_trials(study)
    summary = {
        "study": study.study_name,
        "objective": space.objective,
        "metrics": list(space.metrics),
        "directions": list(space.directions),
        "trials": {state: states.count(state) for state in sorted(set(states))},
        "best": [{"number": t.number, "values": t.values, "params": t.params} for t in best],
    }
    best_cell = with_values(config.cell(space.base_cell), space.cell_values(best[0].params))
    cell_name = f"{space.name}-best"
    # The study's other sections as they are (the tune stage declares each in dvc.yaml); its cells replaced
    # by the best one, so no fine-tuned cell is left naming a cell that is not there.
    study_file = {
        **config.raw,
        "study": f"tune-{space.name}",
        "cells": {cell_name: {k: v for k, v in cell_as_dict(best_cell).items() if k != "name"}},
        "finetuned": {},
        "tune": {},
    }
    final = REPORT_DIR / space.name
    with staged_dir(final) as folder:
        write_json(folder / "summary.json", summary)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        (folder / "best_study.yaml").write_text(
            f"# The best trial of tuning study {space.name}, as a study the DVC pipeline trains:\n"
            f"#   vaebench use-study {final / 'best_study.yaml'} && dvc repro\n"
            + yaml.safe_dump(study_file, sort_keys=False)
        )
        plot_study(study, space, folder)
        check_unchanged(config, TUNE_PARAMS, f"tune@{space.name}")
    tracking.log_tune_results(parent_id, summary, final, best[0].user_attrs.get(RUN_ID_ATTR), len(study.trials))
    log.info("tuning %s: %s; best %s", space.name, summary["trials"], summary["best"][0])
    return summary
