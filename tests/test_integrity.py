"""Issue 23's findings: no output recorded with params it was not made with, names every command accepts,
no run left RUNNING, one line for each fault a user meets."""

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import REPO, TINY_STUDY, copy_repo
from pipeline import cli, engine, evaluate, leftovers, stage_params, tracking
from pipeline.classifier import train_classifier
from pipeline.config import load_study
from pipeline.errors import ArtifactError, TrackingError
from pipeline.outputs import read_json
from pipeline.paths import CONFIG_FILE, RUN_FILE, evaluate_dir, resume_file, train_dir
from pipeline.stage_params import ParamsChanged
from pipeline.train import train_cell
from test_failures import runs_of
from test_multi_machine import environment
from test_train import CELL

OTHER_CELL = "conv-z2-b1-s0"


def own_params(folder: Path, epochs: int = 1) -> Path:
    """The tiny study as the working directory's params.yaml, which the test may edit."""
    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["train"]["epochs"] = epochs
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def edit(path: Path, *keys: str, value: object) -> None:
    raw = yaml.safe_load(path.read_text())
    section = raw
    for key in keys[:-1]:
        section = section[key]
    section[keys[-1]] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_params_edited_while_a_cell_trains_fail_it_and_leave_no_output(prepared, workdir):
    params = own_params(workdir, epochs=2)
    config = load_study(params)
    with pytest.raises(ParamsChanged, match=rf"cells\.{CELL}\.beta: 1\.0 -> 4\.0\); its outputs were made with"):
        train_cell(config, CELL, on_epoch_end=lambda epoch: edit(params, "cells", CELL, "beta", value=4.0))
    assert not train_dir(config.study, CELL).exists()
    assert [run.info.status for run in runs_of(config.study, CELL)] == ["FAILED"]


def test_an_edit_of_params_the_stage_does_not_read_lets_it_finish(prepared, workdir):
    params = own_params(workdir)
    config = load_study(params)
    train_cell(config, CELL, on_epoch_end=lambda epoch: edit(params, "cells", OTHER_CELL, "beta", value=4.0))
    assert read_json(train_dir(config.study, CELL) / CONFIG_FILE)["cell"]["beta"] == 1.0


def test_params_edited_while_a_cell_is_evaluated_reach_neither_its_outputs_nor_its_run(prepared, workdir, monkeypatch):
    params = own_params(workdir)
    config = load_study(params)
    train_classifier(config)
    train_cell(config, CELL)
    measure = evaluate.measure

    def measure_then_edit(*args, **kwargs):
        result = measure(*args, **kwargs)
        edit(params, "sample_quality", "n_samples", value=150)
        return result

    monkeypatch.setattr(evaluate, "measure", measure_then_edit)
    with pytest.raises(ParamsChanged, match=r"sample_quality\.n_samples: 200 -> 150"):
        evaluate.evaluate_cell(config, CELL)
    assert not evaluate_dir(config.study, CELL).exists()
    run = MlflowClient().get_run(read_json(train_dir(config.study, CELL) / RUN_FILE)["run_id"])
    assert run.info.status == "FINISHED" and not any(key.startswith("test_") for key in run.data.metrics)


