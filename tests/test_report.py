import dataclasses
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.classifier import train_classifier
from pipeline.evaluate import evaluate_cell
from pipeline.models import FAMILIES
from pipeline.outputs import read_json
from pipeline.paths import REPORTS, RUN_FILE, train_dir
from pipeline.report import CAPTIONS, build_report, cell_figures
from pipeline.train import train_cell

STUDY_FIGURES = set(CAPTIONS)
pytestmark = pytest.mark.slow  # every test reads the whole tiny study, trained and evaluated

CELL_FIGURES = {"reconstructions", "denoising", "samples", "interpolation", "latent_map", "latent_scatter"}


def cell_figure_names(config, name):
    """Every model figure; KL per dimension only for a family with a posterior; a GAN (no encoder) only
    generates; a quantised code has no interpolation or latent map."""
    capabilities = FAMILIES[config.cell(name).family].capabilities
    if not capabilities.encoder:
        return {"samples", "latent_map"}
    moved_through = set() if capabilities.continuous_code else {"interpolation", "latent_map"}  # a quantised code
    return (CELL_FIGURES - moved_through) | ({"kl_per_dim"} if capabilities.posterior else set())


@pytest.fixture
def evaluated(prepared):
    train_classifier(prepared)
    for name in prepared.cells:
        train_cell(prepared, name)
        evaluate_cell(prepared, name)
    return prepared


def assert_valid_picture(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert min(pixels.shape) > 100, path
    assert pixels.std() > 5, f"{path} is blank"


def test_report_has_every_figure_table_and_finding(evaluated):
    folder = build_report(evaluated)
    for name in STUDY_FIGURES:
        assert_valid_picture(folder / f"{name}.png")
    for svg in folder.glob("*.svg"):
        assert ElementTree.parse(svg).getroot().tag.endswith("svg")
    results = (folder / "results.csv").read_text().splitlines()
    assert len(results) == 1 + len(evaluated.cells)
    report = (folder / "report.md").read_text()
    for name in evaluated.cells:
        assert f"| {name} |" in report
    assert "Does the convolutional VAE beat the linear one on test ELBO?" in report
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(STUDY_FIGURES)
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    for name in evaluated.cells:
        assert {p.stem for p in (folder / "cells" / name).glob("*.png")} == cell_figure_names(evaluated, name)
    assert_compares_the_families_and_shows_missing_metrics_as_dashes(report)
    assert_figures_reach_mlflow(evaluated)


def assert_compares_the_families_and_shows_missing_metrics_as_dashes(report: str) -> None:
    for question in (
        "Which model family reconstructs best?",
        "Which family gives the best codes for a linear probe?",
        "Which family is most robust to noise?",
        "Which family generates best?",
    ):
        assert f"### {question}" in report
    assert "one seed per cell" in report
    assert "### Every family in the same units" in report
    # A GAN has no encoder: no reconstruction, KL or ELBO; the plain AE has no KL, ELBO, active units or
    # likelihood bound: dashes, never 0.
    gan_row = next(line for line in report.splitlines() if line.startswith("| gan-conv-z2-s0 | gan | conv"))
    assert gan_row.endswith("| – | – | – | – |")
    assert "| ae-linear-z2-s0 | ae | linear | 2 | – | 0 | " in report
    ae_row = next(line for line in report.splitlines() if line.startswith("| ae-linear-z2-s0 | ae | linear"))
    assert ae_row.endswith("| – | – | – |")
    assert "| ae-linear-z2-s0 (ex-post Gaussian) |" in report
    sample_row = next(line for line in report.splitlines() if line.startswith("| ae-linear-z2-s0 (ex-post Gaussian) |"))
    assert sample_row.endswith("| – |")
    # The baseline question compares every plain autoencoder at latent_dim 2 with the PCA cell there.
    assert "### At the same latent size, how much better than the linear baseline" in report
    assert "latent_dim 2: ae-linear-z2 reconstructs " in report and " than pca-z2 (" in report
    # The VQ-VAE's own metrics in their table; its quantised code has no contraction: a dash.
    assert "### The families' own metrics" in report and "- codebook_perplexity: exp of the entropy" in report
    rows = [line.strip(" |").split(" | ") for line in report.splitlines() if line.startswith("| vqvae-linear-z2-s0 | ")]
    family_row = next(row for row in rows if len(row) == 11)  # with its sampler column
    own_row = next(row for row in rows if len(row) == 4)
    assert family_row[6] == "–"  # contraction
    perplexity, dead = (float(value) for value in own_row[2:])
    assert 1 <= perplexity <= 16 and 0 <= dead < 1


def assert_figures_reach_mlflow(evaluated) -> None:
    client = MlflowClient()
    run_id = read_json(train_dir(evaluated.study, "conv-z2-b1-s0") / RUN_FILE)["run_id"]
    assert {a.path for a in client.list_artifacts(run_id, "figures")} >= {
        "figures/latent_map.png",
        "figures/samples.png",
    }
    parent = client.get_run(run_id).data.tags["mlflow.parentRunId"]
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}


def test_partial_grid_lists_the_missing_cell(evaluated):
    cells = dict(evaluated.cells)
    cells["conv-z3-b1-s0"] = dataclasses.replace(cells["conv-z2-b1-s0"], name="conv-z3-b1-s0", latent_dim=3)
    folder = build_report(dataclasses.replace(evaluated, cells=cells))
    report = (folder / "report.md").read_text()
    assert "## Missing cells" in report and "- conv-z3-b1-s0: not trained (missing or failed)" in report


def test_figures_on_demand_for_one_cell(evaluated, workdir):
    folder = cell_figures(evaluated, "linear-z2-b1-s0", workdir / "one")
    assert {p.stem for p in folder.glob("*.png")} == cell_figure_names(evaluated, "linear-z2-b1-s0")
    for path in folder.glob("*.png"):
        assert_valid_picture(path)
    folder = cell_figures(evaluated, "dae-linear-z2-s0", workdir / "dae")
    assert {p.stem for p in folder.glob("*.png")} == CELL_FIGURES
    assert not (REPORTS / evaluated.study).exists()
