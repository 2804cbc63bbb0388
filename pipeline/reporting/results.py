"""A study's results read back from disk: the one reader of the stages' outputs that the report and the app
share. Per cell: its recorded configuration, test metrics, class shares, history and images; per study: one
row per cell and one per group of seeds, in pandas.

A metric a family does not have (KL, ELBO, active units and the IW bound without a posterior) is NaN
here and "–" in every table, never 0.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pandas as pd

from pipeline.config import CellConfig, StudyConfig, cell_as_dict, parse_cell
from pipeline.models import FAMILIES, LAB_FAMILY
from pipeline.outputs import read_json
from pipeline.paths import (
    CLASS_SHARES_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    KL_PER_DIM_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RESULTS,
    evaluate_dir,
    train_dir,
)

METRICS = ("recon", "kl", "elbo", "active_units")
FAMILY_METRICS = (
    "recon_bernoulli",
    "recon_mse",
    "noisy_recon_mse",
    "masked_recon_mse",
    "contraction",
    "probe_accuracy",
    "knn_accuracy",
)
SAMPLE_METRICS = (
    "fid_mnist_cnn",
    "kid_mnist_cnn_mean",
    "is_mnist_cnn",
    "precision_mnist_cnn",
    "recall_mnist_cnn",
    "class_entropy_mnist_cnn",
    "fid_mnist_cnn_recon",
    "iw_nll",
    "iw_nll_se",  # its standard error across the test images
)
# Test metrics only some families report (a family's OWN_METRICS), with their descriptions.
OWN_METRICS = {name: text for family in FAMILIES.values() for name, text in family.OWN_METRICS.items()}
ALL_METRICS = METRICS + FAMILY_METRICS + SAMPLE_METRICS + tuple(OWN_METRICS)
SHARES = tuple(f"share_{digit}" for digit in range(10))  # share of the samples the classifier calls each digit
GROUP_KEYS = ["group", "family", "arch", "latent_dim", "beta", "variant", "plain", "init_from", "adversarial"]
SEED_SUFFIX = re.compile(r"-s\d+$")
MISSING = "–"


IMAGES = ("reconstructions", "samples")  # the evaluate stage's pictures of a cell


def studies_with_results() -> list[str]:
    """The studies with at least one trained cell under results/."""
    return sorted({path.parents[2].name for path in RESULTS.glob(f"*/train/*/{MODEL_FILE}")})


def trained_cells(study: str) -> dict[str, CellConfig]:
    """The study's trained cells, each rebuilt from the configuration its train stage recorded."""
    cells = {}
    for path in sorted(RESULTS.glob(f"{study}/train/*/{CONFIG_FILE}")):
        if not (path.parent / MODEL_FILE).is_file():
            continue
        recorded = dict(read_json(path)["cell"])
        if recorded.get("name") != path.parent.name:  # a folder a killed stage left half-written
            continue
        init_from = recorded.pop("init_from", None)  # only the finetuned: block may set it
        cell = parse_cell(recorded.pop("name"), recorded, {}, where=str(path))
        cells[cell.name] = dataclasses.replace(cell, init_from=init_from)
    return cells


def cell_metrics(study: str, cell: str) -> dict | None:
    """The cell's test metrics as its evaluate stage wrote them, or None when it is not evaluated."""
    path = evaluate_dir(study, cell) / METRICS_FILE
    return read_json(path) if path.is_file() else None


def cell_class_shares(study: str, cell: str) -> list[float]:
    """The share of the cell's samples that the classifier assigns to each digit."""
    return read_json(evaluate_dir(study, cell) / CLASS_SHARES_FILE)["samples"]


def cell_kl_per_dim(study: str, cell: str) -> list[float] | None:
    """The cell's test KL per latent dimension (None for a family without a posterior)."""
    return read_json(evaluate_dir(study, cell) / KL_PER_DIM_FILE)


def cell_history(study: str, cell: str) -> list[dict]:
    """The cell's per-epoch training and validation metrics."""
    return read_json(train_dir(study, cell) / HISTORY_FILE)


def cell_images(study: str, cell: str) -> dict[str, Path]:
    """The evaluate stage's pictures of the cell that exist: name -> PNG file."""
    folder = evaluate_dir(study, cell) / "images"
    return {name: folder / f"{name}.png" for name in IMAGES if (folder / f"{name}.png").is_file()}


def group_name(cell_name: str) -> str:
    """The cell's name without its seed suffix (-s0, -s1, ...)."""
    return SEED_SUFFIX.sub("", cell_name)


