import subprocess
import sys

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import ConfigError
from pipeline.tuning.search_space import check_space_fits, load_space, parse_space
from pipeline.tune import open_storage, storage_url, study_name, tune

from conftest import REPO

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
    study = optuna.load_study(study_name=study_name(space), storage=open_storage(storage_url()))
    return study.get_trials(deepcopy=False)


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
    ],
)
def test_bad_search_spaces_fail_with_one_clear_message(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(space_raw(**changes))


def test_family_settings_are_tunable_on_a_cell_of_that_family_only(tiny_study):
    dae_space = parse_space(space_raw(base_cell="dae-linear-z2-s0", objective="val_loss",
                                      space={"mask_prob": {"type": "float", "low": 0.1, "high": 0.5}}))
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
    assert (gaussian.settings.noise, gaussian.settings.noise_std, gaussian.settings.mask_prob) == ("gaussian", 0.5, None)
    assert with_values(gaussian, {"noise": "mask", "mask_prob": 0.4}).settings.mask_prob == 0.4
    assert with_values(masked, {"lr": 0.01}).settings == masked.settings


def test_a_family_setting_is_searched_and_lands_in_the_best_cell(prepared, workdir):
    path = write_space(workdir, n_trials=2, base_cell="cae-conv-z2-s0", objective="val_loss", pruner={"name": "none"},
                       space={"contraction_weight": {"type": "float", "low": 0.01, "high": 1.0, "log": True}})
    summary = tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    best_cell = yaml.safe_load((workdir / "reports" / "tune" / "tiny" / "best_study.yaml").read_text())["cells"]["tiny-best"]
    assert best_cell["family"] == "cae"
    assert best_cell["contraction_weight"] == summary["best"][0]["params"]["contraction_weight"]


def test_cli_rejects_a_bad_space_before_any_trial(tmp_path):
    path = write_space(tmp_path, space={"lr": {"type": "float", "low": -1, "high": 1, "log": True}})
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(REPO / "studies" / "tiny.yaml"), "tune", str(path)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "a log scale needs low > 0" in result.stderr
    assert not (tmp_path / "optuna.db").exists()


def test_tiny_study_completes_and_every_trial_is_an_mlflow_child(prepared, workdir):
    path = write_space(workdir, n_trials=3)
    summary = tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    assert sum(summary["trials"].values()) == 3
    folder = workdir / "reports" / "tune" / "tiny"
    assert {"summary.json", "trials.csv", "best_study.yaml", "optimization_history.png"} <= {p.name for p in folder.iterdir()}
    best_study = yaml.safe_load((folder / "best_study.yaml").read_text())
    assert list(best_study["cells"]) == ["tiny-best"]
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


def test_resumed_study_keeps_its_trials_and_adds_new_numbers(prepared, workdir):
    path = write_space(workdir, n_trials=2)
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    first = [(t.number, t.params) for t in trials(load_space(path))]
    path = write_space(workdir, n_trials=4)
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    after = [(t.number, t.params) for t in trials(load_space(path))]
    assert after[:2] == first and [n for n, _ in after] == [0, 1, 2, 3]


def test_two_concurrent_workers_make_exactly_the_requested_trials(prepared, workdir):
    path = write_space(workdir, n_trials=5)
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"), workers=2)
    found = trials(load_space(path))
    assert len(found) == 5 and sorted(t.number for t in found) == [0, 1, 2, 3, 4]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in found)


def test_a_raising_trial_fails_and_the_study_goes_on(prepared, workdir):
    space = {"lr": {"type": "categorical", "choices": [1e9, 0.001]}}
    path = write_space(workdir, n_trials=3, pruner={"name": "none"}, space=space)
    study = optuna.create_study(study_name=study_name(load_space(path)), storage=open_storage(storage_url()))
    for lr in (1e9, 0.001, 0.001, 0.001):  # the first diverges
        study.enqueue_trial({"lr": lr})
    tune(prepared, load_space(path), str(path), str(REPO / "studies" / "tiny.yaml"))
    found = trials(load_space(path))
    failed = [t for t in found if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("TrainingDiverged" in t.user_attrs["error"] for t in failed)
    assert len([t for t in found if t.state == optuna.trial.TrialState.COMPLETE]) == 3


def test_a_clearly_worse_trial_is_pruned(prepared, workdir):
    path = write_space(
        workdir, n_trials=4, pruner={"name": "median", "n_startup_trials": 3, "n_warmup_steps": 0},
        space={"lr": {"type": "float", "low": 1e-6, "high": 0.01, "log": True}},
    )
    space = load_space(path)
    study = optuna.create_study(study_name=study_name(space), storage=open_storage(storage_url()))
    for lr in (0.005, 0.006, 0.007, 1e-6):  # the last one barely moves from its initialisation
        study.enqueue_trial({"lr": lr})
    tune(prepared, space, str(path), str(REPO / "studies" / "tiny.yaml"))
    states = {t.params["lr"]: t.state for t in trials(space)}
    assert states[1e-6] == optuna.trial.TrialState.PRUNED
    assert [states[lr] for lr in (0.005, 0.006, 0.007)] == [optuna.trial.TrialState.COMPLETE] * 3
