"""The study's cells beside a published table: Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
Autoencoders", Table 1, test -log p(x) on dynamically binarized MNIST with one stochastic layer.

A cell stands for a row of the table when it is trained like the paper's model: the network (784-200-200-50,
tanh, Bernoulli likelihood) on dynamically binarized data, as the plain member of its family, with the
family's number of importance samples k (1 for a family without one). Its epochs, K and test images are
shown beside the paper's, so a shorter run reads as one.
"""

from __future__ import annotations

import itertools

import pandas as pd

from pipeline.config import CellConfig, StudyConfig
from pipeline.models import FAMILIES
from pipeline.reporting.results import number

PAPER = "Burda, Grosse & Salakhutdinov (2016), Table 1 (MNIST, one stochastic layer)"
PAPER_EPOCHS = 3280  # 3^i epochs for i = 0..7
PAPER_K = 5000  # importance samples of the test bound
PAPER_TEST_IMAGES = 10_000
# Row label: (test NLL in nats, active units of 50).
TABLE_1 = {
    "VAE, k = 1": (86.76, 19),
    "VAE, k = 5": (86.47, 20),
    "VAE, k = 50": (86.35, 20),
    "IWAE, k = 1": (86.76, 19),
    "IWAE, k = 5": (85.54, 22),
    "IWAE, k = 50": (84.78, 25),
}
NETWORK = {"arch": "linear", "latent_dim": 50, "hidden": (200, 200), "activation": "tanh", "likelihood": "bernoulli"}


def paper_row(cell: CellConfig, binarize: str) -> str | None:
    """The row of Table 1 the cell is trained like, or None."""
    if binarize != "dynamic" or any(getattr(cell, key) != value for key, value in NETWORK.items()):
        return None
    if not FAMILIES[cell.family].is_plain(cell.settings):
        return None
    label = f"{cell.family.upper()}, k = {getattr(cell.settings, 'k', 1)}"
    return label if label in TABLE_1 else None


def comparison_table(config: StudyConfig, cells: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluated group that stands for a row of Table 1: its test NLL (the IW bound), standard
    error, ELBO, active units and epochs beside the paper's, in the table's order."""
    rows = []
    for group in groups.itertuples():
        cell = config.cell(cells.loc[cells["group"] == group.group, "cell"].iloc[0])
        label = paper_row(cell, config.data.binarize)
        if label is None or pd.isna(group.iw_nll_mean):
            continue
        paper_nll, paper_units = TABLE_1[label]
        rows.append(
            {
                "group": group.group,
                "model": label,
                "seeds": group.seeds,
                "epochs": cell.epochs,
                "nll": group.iw_nll_mean,
                "nll_se": group.iw_nll_se_mean,
                "nll_seed_std": group.iw_nll_std,
                "elbo": group.elbo_mean,
                "active_units": group.active_units_mean,
                "paper_nll": paper_nll,
                "paper_active_units": paper_units,
                "difference": group.iw_nll_mean - paper_nll,
                "order": list(TABLE_1).index(label),
            }
        )
    table = pd.DataFrame(rows)
    return table.sort_values("order").drop(columns="order") if rows else table


def markdown_comparison(table: pd.DataFrame) -> str:
    lines = [
        "| group | paper's model | epochs (paper 3,280) | test NLL ± SE across images | paper NLL | difference | "
        "test −ELBO | active units (paper) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        spread = f" (mean of {row.seeds} seeds, seed std {row.nll_seed_std:.2f})" if row.seeds > 1 else ""
        lines.append(
            f"| {row.group} | {row.model} | {row.epochs} | {row.nll:.2f} ± {number(row.nll_se)}{spread} | "
            f"{row.paper_nll:.2f} | {row.difference:+.2f} | {row.elbo:.2f} | {row.active_units:.0f} "
            f"({row.paper_active_units}) |"
        )
    return "\n".join(lines)


def protocol_text(config: StudyConfig) -> str:
    settings = config.sample_quality
    images = min(settings.iw_images, config.data.test_size)
    same = settings.iw_samples == PAPER_K and images == PAPER_TEST_IMAGES
    return (
        f"Test NLL: the importance-weighted bound on -log p(x) with K = {settings.iw_samples:,} samples on "
        f"{images:,} binarized test images, ± its standard error across images "
        f"({'as the paper estimates it' if same else f'the paper uses K = {PAPER_K:,} on all {PAPER_TEST_IMAGES:,}'}"
        f"). Paper: {PAPER}. docs/literature.md lists every difference from the paper's protocol."
    )


def comparison_findings(table: pd.DataFrame) -> list[str]:
    """Whether the paper's ordering of the models holds here, and how far each number is from the paper's."""
    distances = [
        f"{row.group} ({row.model}, {row.epochs} of {PAPER_EPOCHS:,} epochs): {row.nll:.2f} nats against the "
        f"paper's {row.paper_nll:.2f}, {abs(row.difference):.2f} {'above' if row.difference > 0 else 'below'} it; "
        f"{row.active_units:.0f} active units against {row.paper_active_units}."
        for row in table.itertuples()
    ]
    by_paper = table.sort_values("paper_nll", kind="stable")
    paper_order = " < ".join(
        " = ".join(dict.fromkeys(same["model"])) for _, same in by_paper.groupby("paper_nll", sort=True)
    )
    if by_paper["paper_nll"].nunique() < 2:
        return [f"Only one of the paper's numbers is in the study ({paper_order}): no ordering to check.", *distances]
    ours = by_paper.sort_values("nll", kind="stable")
    # Every pair the paper orders strictly is ordered the same way here (the paper's ties order nothing).
    holds = all(
        (a.nll < b.nll) == (a.paper_nll < b.paper_nll)
        for a, b in itertools.combinations(table.itertuples(), 2)
        if a.paper_nll != b.paper_nll
    )
    measured = " < ".join(f"{row.model} {row.nll:.2f}" for row in ours.itertuples())
    verdict = (
        f"The paper's ordering ({paper_order}) holds here: {measured}."
        if holds
        else f"The paper's ordering ({paper_order}) does not hold here: {measured}."
    )
    return [verdict, *distances]
