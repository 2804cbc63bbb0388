"""The params each stage reads, as dvc.yaml declares them, and the check that params.yaml still holds them
when the stage ends.

DVC records a stage's params in dvc.lock (and its run-cache) from params.yaml as it is when the command
exits, not as the command read it. A stage whose params were edited while it ran would be recorded with
values its outputs were not made with; so every stage compares the sections it read at its start (the
study's parsed YAML) with params.yaml just before it exits, and fails naming the changed keys, so that DVC
records nothing. The few milliseconds between this check and DVC's own read remain.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import ConfigError, StudyConfig

# The params sections of the stages that are not one per cell (dvc.yaml's `params:`).
PREPARE_PARAMS = ("data",)
CLASSIFIER_PARAMS = ("classifier", "threads")
FLOOR_PARAMS = ("classifier.device", "sample_quality", "threads")
REPORT_PARAMS = ("study", "report", "data", "train", "cells", "finetuned", "evaluate", "sample_quality")
TUNE_PARAMS = (
    "study",
    "train",
    "cells",
    "data",
    "evaluate",
    "classifier",
    "sample_quality",
    "report",
    "tracking",
    "threads",
)


class ParamsChanged(ConfigError):
    """params.yaml changed while a stage ran."""


def _cell_key(config: StudyConfig, cell_name: str) -> str:
    return f"{'finetuned' if config.cell(cell_name).init_from else 'cells'}.{cell_name}"


def train_params(config: StudyConfig, cell_name: str) -> tuple[str, ...]:
    """A train@ or finetune@ stage's params: a fine-tuned cell also reads the cell it starts from."""
    cell = config.cell(cell_name)
    origin = (f"cells.{cell.init_from}",) if cell.init_from else ()
    return ("study", "train", "tracking", "threads", _cell_key(config, cell_name), *origin)


def evaluate_params(config: StudyConfig, cell_name: str) -> tuple[str, ...]:
    return ("study", "train", _cell_key(config, cell_name), "evaluate", "sample_quality", "threads")


def value_at(raw: object, key: str) -> object:
    """The value of a dotted key in parsed YAML (None where a part is missing)."""
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def changed_keys(before: object, after: object, key: str) -> list[str]:
    """The dotted keys under `key` whose values differ, down to the leaves that changed."""
    if isinstance(before, dict) and isinstance(after, dict):
        changed = []
        for part in sorted(set(map(str, before)) | set(map(str, after))):
            changed += changed_keys(before.get(part), after.get(part), f"{key}.{part}")
        return changed
    return [] if before == after else [key]


def check_unchanged(config: StudyConfig, keys: tuple[str, ...], stage: str) -> None:
    """Fail when params.yaml no longer holds, under `keys`, what the stage read at its start. A config not
    read from a file (tests, the tuning trials' cells) has nothing to compare."""
    if config.params_file is None:
        return
    path = Path(config.params_file)
    try:
        current = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        current = None
    changed = [name for key in keys for name in changed_keys(value_at(config.raw, key), value_at(current, key), key)]
    if changed:
        shown = ", ".join(
            f"{name}: {value_at(config.raw, name)!r} -> {value_at(current, name)!r}" for name in changed[:3]
        )
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ParamsChanged(
            f"{path} changed while {stage} ran ({shown}{more}); its outputs were made with the old values, so "
            "nothing is recorded: run `dvc repro` again"
        )
