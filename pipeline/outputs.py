"""Where every stage writes, and how: each output appears whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import CellConfig

RESULTS = Path("results")
PREPARED_DIR = RESULTS / "prepare"
PREPARED_FILE = PREPARED_DIR / "mnist.npz"
CLASSIFIER_DIR = RESULTS / "classifier"
# Resume checkpoints live outside the stage outputs, because DVC deletes a stage's outputs before running it.
RESUME_DIR = Path(".vaebench") / "resume"


def train_dir(study: str, cell: str) -> Path:
    return RESULTS / study / "train" / cell


def evaluate_dir(study: str, cell: str) -> Path:
    return RESULTS / study / "evaluate" / cell


def train_stage(cell: CellConfig) -> str:
    """The DVC stage that trains the cell (dvc.yaml): fine-tuned cells have their own."""
    return f"{'finetune' if cell.init_from else 'train'}@{cell.name}"


def evaluate_stage(cell: CellConfig) -> str:
    return f"{'evaluate-finetuned' if cell.init_from else 'evaluate'}@{cell.name}"


def resume_file(study: str, cell: str) -> Path:
    return RESUME_DIR / study / f"{cell}.pt"


@contextmanager
def staged_dir(final: Path):
    """Yield a scratch folder that replaces `final` only if the block finishes without an error."""
    scratch = final.with_name(final.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    scratch.rename(final)


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    scratch.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(scratch, path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_json(path: Path) -> object:
    return json.loads(Path(path).read_text())
