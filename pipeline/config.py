"""The study's typed configuration: read `params.yaml` once, validate every value, fail with one clear line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import VaebenchError

PARAMS_FILE = Path("params.yaml")
DATA_ROOT_ENV = "VAEBENCH_DATA_ROOT"
ARCHS = ("linear", "conv")
LIKELIHOODS = ("bernoulli", "gaussian")
ACTIVATIONS = ("relu", "tanh")  # the MLP's nonlinearity (arch linear)
# data.binarize: none keeps grey levels in [0, 1]; dynamic draws every training image as Bernoulli(pixel) each
# time it is used and the validation and test images once (Burda et al.'s binarized MNIST).
BINARIZE = ("none", "dynamic")
DEVICES = ("auto", "cpu", "cuda")
MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000
# CPU threads every computing stage uses. PyTorch's CPU kernels split work, and so round, by the number of
# threads, not of cores: a fixed number gives the same numbers on a machine with 1, 2 or 16 cores (docs/speed.md
# has the measurement behind 2).
DEFAULT_THREADS = 2
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # matched whole: no leading '-' (an option to argparse)
# The longest file name a cell or study name becomes part of: a resume checkpoint being written.
LONGEST_SUFFIX = ".pt.partial"
# MLflow keeps a run's name (a cell) in a 250-character column and a registered model's name
# (vaebench-<study>-decoder) in a 256-character one.
MLFLOW_NAME_LIMIT = 256 - len("vaebench--decoder")


class ConfigError(VaebenchError):
    """A value in params.yaml (or a study file) that the pipeline cannot use."""


@dataclass(frozen=True)
class DataConfig:
    root: str
    download: bool
    train_size: int
    val_size: int
    test_size: int
    split_seed: int
    binarize: str = "none"  # one of BINARIZE


@dataclass(frozen=True)
class CellConfig:
    """One point of the grid: everything needed to train and evaluate one model. `settings` is the
    family's own settings dataclass (for example the VAE's beta, see pipeline/models/)."""

    name: str
    family: str
    arch: str
    latent_dim: int
    seed: int
    epochs: int
    batch_size: int
    lr: float
    likelihood: str
    gaussian_std: float
    hidden: tuple[int, ...]
    channels: tuple[int, ...]
    device: str
    settings: object
    init_from: str | None = None  # fine-tuned cells (the `finetuned:` block): the VAE cell they start from
    activation: str = "relu"  # the MLP's nonlinearity (arch linear; conv networks use ReLU)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # (epochs, rate) stages: the first `epochs` at `rate`, then the next; they add up to the cell's epochs and
    # start at its lr. None: lr throughout.
    lr_schedule: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int
    seed: int
    n_images: int
    knn_k: int  # neighbours of the k-NN classifier on the codes
    noise_std: float  # robustness: Gaussian noise added to the test images
    mask_prob: float  # robustness: share of test pixels set to 0
    contraction_images: int  # test images the mean Jacobian norm is computed on


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    device: str


@dataclass(frozen=True)
class SampleQualityConfig:
    n_samples: int  # generated images scored against the test set
    kid_subsets: int
    kid_subset_size: int
    pr_k: int  # neighbours that define the precision/recall manifolds
    iw_samples: int  # K of the importance-weighted bound
    iw_images: int  # test images the bound is computed on
    binarize: bool  # evaluate the bound on dynamically binarized test images
    seed: int


@dataclass(frozen=True)
class TrackingConfig:
    log_system_metrics: bool = False  # MLflow's CPU, memory (and GPU) sampling on each training run


@dataclass(frozen=True)
class ReportConfig:
    seed: int
    digits: int  # test digits shown in the reconstruction figure
    samples: int  # samples per model in the sample figure
    interpolation_pairs: tuple[tuple[int, int], ...]  # digit labels, e.g. (1, 7)
    interpolation_steps: int
    latent_map_extent: float  # the 2-D latent map covers [-extent, extent]^2
    latent_map_size: int  # decoded images per side of the map
    scatter_points: int  # test images in the latent scatter
    dpi: int
    collapse_share: float  # findings flag mode collapse where one digit takes more than this share of the samples


@dataclass(frozen=True)
class StudyConfig:
    study: str
    data: DataConfig
    cells: dict[str, CellConfig]
    evaluate: EvaluateConfig
    classifier: ClassifierConfig
    sample_quality: SampleQualityConfig
    report: ReportConfig
    tune: dict[str, str]  # enabled tuning studies: name -> search-space file (DVC stages tune@name)
    tracking: TrackingConfig = TrackingConfig()
    threads: int = DEFAULT_THREADS  # the CPU threads every computing stage uses, whatever the machine's cores
    raw: dict | None = None  # the parsed YAML it was read from (pipeline/stage_params.py compares it at the end)
    params_file: str | None = None  # the file it was read from, when it was
    # `cells` holds the `cells:` block, then the `finetuned:` block (cells with init_from).

    def cell(self, name: str) -> CellConfig:
        if name not in self.cells:
            known = ", ".join(self.cells) or "none"
            raise ConfigError(f"unknown cell {name!r}; the study {self.study!r} has: {known}")
        return self.cells[name]


# Keys a cell may set; the ones in CELL_DEFAULT_KEYS fall back to the `train:` block. A cell may also set
# its family's own settings (family_setting_keys).
CELL_OWN_KEYS = ("family", "arch", "latent_dim", "seed")
CELL_DEFAULT_KEYS = tuple(
    f.name for f in dataclasses.fields(CellConfig) if f.name not in CELL_OWN_KEYS + ("name", "settings", "init_from")
)
# Keys a study may leave out: their defaults are the dataclass's (the optimizer's, PyTorch's Adam defaults).
OPTIONAL_CELL_KEYS = ("activation", "adam_betas", "adam_eps", "lr_schedule")


def families() -> dict:
    """The registry of model families (imported here, not at the top, so that reading params needs no torch
    until a cell is parsed)."""
    from pipeline.models import FAMILIES

    return FAMILIES


def family_setting_keys() -> dict[str, tuple[str, ...]]:
    """Each family's own setting names."""
    return {name: tuple(f.name for f in dataclasses.fields(cls.Settings)) for name, cls in families().items()}


