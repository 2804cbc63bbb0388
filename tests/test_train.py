import dataclasses

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipeline.outputs import read_json, resume_file, train_dir
from pipeline.engine import TrainingDiverged
from pipeline.train import MODEL_FILE, RUN_FILE, load_trained, train_cell

CELL = "linear-z2-b1-s0"


def with_cell(config, study=None, **changes):
    cells = {**config.cells, CELL: dataclasses.replace(config.cells[CELL], **changes)}
    return dataclasses.replace(config, study=study or config.study, cells=cells)


def interrupt(epoch):
    """Stand-in for Ctrl-C arriving after an epoch's checkpoint is written."""
    raise KeyboardInterrupt


def run_of(config, cell=CELL):
    return MlflowClient().get_run(read_json(train_dir(config.study, cell) / RUN_FILE)["run_id"])


def test_training_lowers_the_loss_and_writes_outputs(prepared):
    config = with_cell(prepared, epochs=3)
    history = train_cell(config, CELL)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for row in history:
        assert row["val_elbo"] == pytest.approx(row["val_recon"] + row["val_kl"])
    out = train_dir(config.study, CELL)
    assert {p.name for p in out.iterdir()} == {MODEL_FILE, "history.json", "config.json", RUN_FILE}
    assert read_json(out / "history.json") == history
    assert load_trained(config.study, config.cell(CELL), torch.device("cpu")).latent_dim == 2
    assert not resume_file(config.study, CELL).exists()
    run = run_of(config)
    assert run.info.status == "FINISHED" and run.info.run_name == CELL
    assert run.data.params["cell.arch"] == "linear" and run.data.params["cell.beta"] == "1.0"
    curve = MlflowClient().get_metric_history(run.info.run_id, "val_elbo")
    assert [(m.step, m.value) for m in curve] == [(row["epoch"], row["val_elbo"]) for row in history]


def test_same_seed_same_result(prepared):
    first = train_cell(prepared, CELL)
    second = train_cell(with_cell(prepared, study="again"), CELL)
    assert first == second
    third = train_cell(with_cell(prepared, study="other-seed", seed=1), CELL)
    assert third != first


def test_interrupted_training_resumes_to_the_uninterrupted_result(prepared):
    reference_config = with_cell(prepared, study="reference", epochs=3)
    reference = train_cell(reference_config, CELL)

    config = with_cell(prepared, epochs=3)

    with pytest.raises(KeyboardInterrupt):
        train_cell(config, CELL, on_epoch_end=lambda epoch: epoch == 2 and interrupt(epoch))
    assert resume_file(config.study, CELL).exists()
    assert not train_dir(config.study, CELL).exists()
    interrupted = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("vaebench-tiny").experiment_id], filter_string=f"run_name = '{CELL}'"
    )
    assert [run.info.status for run in interrupted] in (["KILLED"], ["FAILED"])

    epochs_run = []
    resumed = train_cell(config, CELL, on_epoch_end=epochs_run.append)
    assert epochs_run == [3]
    assert resumed == reference
    model = torch.load(train_dir(config.study, CELL) / MODEL_FILE)["state_dict"]
    expected = torch.load(train_dir("reference", CELL) / MODEL_FILE)["state_dict"]
    assert all(torch.equal(model[key], expected[key]) for key in expected)
    run = run_of(config)
    assert run.info.run_id == interrupted[0].info.run_id and run.info.status == "FINISHED"


def test_changed_parameters_do_not_resume_a_stale_checkpoint(prepared):
    with pytest.raises(KeyboardInterrupt):
        train_cell(with_cell(prepared, epochs=2), CELL, on_epoch_end=interrupt)
    epochs_run = []
    train_cell(with_cell(prepared, epochs=2, lr=0.002), CELL, on_epoch_end=epochs_run.append)
    assert epochs_run == [1, 2]


def test_diverging_loss_stops_the_cell_naming_cell_and_epoch(prepared):
    config = with_cell(prepared, lr=1e9)
    with pytest.raises(TrainingDiverged, match=rf"cell {CELL}: the loss became NaN or infinite at epoch 1"):
        train_cell(config, CELL)
    assert not train_dir(config.study, CELL).exists()
    runs = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("vaebench-tiny").experiment_id], filter_string=f"run_name = '{CELL}'"
    )
    assert [run.info.status for run in runs] == ["FAILED"]


def test_a_family_without_a_prior_stores_its_ex_post_gaussian(prepared):
    history = train_cell(prepared, "ae-linear-z2-s0")
    assert set(history[0]) == {"epoch", "train_recon", "train_loss", "val_recon", "val_loss"}
    model = load_trained(prepared.study, prepared.cell("ae-linear-z2-s0"), torch.device("cpu"))
    assert model.code_mean.abs().sum() > 0
    assert not torch.equal(model.code_scale_tril, torch.eye(2))


def test_a_checkpoint_that_is_not_one_is_ignored_without_running_its_code(prepared):
    path = resume_file(prepared.study, CELL)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cell": "not this cell", "payload": [1, 2, 3]}, path)
    assert [row["epoch"] for row in train_cell(prepared, CELL)] == [1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x04not a pickle")
    assert [row["epoch"] for row in train_cell(prepared, CELL)] == [1]
