"""The study's questions answered in sentences generated from the measured table, never written by hand.

Each function takes the per-cell table and the table aggregated over seeds (see pipeline/results.py) and
returns sentences. A question the grid cannot answer says so. With 3 or more seeds on both sides, a
difference comes with Welch's t-test across seeds.
"""

from __future__ import annotations

import pandas as pd
from scipy import stats

ALPHA = 0.05
MIN_SEEDS_FOR_TEST = 3
QUESTIONS = {
    "arch": "Does the convolutional VAE beat the linear one on test ELBO?",
    "latent_dim": "How does latent_dim change reconstructions and samples?",
    "beta": "How does β trade reconstruction against KL?",
}


def seed_values(cells: pd.DataFrame, group: str, metric: str) -> list[float]:
    return cells.loc[(cells["group"] == group) & (cells["status"] == "ok"), metric].tolist()


def significance(a: list[float], b: list[float]) -> str:
    """Welch's t-test across seeds, or nothing when either side has fewer than 3 seeds."""
    if min(len(a), len(b)) < MIN_SEEDS_FOR_TEST:
        return ""
    p_value = stats.ttest_ind(a, b, equal_var=False).pvalue
    verdict = "significant" if p_value < ALPHA else "not significant"
    return f" (Welch's t-test over {len(a)} and {len(b)} seeds: p = {p_value:.3g}, {verdict} at α = {ALPHA})"


def trend(values: list[float]) -> str:
    steps = [b - a for a, b in zip(values, values[1:])]
    if all(step > 0 for step in steps):
        return "rises"
    if all(step < 0 for step in steps):
        return "falls"
    return "changes non-monotonically"


def series(values) -> str:
    return " → ".join(f"{v:.2f}" for v in values)


def conv_vs_linear(cells: pd.DataFrame, groups: pd.DataFrame) -> list[str]:
    sentences, conv_wins, settings = [], 0, 0
    for (latent_dim, beta), same in groups.groupby(["latent_dim", "beta"]):
        linear, conv = same[same["arch"] == "linear"], same[same["arch"] == "conv"]
        if linear.empty or conv.empty:
            continue
        linear, conv = linear.iloc[0], conv.iloc[0]
        settings += 1
        conv_better = conv["elbo_mean"] < linear["elbo_mean"]
        conv_wins += conv_better
        winner = "conv" if conv_better else "linear"
        sentences.append(
            f"At latent_dim {latent_dim}, β {beta:g}: test ELBO conv {conv['elbo_mean']:.2f} vs linear "
            f"{linear['elbo_mean']:.2f} nats/image; {winner} is lower (better) by "
            f"{abs(conv['elbo_mean'] - linear['elbo_mean']):.2f}"
            + significance(seed_values(cells, conv["group"], "elbo"), seed_values(cells, linear["group"], "elbo"))
            + "."
        )
    if settings == 0:
        return ["Not answered: no setting of latent_dim and β was trained with both architectures."]
    if conv_wins == settings:
        summary = f"Yes: the convolutional VAE has the lower (better) test ELBO in each of the {settings} settings trained with both."
    elif conv_wins == 0:
        summary = f"No: the linear VAE has the lower (better) test ELBO in each of the {settings} settings trained with both."
    else:
        summary = f"Mixed: the convolutional VAE has the lower test ELBO in {conv_wins} of {settings} settings trained with both."
    return [summary, *sentences]


def latent_dim_effect(cells: pd.DataFrame, groups: pd.DataFrame) -> list[str]:
    sentences, sharper, comparisons = [], 0, 0
    for (arch, beta), same in groups.groupby(["arch", "beta"]):
        same = same.sort_values("latent_dim").drop_duplicates("latent_dim")
        if len(same) < 2:
            continue
        recon, kl = same["recon_mean"].tolist(), same["kl_mean"].tolist()
        comparisons += len(recon) - 1
        sharper += sum(b < a for a, b in zip(recon, recon[1:]))
        tests = "".join(
            significance(seed_values(cells, a, "recon"), seed_values(cells, b, "recon"))
            for a, b in zip(same["group"], same["group"][1:])
        )
        sentences.append(
            f"{arch}, β {beta:g}, latent_dim {' → '.join(map(str, same['latent_dim']))}: reconstruction "
            f"{trend(recon)} ({series(recon)} nats/image){tests}, KL {trend(kl)} ({series(kl)}), "
            f"ELBO {series(same['elbo_mean'])}; active units {' → '.join(str(round(a)) for a in same['active_units_mean'])}."
        )
    if comparisons == 0:
        return ["Not answered: no architecture and β were trained at two or more latent sizes."]
    summary = (
        f"A larger latent_dim gives a lower (sharper) reconstruction loss in {sharper} of {comparisons} "
        "comparisons between neighbouring sizes."
    )
    return [summary, *sentences, *sample_quality_by_latent_dim(groups)]