def load_study(path: Path | str = PARAMS_FILE) -> StudyConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run from the repository root or pass the params file") from None
    except OSError as error:
        raise ConfigError(f"{path} is not readable ({error}); fix the file") from None
    return dataclasses.replace(parse_study_text(text, str(path)), params_file=str(path))


def parse_study_text(text: str, source: str) -> StudyConfig:
    """The study held by the YAML `text` (of the file `source`)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{source} is not readable YAML ({first_line}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping with the keys study, data, train, cells, evaluate")
    return parse_study(raw, source=source)


def parse_study(raw: dict, source: str = "params") -> StudyConfig:
    _only_keys(
        raw,
        (
            "study",
            "data",
            "train",
            "cells",
            "finetuned",
            "evaluate",
            "classifier",
            "sample_quality",
            "report",
            "tune",
            "tracking",
            "threads",
        ),
        source,
    )
    study = check_name(_required(raw, "study", source), f"{source}: study")
    data = _parse_data(_section(raw, "data", source))
    train_defaults = _section(raw, "train", source)
    _only_keys(train_defaults, CELL_DEFAULT_KEYS, f"{source}: train")
    cells_raw = _section(raw, "cells", source)
    if not cells_raw:
        raise ConfigError(f"{source}: cells is empty; add at least one cell")
    cells = {}
    for name, spec in cells_raw.items():
        _require_family(spec, f"cells.{check_name(name, f'{source}: cell name')}", source)
        cells[name] = parse_cell(name, spec, train_defaults)
    for cell in cells.values():
        if getattr(cell.settings, "init_discriminator", False):
            raise ConfigError(
                f"cells.{cell.name}.init_discriminator starts the discriminator from a VAE's encoder, so it needs "
                "init_from: move the cell under finetuned: with init_from, or remove the setting"
            )
    cells |= _parse_finetuned(raw.get("finetuned") or {}, cells, train_defaults, source)
    _refuse_duplicates(cells, source)
    for cell in cells.values():
        families()[cell.family].check_cell(cell, data.train_size)
    evaluate = _parse_evaluate(_section(raw, "evaluate", source))
    return StudyConfig(
        study=study,
        data=data,
        cells=cells,
        evaluate=evaluate,
        classifier=_parse_classifier(_section(raw, "classifier", source)),
        sample_quality=_parse_sample_quality(_section(raw, "sample_quality", source)),
        report=_parse_report(_section(raw, "report", source)),
        tune=_parse_tune(raw.get("tune") or {}, source),
        tracking=_parse_tracking(raw.get("tracking") or {}),
        threads=integer(raw.get("threads", DEFAULT_THREADS), f"{source}: threads", low=1),
        raw=raw,
    )


def _parse_data(raw: dict) -> DataConfig:
    where = "data"
    _only_keys(raw, [f.name for f in dataclasses.fields(DataConfig)], where)
    root = os.environ.get(DATA_ROOT_ENV) or string(_required(raw, "root", where), f"{where}.root")
    data = DataConfig(
        root=root,
        download=boolean(raw.get("download", True), f"{where}.download"),
        train_size=integer(_required(raw, "train_size", where), f"{where}.train_size", low=1),
        val_size=integer(_required(raw, "val_size", where), f"{where}.val_size", low=1),
        test_size=integer(_required(raw, "test_size", where), f"{where}.test_size", low=1),
        split_seed=integer(raw.get("split_seed", 0), f"{where}.split_seed", low=0),
        binarize=choice(raw.get("binarize", "none"), f"{where}.binarize", BINARIZE),
    )
    if data.train_size + data.val_size > MNIST_TRAIN_IMAGES:
        raise ConfigError(
            f"data.train_size + data.val_size = {data.train_size + data.val_size} exceeds the "
            f"{MNIST_TRAIN_IMAGES} MNIST training images; lower one of them"
        )
    if data.test_size > MNIST_TEST_IMAGES:
        raise ConfigError(f"data.test_size = {data.test_size} exceeds the {MNIST_TEST_IMAGES} MNIST test images")
    return data


def parse_cell(name: str, spec: object, defaults: dict, where: str | None = None) -> CellConfig:
    where = where or f"cells.{name}"
    if isinstance(spec, dict) and "init_from" in spec:
        raise ConfigError(
            f"{where}.init_from: a fine-tuned cell goes under finetuned: (so that DVC re-runs it when its source "
            "cell retrains); move the cell there"
        )
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where} must be a mapping like {{family: {next(iter(families()))}, arch: linear, latent_dim: 2, seed: 0}}"
        )
    if "family" not in spec:
        raise ConfigError(f"{where}.family is missing; name the cell's family ({', '.join(families())})")
    family = choice(spec["family"], f"{where}.family", tuple(families()))
    setting_keys = family_setting_keys()
    for key in spec:
        owners = [other for other, keys in setting_keys.items() if key in keys]
        if owners and family not in owners:
            raise ConfigError(
                f"{where}.{key} is a setting of family {' and '.join(owners)}, not of {family}; "
                f"remove it or set family: {owners[0]}"
            )
    _only_keys(spec, CELL_OWN_KEYS + CELL_DEFAULT_KEYS + setting_keys[family], where)
    merged = {**defaults, **spec, "family": family}
    for key in CELL_OWN_KEYS + CELL_DEFAULT_KEYS:
        if key not in merged and key not in OPTIONAL_CELL_KEYS:
            raise ConfigError(f"{where}.{key} is missing; set it in the cell or in the train block")

    def field(key: str) -> str:
        return f"{where}.{key}"

    arch = choice(merged["arch"], field("arch"), ARCHS)
    channels = int_list(merged["channels"], field("channels"))
    if arch == "conv" and len(channels) > _max_conv_depth():
        raise ConfigError(
            f"{field('channels')} = {list(channels)}: {len(channels)} strided convolutions shrink a 28x28 image "
            f"to nothing; use at most {_max_conv_depth()} entries"
        )
    activation = choice(merged.get("activation", CellConfig.activation), field("activation"), ACTIVATIONS)
    if arch == "conv" and activation != "relu":
        raise ConfigError(
            f"{field('activation')} is {activation!r}, but it sets the MLP's nonlinearity and the conv networks use "
            "ReLU; remove the key from this cell (or from the train block, and set it on the linear cells), or use "
            "arch: linear"
        )
    epochs = integer(merged["epochs"], field("epochs"), low=1)
    lr = number(merged["lr"], field("lr"), low=0.0, low_inclusive=False)
    family_class = families()[family]
    betas = adam_betas(merged.get("adam_betas", list(CellConfig.adam_betas)), field("adam_betas"))
    eps = number(merged.get("adam_eps", CellConfig.adam_eps), field("adam_eps"), low=0.0, low_inclusive=False)
    if family_class.capabilities.adversarial and (betas, eps) != (CellConfig.adam_betas, CellConfig.adam_eps):
        key = "adam_betas" if betas != CellConfig.adam_betas else "adam_eps"
        raise ConfigError(
            f"{field(key)}: family {family} sets its own Adam (its adam_beta1 setting); remove the key from this "
            "cell (or from the train block, and set it on the cells that use it)"
        )
    return CellConfig(
        name=name,
        family=family,
        arch=arch,
        latent_dim=integer(merged["latent_dim"], field("latent_dim"), low=1),
        seed=integer(merged["seed"], field("seed"), low=0),
        epochs=epochs,
        batch_size=integer(merged["batch_size"], field("batch_size"), low=1),
        lr=lr,
        likelihood=choice(merged["likelihood"], field("likelihood"), LIKELIHOODS),
        gaussian_std=number(merged["gaussian_std"], field("gaussian_std"), low=0.0, low_inclusive=False),
        hidden=int_list(merged["hidden"], field("hidden")),
        channels=channels,
        device=device(merged["device"], field("device")),
        settings=family_class.parse_settings({k: v for k, v in spec.items() if k in setting_keys[family]}, where),
        activation=activation,
        adam_betas=betas,
        adam_eps=eps,
        lr_schedule=lr_schedule(merged.get("lr_schedule"), field("lr_schedule"), epochs, lr),
    )


def adam_betas(value: object, what: str) -> tuple[float, float]:
    """Adam's two moment decays, each in [0, 1)."""
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{what} must be a list of two numbers in [0, 1) like [0.9, 0.999], got {value!r}")
    betas = tuple(number(beta, f"{what}[{i}]", low=0.0) for i, beta in enumerate(value))
    for i, beta in enumerate(betas):
        if beta >= 1.0:
            raise ConfigError(f"{what}[{i}] must be below 1, got {beta:g}; a decay of 1 never forgets")
    return betas


