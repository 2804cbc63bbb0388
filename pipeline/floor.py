"""Stage `floor`: the sample-quality scores of real training digits against the test set, what a perfect
generator would score. The report reads every model's scores against this floor."""

from __future__ import annotations

import logging

import torch

from pipeline.classifier import load_classifier, load_test_features
from pipeline.config import SampleQualityConfig, StudyConfig
from pipeline.data import images_to_tensor, load_prepared
from pipeline.engine import resolve_device, set_threads
from pipeline.evaluation.sample_quality import set_scores
from pipeline.outputs import read_json, staged_dir, write_json
from pipeline.paths import FLOOR_DIR, FLOOR_FILE, PREPARED_FILE
from pipeline.stage_params import FLOOR_PARAMS, check_unchanged

log = logging.getLogger(__name__)


def real_data_floor(
    classifier, train_images: torch.Tensor, real_features: torch.Tensor, settings: SampleQualityConfig
) -> dict:
    """The scores of the first `n_samples` training digits, and their share of each predicted digit."""
    scores, shares = set_scores(classifier, real_features, train_images[: settings.n_samples], settings)
    return {**scores, "class_shares": shares}


def compute_floor(config: StudyConfig) -> dict:
    device = resolve_device(config.classifier.device)
    set_threads(config.threads)
    train_images = images_to_tensor(
        load_prepared(PREPARED_FILE)["train_images"][: config.sample_quality.n_samples], device
    )
    floor = real_data_floor(load_classifier(device), train_images, load_test_features(device), config.sample_quality)
    with staged_dir(FLOOR_DIR) as out:
        write_json(out / FLOOR_FILE.name, floor)
        check_unchanged(config, FLOOR_PARAMS, "floor")
    log.info("real-data floor: %s", {key: value for key, value in floor.items() if key != "class_shares"})
    return floor


def load_floor() -> dict | None:
    """The real-data floor, or None before the floor stage has run."""
    return read_json(FLOOR_FILE) if FLOOR_FILE.is_file() else None
