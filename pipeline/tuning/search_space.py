"""A tuning study as data: the search space, objective, sampler and pruner read from studies/tune/*.yaml,
validated before any trial runs."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from pipeline.config import (
    CELL_DEFAULT_KEYS,
    CELL_OWN_KEYS,
    CellConfig,
    ConfigError,
    cell_as_dict,
    check_name,
    family_setting_keys,
    parse_cell,
)

OBJECTIVES = {  # name -> (validation metrics, directions)
    "val_elbo": (("val_elbo",), ("minimize",)),
    "val_recon": (("val_recon",), ("minimize",)),
    "val_loss": (("val_loss",), ("minimize",)),  # the family's own training objective
    "rate_distortion": (("val_recon", "val_kl"), ("minimize", "minimize")),
}
log = logging.getLogger(__name__)
NEEDS_POSTERIOR = ("val_elbo", "rate_distortion")
REGULARISERS = ("noise_std", "mask_prob", "contraction_weight")  # settings whose strength the objective itself pays for
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
TYPES = ("int", "float", "categorical")
# `hidden: 600` means one hidden layer of 600; `channels: 32` means (32, 64). A family's own settings are
# tunable on a base cell of that family; the family itself is the base cell's.
COMMON_TUNABLE = tuple(k for k in CELL_OWN_KEYS + CELL_DEFAULT_KEYS if k not in ("device", "family"))


def tunable() -> tuple[str, ...]:
    return COMMON_TUNABLE + tuple(dict.fromkeys(k for keys in family_setting_keys().values() for k in keys))


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class TuneSpace:
    name: str
    n_trials: int
    base_cell: str
    objective: str
    sampler: str
    seed: int
    pruner: str
    pruner_options: dict
    workers: int
    fixed: dict
    params: tuple[Param, ...]
    source: dict  # the file as read, for hashing and records

    @property
    def metrics(self) -> tuple[str, ...]:
        return OBJECTIVES[self.objective][0]

    @property
    def directions(self) -> tuple[str, ...]:
        return OBJECTIVES[self.objective][1]

    @property
    def fingerprint(self) -> str:
        """Changes with what is searched (a new space is a new Optuna study), not with n_trials or workers,
        so raising n_trials resumes the same study."""
        searched = {k: v for k, v in self.source.items() if k not in ("n_trials", "workers")}
        return hashlib.sha256(json.dumps(searched, sort_keys=True).encode()).hexdigest()[:8]

    def cell_values(self, sampled: dict) -> dict:
        """Cell keys from fixed and sampled values, in the cell's own units."""
        values = {**self.fixed, **sampled}
        if isinstance(values.get("hidden"), int):
            values["hidden"] = [values["hidden"]]
        if isinstance(values.get("channels"), int):
            values["channels"] = [values["channels"], 2 * values["channels"]]
        return values