def lr_schedule(value: object, what: str, epochs: int, lr: float) -> tuple[tuple[int, float], ...] | None:
    """[[epochs, rate], ...]: stages that add up to the cell's epochs and start at its lr (null: none)."""
    if value is None:
        return None
    example = "[[1, 0.001], [3, 0.00072]]"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{what} must be a non-empty list of [epochs, rate] stages like {example}, got {value!r}")
    stages = []
    for i, stage in enumerate(value):
        if not isinstance(stage, list) or len(stage) != 2:
            raise ConfigError(f"{what}[{i}] must be one [epochs, rate] pair like [3, 0.00072], got {stage!r}")
        stages.append(
            (
                integer(stage[0], f"{what}[{i}][0] (epochs)", low=1),
                number(stage[1], f"{what}[{i}][1] (rate)", low=0.0, low_inclusive=False),
            )
        )
    total = sum(count for count, _ in stages)
    if total != epochs:
        raise ConfigError(
            f"{what}: its stages add up to {total} epochs but the cell trains {epochs}; set epochs: {total} or change "
            "the stages"
        )
    if stages[0][1] != lr:
        raise ConfigError(
            f"{what} starts at rate {stages[0][1]:g} but the cell's lr is {lr:g}; set lr: {stages[0][1]:g} (lr is the "
            "schedule's first rate)"
        )
    return tuple(stages)


