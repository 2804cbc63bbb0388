"""A study's results read back from disk into pandas: one row per cell, and one per group of seeds."""

from __future__ import annotations

import re

import pandas as pd

from pipeline.config import StudyConfig
from pipeline.outputs import evaluate_dir, read_json, train_dir

METRICS = ("recon", "kl", "elbo", "active_units")
SAMPLE_METRICS = ("fid_mnist_cnn", "kid_mnist_cnn_mean", "is_mnist_cnn", "precision_mnist_cnn", "recall_mnist_cnn",
                  "class_entropy_mnist_cnn", "fid_mnist_cnn_recon", "iw_nll")
ALL_METRICS = METRICS + SAMPLE_METRICS
SEED_SUFFIX = re.compile(r"-s\d+$")


def group_name(cell_name: str) -> str:
    """The cell's name without its seed: the cells of one group differ only in their seed."""
    return SEED_SUFFIX.sub("", cell_name)


def cell_table(config: StudyConfig) -> pd.DataFrame:
    """One row per cell with its test metrics; `status` is 'ok', or says what is missing."""
    rows = []
    for cell in config.cells.values():
        row = {
            "cell": cell.name,
            "group": group_name(cell.name),
            "arch": cell.arch,
            "latent_dim": cell.latent_dim,
            "beta": cell.beta,
            "seed": cell.seed,
        }
        metrics_file = evaluate_dir(config.study, cell.name) / "metrics.json"
        if metrics_file.is_file():
            measured = read_json(metrics_file)
            row |= {key: measured.get(key, float("nan")) for key in ALL_METRICS} | {"status": "ok"}
        elif (train_dir(config.study, cell.name) / "model.pt").is_file():
            row["status"] = "trained, not evaluated"
        else:
            row["status"] = "not trained (missing or failed)"
        rows.append(row)
    frame = pd.DataFrame(rows)
    for key in ALL_METRICS:
        if key not in frame:
            frame[key] = float("nan")
    return frame


def seed_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over the seeds of each group of evaluated cells."""
    done = cells[cells["status"] == "ok"]
    grouped = done.groupby(["group", "arch", "latent_dim", "beta"], sort=False)
    table = grouped[[key for key in ALL_METRICS if key in done]].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["seeds"] = grouped.size()
    return table.reset_index()


def markdown_table(cells: pd.DataFrame) -> str:
    """The per-cell table in Markdown; a cell that is not evaluated says why."""
    lines = [
        "| cell | arch | latent_dim | beta | seed | test recon | test KL | test ELBO | active units |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cells.itertuples():
        head = f"| {row.cell} | {row.arch} | {row.latent_dim} | {row.beta:g} | {row.seed} |"
        if row.status == "ok":
            lines.append(
                f"{head} {row.recon:.2f} | {row.kl:.2f} | {row.elbo:.2f} | {int(row.active_units)}/{row.latent_dim} |"
            )
        else:
            lines.append(f"{head} {row.status} | | | |")
    return "\n".join(lines)


def markdown_seed_table(groups: pd.DataFrame) -> str:
    """The table aggregated over seeds, mean ± std (std shown only where a group has 2 or more seeds)."""

    def cell(row, metric: str) -> str:
        mean, std = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_std")
        return f"{mean:.2f} ± {std:.2f}" if row.seeds > 1 else f"{mean:.2f}"

    lines = [
        "| group | arch | latent_dim | beta | seeds | test recon | test KL | test ELBO | active units |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in groups.itertuples():
        lines.append(
            f"| {row.group} | {row.arch} | {row.latent_dim} | {row.beta:g} | {row.seeds} | "
            + " | ".join(cell(row, metric) for metric in METRICS)
            + " |"
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
    """Sample-quality scores (MNIST-CNN feature space) per evaluated cell, with the real-data floor first."""
    lines = [
        "| cell | " + " | ".join(SAMPLE_COLUMNS.values()) + " |",
        "|---|" + "---|" * len(SAMPLE_COLUMNS),
    ]
    if floor is not None:
        values = [f"{floor[key]:.3f}" if key in floor else "–" for key in SAMPLE_COLUMNS]
        lines.append("| real training digits (floor) | " + " | ".join(values) + " |")
    for row in cells[cells["status"] == "ok"].itertuples():
        values = ["–" if pd.isna(getattr(row, key)) else f"{getattr(row, key):.3f}" for key in SAMPLE_COLUMNS]
        lines.append(f"| {row.cell} | " + " | ".join(values) + " |")
    return "\n".join(lines)
