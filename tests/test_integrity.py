"""Issue 23's findings: no output recorded with params it was not made with, names every command accepts,
no run left RUNNING, one line for each fault a user meets."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import SHARED_DATA, TINY_STUDY, copy_repo
from pipeline import evaluate, stage_params
from pipeline.classifier import train_classifier
from pipeline.config import load_study
from pipeline.outputs import read_json
from pipeline.paths import CONFIG_FILE, RUN_FILE, evaluate_dir, resume_file, train_dir
from pipeline.stage_params import ParamsChanged
from pipeline.train import train_cell
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


def runs_of(study: str, cell: str):
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"vaebench-{study}")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`vaebench.cell` = '{cell}'")


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


def dvc_environment() -> dict:
    return {
        **{name: value for name, value in os.environ.items() if name != "MLFLOW_TRACKING_URI"},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VAEBENCH_DATA_ROOT": str(SHARED_DATA),
        "DVC_NO_ANALYTICS": "1",
    }


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
        ["dvc", "repro", stage], cwd=root, env=dvc_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
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
    subprocess.run(["dvc", "repro", stage], cwd=root, env=dvc_environment(), check=True, capture_output=True)
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