def seed_groups(config: StudyConfig) -> dict[str, str]:
    """Each cell's group: the cells of a group have the same recorded configuration but for the seed (a
    fine-tuned cell's source counts by its group). A group is named after its first cell without the seed
    suffix, or after the whole cell name when that is taken by a group of another configuration."""
    keys: dict[str, str] = {}

    def key(cell) -> str:
        if cell.name not in keys:
            spec = {k: v for k, v in cell_as_dict(cell).items() if k not in ("name", "seed")}
            if cell.init_from:
                spec["init_from"] = key(config.cell(cell.init_from))
            keys[cell.name] = json.dumps(spec, sort_keys=True)
        return keys[cell.name]

    names: dict[str, str] = {}
    groups = {}
    for cell in config.cells.values():
        spec = key(cell)
        if spec not in names:
            label = group_name(cell.name)
            names[spec] = label if label not in names.values() else cell.name
        groups[cell.name] = names[spec]
    return groups


# The study's headline metrics: the best cell on each gets a registry alias (tracking.log_study_results).
# `elbo` is the negative bound in nats/image (recon + KL), so lower is better, as for the other two.
HEADLINE_METRICS = [("elbo", "best-elbo"), ("iw_nll", "best-nll"), ("fid_mnist_cnn", "best-fid")]


def best_cells(evaluated: pd.DataFrame) -> list[tuple[str, str, str, float]]:
    """(metric, alias, cell, value) of the best (lowest) evaluated cell on each headline metric that some cell has."""
    best = []
    for metric, alias in HEADLINE_METRICS:
        scored = evaluated.dropna(subset=[metric])
        if not scored.empty:
            row = scored.loc[scored[metric].idxmin()]
            best.append((metric, alias, row["cell"], float(row[metric])))
    return best


def cell_table(config: StudyConfig) -> pd.DataFrame:
    """One row per cell with its test metrics; `status` is 'ok', or says what is missing. `beta` is the
    VAE's β (NaN for other families); `variant` labels the family's own settings."""
    rows = []
    groups = seed_groups(config)
    for cell in config.cells.values():
        row = {
            "cell": cell.name,
            "group": groups[cell.name],
            "family": cell.family,
            "arch": cell.arch,
            "latent_dim": cell.latent_dim,
            "beta": cell.settings.beta if cell.family == LAB_FAMILY else float("nan"),  # the lab's β sweep
            "plain": FAMILIES[cell.family].is_plain(cell.settings),  # the member compared across families
            "variant": variant(cell, groups),
            "seed": cell.seed,
            "sampler": FAMILIES[cell.family].Sampler.label,
            "ex_post": FAMILIES[cell.family].Sampler.ex_post,
            "adversarial": FAMILIES[cell.family].capabilities.adversarial,
            "init_from": groups[cell.init_from] if cell.init_from else None,  # seeds of one group start from one group
        }
        measured = cell_metrics(config.study, cell.name)
        if measured is not None:
            row |= {key: measured.get(key, float("nan")) for key in ALL_METRICS} | {"status": "ok"}
            shares = cell_class_shares(config.study, cell.name)
            row |= {f"share_{digit}": share for digit, share in enumerate(shares)}
        elif (train_dir(config.study, cell.name) / MODEL_FILE).is_file():
            row["status"] = "trained, not evaluated"
        else:
            row["status"] = "not trained (missing or failed)"
        rows.append(row)
    frame = pd.DataFrame(rows)
    for key in ALL_METRICS:
        if key not in frame:
            frame[key] = float("nan")
    return frame


def variant(cell, groups: dict[str, str]) -> str:
    """The family's settings, and the group a fine-tuned cell starts from."""
    parts = [cell.settings.label(), f"from {groups[cell.init_from]}" if cell.init_from else ""]
    return ", ".join(part for part in parts if part)


