"""Stage `report`: tables, figures and findings of a whole study in reports/<study>/ (Markdown and
self-contained HTML), logged to the study's MLflow runs. Also `vaebench figures CELL` for one cell."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import tracking
from pipeline.config import ConfigError, StudyConfig
from pipeline.data import images_to_tensor, load_prepared
from pipeline.errors import ArtifactError, VaebenchError
from pipeline.floor import load_floor
from pipeline.leftovers import clear_leftovers
from pipeline.models import LAB_FAMILY, family_names
from pipeline.models.corruption import gaussian_noise, mask_pixels
from pipeline.outputs import read_json, staged_dir, write_json
from pipeline.paths import (
    KL_PER_DIM_FILE,
    PREPARED_FILE,
    REPORTS,
    RUN_FILE,
    evaluate_dir,
    evaluate_stage,
    study_metrics_file,
    train_dir,
)
from pipeline.reporting import figures, literature
from pipeline.reporting.findings import study_findings
from pipeline.reporting.results import (
    OWN_METRICS,
    best_cells,
    cell_history,
    cell_kl_per_dim,
    cell_metrics,
    cell_table,
    markdown_class_share_table,
    markdown_family_table,
    markdown_own_metrics_table,
    markdown_sample_table,
    markdown_seed_table,
    markdown_table,
    own_metrics_measured,
    seed_table,
)
from pipeline.stage_params import REPORT_PARAMS, check_unchanged
from pipeline.trained import load_trained

log = logging.getLogger(__name__)
HEATMAP_METRICS = {  # VAE cells only: these run over latent_dim x β
    "elbo": "ELBO (nats/image)",
    "recon": "reconstruction (nats/image)",
    "kl": "KL (nats/image)",
    "active_units": "active units",
    "fid_mnist_cnn": "sample FID (MNIST CNN)",
    "iw_nll": "IW NLL (nats/image)",
}
CAPTIONS = {
    "loss_curves": "Training (top) and validation (bottom) objective in nats per image (reconstruction + β·KL for a "
    "VAE, plus λ·‖J‖² for a CAE; a DAE's is on corrupted inputs), per epoch; one panel per family and "
    "architecture, colour = latent_dim, line style = the family's setting.",
    "reconstructions": "The same test digits (top row) reconstructed by every model from its code (the posterior "
    "mean for a VAE).",
    "denoising": "The same test digits with Gaussian noise and with masked pixels (the denoising autoencoder's "
    "corruptions, at the evaluate block's levels), and every model's reconstruction of the corrupted digits.",
    "samples": "Decoder means of each model's sampler with a fixed seed: z ~ N(0, I) for a family trained with that "
    "prior; models of equal latent_dim and equal kind of sampler decode the same noise. Families without a prior "
    "map that noise through a distribution fitted to their training codes (ex post).",
    "interpolation": "Decoded points on the straight line between the codes (posterior means) of two fixed test "
    "digits.",
    "latent_map": "Models with latent_dim = 2 and a continuous code: the decoder's mean image on a regular grid over "
    "the latent plane (for a family without a prior, the grid is in units of its ex-post Gaussian).",
    "latent_scatter": "Codes (posterior means) of test images coloured by digit label (2-D models directly, larger "
    "ones by their first two principal components).",
    "rate_distortion": "VAE cells: rate (test KL) against distortion (test reconstruction) for every group of "
    "cells, β annotated.",
    "metric_heatmaps": "VAE cells: each test metric over latent_dim × β, one column per architecture; blank where "
    "the grid has no cell.",
    "kl_per_dim": "VAE cells: test KL per latent dimension, sorted; the dotted line is 0.01 nats.",
    "adversarial_curves": "GAN and VAE-GAN cells, per epoch: the discriminator's and the generator's training "
    "losses, the discriminator's mean output on validation digits (D(real)) and on generated ones (D(fake): "
    "G(z) for a GAN, the reconstructions for a VAE-GAN, whose losses also sum two fake terms, reconstructions "
    "and prior samples), and the FID of 2,000 samples from a fixed z against 2,000 validation digits (MNIST-CNN "
    "features).",
    "finetuning": "Fine-tuned cells: the same z ~ N(0, I) decoded by the source VAE (top) and by the generator "
    "fine-tuned adversarially from it (bottom).",
}


SAMPLE_QUALITY_TEXT = (
    "Scores in the 128-d feature space of the in-project MNIST classifier (results/classifier), not Inception-v3: "
    "{n_samples} samples z ~ N(0, I) and the reconstructions of as many test images, each against the test set. "
    "FID and KID: lower is better; IS-style score: higher is better (10 at most); precision and recall "
    "(k = {pr_k} nearest neighbours): higher is better; class entropy: log 10 = 2.303 nats when every digit is "
    "generated equally often. IW NLL: the importance-weighted bound on -log p(x) with K = {iw_samples} on the "
    "first {iw_images} test images (binarized: {binarize}), for families with a likelihood bound. The first row "
    "scores real training digits: the floor. Families without a prior ({ex_post}) are sampled from a distribution "
    "fitted to the codes of their training images (ex-post density estimation), marked in the table."
)

FAMILY_TEXT = (
    "Every cell in the same units, whatever it was trained with: test reconstruction in Bernoulli nats per image "
    "and as mean squared error per pixel (from the same forward pass, one z sample for a VAE); the MSE against "
    "the clean digits of reconstructions of test digits with Gaussian noise of σ = {noise_std:g} and with a "
    "share p = {mask_prob:g} of pixels masked; the mean Frobenius norm of the encoder's Jacobian ‖∂h/∂x‖_F over "
    "the first {contraction_images} test images (the code h is the posterior mean for a VAE; lower is more "
    "contractive); test accuracy of a linear probe (logistic regression on standardised codes) and of a "
    "{knn_k}-nearest-neighbour vote, both fitted on the codes of the training images; sample FID as below."
)


CLASS_SHARE_TEXT = (
    "The share of each model's {n_samples} samples that the MNIST classifier assigns to each digit (0.10 each "
    "when every digit is generated equally often) and their class entropy; a share above {share:.0%} "
    "(report.collapse_share) is flagged as mode collapse."
)


class TestSet:
    """The prepared test images and labels, with the fixed digits every figure uses."""

    def __init__(self):
        arrays = load_prepared(PREPARED_FILE)
        self.images = images_to_tensor(arrays["test_images"])
        self.labels = arrays["test_labels"]

    def first_of(self, digit: int, occurrence: int = 0) -> torch.Tensor:
        where = np.flatnonzero(self.labels == digit)
        if len(where) <= occurrence:
            raise ConfigError(f"the prepared test set has too few images of digit {digit}; raise data.test_size")
        return self.images[where[occurrence]]

    def digits(self, count: int) -> torch.Tensor:
        """0, 1, ..., 9, 0, 1, ...: the first test image of each class, then the second, and so on."""
        return torch.stack([self.first_of(i % 10, i // 10) for i in range(count)])

    def pairs(self, labels) -> list[tuple[int, torch.Tensor, int, torch.Tensor]]:
        return [(a, self.first_of(a), b, self.first_of(b)) for a, b in labels]


def model_figures(config: StudyConfig, models: dict, test: TestSet, folder: Path) -> list[Path]:
    """The figures drawn from trained models, for one model or for many side by side."""
    settings = config.report
    scatter = slice(0, settings.scatter_points)
    kl_dims = {name: cell_kl_per_dim(config.study, name) for name in models}
    digits = test.digits(settings.digits)
    encoders = {name: model for name, model in models.items() if model.capabilities.encoder}
    # Interpolation and the 2-D map move through code space, which a quantised code does not fill.
    continuous = {name: model for name, model in models.items() if model.capabilities.continuous_code}
    interpolated = {name: model for name, model in encoders.items() if name in continuous}
    generator = torch.Generator().manual_seed(settings.seed)
    corrupted = {
        f"noise σ={config.evaluate.noise_std:g}": gaussian_noise(digits, config.evaluate.noise_std, generator),
        f"mask p={config.evaluate.mask_prob:g}": mask_pixels(digits, config.evaluate.mask_prob, generator),
    }
    with_encoder = (
        []
        if not encoders
        else [  # a GAN has no encoder: no reconstructions or codes
            *figures.reconstructions(encoders, digits, folder, settings.dpi),
            *figures.denoising(encoders, digits, corrupted, folder, settings.dpi),
            *figures.interpolations(
                interpolated,
                test.pairs(settings.interpolation_pairs),
                settings.interpolation_steps,
                folder,
                settings.dpi,
            ),
            *figures.latent_scatter(encoders, test.images[scatter], test.labels[scatter], folder, settings.dpi),
        ]
    )
    return [
        *with_encoder,
        *figures.samples(models, settings.samples, settings.seed, folder, settings.dpi),
        *figures.latent_maps(continuous, settings.latent_map_extent, settings.latent_map_size, folder, settings.dpi),
        *figures.kl_per_dimension(kl_dims, folder, settings.dpi),
    ]


def history_table(config: StudyConfig, cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for cell in cells[(cells["status"] == "ok") & ~cells["adversarial"]].itertuples():
        for epoch in cell_history(config.study, cell.cell):
            for split, prefix in (("training", "train"), ("validation", "val")):
                rows.append(
                    {
                        "model": f"{cell.family} · {cell.arch}",
                        "latent_dim": cell.latent_dim,
                        "setting": cell.variant or "–",
                        "cell": cell.cell,
                        "epoch": epoch["epoch"],
                        "split": split,
                        "loss": epoch[f"{prefix}_loss"],
                    }
                )
    return pd.DataFrame(rows)


def load_models(config: StudyConfig, names) -> dict:
    return {name: load_trained(config.study, config.cell(name), torch.device("cpu")) for name in names}


def design_text(config: StudyConfig, cells: pd.DataFrame) -> str:
    values = lambda key: ", ".join(str(v) for v in sorted(cells[key].unique()))  # noqa: E731
    epochs = sorted({cell.epochs for cell in config.cells.values()})
    betas = sorted(cells["beta"].dropna().unique())
    settings = sorted({v for v in cells.loc[cells["family"] != LAB_FAMILY, "variant"] if v})
    return (
        f"{len(cells)} cells: family {{{values('family')}}}, arch {{{values('arch')}}}, latent_dim "
        f"{{{values('latent_dim')}}}, "
        f"VAE β {{{', '.join(f'{b:g}' for b in betas) or '–'}}}"
        + (f", other family settings {{{', '.join(settings)}}}" if settings else "")
        + f", seeds {{{values('seed')}}}; "
        f"{'/'.join(map(str, epochs))} epochs on {config.data.train_size:,} training images "
        f"({config.data.val_size:,} for validation), evaluated on {config.data.test_size:,} test images. "
        "Reconstruction, KL and ELBO are nats per image; ELBO means reconstruction + KL (the negative evidence lower "
        "bound, lower is better), reported only for families that have it."
    )


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def generator_text(
    config: StudyConfig, cells: pd.DataFrame, models: dict, histories: dict[str, list[dict]]
) -> list[str]:
    """The lab's questions on the GAN cells (how the decoder serves as a generator, how the encoder and the
    discriminator differ), in sentences built from the trained networks and the measured numbers."""
    sentences = []
    by_name = cells.set_index("cell")
    for name, model in models.items():
        if model.capabilities.encoder or not model.capabilities.adversarial:  # a generator alone
            continue
        cell, first, last = config.cell(name), histories[name][0], histories[name][-1]
        vae_encoder_outputs = 2 * cell.latent_dim
        text = (
            f"{name}: the generator is the {cell.arch} decoder network of a latent_dim {cell.latent_dim} VAE "
            f"({parameters(model.decoder):,} parameters, z ~ N(0, I) in, 784 pixel logits out); the discriminator "
            f"is the "
            f"{cell.arch} encoder network with one output, a real/fake logit, instead of the VAE encoder's "
            f"{vae_encoder_outputs} (mean and log-variance of q(z|x)): {parameters(model.discriminator):,} parameters. "
            f"After {last['epoch']} epoch{'s' if last['epoch'] > 1 else ''} the discriminator's mean output was "
            f"{last['val_d_real']:.2f} on validation "
            f"digits and {last['val_d_fake']:.2f} on generated ones (0.5 on both: it cannot tell them apart); "
            f"the FID probe went from {first['val_fid_probe']:.1f} "
            f"after epoch 1 to {last['val_fid_probe']:.1f} (figure adversarial_curves)."
        )
        if cell.init_from in by_name.index:  # the source VAE is evaluated too
            source = by_name.loc[cell.init_from]
            mine = by_name.loc[name]
            text += (
                f" It started from the decoder of {cell.init_from}, weight for weight"
                + (
                    " (and its discriminator from that VAE's encoder, but for the output layer)"
                    if cell.settings.init_discriminator
                    else ""
                )
                + f"; from the same z (figure finetuning), its samples moved from the VAE's FID "
                f"{source.fid_mnist_cnn:.1f}, precision {source.precision_mnist_cnn:.3f}, recall "
                f"{source.recall_mnist_cnn:.3f} "
                f"to FID {mine.fid_mnist_cnn:.1f}, precision {mine.precision_mnist_cnn:.3f}, recall "
                f"{mine.recall_mnist_cnn:.3f}."
            )
        sentences.append(text)
    return sentences


def report_blocks(
    config: StudyConfig,
    cells: pd.DataFrame,
    groups: pd.DataFrame,
    figure_names: list[str],
    generator_sentences: list[str],
) -> list:
    blocks = [("h1", f"vaebench study report: {config.study}"), ("h2", "Design"), ("p", design_text(config, cells))]
    blocks.append(("h2", "Findings"))
    for question, sentences in study_findings(cells, groups, config.report.collapse_share).items():
        blocks += [("h3", question), ("ul", sentences)]
    if generator_sentences:
        blocks += [
            ("h3", "The decoder as a generator, the encoder against the discriminator"),
            ("ul", generator_sentences),
        ]
    compared = literature.comparison_table(config, cells, groups)
    if not compared.empty:
        blocks += [
            ("h2", "Against the literature"),
            ("p", literature.protocol_text(config)),
            ("table", literature.markdown_comparison(compared)),
            ("ul", literature.comparison_findings(compared)),
        ]
    blocks += [("h2", "Results"), ("table", markdown_table(cells))]
    if (groups["seeds"] > 1).any():
        blocks += [("p", "Aggregated over seeds (mean ± standard deviation):"), ("table", markdown_seed_table(groups))]
    blocks += [
        ("h3", "Every family in the same units"),
        ("p", FAMILY_TEXT.format(**vars(config.evaluate))),
        ("table", markdown_family_table(cells)),
    ]
    own = own_metrics_measured(cells)
    if own:
        blocks += [
            ("h3", "The families' own metrics"),
            ("ul", [f"{name}: {OWN_METRICS[name]}" for name in own]),
            ("table", markdown_own_metrics_table(cells, own)),
        ]
    blocks += [
        ("h3", "Sample quality"),
        (
            "p",
            SAMPLE_QUALITY_TEXT.format(
                **(
                    vars(config.sample_quality)
                    | ({"binarize": "drawn once by prepare"} if config.data.binarize == "dynamic" else {})
                ),
                ex_post=family_names(lambda family: family.Sampler.ex_post),
            ),
        ),
        ("table", markdown_sample_table(cells, load_floor())),
        ("h3", "Digits in the samples"),
        ("p", CLASS_SHARE_TEXT.format(n_samples=config.sample_quality.n_samples, share=config.report.collapse_share)),
        ("table", markdown_class_share_table(cells, config.report.collapse_share)),
    ]
    missing = cells[cells["status"] != "ok"]
    if not missing.empty:
        blocks += [("h2", "Missing cells"), ("ul", [f"{row.cell}: {row.status}" for row in missing.itertuples()])]
    blocks.append(("h2", "Figures"))
    blocks += [("figure", f"{name}.png", CAPTIONS[name]) for name in figure_names]
    return blocks


def to_markdown(blocks: list) -> str:
    out = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {content[0]}")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in content[0]))
        elif kind == "figure":
            name, caption = content
            out.append(f"![{caption}]({name})\n\n*{caption}*")
        else:  # p, table
            out.append(content[0])
    return "\n\n".join(out) + "\n"


def markdown_table_to_html(table: str) -> str:
    rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in table.splitlines()]
    head, body = rows[0], rows[2:]
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{c}</th>" for c in head)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
        + "</tbody></table>"
    )


def to_html(blocks: list, folder: Path) -> str:
    """One self-contained page: the images are embedded, nothing is fetched."""
    out = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(content[0])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            out.append(markdown_table_to_html(content[0]))
        elif kind == "figure":
            name, caption = content
            data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        else:
            out.append(f"<p>{html.escape(content[0])}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-style:italic;color:#444}"
    )
    title = html.escape(blocks[0][1])
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>{''.join(out)}</body></html>\n"
    )


def build_report(config: StudyConfig) -> Path:
    tracking.check_store()
    clear_leftovers(config.study)
    cells = cell_table(config)
    evaluated = cells[cells["status"] == "ok"]
    if evaluated.empty:
        raise VaebenchError(f"no cell of study {config.study!r} is evaluated yet; run dvc repro first")
    groups = seed_table(cells)
    vae_groups = groups[groups["family"] == LAB_FAMILY]
    test = TestSet()
    final = REPORTS / config.study
    # Study figures show one model per group (its first seed) so that rows stay readable.
    shown = evaluated.drop_duplicates("group")["cell"].tolist()
    tuned = [(config.cell(name).init_from, name) for name in evaluated["cell"] if config.cell(name).init_from]
    loaded = load_models(config, dict.fromkeys([*shown, *(name for pair in tuned for name in pair)]))
    models = {name: loaded[name] for name in shown}
    adversarial = {name: cell_history(config.study, name) for name in evaluated.loc[evaluated["adversarial"], "cell"]}
    with staged_dir(final) as folder:
        log.info("report: drawing figures of %d models", len(shown))
        written = [
            *figures.loss_curves(history_table(config, cells), folder, config.report.dpi),
            *model_figures(config, models, test, folder),
            *figures.adversarial_curves(adversarial, folder, config.report.dpi),
            *figures.finetuning(
                [(source, loaded[source], name, loaded[name]) for source, name in tuned],
                config.report.samples,
                config.report.seed,
                folder,
                config.report.dpi,
            ),
            *(figures.rate_distortion(vae_groups, folder, config.report.dpi) if not vae_groups.empty else []),
            *(
                figures.metric_heatmaps(vae_groups, HEATMAP_METRICS, folder, config.report.dpi)
                if not vae_groups.empty
                else []
            ),
        ]
        names = [name for name in CAPTIONS if any(p.stem == name for p in written)]
        cells.to_csv(folder / "results.csv", index=False)
        groups.to_csv(folder / "results_by_group.csv", index=False)
        blocks = report_blocks(config, cells, groups, names, generator_text(config, evaluated, models, adversarial))
        (folder / "results.md").write_text(markdown_table(cells) + "\n")
        (folder / "report.md").write_text(to_markdown(blocks))
        (folder / "report.html").write_text(to_html(blocks, folder))
        for name in evaluated["cell"]:
            cell_figures(config, name, folder / "cells" / name, test)
        check_unchanged(config, REPORT_PARAMS, "report")
    write_json(study_metrics_file(config.study), {name: cell_metrics(config.study, name) for name in evaluated["cell"]})
    run_ids = {name: read_json(train_dir(config.study, name) / RUN_FILE)["run_id"] for name in evaluated["cell"]}
    tracking.log_report(config, final, {run_ids[name]: final / "cells" / name for name in evaluated["cell"]})
    tracking.log_study_results(config, best_cells(evaluated), run_ids, dict(zip(evaluated["cell"], evaluated["group"])))
    log.info("report: %s", final / "report.html")
    return final


def cell_figures(config: StudyConfig, name: str, folder: Path, test: TestSet | None = None) -> Path:
    """All model figures of one trained and evaluated cell, into `folder` (for `vaebench figures CELL`)."""
    if not (evaluate_dir(config.study, name) / KL_PER_DIM_FILE).is_file():
        raise ArtifactError(
            f"cell {name} is not evaluated yet; run `dvc repro {evaluate_stage(config.cell(name))}` first"
        )
    with staged_dir(folder) as scratch:
        model_figures(config, load_models(config, [name]), test or TestSet(), scratch)
    return folder
