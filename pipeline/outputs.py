"""How every stage writes: each output appears whole or not at all (where: pipeline/paths.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ArtifactError, VaebenchError

REPOSITORY_ROOT_ENV = "DVC_ROOT"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(VaebenchError):
    """A write failed for want of space (a full file system, or the user's quota)."""


def size_text(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_space(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would: its nearest existing folder)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: Path, needed: int | None = None) -> DiskFull:
    """The one-line error for a write to `path` that found no space; `needed`: the bytes it needed, if known."""
    need = f", and it needs at least {size_text(needed)}" if needed else ""
    return DiskFull(
        f"no space left for {path}: its file system (or your quota there) has {size_text(free_space(path))} free"
        f"{need}; free space there, then re-run"
    )


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def check_room_for_dvc_cache(outputs: list[Path]) -> None:
    """Under DVC (which sets DVC_ROOT), that DVC's cache has room to store the stage's outputs once the command
    exits: a stage that ends successfully while DVC then fails to cache its outputs would leave an MLflow run
    that looks valid for outputs DVC never recorded. (With reflinks or hardlinks DVC needs less; the check is
    a bound.)"""
    root = os.environ.get(REPOSITORY_ROOT_ENV)
    if not root:
        return
    needed = sum(folder_size(path) for path in outputs if Path(path).exists())
    cache = Path(root) / ".dvc" / "cache"
    if free_space(cache) < needed:
        raise disk_full(cache, needed)


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
    except OSError as error:
        written = folder_size(scratch) if scratch.exists() else 0
        shutil.rmtree(scratch, ignore_errors=True)
        if error.errno in DISK_FULL:
            raise disk_full(final, written or None) from None
        raise
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
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Replace `path` with `data` in one step, through a scratch file beside it that no failure or interrupt
    leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(path.name + ".partial")
    try:
        scratch.write_bytes(data)
    except BaseException as error:  # a full disk, or Ctrl-C / SIGTERM mid-write: no half-written scratch left
        scratch.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise disk_full(path, len(data)) from None
        raise
    os.replace(scratch, path)


def non_finite(values: dict[str, float]) -> list[str]:
    """The keys whose values are NaN or infinite."""
    return [key for key, value in values.items() if not math.isfinite(value)]


def save_torch_file(value: object, path: Path) -> None:
    """torch.save, atomically (a kill mid-write leaves the previous file). Serialized in memory first: torch's
    own file writer reports a full disk as an unrelated RuntimeError ("unexpected pos ...")."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    write_bytes(path, buffer.getbuffer())


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
