"""How every stage writes: each output appears whole or not at all (where: pipeline/paths.py)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ArtifactError

REPOSITORY_ROOT_ENV = "DVC_ROOT"


def repository_root() -> Path:
    """The repository the study belongs to, where its local stores (mlflow.db, optuna.db) live. DVC gives
    every stage command DVC_ROOT; for `dvc exp run --temp` or `--queue` it names the repository the
    experiment was started from, not the temporary workspace the stage runs in, whose files are thrown away.
    Outside DVC, the working directory."""
    return Path(os.environ.get(REPOSITORY_ROOT_ENV) or ".").resolve()


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
    """Strict JSON (NaN and infinity are refused: callers check their numbers first), written atomically."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    scratch.write_text(text)
    os.replace(scratch, path)


def non_finite(values: dict[str, float]) -> list[str]:
    """The keys whose values are NaN or infinite."""
    return [key for key, value in values.items() if not math.isfinite(value)]


def save_torch_file(value: object, path: Path) -> None:
    """torch.save, atomically (a kill mid-write leaves the previous file)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    torch.save(value, scratch)
    os.replace(scratch, path)


def load_torch_file(path: Path, stage: str, device: object = "cpu") -> object:
    """torch.load with weights_only=True, so that loading cannot run code. A missing, truncated or foreign
    file fails with one line naming it and the DVC stage that writes it again."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; run `dvc repro {stage}` first")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # the unpickler of a damaged file raises almost anything; the file is at fault
        reason = (
            "it holds more than tensors and plain values, or is not a PyTorch file at all"
            if isinstance(error, (pickle.UnpicklingError, IndexError))
            else (str(error).split(".")[0] or type(error).__name__)
        )
        raise ArtifactError(
            f"{path} is not a readable PyTorch file ({reason}); delete it and re-create it with `dvc repro -f {stage}`"
        ) from None


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_json(path: Path) -> object:
    return json.loads(Path(path).read_text())


def restore_weights(module, state_dict: object, path: Path, stage: str) -> None:
    """module.load_state_dict for weights read from `path`, failing with one line when they belong to
    another network."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError, KeyError):
        raise ArtifactError(
            f"{path} does not hold the weights of this network (written by other code or for other parameters); "
            f"re-create it with `dvc repro -f {stage}`"
        ) from None
