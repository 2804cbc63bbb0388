"""A cell's trained model, rebuilt from its train stage's output (read by evaluate, the report and the app)."""

from __future__ import annotations

import torch

from pipeline.config import CellConfig, cell_as_dict
from pipeline.errors import ArtifactError
from pipeline.models import Autoencoder, build_model
from pipeline.outputs import load_torch_file, restore_weights
from pipeline.paths import MODEL_FILE, train_dir, train_stage


def load_trained(study: str, cell: CellConfig, device: torch.device) -> Autoencoder:
    path, stage = train_dir(study, cell.name) / MODEL_FILE, train_stage(cell)
    saved = load_torch_file(path, stage, device)
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise ArtifactError(f"{path} is not a vaebench model file; re-create it with `dvc repro -f {stage}`")
    if saved.get("cell") != cell_as_dict(cell):
        block = "finetuned" if cell.init_from else "cells"
        raise ArtifactError(
            f"{path} was trained with other parameters than {block}.{cell.name}; retrain it: dvc repro -f {stage} "
            "(-f also skips DVC's run-cache, which may map these parameters to that model, and replaces the entry)"
        )
    model = build_model(cell).to(device)
    restore_weights(model, saved["state_dict"], path, stage)
    broken = [
        name for name, value in model.state_dict().items() if value.is_floating_point() and not value.isfinite().all()
    ]
    if broken:
        raise ArtifactError(
            f"{path} holds NaN or infinite weights ({broken[0]}); retrain the cell: dvc repro -f {stage}"
        )
    return model.eval()
