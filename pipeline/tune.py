"""Stage `tune`: search a cell's hyperparameters with Optuna, every trial an MLflow run.

The Optuna study lives in RDB storage (SQLite in the repository by default, any database URL with
--storage or VAEBENCH_OPTUNA_STORAGE), so it resumes after a crash and several workers, on one machine
or several, share it. Workers reserve trials under a lock, so the study ends with exactly `n_trials`
trials that completed or were pruned; a trial that raises is marked FAIL and replaced.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
import torch
import yaml
from filelock import FileLock

from pipeline import engine, tracking
from pipeline.config import PARAMS_FILE, StudyConfig, cell_as_dict, load_study
from pipeline.data import images_to_tensor, load_prepared
from pipeline.errors import VaebenchError
from pipeline.outputs import PREPARED_FILE, save_torch_file, staged_dir, write_json
from pipeline.tuning.search_space import TuneSpace, check_space_fits, load_space, make_pruner, make_sampler, with_values

log = logging.getLogger(__name__)
STORAGE_ENV = "VAEBENCH_OPTUNA_STORAGE"
DEFAULT_STORAGE = Path("optuna.db")
WORK_DIR = Path(".vaebench") / "tune"
REPORT_DIR = Path("reports") / "tune"
# Trials that count toward n_trials: finished or reserved by a running worker. A FAIL does not count (it is
# replaced), and queued WAITING trials count once a worker takes them.
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30


def storage_url(override: str | None = None) -> str:
    return override or os.environ.get(STORAGE_ENV) or f"sqlite:///{DEFAULT_STORAGE.resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a later worker marks the trial of a killed worker FAIL (and queues it
    again) instead of leaving it RUNNING forever."""
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )


@contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial):
    """Record the trial's heartbeat while it runs (Study.optimize does this itself; ask-and-tell does not)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            storage.record_heartbeat(trial._trial_id)

    storage.record_heartbeat(trial._trial_id)
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def study_name(space: TuneSpace) -> str:
    return f"{space.name}-{space.fingerprint}"


def trial_cell(config: StudyConfig, space: TuneSpace, trial: optuna.Trial):
    sampled = {param.name: param.suggest(trial) for param in space.params}
    return with_values(config.cell(space.base_cell), space.cell_values(sampled))


def run_trial(config: StudyConfig, space: TuneSpace, trial: optuna.Trial, data: dict, parent_id: str):
    """Train one sampled cell, reporting the validation objective after every epoch for pruning."""
    cell = trial_cell(config, space, trial)
    training = engine.start_training(cell, data["train"].device)
    with tracking.trial_run(config, study_name(space), trial.number, parent_id) as run:
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
        tracking.tag_trial_state("COMPLETE", epoch)
        values = tuple(row[metric] for metric in space.metrics)
        tracking.log_objective(dict(zip(space.metrics, values)))
        checkpoint = WORK_DIR / study_name(space) / f"trial-{trial.number}.pt"
        engine.finish_training(training, data["train"])
        save_torch_file({"cell": cell_as_dict(cell), "state_dict": training.model.state_dict(), "run_id": run.info.run_id}, checkpoint)
    return values if len(values) > 1 else values[0]


def worker(params_file: str, space_file: str, url: str, parent_id: str, index: int, threads: int) -> None:
    """Run trials until the study holds n_trials counted trials."""
    logging.basicConfig(level=logging.INFO, format="[vaebench] %(message)s")
    torch.set_num_threads(threads)
    config, space = load_study(params_file), load_space(space_file)
    storage = open_storage(url)
    # A different seed per worker and per resumption, so no two samplers replay the same sequence.
    existing = len(optuna.load_study(study_name=study_name(space), storage=storage).trials)
    sampler = make_sampler(space, seed_offset=1000 * index + existing)
    study = optuna.load_study(study_name=study_name(space), storage=storage, sampler=sampler, pruner=make_pruner(space))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]
    tracking.fail_orphaned_trial_runs(config, study_name(space), failed)
    device = engine.resolve_device(config.cell(space.base_cell).device)
    arrays = load_prepared(PREPARED_FILE)
    data = {"train": images_to_tensor(arrays["train_images"], device), "val": images_to_tensor(arrays["val_images"], device)}
    lock = FileLock(str(WORK_DIR / f"{study_name(space)}.lock"))
    while True:
        with lock:
            counted = len(study.get_trials(deepcopy=False, states=COUNTED))
            if counted >= space.n_trials:
                return
            failed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
            if failed >= space.n_trials:
                raise VaebenchError(
                    f"{failed} trials of {space.name} failed (see their errors in MLflow or optuna); fix the search space"
                )
            with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": heartbeat() below covers it
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask()
        try:
            with heartbeat(storage, trial):
                value = run_trial(config, space, trial, data, parent_id)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d pruned", trial.number)
            continue
        except Exception as error:  # a failing trial must not stop the study
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
            continue
        study.tell(trial, value)
        log.info("trial %d: %s = %s  %s", trial.number, space.objective, value, trial.params)


def tune(config: StudyConfig, space: TuneSpace, space_file: str, params_file: str = str(PARAMS_FILE),
         storage: str | None = None, workers: int | None = None) -> dict:
    workers = workers or space.workers
    url = storage_url(storage)
    tracking.check_store()
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    check_space_fits(space, config.cell(space.base_cell))  # fails now, not in a worker, when they do not fit
    optuna.create_study(study_name=study_name(space), storage=open_storage(url), directions=list(space.directions),
                        load_if_exists=True)
    parent_id = tracking.tune_parent_run(config, study_name(space), space.source)
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    log.info("tuning %s: %d trials in total, %d worker(s), storage %s", space.name, space.n_trials, workers, url)
    if workers == 1:
        worker(params_file, space_file, url, parent_id, 0, threads)
    else:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=worker, args=(params_file, space_file, url, parent_id, i, threads))
                     for i in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(process.exitcode != 0 for process in processes):
            raise VaebenchError(f"a tuning worker exited with an error; re-run to resume study {space.name}")
    study = optuna.load_study(study_name=study_name(space), storage=open_storage(url))
    return export_results(config, space, study, parent_id)


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
    study_file = {
        **yaml.safe_load(PARAMS_FILE.read_text() if PARAMS_FILE.is_file() else "{}"),
        "study": f"tune-{space.name}",
        "cells": {cell_name: {k: v for k, v in cell_as_dict(best_cell).items() if k != "name"}},
        "tune": {},
    }
    final = REPORT_DIR / space.name
    with staged_dir(final) as folder:
        write_json(folder / "summary.json", summary)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        (folder / "best_study.yaml").write_text(
            f"# The best trial of tuning study {space.name}, as a study the DVC pipeline trains:\n"
            f"#   vaebench use-study {final / 'best_study.yaml'} && dvc repro\n" + yaml.safe_dump(study_file, sort_keys=False)
        )
        plot_study(study, space, folder)
    tracking.log_tune_results(parent_id, summary, final, WORK_DIR / study.study_name / f"trial-{best[0].number}.pt")
    log.info("tuning %s: %s; best %s", space.name, summary["trials"], summary["best"][0])
    return summary
