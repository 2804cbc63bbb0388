"""MNIST on disk: the four IDX files, their published checksums, and the prepared arrays."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import VaebenchError
from pipeline.outputs import sha256_of

# Published SHA-256 sums of the original distribution files (the same as shared/data/SHA256SUMS).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
SPLITS = ("train", "val", "test")


class DataError(VaebenchError):
    """A missing, corrupt or unreadable data file."""


def raw_dir(root: str | Path) -> Path:
    """torchvision's layout: <root>/MNIST/raw/*.gz"""
    return Path(root) / "MNIST" / "raw"


def missing_files(root: str | Path) -> list[str]:
    return [name for name in MNIST_SHA256 if not (raw_dir(root) / name).is_file()]


def verify_checksums(root: str | Path) -> None:
    for name, expected in MNIST_SHA256.items():
        path = raw_dir(root) / name
        actual = sha256_of(path)
        if actual != expected:
            raise DataError(
                f"checksum mismatch for {path}: sha256 {actual[:16]}… but the published file has "
                f"{expected[:16]}…; the file is corrupt or truncated, delete it and download it again"
            )


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip-compressed IDX file of unsigned bytes (the MNIST format)."""
    with gzip.open(path, "rb") as handle:
        content = handle.read()
    zero, dtype_code, ndim = content[0:2], content[2], content[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_raw(root: str | Path) -> dict[str, np.ndarray]:
    folder = raw_dir(root)
    return {
        "train_images": read_idx(folder / "train-images-idx3-ubyte.gz"),
        "train_labels": read_idx(folder / "train-labels-idx1-ubyte.gz"),
        "test_images": read_idx(folder / "t10k-images-idx3-ubyte.gz"),
        "test_labels": read_idx(folder / "t10k-labels-idx1-ubyte.gz"),
    }


def split(raw: dict[str, np.ndarray], train_size: int, val_size: int, test_size: int, seed: int) -> dict:
    """A deterministic train/validation split of the 60,000 training images, plus the first test images."""
    order = np.random.default_rng(seed).permutation(len(raw["train_images"]))
    train_idx, val_idx = order[:train_size], order[train_size : train_size + val_size]
    return {
        "train_images": raw["train_images"][np.sort(train_idx)],
        "train_labels": raw["train_labels"][np.sort(train_idx)],
        "val_images": raw["train_images"][np.sort(val_idx)],
        "val_labels": raw["train_labels"][np.sort(val_idx)],
        "test_images": raw["test_images"][:test_size],
        "test_labels": raw["test_labels"][:test_size],
    }


def load_prepared(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"prepared data {path} is missing; run `dvc repro prepare` first")
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"prepared data {path} is unreadable ({error}); re-create it with `dvc repro -f prepare`"
        ) from None


def binarize_once(images: np.ndarray, seed: int, split: str) -> np.ndarray:
    """uint8 grey images drawn once as binary ones (0 or 255): each pixel is 255 with probability pixel / 255
    (the reference code's test set: one seeded Bernoulli draw of the grey pixels). Each split has a stream of
    its own, apart from the split's permutation of the same seed."""
    stream = np.random.SeedSequence([seed, SPLITS.index(split) + 1])
    draws = np.random.default_rng(stream).random(images.shape)
    return np.where(draws < images / 255.0, 255, 0).astype(np.uint8)


def images_to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], the targets of the Bernoulli likelihood."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).unsqueeze(1).float().div_(255.0)