def test_each_stage_checks_the_params_dvc_yaml_declares_for_it(workdir):
    """stage_params mirrors dvc.yaml's `params:` of every stage, as DVC itself resolves them."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = copy_repo(workdir / "clone", TINY_STUDY)
    config = load_study(root / "params.yaml")
    expected = {
        "prepare": stage_params.PREPARE_PARAMS,
        "classifier": stage_params.CLASSIFIER_PARAMS,
        "floor": stage_params.FLOOR_PARAMS,
        "report": stage_params.REPORT_PARAMS,
    }
    for name in config.cells:
        cell = config.cell(name)
        expected[f"{'finetune' if cell.init_from else 'train'}@{name}"] = stage_params.train_params(config, name)
        expected[f"{'evaluate-finetuned' if cell.init_from else 'evaluate'}@{name}"] = stage_params.evaluate_params(
            config, name
        )
    declared = {
        stage.name: tuple(key for dep in stage.deps if isinstance(dep, ParamsDependency) for key in dep.params)
        for stage in Repo(str(root)).index.stages
    }
    assert declared == expected


@pytest.mark.slow
def test_dvc_records_nothing_for_a_stage_whose_params_changed_while_it_ran(workdir):
    """The finding as a user met it: `beta` edited in params.yaml while `dvc repro train@…` runs."""
    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["cells"] = {CELL: {**raw["cells"][CELL], "epochs": 30}}
    raw["finetuned"] = {}
    study = workdir / "study.yaml"
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = copy_repo(workdir / "clone", study)
    stage = f"train@{CELL}"
    process = subprocess.Popen(
        ["dvc", "repro", stage], cwd=root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    checkpoint = root / resume_file("tiny", CELL)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    edit(root / "params.yaml", "cells", CELL, "beta", value=4.0)
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode != 0
    assert f"params.yaml changed while {stage} ran (cells.{CELL}.beta: 1.0 -> 4.0)" in output
    assert "Traceback" not in output
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert stage not in lock["stages"]  # prepare and classifier, which finished, are recorded
    assert not (root / train_dir("tiny", CELL)).exists()
    # Run again, it trains with the new value and records it.
    subprocess.run(["dvc", "repro", stage], cwd=root, env=environment(), check=True, capture_output=True)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"][stage]["params"]["params.yaml"][f"cells.{CELL}"]["beta"] == 4.0
    assert read_json(root / train_dir("tiny", CELL) / CONFIG_FILE)["cell"]["beta"] == 4.0
    saved = torch.load(root / train_dir("tiny", CELL) / "model.pt", weights_only=True)
    assert saved["cell"]["beta"] == 4.0


def test_a_stage_reads_a_cell_named_like_an_option_after_the_separator():
    from pipeline import cli

    assert cli.build_parser().parse_args(["train", "--", "-x"]).cell == "-x"


def test_dvc_yaml_passes_every_cell_after_the_separator():
    from conftest import REPO

    commands = [
        line.split("cmd:")[1].strip() for line in (REPO / "dvc.yaml").read_text().splitlines() if "cmd:" in line
    ]
    for command in commands:
        if "${" in command:
            assert " -- ${" in command, command


def study_with_cells(folder: Path, cells: dict) -> Path:
    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["cells"], raw["finetuned"] = cells, {}
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["-x", "--help", "c" * 300, "bad\n"])
def test_a_stage_refuses_a_bad_cell_name_before_any_work(workdir, capsys, name):
    params = study_with_cells(workdir, {name: {"family": "vae", "arch": "linear", "latent_dim": 2, "seed": 0}})
    assert cli.main(["--params", str(params), "train", "--", name]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vaebench: error: ") and "must use only letters, digits" in error
    assert len(error.strip().splitlines()) == 1 and not (workdir / "results").exists()


def disk_full_error(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_a_stage_output_is_one_line_and_the_run_fails(prepared, workdir, monkeypatch, capsys):
    params = own_params(workdir)
    monkeypatch.setattr("pipeline.train.write_json", disk_full_error)
    assert cli.main(["--params", str(params), "train", "--", CELL]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"vaebench: error: no space left for {train_dir('tiny', CELL)}: its file system")
    assert "Traceback" not in error and len(error.splitlines()) == 1
    assert not train_dir("tiny", CELL).exists() and not Path(f"{train_dir('tiny', CELL)}.partial").exists()
    assert [run.info.status for run in runs_of("tiny", CELL)] == ["FAILED"]


def test_a_model_upload_that_fails_leaves_a_failed_run_tagged_incomplete_that_is_never_loaded(
    prepared, workdir, monkeypatch, capsys
):
    params = own_params(workdir)
    monkeypatch.setattr("mlflow.log_artifacts", disk_full_error)
    assert cli.main(["--params", str(params), "train", "--", CELL]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("vaebench: error: no space left for ") and len(error.splitlines()) == 1
    (run,) = runs_of("tiny", CELL)
    assert run.info.status == "FAILED" and run.data.tags[tracking.ARTIFACTS_TAG] == "incomplete"
    assert not train_dir("tiny", CELL).exists()  # DVC records nothing, and no output looks valid
    with pytest.raises(ArtifactError, match=f"the MLflow run {run.info.run_id} ended FAILED and its model is not"):
        tracking.load_logged_model(run.info.run_id)


def test_loading_a_run_without_a_model_is_one_line_and_leaves_no_temporary_folder(
    empty_tracking_store, workdir, monkeypatch
):
    import tempfile

    import mlflow

    scratch = workdir / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with mlflow.start_run() as run:
        mlflow.log_param("x", 1)
    for _ in range(2):
        with pytest.raises(ArtifactError, match=f"the MLflow run {run.info.run_id} holds no model"):
            tracking.load_logged_model(run.info.run_id)
    with pytest.raises(TrackingError, match="no MLflow run 0123abc"):
        tracking.load_logged_model("0123abc")
    assert list(scratch.iterdir()) == []


def test_commands_run_from_a_subfolder_work_on_the_checkout(workdir, capsys):
    root = copy_repo(workdir / "clone", TINY_STUDY)
    (root / ".vaebench").mkdir()
    subfolder = root / "results" / "deep"
    subfolder.mkdir(parents=True)
    os.chdir(subfolder)
    assert cli.main(["check"]) == 0
    assert "params.yaml: study 'tiny'" in capsys.readouterr().out
    assert cli.main(["use-study", "seeds"]) == 0
    assert load_study(root / "params.yaml").study == "seeds"
    (root / "mine.yaml").write_text(TINY_STUDY.read_text())
    os.chdir(subfolder)
    assert cli.main(["use-study", "../../mine.yaml"]) == 0  # a path the user gave, from where they are
    assert load_study(root / "params.yaml").study == "tiny"
    assert Path.cwd() == root
    app = root / ".vaebench" / "app"  # a folder with a params.yaml of its own (the app's workspace) stays
    app.mkdir()
    (app / "params.yaml").write_text((REPO / "studies" / "seeds.yaml").read_text())
    os.chdir(app)
    assert cli.main(["check"]) == 0
    assert "params.yaml: study 'seeds'" in capsys.readouterr().out


def test_an_interrupt_before_the_run_opens_says_no_run_was_open(prepared, workdir, monkeypatch, capsys):
    params = own_params(workdir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.train.load_prepared", interrupted)
    monkeypatch.setattr(tracking, "ended_runs", [])
    assert cli.main(["--params", str(params), "train", "--", CELL]) == 130
    assert capsys.readouterr().err == (
        "vaebench train: interrupted; no MLflow run was open and nothing half-written was kept; re-run the same "
        "command (or dvc repro) to start the training again\n"
    )


def test_an_interrupt_mid_training_names_the_run_it_ended(prepared, workdir, monkeypatch, capsys):
    params = own_params(workdir, epochs=3)
    save = engine.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_interrupt)
    monkeypatch.setattr(tracking, "ended_runs", [])
    assert cli.main(["--params", str(params), "train", "--", CELL]) == 130
    (run,) = runs_of("tiny", CELL)
    assert run.info.status == "KILLED"
    assert capsys.readouterr().err == (
        f"vaebench train: interrupted; its MLflow run {run.info.run_id} ended KILLED and nothing half-written was "
        "kept; re-run the same command (or dvc repro) to resume after the last finished epoch\n"
    )


def test_a_run_left_running_by_a_process_that_is_gone_ends_at_the_next_stage(prepared, workdir):
    """Another process's run: a pid that is not there (the tag as a killed stage leaves it)."""
    import socket

    from mlflow import MlflowClient

    config = load_study(own_params(workdir))
    tracking.ensure_study(config)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("vaebench-tiny").experiment_id
    gone = client.create_run(experiment, tags={tracking.PROCESS_TAG: f"{socket.gethostname()}:999999999:1.000"})
    elsewhere = client.create_run(experiment, tags={tracking.PROCESS_TAG: "another-host:1:1.000"})
    alive = client.create_run(experiment, tags={tracking.PROCESS_TAG: tracking.process_tag()})
    train_cell(config, CELL)
    assert client.get_run(gone.info.run_id).info.status == "KILLED"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # another host's: not judged here
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"


