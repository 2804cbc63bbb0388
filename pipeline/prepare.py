"""Stage `prepare`: verify the four MNIST files and write the train/validation/test arrays (uint8)."""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline import data
from pipeline.config import DATA_ROOT_ENV, StudyConfig
from pipeline.outputs import repository_root, sha256_of, staged_dir, write_json
from pipeline.paths import PREPARED_DIR, PREPARED_FILE, PREPARED_SUMMARY
from pipeline.stage_params import PREPARE_PARAMS, check_unchanged

log = logging.getLogger(__name__)


def ensure_raw_files(root: Path, download: bool) -> None:
    """Download the missing files when asked to, or fail naming what is expected where. The data folder
    receives only whole files that downloaded and match their published checksums."""
    missing = data.missing_files(root)
    if not missing:
        return
    expected = f"{data.raw_dir(root)}/ ({', '.join(missing)})"
    if not download:
        raise data.DataError(f"MNIST files missing: {expected}; copy them there or set data.download: true")
    log.info("MNIST files missing in %s; downloading %s", data.raw_dir(root), ", ".join(missing))
    with tempfile.TemporaryDirectory(prefix="vaebench-mnist-") as scratch:
        try:
            for name in missing:
                download_file(name, Path(scratch))
        except (OSError, RuntimeError) as error:  # torchvision raises RuntimeError on too many redirects
            raise data.DataError(
                f"MNIST files missing: {expected}, and downloading them failed ({type(error).__name__}: {error}); "
                f"copy the four .gz files there, or point data.root (or {DATA_ROOT_ENV}) at a folder holding MNIST/raw"
            ) from None
        data.raw_dir(root).mkdir(parents=True, exist_ok=True)
        for name in missing:
            partial = data.raw_dir(root) / f"{name}.partial"
            shutil.move(Path(scratch) / name, partial)
            os.replace(partial, data.raw_dir(root) / name)


def mirrors() -> list[str]:
    from torchvision.datasets import MNIST

    return MNIST.mirrors


def download_file(name: str, folder: Path) -> None:
    """Download one MNIST file into `folder` from the first mirror that serves it, checking its SHA-256."""
    from torchvision.datasets.utils import download_url

    errors = []
    for mirror in mirrors():
        (folder / name).unlink(missing_ok=True)  # download_url would keep a part left by the last mirror
        try:
            download_url(mirror + name, folder, filename=name)
        except (OSError, http.client.HTTPException) as error:  # urllib's errors are OSErrors
            errors.append(f"{mirror}: {getattr(error, 'reason', None) or error}")
            continue
        if sha256_of(folder / name) == data.MNIST_SHA256[name]:
            return
        errors.append(f"{mirror}: the file does not match its published SHA-256")
    raise OSError(f"no mirror served {name} ({'; '.join(errors)})")


def prepare(config: StudyConfig) -> dict:
    settings = config.data
    root = repository_root() / settings.root  # a relative data.root is relative to the repository, as documented
    ensure_raw_files(root, settings.download)
    data.verify_checksums(root)
    arrays = data.split(
        data.load_raw(root),
        settings.train_size,
        settings.val_size,
        settings.test_size,
        settings.split_seed,
    )
    if settings.binarize == "dynamic":  # training images stay grey: the train stage draws them anew every epoch
        for split in ("val", "test"):
            arrays[f"{split}_images"] = data.binarize_once(arrays[f"{split}_images"], settings.split_seed, split)
    with staged_dir(PREPARED_DIR) as scratch:
        np.savez_compressed(scratch / PREPARED_FILE.name, **arrays)
        summary = {
            "images": {split: int(len(arrays[f"{split}_images"])) for split in data.SPLITS},
            "split_seed": settings.split_seed,
            "sha256": data.MNIST_SHA256,
        }
        if settings.binarize != "none":  # grey-level data keeps the summary (and dataset digest) it always had
            summary["binarize"] = settings.binarize  # dynamic: val and test binary (drawn once), train grey
        write_json(scratch / PREPARED_SUMMARY.name, summary)
        check_unchanged(config, PREPARE_PARAMS, "prepare")
    log.info("prepared %s", summary["images"])
    return summary