def sample_quality_by_latent_dim(groups: pd.DataFrame) -> list[str]:
    """Whether larger latents generate worse samples: FID, precision and recall of prior samples."""
    if "fid_mnist_cnn_mean" not in groups or groups["fid_mnist_cnn_mean"].isna().all():
        return [
            "Sample quality is not scored in this study's metrics, so whether larger latents generate more "
            "artefacts is not measured here; the samples figure shows the decoded prior samples for inspection."
        ]
    sentences, counts = [], {"fid_worse": 0, "precision_lower": 0, "recall_higher": 0, "lab_fid": 0, "lab_precision": 0}
    comparisons = 0
    for (arch, beta), same in groups.dropna(subset=["fid_mnist_cnn_mean"]).groupby(["arch", "beta"]):
        same = same.sort_values("latent_dim").drop_duplicates("latent_dim")
        if len(same) < 2:
            continue
        fid, recon = same["fid_mnist_cnn_mean"].tolist(), same["recon_mean"].tolist()
        precision, recall = same["precision_mnist_cnn_mean"].tolist(), same["recall_mnist_cnn_mean"].tolist()
        for i in range(len(fid) - 1):
            comparisons += 1
            sharper = recon[i + 1] < recon[i]
            counts["fid_worse"] += fid[i + 1] > fid[i]
            counts["precision_lower"] += precision[i + 1] < precision[i]
            counts["recall_higher"] += recall[i + 1] > recall[i]
            counts["lab_fid"] += sharper and fid[i + 1] > fid[i]
            counts["lab_precision"] += sharper and precision[i + 1] < precision[i]
        sentences.append(
            f"{arch}, β {beta:g}, latent_dim {' → '.join(map(str, same['latent_dim']))}: sample FID (MNIST-CNN "
            f"features, lower is better) {trend(fid)} ({series(fid)}), precision {trend(precision)} "
            f"({series(precision)}), recall {trend(recall)} ({series(recall)})."
        )
    if comparisons == 0:
        return ["Sample quality: no architecture and β have scored samples at two or more latent sizes."]
    n = comparisons
    summary = [
        f"Samples: a larger latent_dim gives a worse (higher) sample FID in {counts['fid_worse']} of {n} comparisons; "
        f"precision (the share of samples on the real-digit manifold) falls in {counts['precision_lower']} of {n} and "
        f"recall (the share of real digits the samples cover) rises in {counts['recall_higher']} of {n}.",
        f"The lab's observation, sharper reconstructions but more artefacts at a larger latent_dim, holds in "
        f"{counts['lab_precision']} of {n} comparisons when artefacts are read as lower precision, and in "
        f"{counts['lab_fid']} of {n} when read as a higher FID.",
    ]
    return [*summary, *sentences]


def beta_tradeoff(cells: pd.DataFrame, groups: pd.DataFrame) -> list[str]:
    sentences = []
    for (arch, latent_dim), same in groups.groupby(["arch", "latent_dim"]):
        same = same.sort_values("beta").drop_duplicates("beta")
        if len(same) < 2:
            continue
        recon, kl = same["recon_mean"].tolist(), same["kl_mean"].tolist()
        best = same.loc[same["elbo_mean"].idxmin()]
        sentences.append(
            f"{arch}, latent_dim {latent_dim}: as β goes {' → '.join(f'{b:g}' for b in same['beta'])}, KL {trend(kl)} "
            f"({series(kl)} nats/image) and reconstruction {trend(recon)} ({series(recon)}); the lowest test "
            f"ELBO is at β = {best['beta']:g} ({best['elbo_mean']:.2f})."
        )
    if not sentences:
        return ["Not answered: no architecture and latent_dim were trained with two or more values of β."]
    return sentences


def study_findings(cells: pd.DataFrame, groups: pd.DataFrame) -> dict[str, list[str]]:
    return {
        QUESTIONS["arch"]: conv_vs_linear(cells, groups),
        QUESTIONS["latent_dim"]: latent_dim_effect(cells, groups),
        QUESTIONS["beta"]: beta_tradeoff(cells, groups),
    }
