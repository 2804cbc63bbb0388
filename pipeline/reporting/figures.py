"""The study's figures: one function per figure, each writing PNG (and SVG for vector plots) to a folder.

Image figures take trained models and test images; chart figures take pandas tables. One style for
all: seaborn's whitegrid with the colour-blind-safe `colorblind` palette, labelled axes with units.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.models import Autoencoder  # noqa: E402

PALETTE = "colorblind"
sns.set_theme(style="whitegrid", palette=PALETTE, context="paper")


def save(fig, folder: Path, name: str, dpi: int, vector: bool = False) -> list[Path]:
    paths = [folder / f"{name}.png"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    if vector:
        paths.append(folder / f"{name}.svg")
        fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def strip(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 28, 28) in [0, 1] -> one (30, N*30) row for imshow (ink = 1), white gaps between digits."""
    padded = torch.nn.functional.pad(images[:, 0], (1, 1, 1, 1), value=0.0)
    return torch.cat(list(padded), dim=1).cpu().numpy()


def image_rows(rows: list[tuple[str, torch.Tensor]], title: str) -> plt.Figure:
    """A figure of labelled image strips, one per row."""
    width = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.55 * width + 1.8, 0.62 * len(rows) + 0.5), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        ax.imshow(strip(images), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.grid(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@torch.no_grad()
def reconstructions(models: dict[str, Autoencoder], digits: torch.Tensor, folder: Path, dpi: int) -> list[Path]:
    """The same test digits for every model: originals on top, each model's reconstruction from its code below."""
    rows = [("original", digits)]
    rows += [(name, torch.sigmoid(model.decode(model.encode(digits)))) for name, model in models.items()]
    return save(
        image_rows(rows, "Test digits (top) and their reconstructions from the code (posterior mean for a VAE)"),
        folder,
        "reconstructions",
        dpi,
    )


@torch.no_grad()
def denoising(
    models: dict[str, Autoencoder], digits: torch.Tensor, corrupted: dict[str, torch.Tensor], folder: Path, dpi: int
) -> list[Path]:
    """Corrupted test digits (each corruption in turn) and every model's reconstruction of them."""
    rows = [("clean", digits)]
    for corruption, inputs in corrupted.items():
        rows.append((corruption, inputs.clamp(0, 1)))
        rows += [
            (f"{name} ← {corruption}", torch.sigmoid(model.decode(model.encode(inputs))))
            for name, model in models.items()
        ]
    title = "Corrupted test digits and every model's reconstruction of them (the clean digits on top)"
    return save(image_rows(rows, title), folder, "denoising", dpi)


def sampler_noise(model: Autoencoder, count: int, seed: int) -> torch.Tensor:
    """The model's noise from a seed fixed per latent size, so models of equal latent_dim and equal samplers'
    noise decode the same draw."""
    return model.sample_noise(count, torch.Generator().manual_seed(seed + model.latent_dim))


@torch.no_grad()
def samples(models: dict[str, Autoencoder], count: int, seed: int, folder: Path, dpi: int) -> list[Path]:
    rows = [
        (
            f"{name} ({model.sampler.label})" if model.sampler.ex_post else name,
            torch.sigmoid(model.decode_noise(sampler_noise(model, count, seed))),
        )
        for name, model in models.items()
    ]
    title = "Samples: decoder means of each model's sampler (z ~ N(0, I), or the same noise through an ex-post fit)"
    return save(image_rows(rows, title), folder, "samples", dpi)


@torch.no_grad()
def interpolations(
    models: dict[str, Autoencoder],
    pairs: list[tuple[int, torch.Tensor, int, torch.Tensor]],
    steps: int,
    folder: Path,
    dpi: int,
) -> list[Path]:
    """Decoded points on the straight line between the codes (posterior means) of two test digits; no figure
    without a model."""
    if not models:
        return []
    weights = torch.linspace(0, 1, steps).unsqueeze(1)
    rows = []
    for name, model in models.items():
        for label_a, image_a, label_b, image_b in pairs:
            mu_a, mu_b = model.encode(image_a[None]), model.encode(image_b[None])
            rows.append(
                (f"{name} {label_a}→{label_b}", torch.sigmoid(model.decode((1 - weights) * mu_a + weights * mu_b)))
            )
    return save(
        image_rows(rows, "Latent interpolation between the codes (posterior means) of two test digits"),
        folder,
        "interpolation",
        dpi,
    )


@torch.no_grad()
def latent_maps(models: dict[str, Autoencoder], extent: float, size: int, folder: Path, dpi: int) -> list[Path]:
    """For 2-D latent spaces: the decoder's mean image at every point of a regular size x size grid of the
    sampler's noise (z itself for a family with a prior; mapped through an ex-post Gaussian otherwise)."""
    two_d = {name: model for name, model in models.items() if model.latent_dim == 2}
    if not two_d:
        return []
    axis = torch.linspace(-extent, extent, size)
    # Rows run from +extent (top) to -extent (bottom) so the picture reads like a plot of z.
    z = torch.stack(torch.meshgrid(axis.flip(0), axis, indexing="ij"), dim=-1).reshape(-1, 2)[:, [1, 0]]
    fig, axes = plt.subplots(1, len(two_d), figsize=(4.2 * len(two_d), 4.4), squeeze=False)
    for ax, (name, model) in zip(axes[0], two_d.items()):
        images = torch.sigmoid(model.decode_noise(z)).reshape(size, size, 28, 28)
        mosaic = images.permute(0, 2, 1, 3).reshape(size * 28, size * 28).numpy()
        ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, extent=(-extent, extent, -extent, extent))
        ax.set_title(f"{name} ({model.sampler.label} units)" if model.sampler.ex_post else name, fontsize=9)
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
        ax.grid(False)
    fig.suptitle(f"Decoded 2-D latent space over [-{extent:g}, {extent:g}]², {size}×{size} points", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "latent_map", dpi)


def project_2d(points: torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """Posterior means as 2-D points: the means themselves for 2-D models, else their first two principal components."""
    if points.shape[1] == 2:
        return points, "$\\mu_1$", "$\\mu_2$"
    centred = points - points.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T, "PC 1 of $\\mu$", "PC 2 of $\\mu$"


@torch.no_grad()
def latent_scatter(
    models: dict[str, Autoencoder], images: torch.Tensor, labels: np.ndarray, folder: Path, dpi: int
) -> list[Path]:
    columns = min(4, len(models))
    rows = -(-len(models) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False)
    colours = sns.color_palette(PALETTE, 10)
    for ax, (name, model) in zip(axes.flat, models.items()):
        points, xlabel, ylabel = project_2d(model.encode(images))
        for digit in range(10):
            chosen = points[torch.from_numpy(labels == digit)]
            ax.scatter(chosen[:, 0], chosen[:, 1], s=3, color=colours[digit], label=str(digit), alpha=0.7, linewidths=0)
        ax.set_title(name if model.latent_dim == 2 else f"{name} (first 2 PCs)", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, title="digit", loc="center right", markerscale=4, fontsize=8)
    fig.suptitle("Test-set codes (posterior means for a VAE), coloured by digit", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    return save(fig, folder, "latent_scatter", dpi)


def loss_curves(history: pd.DataFrame, folder: Path, dpi: int) -> list[Path]:
    """history: one row per cell, epoch and split ('train' or 'validation'), with the objective in `loss`;
    one column per model (family and arch), line style = the family's setting (β for a VAE)."""
    if history.empty:
        return []
    grid = sns.relplot(
        data=history,
        x="epoch",
        y="loss",
        row="split",
        col="model",
        hue="latent_dim",
        style="setting",
        kind="line",
        palette=PALETTE,
        height=2.8,
        aspect=1.3,
        facet_kws={"sharey": False},
        markers=True,
        estimator="mean",
        errorbar=("sd", 1),
    )
    grid.set_axis_labels("epoch", "training objective (nats/image)")
    grid.set_titles("{row_name} · {col_name}")
    grid.figure.suptitle("Training and validation loss per epoch (mean ± sd over seeds)", y=1.02, fontsize=10)
    return save(grid.figure, folder, "loss_curves", dpi, vector=True)


def rate_distortion(groups: pd.DataFrame, folder: Path, dpi: int) -> list[Path]:
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    sns.scatterplot(
        data=groups, x="kl_mean", y="recon_mean", hue="latent_dim", style="arch", s=70, palette=PALETTE, ax=ax
    )
    for row in groups.itertuples():
        ax.annotate(
            f"β={row.beta:g}", (row.kl_mean, row.recon_mean), textcoords="offset points", xytext=(5, 4), fontsize=7
        )
    ax.set_xlabel("rate: test KL (nats/image)")
    ax.set_ylabel("distortion: test reconstruction (nats/image)")
    ax.set_title("Rate–distortion of every cell (mean over seeds)", fontsize=10)
    return save(fig, folder, "rate_distortion", dpi, vector=True)


def metric_heatmaps(groups: pd.DataFrame, metrics: dict[str, str], folder: Path, dpi: int) -> list[Path]:
    """One heatmap per metric and arch over latent_dim x beta (empty where the grid has no cell)."""
    archs = sorted(groups["arch"].unique())
    fig, axes = plt.subplots(len(metrics), len(archs), figsize=(3.8 * len(archs), 2.9 * len(metrics)), squeeze=False)
    for i, (metric, label) in enumerate(metrics.items()):
        for j, arch in enumerate(archs):
            table = groups[groups["arch"] == arch].pivot_table(
                index="latent_dim", columns="beta", values=f"{metric}_mean"
            )
            sns.heatmap(table, annot=True, fmt=".1f", cmap="viridis", ax=axes[i, j], cbar_kws={"label": label})
            axes[i, j].grid(False)
            axes[i, j].set_title(f"{arch}: {label}", fontsize=9)
            axes[i, j].set_xlabel("β")
            axes[i, j].set_ylabel("latent_dim")
    fig.suptitle("Test metrics over latent_dim × β", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title above the first row
    return save(fig, folder, "metric_heatmaps", dpi, vector=True)


def kl_per_dimension(kl_dims: dict[str, list[float]], folder: Path, dpi: int) -> list[Path]:
    """Each model's test KL per latent dimension, largest first: where the information goes."""
    kl_dims = {name: values for name, values in kl_dims.items() if values is not None}
    if not kl_dims:
        return []
    columns = min(4, len(kl_dims))
    rows = -(-len(kl_dims) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, kl_dims.items()):
        ordered = sorted(values, reverse=True)
        ax.bar(range(1, len(ordered) + 1), ordered, color=sns.color_palette(PALETTE)[0])
        ax.axhline(0.01, color="grey", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("latent dimension (sorted)")
        ax.set_ylabel("KL (nats/image)")
    for ax in list(axes.flat)[len(kl_dims) :]:
        ax.set_visible(False)
    fig.suptitle("Test KL per latent dimension", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "kl_per_dim", dpi, vector=True)


ADVERSARIAL_CURVES = {  # history key: panel title
    "train_d_loss": "discriminator loss (train)",
    "train_g_loss": "generator loss (train)",
    "val_d_real": "mean D(real) (validation)",
    "val_d_fake": "mean D(fake) (validation)",
    "val_fid_probe": "FID probe, 2,000 samples (validation)",
}


def adversarial_curves(histories: dict[str, list[dict]], folder: Path, dpi: int) -> list[Path]:
    """Per epoch, for every adversarial cell: both players' losses, D's mean outputs and the FID probe."""
    rows = [
        {"cell": cell, "epoch": row["epoch"], "panel": title, "value": row[key]}
        for cell, history in histories.items()
        for row in history
        for key, title in ADVERSARIAL_CURVES.items()
        if key in row
    ]
    if not rows:
        return []
    palette = sns.color_palette(PALETTE if len(histories) <= 10 else "husl", len(histories))  # one colour per cell
    grid = sns.relplot(
        data=pd.DataFrame(rows),
        x="epoch",
        y="value",
        col="panel",
        hue="cell",
        kind="line",
        marker="o",
        col_wrap=3,
        height=2.6,
        aspect=1.3,
        facet_kws={"sharey": False},
        palette=palette,
    )
    grid.set_titles("{col_name}")
    grid.set_axis_labels("epoch", "")
    grid.figure.suptitle("Adversarial training per epoch", y=1.02, fontsize=10)
    return save(grid.figure, folder, "adversarial_curves", dpi, vector=True)


@torch.no_grad()
def finetuning(
    pairs: list[tuple[str, Autoencoder, str, Autoencoder]], count: int, seed: int, folder: Path, dpi: int
) -> list[Path]:
    """For each fine-tuned cell: its source model's samples and its own from the same noise, one row above the
    other."""
    rows = []
    for source_name, source, name, tuned in pairs:
        noise = sampler_noise(tuned, count, seed)
        rows += [
            (f"{source_name} (source)", torch.sigmoid(source.decode_noise(noise))),
            (f"{name} (fine-tuned)", torch.sigmoid(tuned.decode_noise(noise))),
        ]
    if not rows:
        return []
    title = "The same noise through the source's decoder before (top) and after adversarial fine-tuning"
    return save(image_rows(rows, title), folder, "finetuning", dpi)
