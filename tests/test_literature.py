"""The report's comparison with Burda et al.'s Table 1 (pipeline/reporting/literature.py), on made-up results."""

import pandas as pd
import pytest

from pipeline.config import parse_study
from pipeline.reporting import literature
from pipeline.reporting.results import seed_groups

BURDA_TRAIN = {
    "epochs": 4,
    "batch_size": 20,
    "lr": 0.001,
    "lr_schedule": [[1, 0.001], [3, 0.00072]],
    "adam_eps": 1e-4,
    "likelihood": "bernoulli",
    "gaussian_std": 0.1,
    "hidden": [200, 200],
    "activation": "tanh",
    "channels": [4, 8],
    "device": "cpu",
}
CELLS = {
    "vae-k1-s0": {"family": "vae", "arch": "linear", "latent_dim": 50, "beta": 1.0, "seed": 0},
    "iwae-k5-s0": {"family": "iwae", "arch": "linear", "latent_dim": 50, "k": 5, "seed": 0},
    "iwae-k50-s0": {"family": "iwae", "arch": "linear", "latent_dim": 50, "k": 50, "seed": 0},
    "iwae-k1-s0": {"family": "iwae", "arch": "linear", "latent_dim": 50, "k": 1, "seed": 0},
    "relu-k5-s0": {"family": "iwae", "arch": "linear", "latent_dim": 50, "k": 5, "seed": 0, "activation": "relu"},
    "vae-b4-s0": {"family": "vae", "arch": "linear", "latent_dim": 50, "beta": 4.0, "seed": 0},
}


def study(binarize="dynamic", iw_samples=5000, iw_images=10000):
    return parse_study(
        {
            "study": "t",
            "data": {"root": ".", "train_size": 100, "val_size": 10, "test_size": 10000, "binarize": binarize},
            "train": BURDA_TRAIN,
            "cells": CELLS,
            "evaluate": {"batch_size": 10},
            "classifier": {"epochs": 1, "batch_size": 8, "lr": 0.01},
            "sample_quality": {
                "n_samples": 10,
                "kid_subsets": 1,
                "kid_subset_size": 2,
                "pr_k": 1,
                "iw_samples": iw_samples,
                "iw_images": iw_images,
            },
            "report": {
                "digits": 1,
                "samples": 1,
                "interpolation_pairs": [[1, 7]],
                "interpolation_steps": 2,
                "latent_map_extent": 1.0,
                "latent_map_size": 2,
                "scatter_points": 10,
            },
        }
    )


def tables(config, nll: dict[str, float]):
    groups_of = seed_groups(config)
    cells = pd.DataFrame({"cell": list(config.cells), "group": [groups_of[name] for name in config.cells]})
    groups = pd.DataFrame(
        {
            "group": cells["group"],
            "seeds": 1,
            "iw_nll_mean": [nll[name] for name in config.cells],
            "iw_nll_se_mean": 0.3,
            "iw_nll_std": float("nan"),
            "elbo_mean": [nll[name] + 4 for name in config.cells],
            "active_units_mean": 20.0,
        }
    )
    return cells, groups


NLL = {
    "vae-k1-s0": 95.0,
    "iwae-k5-s0": 94.0,
    "iwae-k50-s0": 93.5,
    "iwae-k1-s0": 94.5,  # the paper's tie with the VAE orders nothing
    "relu-k5-s0": 90.0,
    "vae-b4-s0": 99.0,
}


def test_only_cells_trained_like_the_papers_models_are_compared_in_the_tables_order():
    config = study()
    table = literature.comparison_table(config, *tables(config, NLL))
    assert list(table["model"]) == ["VAE, k = 1", "IWAE, k = 1", "IWAE, k = 5", "IWAE, k = 50"]
    assert list(table["group"]) == ["vae-k1", "iwae-k1", "iwae-k5", "iwae-k50"]
    assert list(table["difference"]) == pytest.approx([95.0 - 86.76, 94.5 - 86.76, 94.0 - 85.54, 93.5 - 84.78])
    assert list(table["epochs"]) == [4, 4, 4, 4]
    markdown = literature.markdown_comparison(table)
    assert "| vae-k1 | VAE, k = 1 | 4 | 95.00 ± 0.30 | 86.76 | +8.24 | 99.00 | 20 (19) |" in markdown


def test_grey_level_data_is_not_compared():
    config = study(binarize="none")
    assert literature.comparison_table(config, *tables(config, NLL)).empty


def test_the_findings_say_whether_the_papers_ordering_holds_and_how_far_each_number_is():
    config = study()
    table = literature.comparison_table(config, *tables(config, NLL))
    verdict, *distances = literature.comparison_findings(table)
    assert verdict == (
        "The paper's ordering (IWAE, k = 50 < IWAE, k = 5 < VAE, k = 1 = IWAE, k = 1) holds here: IWAE, k = 50 "
        "93.50 < IWAE, k = 5 94.00 < IWAE, k = 1 94.50 < VAE, k = 1 95.00."
    )
    assert distances[0] == (
        "vae-k1 (VAE, k = 1, 4 of 3,280 epochs): 95.00 nats against the paper's 86.76, 8.24 above it; 20 active "
        "units against 19."
    )
    swapped = literature.comparison_table(config, *tables(config, NLL | {"vae-k1-s0": 93.0}))
    assert literature.comparison_findings(swapped)[0].startswith(
        "The paper's ordering (IWAE, k = 50 < IWAE, k = 5 < VAE, k = 1 = IWAE, k = 1) does not hold here: VAE, "
        "k = 1 93.00 <"
    )


def test_the_protocol_text_names_a_bound_other_than_the_papers():
    assert "as the paper estimates it" in literature.protocol_text(study())
    assert "the paper uses K = 5,000 on all 10,000" in literature.protocol_text(study(iw_samples=1000, iw_images=300))


def test_several_seeds_show_their_spread_and_a_missing_standard_error_is_a_dash():
    config = study()
    cells, groups = tables(config, NLL)
    groups["seeds"], groups["iw_nll_std"] = 3, 0.25
    groups.loc[0, "iw_nll_se_mean"] = float("nan")
    markdown = literature.markdown_comparison(literature.comparison_table(config, cells, groups))
    assert "| 95.00 ± – (mean of 3 seeds, seed std 0.25) |" in markdown