def _refuse_duplicates(cells: dict[str, CellConfig], source: str) -> None:
    """Two cells with the same configuration and seed would train the same model twice, and the report would
    average them as seeds."""
    seen: dict[str, str] = {}
    for name, cell in cells.items():
        key = repr(sorted((k, v) for k, v in cell_as_dict(cell).items() if k != "name"))
        if key in seen:
            raise ConfigError(
                f"{source}: cells {seen[key]} and {name} have the same configuration and seed; remove one, or give "
                "it another seed"
            )
        seen[key] = name


def _require_family(spec: object, where: str, source: str) -> None:
    """A study's cells name their family: dvc.yaml reads it to make the cell's stages depend on its module."""
    if isinstance(spec, dict) and "family" not in spec:
        raise ConfigError(
            f"{source}: {where}.family is missing; name the cell's family ({', '.join(families())}): "
            "dvc.yaml makes the cell's stages depend on pipeline/models/<family>.py"
        )


def _parse_finetuned(raw: object, cells: dict[str, CellConfig], defaults: dict, source: str) -> dict[str, CellConfig]:
    """The `finetuned:` block: cells that start from a trained VAE cell of `cells:` (init_from). They sit in
    their own block so that DVC's stage for them can depend on the source cell's model."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: finetuned must be a mapping of cell name: cell with init_from, or {{}}")
    finetuned = {}
    for name, spec in raw.items():
        where = f"finetuned.{check_name(name, f'{source}: cell name')}"
        if name in cells:
            raise ConfigError(f"{where}: the name is already a cell under cells:; rename one of them")
        if not isinstance(spec, dict) or "init_from" not in spec:
            raise ConfigError(
                f"{where} must be a mapping with init_from: <a cell under cells: of a family it may start from>"
            )
        source_name = spec["init_from"]
        if not isinstance(source_name, str) or source_name not in cells:
            sources = families()[spec.get("family")].starts_from if spec.get("family") in families() else ()
            known = ", ".join(n for n, c in cells.items() if c.family in sources) or "none"
            kinds = " or ".join(sources) or "source"
            raise ConfigError(f"{where}.init_from is {source_name!r}, not a cell under cells:; {kinds} cells: {known}")
        _require_family(spec, where, source)
        origin = cells[source_name]
        cell = parse_cell(name, {k: v for k, v in spec.items() if k != "init_from"}, defaults, where)
        _check_init_from(cell, origin, where)
        finetuned[name] = dataclasses.replace(cell, init_from=source_name)
    return finetuned


def _check_init_from(cell: CellConfig, origin: CellConfig, where: str) -> None:
    """A fine-tuned cell starts from a VAE of the same networks."""
    sources = families()[cell.family].starts_from
    if not sources:
        starters = ", ".join(name for name, cls in families().items() if cls.starts_from)
        raise ConfigError(f"{where}: family {cell.family} cannot start from another cell; use family {starters}")
    if origin.family not in sources:
        raise ConfigError(
            f"{where}.init_from: {origin.name} is a cell of family {origin.family}; name a {' or '.join(sources)} cell"
        )
    network_keys = ("arch", "latent_dim", "hidden") if cell.arch == "linear" else ("arch", "latent_dim", "channels")
    for key in network_keys:
        if getattr(cell, key) != getattr(origin, key):
            raise ConfigError(
                f"{where}.{key} is {getattr(cell, key)!r} but its init_from cell {origin.name} has "
                f"{getattr(origin, key)!r}; "
                "the networks must match to copy the weights"
            )


def _max_conv_depth() -> int:
    """The most strided convolutions a 28x28 image survives (28, 14, 7, 3, 1: four)."""
    from pipeline.models.networks import conv_sides

    sides = conv_sides((1,) * 8)
    return max(i for i, side in enumerate(sides) if side >= 1)


def _parse_evaluate(raw: dict) -> EvaluateConfig:
    _only_keys(raw, [f.name for f in dataclasses.fields(EvaluateConfig)], "evaluate")
    return EvaluateConfig(
        batch_size=integer(_required(raw, "batch_size", "evaluate"), "evaluate.batch_size", low=1),
        seed=integer(raw.get("seed", 0), "evaluate.seed", low=0),
        n_images=integer(raw.get("n_images", 64), "evaluate.n_images", low=1),
        knn_k=integer(raw.get("knn_k", 5), "evaluate.knn_k", low=1),
        noise_std=number(raw.get("noise_std", 0.5), "evaluate.noise_std", low=0.0),
        mask_prob=probability(raw.get("mask_prob", 0.25), "evaluate.mask_prob"),
        contraction_images=integer(raw.get("contraction_images", 1000), "evaluate.contraction_images", low=1),
    )


def probability(value: object, what: str) -> float:
    """A share of pixels to drop: in [0, 1), since 1 would erase every pixel."""
    value = number(value, what, low=0.0)
    if value >= 1.0:
        raise ConfigError(f"{what} must be in [0, 1), got {value:g}; 1 would erase every pixel")
    return value


def _parse_tune(raw: object, source: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: tune must be a mapping of name: search-space file, or {{}}")
    return {check_name(name, f"{source}: tune name"): string(path, f"tune.{name}") for name, path in raw.items()}


def _parse_classifier(raw: dict) -> ClassifierConfig:
    where = "classifier"
    _only_keys(raw, [f.name for f in dataclasses.fields(ClassifierConfig)], where)
    return ClassifierConfig(
        epochs=integer(_required(raw, "epochs", where), f"{where}.epochs", low=1),
        batch_size=integer(_required(raw, "batch_size", where), f"{where}.batch_size", low=1),
        lr=number(_required(raw, "lr", where), f"{where}.lr", low=0.0, low_inclusive=False),
        seed=integer(raw.get("seed", 0), f"{where}.seed", low=0),
        device=device(raw.get("device", "auto"), f"{where}.device"),
    )


def _parse_sample_quality(raw: dict) -> SampleQualityConfig:
    where = "sample_quality"
    _only_keys(raw, [f.name for f in dataclasses.fields(SampleQualityConfig)], where)

    def count(key: str, low: int) -> int:
        return integer(_required(raw, key, where), f"{where}.{key}", low=low)

    return SampleQualityConfig(
        n_samples=count("n_samples", 10),
        kid_subsets=count("kid_subsets", 1),
        kid_subset_size=count("kid_subset_size", 2),
        pr_k=count("pr_k", 1),
        iw_samples=count("iw_samples", 1),
        iw_images=count("iw_images", 1),
        binarize=boolean(raw.get("binarize", False), f"{where}.binarize"),
        seed=integer(raw.get("seed", 0), f"{where}.seed", low=0),
    )


def _parse_report(raw: dict) -> ReportConfig:
    where = "report"
    _only_keys(raw, [f.name for f in dataclasses.fields(ReportConfig)], where)
    pairs = _required(raw, "interpolation_pairs", where)
    if not isinstance(pairs, list) or not pairs:
        raise ConfigError(f"{where}.interpolation_pairs must be a non-empty list of digit pairs like [[1, 7]]")
    for i, pair in enumerate(pairs):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in pair)
        ):
            raise ConfigError(f"{where}.interpolation_pairs[{i}] must be two digit labels 0-9, got {pair!r}")
    return ReportConfig(
        seed=integer(raw.get("seed", 0), f"{where}.seed", low=0),
        digits=integer(_required(raw, "digits", where), f"{where}.digits", low=1),
        samples=integer(_required(raw, "samples", where), f"{where}.samples", low=1),
        interpolation_pairs=tuple(tuple(pair) for pair in pairs),
        interpolation_steps=integer(
            _required(raw, "interpolation_steps", where), f"{where}.interpolation_steps", low=2
        ),
        latent_map_extent=number(
            _required(raw, "latent_map_extent", where), f"{where}.latent_map_extent", low=0.0, low_inclusive=False
        ),
        latent_map_size=integer(_required(raw, "latent_map_size", where), f"{where}.latent_map_size", low=2),
        scatter_points=integer(_required(raw, "scatter_points", where), f"{where}.scatter_points", low=10),
        dpi=integer(raw.get("dpi", 300), f"{where}.dpi", low=50),
        collapse_share=_collapse_share(raw.get("collapse_share", 0.2), f"{where}.collapse_share"),
    )


def _parse_tracking(raw: object) -> TrackingConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"tracking must be a mapping, got {type(raw).__name__}")
    _only_keys(raw, [f.name for f in dataclasses.fields(TrackingConfig)], "tracking")
    return TrackingConfig(
        log_system_metrics=boolean(raw.get("log_system_metrics", False), "tracking.log_system_metrics")
    )


def _collapse_share(value: object, what: str) -> float:
    """Above the uniform share 0.1 (or every cell is flagged) and below 1 (or none can be)."""
    value = number(value, what, low=0.1, low_inclusive=False)
    if value >= 1.0:
        raise ConfigError(f"{what} must be below 1, got {value:g}; no digit can take more than all samples")
    return value


def _section(raw: dict, key: str, where: str) -> dict:
    value = _required(raw, key, where)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _required(raw: dict, key: str, where: str) -> object:
    if key not in raw:
        raise ConfigError(f"{where}: {key} is missing")
    return raw[key]


def _only_keys(raw: dict, allowed, where: str) -> None:
    unknown = sorted(set(map(str, raw)) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(allowed)}")


def max_name_length() -> int:
    """The longest cell or study name whose files fit the file system's name limit here and whose MLflow
    names fit MLflow's columns."""
    return min(os.pathconf(".", "PC_NAME_MAX") - len(LONGEST_SUFFIX), MLFLOW_NAME_LIMIT)