def seed_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over the seeds of each group of evaluated cells."""
    done = cells[cells["status"] == "ok"]
    grouped = done.groupby(GROUP_KEYS, sort=False, dropna=False)
    table = grouped[[key for key in ALL_METRICS + SHARES if key in done]].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["seeds"] = grouped.size()
    return table.reset_index()


def number(value, digits: int = 2) -> str:
    return MISSING if pd.isna(value) else f"{value:.{digits}f}"


def markdown_table(cells: pd.DataFrame) -> str:
    """The per-cell table in Markdown; a cell that is not evaluated says why."""
    lines = [
        "| cell | family | arch | latent_dim | setting | seed | test recon | test KL | test ELBO | active units |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cells.itertuples():
        head = f"| {row.cell} | {row.family} | {row.arch} | {row.latent_dim} | {row.variant or MISSING} | {row.seed} |"
        if row.status == "ok":
            units = MISSING if pd.isna(row.active_units) else f"{int(row.active_units)}/{row.latent_dim}"
            lines.append(f"{head} {number(row.recon)} | {number(row.kl)} | {number(row.elbo)} | {units} |")
        else:
            lines.append(f"{head} {row.status} | | | |")
    return "\n".join(lines)


def markdown_seed_table(groups: pd.DataFrame) -> str:
    """The table aggregated over seeds, mean ± std (std shown only where a group has 2 or more seeds)."""

    def cell(row, metric: str) -> str:
        mean, std = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_std")
        if pd.isna(mean):
            return MISSING
        return f"{mean:.2f} ± {std:.2f}" if row.seeds > 1 else f"{mean:.2f}"

    lines = [
        "| group | family | arch | latent_dim | setting | seeds | test recon | test KL | test ELBO | active units |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in groups.itertuples():
        lines.append(
            f"| {row.group} | {row.family} | {row.arch} | {row.latent_dim} | {row.variant or MISSING} | {row.seeds} | "
            + " | ".join(cell(row, metric) for metric in METRICS)
            + " |"
        )
    return "\n".join(lines)


FAMILY_COLUMNS = {  # metric: (header, decimals)
    "recon_bernoulli": ("recon (Bernoulli nats)", 2),
    "recon_mse": ("recon MSE", 4),
    "noisy_recon_mse": ("MSE, noisy input", 4),
    "masked_recon_mse": ("MSE, masked input", 4),
    "contraction": ("mean ‖∂h/∂x‖_F", 3),
    "probe_accuracy": ("linear probe acc.", 4),
    "knn_accuracy": ("k-NN acc.", 4),
    "fid_mnist_cnn": ("sample FID", 1),
}


def markdown_family_table(cells: pd.DataFrame) -> str:
    """Every evaluated cell in the units every family has: reconstruction, robustness, contraction, codes, samples."""
    lines = [
        "| cell | family | " + " | ".join(header for header, _ in FAMILY_COLUMNS.values()) + " | samples from |",
        "|---|---|" + "---|" * (len(FAMILY_COLUMNS) + 1),
    ]
    for row in cells[cells["status"] == "ok"].itertuples():
        values = [number(getattr(row, key), digits) for key, (_, digits) in FAMILY_COLUMNS.items()]
        lines.append(f"| {row.cell} | {row.family} | " + " | ".join(values) + f" | {row.sampler} |")
    return "\n".join(lines)


def own_metrics_measured(cells: pd.DataFrame) -> list[str]:
    """The families' own metrics (OWN_METRICS) that some evaluated cell has."""
    return [name for name in OWN_METRICS if cells.loc[cells["status"] == "ok", name].notna().any()]


def markdown_own_metrics_table(cells: pd.DataFrame, names: list[str]) -> str:
    """The families' own test metrics `names`, one row per evaluated cell that has any of them."""
    lines = ["| cell | family | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in cells[(cells["status"] == "ok") & cells[names].notna().any(axis=1)].itertuples():
        lines.append(
            f"| {row.cell} | {row.family} | " + " | ".join(number(getattr(row, key), 3) for key in names) + " |"
        )
    return "\n".join(lines)


SAMPLE_COLUMNS = {
    "fid_mnist_cnn": "FID samples",
    "kid_mnist_cnn_mean": "KID samples",
    "is_mnist_cnn": "IS-style samples",
    "precision_mnist_cnn": "precision",
    "recall_mnist_cnn": "recall",
    "class_entropy_mnist_cnn": "class entropy (nats)",
    "fid_mnist_cnn_recon": "FID reconstructions",
    "iw_nll": "IW NLL (nats/image)",
}


def markdown_sample_table(cells: pd.DataFrame, floor: dict | None) -> str:
    """Sample-quality scores (MNIST-CNN feature space) per evaluated cell, with the real-data floor first.
    Cells of a family without a prior are marked: their samples come from the ex-post Gaussian."""
    lines = [
        "| cell | " + " | ".join(SAMPLE_COLUMNS.values()) + " |",
        "|---|" + "---|" * len(SAMPLE_COLUMNS),
    ]
    if floor is not None:
        values = [f"{floor[key]:.3f}" if key in floor else MISSING for key in SAMPLE_COLUMNS]
        lines.append("| real training digits (floor) | " + " | ".join(values) + " |")
    for row in cells[cells["status"] == "ok"].itertuples():
        values = [number(getattr(row, key), 3) for key in SAMPLE_COLUMNS]
        label = f"{row.cell} ({row.sampler})" if row.ex_post else row.cell
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def markdown_class_share_table(cells: pd.DataFrame, collapse_share: float) -> str:
    """Per evaluated cell: the share of its samples the classifier assigns to each digit (uniform: 0.10),
    the class entropy, and a flag where one digit takes more than `collapse_share`."""
    lines = [
        "| cell | " + " | ".join(str(digit) for digit in range(10)) + " | class entropy (nats) | one digit > "
        f"{collapse_share:.0%} |",
        "|---|" + "---|" * 12,
    ]
    for row in cells[cells["status"] == "ok"].itertuples():
        shares = [getattr(row, key) for key in SHARES]
        flag = f"yes: digit {shares.index(max(shares))}" if max(shares) > collapse_share else "no"
        lines.append(
            f"| {row.cell} | "
            + " | ".join(f"{share:.2f}" for share in shares)
            + f" | {number(row.class_entropy_mnist_cnn, 3)} | {flag} |"
        )
    return "\n".join(lines)
