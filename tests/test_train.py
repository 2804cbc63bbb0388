import dataclasses
import math
import os

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import SHARED_DATA, TINY_STUDY
from pipeline import engine
from pipeline.config import load_study
from pipeline.data import images_to_tensor, load_prepared, raw_dir, read_idx
from pipeline.engine import TrainingDiverged, encode_all
from pipeline.outputs import read_json
from pipeline.paths import MODEL_FILE, PREPARED_FILE, RUN_FILE, resume_file, train_dir
from pipeline.train import train_cell
from pipeline.trained import load_trained

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


def weights(study, cell=CELL):
    return torch.load(train_dir(study, cell) / MODEL_FILE, weights_only=True)["state_dict"]


def test_same_seed_same_result(prepared):
    first = train_cell(prepared, CELL)
    second = train_cell(with_cell(prepared, study="again"), CELL)
    assert first == second
    model, again = weights(prepared.study), weights("again")
    assert model.keys() == again.keys() and all(torch.equal(model[key], again[key]) for key in model)
    third = train_cell(with_cell(prepared, study="other-seed", seed=1), CELL)
    assert third != first
    other = weights("other-seed")
    assert not all(torch.equal(model[key], other[key]) for key in model)


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
    # The Gaussian of the saved model's codes of the training images: their mean and covariance.
    codes = encode_all(model, images_to_tensor(load_prepared(PREPARED_FILE)["train_images"])).double()
    assert torch.allclose(model.sampler.mean.double(), codes.mean(0), rtol=1e-5, atol=1e-5)
    covariance = model.sampler.scale_tril.double() @ model.sampler.scale_tril.double().T
    assert torch.allclose(covariance, torch.cov(codes.T), rtol=1e-4, atol=1e-6)
    assert torch.equal(model.sampler.scale_tril, torch.tril(model.sampler.scale_tril))
    assert model.sampler.mean.abs().sum() > 0 and not torch.equal(model.sampler.scale_tril, torch.eye(2))


class Payload:
    """A pickle that runs a command when it is loaded (unless the loader refuses to call anything)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_is_not_one_is_ignored_without_running_its_code(prepared, workdir):
    path = resume_file(prepared.study, CELL)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = workdir / "the-checkpoint-ran-code"
    torch.save({"cell": "not this cell", "payload": Payload(marker)}, path)
    assert [row["epoch"] for row in train_cell(prepared, CELL)] == [1]
    assert not marker.exists()
    torch.save({"cell": "not this cell", "payload": [1, 2, 3]}, path)  # loadable, but not a checkpoint
    assert [row["epoch"] for row in train_cell(prepared, CELL)] == [1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x04not a pickle")
    assert [row["epoch"] for row in train_cell(prepared, CELL)] == [1]


# One cell of each family of the tiny study, trained for a few epochs of a few hundred real digits.
FAMILY_CELLS = {
    "vae": "linear-z2-b1-s0",
    "ae": "ae-linear-z2-s0",
    "dae": "dae-linear-z2-s0",
    "cae": "cae-conv-z2-s0",
    "gan": "gan-conv-z2-s0",
    "vaegan": "vaegan-linear-z2-s0",
    "iwae": "iwae-linear-z2-k5-s0",
}


@pytest.fixture(scope="module")
def digits():
    """The first 320 MNIST training digits: 256 to train on, 64 to validate on."""
    images = images_to_tensor(read_idx(raw_dir(SHARED_DATA) / "train-images-idx3-ubyte.gz")[:320].copy())
    return images[:256], images[256:]


@pytest.mark.parametrize("family", list(FAMILY_CELLS))
def test_a_few_epochs_of_each_family_on_real_digits_give_finite_falling_losses(family, digits):
    """The real engine (engine.epochs: the loop of the train and tune stages), without the stage's files and
    tracking around it: 3 epochs of 8 batches of 32 digits."""
    train_images, val_images = digits
    cell = dataclasses.replace(load_study(TINY_STUDY).cell(FAMILY_CELLS[family]), epochs=3, batch_size=32, device="cpu")
    assert cell.family == family
    training = engine.start_training(cell, torch.device("cpu"))
    model = training.model
    players = {"gan": ["decoder", "discriminator"], "vaegan": ["encoder", "decoder", "discriminator"]}.get(family, [])
    start = {player: [p.detach().clone() for p in getattr(model, player).parameters()] for player in players}
    history = list(engine.epochs(training, train_images, val_images))
    engine.finish_training(training, train_images)
    assert [row["epoch"] for row in history] == [1, 2, 3] and training.history == history
    assert all(math.isfinite(value) for row in history for value in row.values())
    first, last = history[0], history[-1]
    if model.capabilities.adversarial:
        # A two-player game has no total loss that must fall; in 3 epochs the discriminator learns to tell real
        # digits from the generator's (its loss falls, D(x) ends above D(G(z))), and every player has moved.
        assert last["val_d_loss"] < first["val_d_loss"] and last["val_d_real"] > last["val_d_fake"]
        for player in players:
            moved = [not torch.equal(a, b) for a, b in zip(start[player], getattr(model, player).parameters())]
            assert any(moved), player
    else:
        assert last["train_loss"] < first["train_loss"] and last["val_loss"] < first["val_loss"]
    if model.capabilities.encoder:  # the VAE-GAN too: its encoder and decoder learn to reconstruct
        assert last["val_recon"] < first["val_recon"]
    if model.capabilities.posterior:
        assert all(row["val_elbo"] == pytest.approx(row["val_recon"] + row["val_kl"]) for row in history)
    if model.sampler.ex_post:  # the ex-post Gaussian of the training codes
        assert torch.allclose(model.sampler.mean, encode_all(model, train_images).mean(0), atol=1e-4)
