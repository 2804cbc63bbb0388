"""Stage `train`: fit one grid cell's model with the training engine, checkpointing every epoch so that a
killed run resumes where it stopped."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

from pipeline import engine, stage_params, tracking
from pipeline.classifier import load_classifier
from pipeline.config import StudyConfig, cell_as_dict
from pipeline.data import images_to_tensor, load_prepared
from pipeline.evaluation.probe import FIDProbe
from pipeline.leftovers import clear_leftovers
from pipeline.memory import check_memory
from pipeline.outputs import check_room_for_dvc_cache, read_json, save_torch_file, sha256_of, staged_dir, write_json
from pipeline.paths import (
    CONFIG_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    PREPARED_FILE,
    PREPARED_SUMMARY,
    RUN_FILE,
    resume_file,
    train_dir,
    train_stage,
)
from pipeline.timing import Stopwatch
from pipeline.trained import load_trained

log = logging.getLogger(__name__)


def train_cell(
    config: StudyConfig,
    cell_name: str,
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train one cell, write its stage outputs, and return its per-epoch history."""
    cell = config.cell(cell_name)
    stopwatch = Stopwatch()
    with stopwatch.part("setup"):
        device = engine.resolve_device(cell.device)
        check_memory(cell, config.data.train_size, device, val_images=config.data.val_size)
        tracking.check_store()
        clear_leftovers(config.study)
        engine.set_threads(config.threads)
        arrays = load_prepared(PREPARED_FILE)
        train_images = images_to_tensor(arrays["train_images"], device)
        val_images = images_to_tensor(arrays["val_images"], device)

    prepared = read_json(PREPARED_SUMMARY)
    training = engine.start_training(cell, device, binarize=prepared.get("binarize") == "dynamic")
    inputs = {"data": sha256_of(PREPARED_FILE)}
    if cell.init_from:
        training.model.start_from(load_trained(config.study, config.cell(cell.init_from), device))
        inputs["origin"] = sha256_of(train_dir(config.study, cell.init_from) / MODEL_FILE)
    probe = None
    if training.model.capabilities.adversarial:
        probe = FIDProbe(load_classifier(device), val_images, training.model, seed=cell.seed)
    checkpoint = resume_file(config.study, cell.name)
    run_id = engine.restore_checkpoint(checkpoint, training, inputs)
    if run_id is not None and not tracking.run_exists(run_id):
        log.warning(
            "%s: the MLflow run %s of the resumed epochs is not in the tracking store; logging them again to a new run",
            cell.name,
            run_id,
        )
        run_id = None
    system_metrics = config.tracking.log_system_metrics
    with tracking.cell_run(config, cell, stage=train_stage(cell), run_id=run_id, system_metrics=system_metrics) as run:
        with stopwatch.part("setup"):
            if run_id is None:
                tracking.log_cell_params(config, cell, prepared)
                tracking.log_dataset(tracking.prepared_dataset(prepared, PREPARED_FILE), context="training")
                for row in training.history:
                    tracking.log_epoch(row)
        with stopwatch.part("epochs"):  # with each epoch's validation, MLflow metrics and resume checkpoint
            for row in engine.epochs(training, train_images, val_images, probe):
                tracking.log_epoch(row)
                validation = "  ".join(f"{key[4:]} {value:.2f}" for key, value in row.items() if key.startswith("val_"))
                log.info(
                    "%s epoch %d/%d  train loss %.2f  val %s",
                    cell.name,
                    row["epoch"],
                    cell.epochs,
                    row["train_loss"],
                    validation,
                )
                engine.save_checkpoint(checkpoint, training, run.info.run_id, inputs)
                if on_epoch_end is not None:
                    on_epoch_end(row["epoch"])
            engine.finish_training(training, train_images)

        with stopwatch.part("write_outputs"), staged_dir(train_dir(config.study, cell.name)) as out:
            save_torch_file({"cell": cell_as_dict(cell), "state_dict": training.model.state_dict()}, out / MODEL_FILE)
            write_json(out / HISTORY_FILE, training.history)
            write_json(out / CONFIG_FILE, {"study": config.study, "cell": cell_as_dict(cell)})
            write_json(out / RUN_FILE, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
        try:  # a failure from here on (an upload, edited params) leaves no outputs and the run FAILED
            with stopwatch.part("log_model"):
                tracking.log_model(training.model, cell)
                tracking.log_networks(training.model, cell)
            tracking.log_stage_seconds("train", stopwatch.seconds)
            stage_params.check_unchanged(config, stage_params.train_params(config, cell.name), train_stage(cell))
            check_room_for_dvc_cache([train_dir(config.study, cell.name)])
        except BaseException:
            shutil.rmtree(train_dir(config.study, cell.name), ignore_errors=True)
            raise
    checkpoint.unlink(missing_ok=True)
    return training.history