def load_space(path: Path | str) -> TuneSpace:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"search space {path} not found; see studies/tune/ for examples") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not readable YAML ({str(error).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with name, n_trials, base_cell, objective, sampler, pruner, space")
    return parse_space(raw, str(path))


def parse_space(raw: dict, where: str = "search space") -> TuneSpace:
    allowed = ("name", "n_trials", "base_cell", "objective", "sampler", "pruner", "workers", "fixed", "space")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(allowed)}")
    for key in ("name", "n_trials", "base_cell", "space"):
        if key not in raw:
            raise ConfigError(f"{where}: {key} is missing")
    name = check_name(raw["name"], f"{where}: name")
    n_trials = raw["n_trials"]
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(f"{where}: n_trials must be an integer >= 1, got {n_trials!r}")
    objective = raw.get("objective", "val_elbo")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    sampler = dict(raw.get("sampler") or {"name": "tpe"})
    if sampler.get("name") not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler {sampler.get('name')!r}; choose one of {', '.join(SAMPLERS)}")
    pruner = dict(raw.get("pruner") or {"name": "median"})
    pruner_name = pruner.pop("name", None)
    if pruner_name not in PRUNERS:
        raise ConfigError(f"{where}: unknown pruner {pruner_name!r}; choose one of {', '.join(PRUNERS)}")
    if len(OBJECTIVES[objective][1]) > 1 and pruner_name != "none":
        raise ConfigError(f"{where}: Optuna cannot prune multi-objective studies; set pruner: {{name: none}}")
    workers = raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{where}: workers must be an integer >= 1, got {workers!r}")
    fixed = raw.get("fixed") or {}
    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: space must be a non-empty mapping of parameter: {{type, low, high, ...}}")
    for key in [*fixed, *space]:
        if key not in tunable():
            raise ConfigError(f"{where}: unknown parameter {key!r}; tunable parameters are {', '.join(tunable())}")
    return TuneSpace(
        name=name,
        n_trials=n_trials,
        base_cell=str(raw["base_cell"]),
        objective=objective,
        sampler=sampler["name"],
        seed=int(sampler.get("seed", 0)),
        pruner=pruner_name,
        pruner_options=pruner,
        workers=workers,
        fixed=dict(fixed),
        params=tuple(_parse_param(key, spec, f"{where}: space.{key}") for key, spec in space.items()),
        source=raw,
    )


def _parse_param(name: str, spec: object, where: str) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"{where} needs type: one of {', '.join(TYPES)}")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: a categorical parameter needs a non-empty list of choices")
        return Param(name, "categorical", choices=tuple(choices))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: {spec['type']} parameters need numeric low and high") from None
    log = bool(spec.get("log", False))
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"{where}: low ({low:g}) must not exceed high ({high:g})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low:g}")
    step = spec.get("step")
    if step is not None and log:
        raise ConfigError(f"{where}: step and log cannot be combined")
    return Param(name, spec["type"], low=low, high=high, log=log, step=float(step) if step is not None else None)


def make_sampler(space: TuneSpace, seed_offset: int) -> optuna.samplers.BaseSampler:
    seed = space.seed + seed_offset
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)


def make_pruner(space: TuneSpace) -> optuna.pruners.BasePruner:
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(**{"n_startup_trials": 4, "n_warmup_steps": 2, **space.pruner_options})
    if space.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(**space.pruner_options)
    return optuna.pruners.NopPruner()


def check_space_fits(space: TuneSpace, base: CellConfig) -> None:
    """Before any trial: the searched and fixed keys belong to the base cell's family, and the objective
    is one that family reports."""
    from pipeline.models import FAMILIES

    if FAMILIES[base.family].capabilities.adversarial:
        raise ConfigError(
            f"search space {space.name}: base cell {base.name} is a {base.family} cell, whose losses are a two-player "
            "game rather than an objective to minimise; tune a vae, ae, dae or cae cell"
        )
    allowed = COMMON_TUNABLE + family_setting_keys()[base.family]
    for key in [*space.fixed, *(param.name for param in space.params)]:
        if key not in allowed:
            raise ConfigError(
                f"search space {space.name}: {key} is not a setting of family {base.family} (base cell "
                f"{base.name}); tunable here: {', '.join(allowed)}"
            )
    if space.objective in NEEDS_POSTERIOR and not FAMILIES[base.family].capabilities.posterior:
        raise ConfigError(
            f"search space {space.name}: objective {space.objective} needs a KL term, which family {base.family} "
            f"(base cell {base.name}) has not; use val_recon or val_loss"
        )
    with_values(base, space.cell_values({}))
    weakened = [p.name for p in space.params if p.name in REGULARISERS] if space.objective in ("val_loss", "val_recon") else []
    if weakened:
        log.warning(
            "search space %s: %s is searched against %s, which is lowest with the least regularisation (the DAE "
            "validates on corrupted inputs, the CAE's loss holds its penalty); read such trials with care",
            space.name, ", ".join(weakened), space.objective,
        )


def with_values(cell, values: dict):
    """The base cell with tuned values, validated like any cell of params.yaml. A DAE whose noise kind is
    set keeps only the level that kind reads (its default unless set too)."""
    base = cell_as_dict(cell)
    if "noise" in values:
        base = {key: value for key, value in base.items() if key not in ("noise_std", "mask_prob")}
    merged = {**base, **values}
    name = merged.pop("name")
    return parse_cell(name, merged, {})

