"""Stage `train`: fit one grid cell's model with the training engine, checkpointing every epoch so that a
killed run resumes where it stopped."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pipeline import engine, tracking
from pipeline.classifier import load_classifier
from pipeline.config import CellConfig, StudyConfig, cell_as_dict
from pipeline.data import images_to_tensor, load_prepared
from pipeline.evaluation.sample_quality import FIDProbe
from pipeline.models import Autoencoder, build_model
from pipeline.outputs import PREPARED_FILE, resume_file, sha256_of, staged_dir, train_dir, train_stage, write_json

log = logging.getLogger(__name__)
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
RUN_FILE = "mlflow_run.json"


def train_cell(
    config: StudyConfig,
    cell_name: str,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train one cell, write its stage outputs, and return its per-epoch history."""
    cell = config.cell(cell_name)
    device = engine.resolve_device(cell.device)
    engine.set_threads()
    arrays = load_prepared(PREPARED_FILE)
    train_images = images_to_tensor(arrays["train_images"], device)
    val_images = images_to_tensor(arrays["val_images"], device)

    training = engine.start_training(cell, device)
    origin = None
    if cell.init_from:
        training.model.start_from(load_trained(config.study, config.cell(cell.init_from), device))
        origin = sha256_of(train_dir(config.study, cell.init_from) / MODEL_FILE)
    probe = None
    if training.model.capabilities.adversarial:
        probe = FIDProbe(load_classifier(device), val_images, cell.latent_dim, seed=cell.seed)
    checkpoint = resume_file(config.study, cell.name)
    run_id = engine.restore_checkpoint(checkpoint, training, origin)
    with tracking.cell_run(config, cell, stage=train_stage(cell), run_id=run_id) as run:
        if not training.history:
            tracking.log_cell_params(config, cell)
        for row in engine.epochs(training, train_images, val_images, probe):
            tracking.log_epoch(row)
            validation = "  ".join(f"{key[4:]} {value:.2f}" for key, value in row.items() if key.startswith("val_"))
            log.info("%s epoch %d/%d  train loss %.2f  val %s", cell.name, row["epoch"], cell.epochs, row["train_loss"], validation)
            engine.save_checkpoint(checkpoint, training, run.info.run_id, origin)
            if on_epoch_end is not None:
                on_epoch_end(row["epoch"])
        engine.finish_training(training, train_images)

        with staged_dir(train_dir(config.study, cell.name)) as out:
            torch.save({"cell": cell_as_dict(cell), "state_dict": training.model.state_dict()}, out / MODEL_FILE)
            write_json(out / HISTORY_FILE, training.history)
            write_json(out / "config.json", {"study": config.study, "cell": cell_as_dict(cell)})
            write_json(out / RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
        tracking.log_model(training.model)
    checkpoint.unlink(missing_ok=True)
    return training.history


def load_trained(study: str, cell: CellConfig, device: torch.device) -> Autoencoder:
    path = train_dir(study, cell.name) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; train the cell first (dvc repro {train_stage(cell)})")
    saved = torch.load(path, map_location=device, weights_only=True)
    if saved["cell"] != cell_as_dict(cell):
        block = "finetuned" if cell.init_from else "cells"
        raise RuntimeError(f"{path} was trained with other parameters than {block}.{cell.name}; re-run dvc repro")
    model = build_model(cell).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval()