def check_name(value: object, what: str) -> str:
    limit = max_name_length()
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or len(value) > limit:
        raise ConfigError(
            f"{what} {value!r} must use only letters, digits, '-' and '_', start with a letter or digit and have "
            f"at most {limit} characters (it names folders, files and MLflow runs)"
        )
    return value


def string(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    return value


def boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value


def choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{what} is {value!r}; choose one of {', '.join(choices)}")
    return value


def device(value: object, what: str) -> str:
    """A device this machine has: `cuda` is refused when no CUDA device is visible."""
    import torch

    value = choice(value, what, DEVICES)
    if value == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{what} is 'cuda' but this machine has no CUDA device; set it to auto (CUDA when present) or cpu"
        )
    return value


def integer(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise ConfigError(f"{what} must be >= {low}, got {value}")
    return value


def number(value: object, what: str, low: float, low_inclusive: bool = True) -> float:
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{what} must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if value < low or (value == low and not low_inclusive):
        bound = ">=" if low_inclusive else ">"
        raise ConfigError(f"{what} must be {bound} {low:g}, got {value:g}")
    return float(value)


def int_list(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{what} must be a non-empty list of integers, got {value!r}")
    return tuple(integer(item, f"{what}[{i}]", low=1) for i, item in enumerate(value))


def _optional_default(key: str) -> object:
    default = {f.name: f.default for f in dataclasses.fields(CellConfig)}[key]
    return list(default) if isinstance(default, tuple) else default


def cell_as_dict(cell: CellConfig) -> dict:
    """The cell as one flat mapping, its family settings beside the common keys (parse_cell reads it back,
    except a fine-tuned cell's init_from, which only the finetuned: block may set)."""
    values = {f.name: getattr(cell, f.name) for f in dataclasses.fields(cell) if f.name != "settings"}
    if cell.init_from is None:
        del values["init_from"]
    values["hidden"] = list(cell.hidden)
    values["channels"] = list(cell.channels)
    values["adam_betas"] = list(cell.adam_betas)
    values["lr_schedule"] = None if cell.lr_schedule is None else [list(stage) for stage in cell.lr_schedule]
    # The optional keys at their defaults are left out, as a cell that does not set them reads.
    for key in OPTIONAL_CELL_KEYS:
        if values[key] == _optional_default(key):
            del values[key]
    settings = {key: value for key, value in dataclasses.asdict(cell.settings).items() if value is not None}
    return values | settings
