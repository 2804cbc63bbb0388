"""Stage `prepare`: verify the four MNIST files and write the train/validation/test arrays (uint8)."""

from __future__ import annotations

import logging

import numpy as np

from pipeline import data
from pipeline.config import DATA_ROOT_ENV, StudyConfig
from pipeline.outputs import PREPARED_DIR, PREPARED_FILE, staged_dir, write_json

log = logging.getLogger(__name__)


def ensure_raw_files(root: str, download: bool) -> None:
    """Download the files with torchvision when they are missing, or fail naming what is expected where."""
    missing = data.missing_files(root)
    if not missing:
        return
    expected = f"{data.raw_dir(root)}/ ({', '.join(missing)})"
    if not download:
        raise data.DataError(f"MNIST files missing: {expected}; copy them there or set data.download: true")
    log.info("MNIST files missing in %s; downloading with torchvision", data.raw_dir(root))
    try:
        from torchvision.datasets import MNIST

        MNIST(root=root, train=True, download=True)
        MNIST(root=root, train=False, download=True)
    except Exception as error:  # torchvision raises several kinds of network and file errors
        raise data.DataError(
            f"MNIST files missing: {expected}, and the download failed ({type(error).__name__}); "
            f"copy the four .gz files there, or point data.root (or {DATA_ROOT_ENV}) at a folder holding MNIST/raw"
        ) from None


def prepare(config: StudyConfig) -> dict:
    settings = config.data
    ensure_raw_files(settings.root, settings.download)
    data.verify_checksums(settings.root)
    arrays = data.split(
        data.load_raw(settings.root),
        settings.train_size,
        settings.val_size,
        settings.test_size,
        settings.split_seed,
    )
    with staged_dir(PREPARED_DIR) as scratch:
        np.savez_compressed(scratch / PREPARED_FILE.name, **arrays)
        summary = {
            "images": {split: int(len(arrays[f"{split}_images"])) for split in data.SPLITS},
            "split_seed": settings.split_seed,
            "sha256": data.MNIST_SHA256,
        }
        write_json(scratch / "summary.json", summary)
    log.info("prepared %s", summary["images"])
    return summary