def test_a_checkpoint_older_than_its_cells_restored_model_is_removed(prepared, workdir):
    config = load_study(own_params(workdir))
    train_cell(config, CELL)
    checkpoint = resume_file(config.study, CELL)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"an old checkpoint")
    os.utime(checkpoint, (1, 1))
    kept = resume_file(config.study, OTHER_CELL)
    kept.write_bytes(b"a checkpoint of a cell with no outputs")
    leftovers.clear_leftovers(config.study)
    assert not checkpoint.exists() and kept.exists()


OVERSIZED = [{"latent_dim": 100_000_000}, {"hidden": [2_000_000]}, {"arch": "conv", "channels": [100_000, 100_000]}]


@pytest.mark.parametrize("sizes", OVERSIZED)
def test_a_cell_too_big_for_memory_is_refused_with_its_estimate_by_check_and_by_the_stage(workdir, capsys, sizes):
    spec = {"family": "vae", "arch": "linear", "latent_dim": 2, "seed": 0, **sizes}
    params = study_with_cells(workdir, {"big": spec})
    for command in (["check"], ["train", "--", "big"]):
        assert cli.main(["--params", str(params), *command]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("vaebench: error: cell big: training needs about ") and len(error.splitlines()) == 1
        assert "GiB this process may use on cpu; lower latent_dim/hidden/channels/batch_size" in error
    assert not (workdir / "results").exists() and not (workdir / "mlflow.db").exists()


def test_an_allocation_failure_while_training_is_one_line_and_the_run_fails(prepared, workdir, monkeypatch, capsys):
    params = own_params(workdir)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 6272000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    monkeypatch.setattr(engine, "epochs", out_of_memory)
    assert cli.main(["--params", str(params), "train", "--", CELL]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"vaebench: error: cell {CELL} ran out of memory ([enforce fail at alloc_cpu.cpp:117]")
    assert error.endswith(
        "lower its latent_dim, hidden, channels or batch_size, or run it on a machine with more memory"
    )
    assert len(error.splitlines()) == 1
    assert [run.info.status for run in runs_of("tiny", CELL)] == ["FAILED"]


@pytest.mark.slow
def test_a_killed_stage_restored_by_dvc_leaves_no_running_run_and_no_checkpoint_to_resume(workdir):
    """Killed mid-training with edited params; the edit reverted, DVC restores the cell from its cache without
    running it: the next stage that runs ends the killed run and removes the killed run's checkpoint."""
    import signal

    raw = yaml.safe_load(TINY_STUDY.read_text())
    raw["cells"] = {name: raw["cells"][name] for name in (CELL, "ae-linear-z2-s0")}
    raw["finetuned"] = {}
    study = workdir / "study.yaml"
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = copy_repo(workdir / "clone", study)
    original = (root / "params.yaml").read_text()
    env = environment()
    subprocess.run(["dvc", "repro", f"train@{CELL}"], cwd=root, env=env, check=True, capture_output=True)
    edit(root / "params.yaml", "cells", CELL, "epochs", value=200)
    process = subprocess.Popen(
        ["dvc", "repro", f"train@{CELL}"], cwd=root, env=env, stdout=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = root / resume_file("tiny", CELL)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vaebench-tiny").experiment_id
    (killed,) = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    (root / "params.yaml").write_text(original)
    restored = subprocess.run(
        ["dvc", "repro", f"train@{CELL}", "train@ae-linear-z2-s0"], cwd=root, env=env, capture_output=True, text=True
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"Running stage 'train@{CELL}'" not in restored.stdout  # restored, not run
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert not client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'")
    assert not checkpoint.exists()


def test_a_full_tracking_store_is_one_line_naming_it(prepared, workdir, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    params = own_params(workdir)

    def store_full(*args, **kwargs):  # what MLflow raises when SQLite cannot grow mlflow.db
        raise MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO runs ...]")

    monkeypatch.setattr(tracking, "log_cell_params", store_full)
    assert cli.main(["--params", str(params), "train", "--", CELL]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"vaebench: error: no space left for {tracking.local_store()}: its file system")
    assert len(error.splitlines()) == 1


def test_a_stage_whose_outputs_dvcs_cache_has_no_room_for_fails_before_its_run_finishes(prepared, workdir, monkeypatch):
    from pipeline import outputs

    params = own_params(workdir)
    monkeypatch.setenv("DVC_ROOT", str(workdir))
    monkeypatch.setattr(outputs, "free_space", lambda path: 1000)
    with pytest.raises(
        outputs.DiskFull, match=r"no space left for .*\.dvc/cache: .* has 1000 bytes free, and it needs"
    ):
        train_cell(load_study(params), CELL)
    assert not train_dir("tiny", CELL).exists()
    assert [run.info.status for run in runs_of("tiny", CELL)] == ["FAILED"]
