import json
import subprocess
import sys
import time
from contextlib import nullcontext

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import REPO
from pipeline.config import ConfigError
from pipeline.tune import open_storage, storage_url, study_name, tune
from pipeline.tuning.search_space import check_space_fits, load_space, parse_space

TINY_SPACE = REPO / "studies" / "tune" / "tiny.yaml"


def space_raw(**changes):
    raw = yaml.safe_load(TINY_SPACE.read_text())
    raw.update(changes)
    return raw


def write_space(folder, **changes):
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space_raw(**changes)))
    return path


def trials(space):
    return new_or_existing_study(space).get_trials(deepcopy=False)


def new_or_existing_study(space):
    return optuna.create_study(
        study_name=study_name(space),
        storage=open_storage(storage_url(), space),
        directions=list(space.directions),
        load_if_exists=True,
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"space": {"width": {"type": "int", "low": 1, "high": 2}}}, "unknown parameter 'width'"),
        ({"space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "low (0.1) must not exceed high (0.01)"),
        ({"space": {"lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}}}, "a log scale needs low > 0"),
        ({"sampler": {"name": "cmaes"}}, "unknown sampler 'cmaes'"),
        ({"pruner": {"name": "patient"}}, "unknown pruner 'patient'"),
        ({"space": {"batch_size": {"type": "categorical", "choices": []}}}, "needs a non-empty list of choices"),
        ({"objective": "fid"}, "unknown objective 'fid'"),
        ({"objective": "rate_distortion"}, "cannot prune multi-objective studies"),
        (
            {"space": {"latent_dim": {"type": "int", "low": 0.5, "high": 4, "log": True}}},
            "int parameters need integer low and high",
        ),
        (
            {"space": {"latent_dim": {"type": "int", "low": 2, "high": 8, "step": 0}}},
            "step must be an integer > 0, got 0",
        ),
        (
            {"space": {"lr": {"type": "float", "low": 0.1, "high": 0.2, "stp": 0.1}}},
            "a float parameter takes high, log, low, step, type, not stp",
        ),
        ({"sampler": "tpe"}, "sampler must be a mapping such as {name: tpe, seed: 0}, got 'tpe'"),
        ({"sampler": {"name": "tpe", "sed": 1}}, "sampler takes name and seed only, got 'sed'"),
        (
            {"pruner": {"name": "median", "patience": 3}},
            "unknown option 'patience' of pruner median; it takes n_startup_trials",
        ),
        (
            {"pruner": {"name": "median", "n_startup_trials": -1}},
            "pruner median: Number of startup trials cannot be negative",
        ),
        ({"fixed": {"epochs": 2, "lr": 0.1}}, "lr is both fixed and searched"),
        ({"heartbeat": {"interval": 10, "grace": 5}}, "heartbeat.grace (5 s) must exceed heartbeat.interval (10 s)"),
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ],
)
def test_bad_search_spaces_fail_with_one_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(space_raw(**changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fixed": {"epochs": 0}}, "the fixed values do not make a valid cell"),
        (
            {"space": {"latent_dim": {"type": "int", "low": 0, "high": 4}}},
            "latent_dim = 0 is in the space but not a valid cell",
        ),
        (
            {"space": {"batch_size": {"type": "categorical", "choices": [64, -1]}}},
            "batch_size = -1 is in the space but not a valid cell",
        ),
    ],
)
def test_values_no_cell_accepts_fail_before_any_trial(tiny_study, changes, message):
    with pytest.raises(ConfigError, match=message):
        check_space_fits(parse_space(space_raw(**changes)), tiny_study.cell("linear-z2-b1-s0"))


def test_family_settings_are_tunable_on_a_cell_of_that_family_only(tiny_study):
    dae_space = parse_space(
        space_raw(
            base_cell="dae-linear-z2-s0",
            objective="val_loss",
            space={"mask_prob": {"type": "float", "low": 0.1, "high": 0.5}},
        )
    )
    check_space_fits(dae_space, tiny_study.cell("dae-linear-z2-s0"))
    with pytest.raises(ConfigError, match="mask_prob is not a setting of family vae"):
        check_space_fits(dae_space, tiny_study.cell("linear-z2-b1-s0"))
    with pytest.raises(ConfigError, match="objective val_elbo needs a KL term, which family ae"):
        check_space_fits(parse_space(space_raw(base_cell="ae-linear-z2-s0")), tiny_study.cell("ae-linear-z2-s0"))
    gan_space = parse_space(space_raw(base_cell="gan-conv-z2-s0", objective="val_loss"))
    with pytest.raises(ConfigError, match="base cell gan-conv-z2-s0 is a gan cell, whose losses are a two-player game"):
        check_space_fits(gan_space, tiny_study.cell("gan-conv-z2-s0"))


def test_a_dae_switching_its_noise_kind_keeps_only_the_level_that_kind_reads(tiny_study):
    from pipeline.tuning.search_space import with_values

    masked = tiny_study.cell("dae-linear-z2-s0")  # noise: mask, mask_prob: 0.25
    gaussian = with_values(masked, {"noise": "gaussian"})
    assert (gaussian.settings.noise, gaussian.settings.noise_std, gaussian.settings.mask_prob) == (
        "gaussian",
        0.5,
        None,
    )
    assert with_values(gaussian, {"noise": "mask", "mask_prob": 0.4}).settings.mask_prob == 0.4
    assert with_values(masked, {"lr": 0.01}).settings == masked.settings


@pytest.mark.slow
def test_a_family_setting_is_searched_and_lands_in_the_best_cell(prepared, workdir):
    path = write_space(
        workdir,
        n_trials=2,
        base_cell="cae-conv-z2-s0",
        objective="val_loss",
        pruner={"name": "none"},
        space={"contraction_weight": {"type": "float", "low": 0.01, "high": 1.0, "log": True}},
    )
    summary = tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    best_cell = yaml.safe_load((workdir / "reports" / "tune" / "tiny" / "best_study.yaml").read_text())["cells"][
        "tiny-best"
    ]
    assert best_cell["family"] == "cae"
    assert best_cell["contraction_weight"] == summary["best"][0]["params"]["contraction_weight"]


@pytest.mark.parametrize(
    "changes, options, message",
    [
        ({"space": {"lr": {"type": "float", "low": -1, "high": 1, "log": True}}}, [], "a log scale needs low > 0"),
        ({"pruner": {"name": "median", "patience": 3}}, [], "unknown option 'patience' of pruner median"),
        (
            {"space": {"latent_dim": {"type": "int", "low": 0, "high": 4}}},
            [],
            "latent_dim = 0 is in the space but not a valid cell",
        ),
        ({}, ["--workers", "-1"], "argument --workers: must be an integer >= 1, got '-1'"),
        ({}, ["--workers", "0"], "argument --workers: must be an integer >= 1, got '0'"),
    ],
)
def test_cli_rejects_a_bad_space_or_option_before_any_study_or_run(workdir, capsys, changes, options, message):
    # In-process: the command line itself runs in a subprocess in the killed-worker test below.
    from pipeline import cli

    path = write_space(workdir, **changes)
    with pytest.raises(SystemExit) if options else nullcontext():  # argparse exits by itself
        assert cli.main(["--params", str(REPO / "studies" / "tiny.yaml"), "tune", str(path), *options]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) <= 2  # argparse adds its usage line
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


@pytest.mark.slow
def test_tiny_study_completes_and_every_trial_is_an_mlflow_child(prepared, workdir):
    path = write_space(workdir, n_trials=3)
    summary = tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    assert sum(summary["trials"].values()) == 3
    folder = workdir / "reports" / "tune" / "tiny"
    assert {"summary.json", "trials.csv", "best_study.yaml", "optimization_history.png"} <= {
        p.name for p in folder.iterdir()
    }
    best_study = yaml.safe_load((folder / "best_study.yaml").read_text())
    assert list(best_study["cells"]) == ["tiny-best"] and best_study["finetuned"] == {}
    assert best_study["cells"]["tiny-best"]["latent_dim"] == summary["best"][0]["params"]["latent_dim"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("vaebench-tiny")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("vaebench.role") == "tune"]
    children = [r for r in runs if r.data.tags.get("vaebench.role") == "trial"]
    assert len(parent) == 1 and len(children) == 3
    assert all(c.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for c in children)
    assert {c.data.tags["optuna.state"] for c in children} <= {"COMPLETE", "PRUNED"}
    assert parent[0].data.tags["vaebench.best_trial"] == str(summary["best"][0]["number"])


@pytest.mark.slow
def test_resumed_study_keeps_its_trials_and_adds_new_numbers(prepared, workdir):
    path = write_space(workdir, n_trials=2)
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    first = [(t.number, t.params) for t in trials(load_space(path))]
    path = write_space(workdir, n_trials=4)
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    after = [(t.number, t.params) for t in trials(load_space(path))]
    assert after[:2] == first and [n for n, _ in after] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", pytest.param("postgresql", marks=pytest.mark.system)])
def test_a_resumed_study_whose_new_trial_is_best_moves_the_best_model(prepared, workdir, storage, request, monkeypatch):
    """Resuming used to crash for good once the best trial changed (best_* metrics logged at step 0)."""
    if storage == "postgresql":
        monkeypatch.setenv("VAEBENCH_OPTUNA_STORAGE", request.getfixturevalue("postgres_url"))
    space = {"lr": {"type": "float", "low": 1e-6, "high": 0.01, "log": True}}
    path = write_space(workdir, n_trials=2, pruner={"name": "none"}, space=space)
    study = new_or_existing_study(load_space(path))
    for lr in (1e-6, 2e-6):  # barely move from their initialisation
        study.enqueue_trial({"lr": lr})
    first = tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    study.enqueue_trial({"lr": 0.01})
    path = write_space(workdir, n_trials=3, pruner={"name": "none"}, space=space)
    second = tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    assert first["best"][0]["number"] in (0, 1) and second["best"][0]["number"] == 2
    assert second["best"][0]["values"][0] < first["best"][0]["values"][0]
    client = MlflowClient()
    parent = client.search_runs(
        [client.get_experiment_by_name("vaebench-tiny").experiment_id], filter_string="tags.`vaebench.role` = 'tune'"
    )
    assert len(parent) == 1
    parent = parent[0]
    assert parent.data.tags["vaebench.best_trial"] == "2"
    history = client.get_metric_history(parent.info.run_id, "best_val_elbo")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [first["best"][0]["values"][0], second["best"][0]["values"][0]]
    )
    best_run = parent.data.tags["vaebench.best_run"]
    assert client.get_run(best_run).data.tags["optuna.trial"] == "2"
    on_parent = torch.load(
        client.download_artifacts(parent.info.run_id, "model/state_dict.pt", str(workdir)), weights_only=True
    )
    (workdir / "best").mkdir()
    on_trial = torch.load(
        client.download_artifacts(best_run, "model/state_dict.pt", str(workdir / "best")), weights_only=True
    )
    assert on_parent.keys() == on_trial.keys() and all(torch.equal(on_parent[k], on_trial[k]) for k in on_parent)


@pytest.mark.slow
def test_two_concurrent_workers_make_the_requested_trials_overshooting_by_at_most_one(prepared, workdir):
    path = write_space(workdir, n_trials=5)
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"), workers=2)
    found = trials(load_space(path))
    assert 5 <= len(found) <= 5 + (2 - 1)  # two workers may start a trial at the same moment
    assert sorted(t.number for t in found) == list(range(len(found)))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in found)
    assert len({t.user_attrs["worker"] for t in found}) == 2


@pytest.mark.slow
def test_a_raising_trial_fails_and_the_study_goes_on(prepared, workdir):
    space = {"lr": {"type": "categorical", "choices": [1e9, 0.001]}}
    path = write_space(workdir, n_trials=3, pruner={"name": "none"}, space=space)
    study = new_or_existing_study(load_space(path))
    for lr in (1e9, 0.001, 0.001, 0.001):  # the first diverges
        study.enqueue_trial({"lr": lr})
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    found = trials(load_space(path))
    failed = [t for t in found if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("TrainingDiverged" in t.user_attrs["error"] for t in failed)
    assert len([t for t in found if t.state == optuna.trial.TrialState.COMPLETE]) == 3


@pytest.mark.slow
def test_a_clearly_worse_trial_is_pruned(prepared, workdir):
    path = write_space(
        workdir,
        n_trials=4,
        pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 0},
        space={"lr": {"type": "float", "low": 1e-6, "high": 0.01, "log": True}},
    )
    space = load_space(path)
    study = new_or_existing_study(space)
    for lr in (0.005, 0.006, 0.007, 1e-6):  # the last one barely moves from its initialisation
        study.enqueue_trial({"lr": lr})
    tune(prepared, space, str(path), str(REPO / "studies" / "tiny.yaml"))
    states = {t.params["lr"]: t.state for t in trials(space)}
    assert states[1e-6] == optuna.trial.TrialState.PRUNED
    assert [states[lr] for lr in (0.005, 0.006, 0.007)] == [optuna.trial.TrialState.COMPLETE] * 3


@pytest.mark.slow
def test_a_killed_worker_s_trial_fails_and_is_retried_when_the_study_is_rerun_at_once(prepared, workdir):
    """Re-running within the grace period used to count the dead RUNNING trial and stop."""
    # A grace period longer than the re-run's start-up, so that it finds the dead trial still RUNNING.
    path = write_space(
        workdir, n_trials=3, pruner={"name": "none"}, heartbeat={"interval": 1, "grace": 15}, fixed={"epochs": 30}
    )
    space = load_space(path)
    command = [sys.executable, "-m", "pipeline", "--params", str(REPO / "studies" / "tiny.yaml"), "tune", str(path)]
    first = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and first.poll() is None and time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=study_name(space), storage=storage_url())
        except KeyError:  # the worker has not created it yet
            study = None
        running = (
            [
                t
                for t in study.trials
                if t.state == optuna.trial.TrialState.RUNNING and 2 <= len(t.intermediate_values) <= 20
            ]
            if study
            else []
        )  # mid-training, not at its end
        killed = running[0].number if running else None
        time.sleep(0.05)
    first.kill()
    first.wait()
    assert killed is not None, "the worker finished before it could be killed mid-trial"
    rerun = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "waiting for 1 running trial(s)" in rerun.stderr  # it found the dead trial RUNNING, within the grace
    found = {t.number: t for t in trials(space)}
    assert found[killed].state == optuna.trial.TrialState.FAIL
    retries = [t for t in found.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == found[killed].params
    assert not [
        t for t in found.values() if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    ]
    assert len([t for t in found.values() if t.state == optuna.trial.TrialState.COMPLETE]) >= 3
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("vaebench-tiny").experiment_id], filter_string="tags.`vaebench.role` = 'trial'"
    )
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_trial = {r.data.tags["optuna.trial"]: r for r in runs}
    assert by_trial[str(killed)].info.status == "FAILED" and by_trial[str(killed)].data.tags["optuna.state"] == "FAIL"
    summary = json.loads((workdir / "reports" / "tune" / "tiny" / "summary.json").read_text())
    assert summary["trials"]["FAIL"] == 1 and "RUNNING" not in summary["trials"]
