"""What a killed stage leaves behind, cleared when a later stage of the study starts: MLflow runs left RUNNING
by a process that is gone (the killed stage may never run again to end its run: DVC can restore its outputs
from the run-cache), and resume checkpoints of cells whose train outputs DVC has since put in place."""

from __future__ import annotations

import logging

from pipeline import tracking
from pipeline.paths import MODEL_FILE, RESUME_DIR, train_dir

log = logging.getLogger(__name__)


def stale_checkpoints(study: str) -> list:
    """Resume checkpoints older than their cell's model.pt. DVC deletes a stage's outputs before running it, so
    a model.pt beside a checkpoint was put there after it: restored from DVC's cache (a copy, so newer), or
    written by a run that finished. Resuming from such a checkpoint would continue a training that other
    code or other inputs may since have replaced. (A checkpoint written after its cell's model.pt, by a
    training run by hand outside DVC, is kept.)"""
    stale = []
    for checkpoint in sorted((RESUME_DIR / study).glob("*.pt")):
        model = train_dir(study, checkpoint.stem) / MODEL_FILE
        if model.is_file() and model.stat().st_mtime > checkpoint.stat().st_mtime:
            stale.append(checkpoint)
    return stale


def clear_leftovers(study: str) -> None:
    tracking.end_abandoned_runs(study)
    for checkpoint in stale_checkpoints(study):
        checkpoint.unlink(missing_ok=True)
        log.info("removed the resume checkpoint %s: its cell's outputs are in place", checkpoint)
