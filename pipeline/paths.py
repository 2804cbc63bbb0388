"""Where every stage's outputs live (the layout dvc.yaml declares). Only names: no stage depends on this
module, because moving an output means editing dvc.yaml too."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import CellConfig

RESULTS = Path("results")
REPORTS = Path("reports")
PREPARED_DIR = RESULTS / "prepare"
PREPARED_FILE = PREPARED_DIR / "mnist.npz"
PREPARED_SUMMARY = PREPARED_DIR / "summary.json"  # split sizes and seed, the raw files' SHA-256
CLASSIFIER_DIR = RESULTS / "classifier"
CLASSIFIER_FILE = CLASSIFIER_DIR / "model.pt"
TEST_FEATURES_FILE = CLASSIFIER_DIR / "test_features.pt"  # the real side of every score, computed once
FLOOR_DIR = RESULTS / "floor"
FLOOR_FILE = FLOOR_DIR / "floor.json"
# Resume checkpoints live outside the stage outputs, because DVC deletes a stage's outputs before running it.
RESUME_DIR = Path(".vaebench") / "resume"

# The files of a cell's train folder and evaluate folder.
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"  # the cell as its train stage recorded it
RUN_FILE = "mlflow_run.json"
METRICS_FILE = "metrics.json"
KL_PER_DIM_FILE = "kl_per_dim.json"  # null for a family without a posterior
CLASS_SHARES_FILE = "class_shares.json"


def train_dir(study: str, cell: str) -> Path:
    return RESULTS / study / "train" / cell


def evaluate_dir(study: str, cell: str) -> Path:
    return RESULTS / study / "evaluate" / cell


def study_metrics_file(study: str) -> Path:
    """Every evaluated cell's test metrics, by cell: the report stage's DVC metrics file, committed to Git."""
    return RESULTS / study / "metrics.json"


def resume_file(study: str, cell: str) -> Path:
    return RESUME_DIR / study / f"{cell}.pt"


def train_stage(cell: CellConfig) -> str:
    """The DVC stage that trains the cell (dvc.yaml): fine-tuned cells have their own."""
    return f"{'finetune' if cell.init_from else 'train'}@{cell.name}"


def evaluate_stage(cell: CellConfig) -> str:
    return f"{'evaluate-finetuned' if cell.init_from else 'evaluate'}@{cell.name}"
