"""A tuning study as data: the search space, objective, sampler and pruner read from studies/tune/*.yaml,
validated before any trial runs."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from pipeline.config import (
    CELL_DEFAULT_KEYS,
    CELL_OWN_KEYS,
    MNIST_TRAIN_IMAGES,
    CellConfig,
    ConfigError,
    cell_as_dict,
    check_name,
    families,
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
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 30
# `hidden: 600` means one hidden layer of 600; `channels: 32` means (32, 64). A family's own settings are
# tunable on a base cell of that family; the family itself is the base cell's.
COMMON_TUNABLE = tuple(k for k in CELL_OWN_KEYS + CELL_DEFAULT_KEYS if k not in ("device", "family"))


def tunable() -> tuple[str, ...]:
    return COMMON_TUNABLE + tuple(dict.fromkeys(k for keys in family_setting_keys().values() for k in keys))


@dataclass(frozen=True)
class Param:
    """One searched setting: its name and the Optuna distribution it is drawn from."""

    name: str
    distribution: BaseDistribution

    def suggest(self, trial: optuna.Trial):
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, list(d.choices))
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)

    def extremes(self) -> list:
        """The values a trial can draw that are most likely to be invalid for the cell: every choice, or
        both bounds."""
        d = self.distribution
        return list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]


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
    heartbeat_interval: int  # seconds between a running trial's heartbeats in the Optuna storage
    grace_period: int  # a RUNNING trial whose last heartbeat is older is a killed worker's: FAIL, then retried
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
        """Changes with what is searched (a new space is a new Optuna study), not with n_trials, workers or heartbeat,
        so raising n_trials resumes the same study."""
        searched = {k: v for k, v in self.source.items() if k not in ("n_trials", "workers", "heartbeat")}
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
    allowed = (
        "name",
        "n_trials",
        "base_cell",
        "objective",
        "sampler",
        "pruner",
        "workers",
        "heartbeat",
        "fixed",
        "space",
    )
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(allowed)}")
    for key in ("name", "n_trials", "base_cell", "space"):
        if key not in raw:
            raise ConfigError(f"{where}: {key} is missing")
    name = check_name(raw["name"], f"{where}: name")
    n_trials = _positive_int(raw["n_trials"], f"{where}: n_trials")
    objective = raw.get("objective", "val_elbo")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    sampler = _mapping(raw.get("sampler", {"name": "tpe"}), f"{where}: sampler", "{name: tpe, seed: 0}")
    if sampler.get("name") not in SAMPLERS:
        raise ConfigError(f"{where}: unknown sampler {sampler.get('name')!r}; choose one of {', '.join(SAMPLERS)}")
    if set(sampler) - {"name", "seed"}:
        raise ConfigError(
            f"{where}: sampler takes name and seed only, got {sorted(set(sampler) - {'name', 'seed'})[0]!r}"
        )
    seed = sampler.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{where}: sampler seed must be an integer >= 0, got {seed!r}")
    pruner = _mapping(raw.get("pruner", {"name": "median"}), f"{where}: pruner", "{name: median}")
    pruner_name = pruner.pop("name", None)
    if pruner_name not in PRUNERS:
        raise ConfigError(f"{where}: unknown pruner {pruner_name!r}; choose one of {', '.join(PRUNERS)}")
    if len(OBJECTIVES[objective][1]) > 1 and pruner_name != "none":
        raise ConfigError(f"{where}: Optuna cannot prune multi-objective studies; set pruner: {{name: none}}")
    build_pruner(pruner_name, pruner, where)  # its options are checked now, not in the first trial
    workers = _positive_int(raw.get("workers", 1), f"{where}: workers")
    heartbeat = _mapping(raw.get("heartbeat", {}), f"{where}: heartbeat", "{interval: 10, grace: 30}")
    if set(heartbeat) - {"interval", "grace"}:
        raise ConfigError(f"{where}: heartbeat takes interval and grace (seconds), got {sorted(heartbeat)}")
    interval = _positive_int(heartbeat.get("interval", HEARTBEAT_SECONDS), f"{where}: heartbeat.interval")
    grace = _positive_int(heartbeat.get("grace", GRACE_SECONDS), f"{where}: heartbeat.grace")
    if grace <= interval:
        raise ConfigError(f"{where}: heartbeat.grace ({grace} s) must exceed heartbeat.interval ({interval} s)")
    fixed = _mapping(raw.get("fixed") or {}, f"{where}: fixed", "{epochs: 10}")
    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: space must be a non-empty mapping of parameter: {{type, low, high, ...}}")
    for key in [*fixed, *space]:
        if key not in tunable():
            raise ConfigError(f"{where}: unknown parameter {key!r}; tunable parameters are {', '.join(tunable())}")
    both = sorted(set(fixed) & set(space))
    if both:
        raise ConfigError(f"{where}: {both[0]} is both fixed and searched; keep one")
    return TuneSpace(
        name=name,
        n_trials=n_trials,
        base_cell=str(raw["base_cell"]),
        objective=objective,
        sampler=sampler["name"],
        seed=seed,
        pruner=pruner_name,
        pruner_options=pruner,
        workers=workers,
        heartbeat_interval=interval,
        grace_period=grace,
        fixed=dict(fixed),
        params=tuple(_parse_param(key, spec, f"{where}: space.{key}") for key, spec in space.items()),
        source=raw,
    )


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be an integer >= 1, got {value!r}")
    return value


def _mapping(value: object, where: str, example: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping such as {example}, got {value!r}")
    return dict(value)


def _parse_param(name: str, spec: object, where: str) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"{where} needs type: one of {', '.join(TYPES)}")
    kind = spec["type"]
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    if set(spec) - allowed:
        raise ConfigError(
            f"{where}: a {kind} parameter takes {', '.join(sorted(allowed))}, not {sorted(set(spec) - allowed)[0]}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: a categorical parameter needs a non-empty list of choices")
        if not all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in choices):
            raise ConfigError(f"{where}: choices must be numbers, strings or booleans")
        return Param(name, CategoricalDistribution(choices))
    number = (int,) if kind == "int" else (int, float)
    bounds = [spec.get("low"), spec.get("high")]
    if not all(isinstance(bound, number) and not isinstance(bound, bool) for bound in bounds):
        raise ConfigError(
            f"{where}: {kind} parameters need {'integer' if kind == 'int' else 'numeric'} low and high, got {bounds}"
        )
    low, high = bounds
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"{where}: low ({low:g}) must not exceed high ({high:g})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low:g}")
    step = spec.get("step")
    if step is not None and log:
        raise ConfigError(f"{where}: step and log cannot be combined")
    if step is not None and (not isinstance(step, number) or isinstance(step, bool) or step <= 0):
        raise ConfigError(f"{where}: step must be a{'n integer' if kind == 'int' else ' number'} > 0, got {step!r}")
    try:
        if kind == "int":
            return Param(name, IntDistribution(low, high, log=log, step=step or 1))
        return Param(name, FloatDistribution(float(low), float(high), log=log, step=step))
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def make_sampler(space: TuneSpace, seed_offset: int) -> optuna.samplers.BaseSampler:
    seed = space.seed + seed_offset
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)


def build_pruner(name: str, options: dict, where: str = "search space") -> optuna.pruners.BasePruner:
    classes = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    if name == "median":
        options = {"n_startup_trials": 4, "n_warmup_steps": 2, **options}
    accepted = [key for key in inspect.signature(classes[name]).parameters if key != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option {unknown[0]!r} of pruner {name}; it takes {', '.join(accepted) or 'none'}"
        )
    try:
        return classes[name](**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: pruner {name}: {error}") from None


def make_pruner(space: TuneSpace) -> optuna.pruners.BasePruner:
    return build_pruner(space.pruner, space.pruner_options, space.name)


def check_space_fits(space: TuneSpace, base: CellConfig) -> None:
    """Before any trial: the searched and fixed keys belong to the base cell's family, and the objective
    is one that family reports."""
    from pipeline.models import FAMILIES, family_names

    capabilities = FAMILIES[base.family].capabilities
    tunable = family_names(lambda family: not family.capabilities.adversarial and not family.capabilities.one_pass)
    if capabilities.adversarial:
        raise ConfigError(
            f"search space {space.name}: base cell {base.name} is a {base.family} cell, whose losses are a two-player "
            "game rather than an objective to minimise; tune a "
            f"{tunable} cell"
        )
    if capabilities.one_pass:
        raise ConfigError(
            f"search space {space.name}: base cell {base.name} is a {base.family} cell, fitted in closed form with "
            "no training settings to tune; tune a "
            f"{tunable} cell"
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
    try:
        with_values(base, space.cell_values({}))
    except ConfigError as error:
        raise ConfigError(f"search space {space.name}: the fixed values do not make a valid cell: {error}") from None
    for param in space.params:  # a value a trial may draw that no cell accepts fails now, not in every trial
        for value in param.extremes():
            try:
                with_values(base, space.cell_values({param.name: value}))
            except ConfigError as error:
                raise ConfigError(
                    f"search space {space.name}: {param.name} = {value!r} is in the space but not a valid cell: {error}"
                ) from None
    weakened = (
        [p.name for p in space.params if p.name in REGULARISERS] if space.objective in ("val_loss", "val_recon") else []
    )
    if weakened:
        log.warning(
            "search space %s: %s is searched against %s, which is lowest with the least regularisation (the DAE "
            "validates on corrupted inputs, the CAE's loss holds its penalty); read such trials with care",
            space.name,
            ", ".join(weakened),
            space.objective,
        )


def with_values(cell, values: dict):
    """The base cell with tuned values, validated like any cell of params.yaml. A DAE whose noise kind is
    set keeps only the level that kind reads (its default unless set too)."""
    base = cell_as_dict(cell)
    if "noise" in values:
        base = {key: value for key, value in base.items() if key not in ("noise_std", "mask_prob")}
    merged = {**base, **values}
    name = merged.pop("name")
    tuned = parse_cell(name, merged, {})
    # The family's own constraints (a VQ-VAE's latent_dim against its positions); the data's size was
    # checked when the study loaded, so every MNIST training image is the bound here.
    families()[tuned.family].check_cell(tuned, MNIST_TRAIN_IMAGES)
    return tuned
