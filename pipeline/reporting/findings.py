"""The study's questions answered in sentences generated from the measured table, never written by hand.

Each function takes the per-cell table and the table aggregated over seeds (see reporting/results.py) and
returns sentences. A question the grid cannot answer says so. With 3 or more seeds on both sides, a
difference comes with Welch's t-test across seeds. The lab's three questions are about the VAE and read
the VAE cells only; the family questions compare families at the same arch and latent_dim.
"""

from __future__ import annotations

import pandas as pd
from scipy import stats

from pipeline.models import FAMILIES, LAB_FAMILY, family_names

ALPHA = 0.05
MIN_SEEDS_FOR_TEST = 3
QUESTIONS = {
    "arch": "Does the convolutional VAE beat the linear one on test ELBO?",
    "latent_dim": "How does latent_dim change reconstructions and samples?",
    "beta": "How does β trade reconstruction against KL?",
    "family_recon": "Which model family reconstructs best?",
    "family_codes": "Which family gives the best codes for a linear probe?",
    "family_robustness": "Which family is most robust to noise?",
    "family_samples": "Which family generates best?",
    "adversarial": "Does adversarial training make samples more realistic (precision, FID), and at what cost in "
    "diversity (recall, class entropy)?",
    "initialisation": "Does starting from the VAE's decoder help the GAN?",
    "collapse": "Does any generator collapse onto a few digits?",
    "baseline": "At the same latent size, how much better than the linear baseline fitted in closed form does each "
    "autoencoder reconstruct (Bernoulli nats) and encode (linear probe and k-NN accuracy on its codes)?",
    "bound": "Does training on a tighter bound (the IWAE's K-sample bound against the VAE's ELBO) tighten the "
    "likelihood bound on the same network, and does it keep more active units?",
}
ADVERSARIAL_METRICS = (  # metric, label, digits, lower is better
    ("precision_mnist_cnn", "precision", 3, False),
    ("fid_mnist_cnn", "FID", 1, True),
    ("recall_mnist_cnn", "recall", 3, False),
    ("class_entropy_mnist_cnn", "class entropy", 3, False),
)


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
        summary = (
            f"Yes: the convolutional VAE has the lower (better) test ELBO in each of the {settings} settings "
            "trained with both."
        )
    elif conv_wins == 0:
        summary = (
            f"No: the linear VAE has the lower (better) test ELBO in each of the {settings} settings trained with both."
        )
    else:
        summary = (
            f"Mixed: the convolutional VAE has the lower test ELBO in {conv_wins} of {settings} settings "
            "trained with both."
        )
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
            f"ELBO {series(same['elbo_mean'])}; active units "
            f"{' → '.join(str(round(a)) for a in same['active_units_mean'])}."
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


def family_label(row) -> str:
    return f"{row['family']} ({row['variant']})" if row["variant"] else row["family"]


def family_settings(groups: pd.DataFrame):
    """(arch, latent_dim, groups) where two or more families were trained; of the VAE only β = 1, the plain
    VAE (other βs answer the β question)."""
    comparable = groups[groups["plain"].astype(bool)]
    for (arch, latent_dim), same in comparable.groupby(["arch", "latent_dim"]):
        if same["family"].nunique() >= 2:
            yield arch, latent_dim, same


def seed_caveat(cells: pd.DataFrame, ordered: pd.DataFrame, metric: str) -> str:
    """Welch's test between the best two with 3 or more seeds each; otherwise say what the ranking rests on."""
    seeds = int(ordered["seeds"].min())
    if seeds >= MIN_SEEDS_FOR_TEST:
        return significance(*(seed_values(cells, group, metric) for group in ordered["group"].iloc[:2]))
    if seeds == 1:
        return " (one seed per cell: a ranking of single runs, not tested for significance)"
    return f" (only {seeds} seeds per cell: too few for a t-test)"


def family_ranking(
    cells: pd.DataFrame,
    groups: pd.DataFrame,
    metric: str,
    lower_is_better: bool,
    label: str,
    digits: int,
    note: str = "",
) -> list[str]:
    sentences, wins, settings = [], {}, 0
    for arch, latent_dim, same in family_settings(groups):
        ordered = same.dropna(subset=[f"{metric}_mean"]).sort_values(f"{metric}_mean", ascending=lower_is_better)
        if len(ordered) < 2:
            continue
        settings += 1
        best, runner_up = ordered.iloc[0], ordered.iloc[1]
        wins[family_label(best)] = wins.get(family_label(best), 0) + 1
        ranking = ", ".join(f"{family_label(row)} {row[f'{metric}_mean']:.{digits}f}" for _, row in ordered.iterrows())
        margin = abs(best[f"{metric}_mean"] - runner_up[f"{metric}_mean"])
        sentences.append(
            f"{arch}, latent_dim {latent_dim}: {label}, best first: {ranking}; {family_label(best)} leads "
            f"{family_label(runner_up)} by {margin:.{digits}f}" + seed_caveat(cells, ordered, metric) + "."
        )
    if settings == 0:
        return ["Not answered: no arch and latent_dim were trained with two or more families."]
    leader = max(wins, key=wins.get)
    compared = "setting" if settings == 1 else "settings"
    summary = (
        f"{label[0].upper()}{label[1:]}: {leader} is best in {wins[leader]} of {settings} {compared} compared." + note
    )
    return [summary, *sentences]


def both(first: list[str], second: list[str]) -> list[str]:
    """The answers on a question's two metrics, or the one 'not answered' line."""
    return first if first[0].startswith("Not answered") else first + second


def family_findings(cells: pd.DataFrame, groups: pd.DataFrame) -> dict[str, list[str]]:
    return {
        QUESTIONS["family_recon"]: both(
            family_ranking(
                cells,
                groups,
                "recon_bernoulli",
                True,
                "test reconstruction in Bernoulli nats/image (lower is better)",
                2,
            ),
            family_ranking(cells, groups, "recon_mse", True, "test reconstruction MSE per pixel (lower is better)", 4),
        ),
        QUESTIONS["family_codes"]: both(
            family_ranking(
                cells, groups, "probe_accuracy", False, "linear-probe test accuracy on the codes (higher is better)", 4
            ),
            family_ranking(
                cells, groups, "knn_accuracy", False, "k-NN test accuracy on the codes (higher is better)", 4
            ),
        ),
        QUESTIONS["family_robustness"]: both(
            family_ranking(
                cells,
                groups,
                "noisy_recon_mse",
                True,
                "MSE of reconstructions of noisy test digits against the clean ones (lower is better)",
                4,
            ),
            family_ranking(
                cells,
                groups,
                "masked_recon_mse",
                True,
                "MSE of reconstructions of masked test digits against the clean ones (lower is better)",
                4,
            ),
        ),
        QUESTIONS["family_samples"]: family_ranking(
            cells,
            groups,
            "fid_mnist_cnn",
            True,
            "sample FID in MNIST-CNN features (lower is better)",
            1,
            note=f" Families without a prior ({family_names(lambda family: family.Sampler.ex_post)}) are sampled "
            "from a distribution fitted to their training codes (ex-post density estimation), the VAE from its prior "
            "N(0, I).",
        ),
    }


def compare(before: pd.Series, after: pd.Series) -> tuple[str, dict[str, bool]]:
    """'precision 0.612 → 0.705, FID ...' from one group to another, and which metrics improved."""
    parts, improved = [], {}
    for metric, label, digits, lower_is_better in ADVERSARIAL_METRICS:
        a, b = before[f"{metric}_mean"], after[f"{metric}_mean"]
        parts.append(f"{label} {a:.{digits}f} → {b:.{digits}f}")
        improved[label] = b < a if lower_is_better else b > a
    return ", ".join(parts), improved


def tally(outcomes: list[dict[str, bool]], labels: tuple[str, ...]) -> str:
    return ", ".join(f"{label} in {sum(o[label] for o in outcomes)} of {len(outcomes)}" for label in labels)


def adversarial_effect(groups: pd.DataFrame) -> list[str]:
    """Every adversarial group against the plain VAE (β = 1) of the same arch and latent_dim."""
    sentences, outcomes = [], []
    for (arch, latent_dim), same in groups.groupby(["arch", "latent_dim"]):
        baseline = same[(same["family"] == LAB_FAMILY) & same["plain"].astype(bool)]
        if baseline.empty:
            continue
        for _, model in same[same["adversarial"]].iterrows():
            text, improved = compare(baseline.iloc[0], model)
            outcomes.append(improved)
            sentences.append(
                f"{arch}, latent_dim {latent_dim}: {family_label(baseline.iloc[0])} → {family_label(model)}: {text}."
            )
    if not outcomes:
        return ["Not answered: no GAN or VAE-GAN was trained beside a VAE (β = 1) of the same arch and latent_dim."]
    realism = tally(outcomes, ("precision", "FID"))
    diversity = ", ".join(
        f"{label} in {sum(not o[label] for o in outcomes)} of {len(outcomes)}" for label in ("recall", "class entropy")
    )
    summary = (
        f"Against the VAE of the same networks, adversarial training improved {realism} models "
        f"(higher precision, lower FID); it lowered {diversity}."
    )
    return [summary, *sentences]


def initialisation_effect(groups: pd.DataFrame) -> list[str]:
    """GANs fine-tuned from a VAE against GANs trained from scratch, at the same arch and latent_dim."""
    sentences, outcomes = [], []
    adversarial = groups[groups["adversarial"].astype(bool)]
    for (_, arch, latent_dim), same in adversarial.groupby(["family", "arch", "latent_dim"]):
        scratch, tuned = same[same["init_from"].isna()], same[same["init_from"].notna()]
        for _, base in scratch.iterrows():
            for _, model in tuned.iterrows():
                text, improved = compare(base, model)
                outcomes.append(improved)
                sentences.append(f"{arch}, latent_dim {latent_dim}: from scratch → {family_label(model)}: {text}.")
    if not outcomes:
        return [
            "Not answered: no arch and latent_dim has both a GAN trained from scratch and one fine-tuned from a VAE "
            "(the adversarial study in studies/ has both)."
        ]
    summary = f"Starting from the VAE's decoder improved {tally(outcomes, ('FID', 'precision', 'recall'))} comparisons."
    return [summary, *sentences]


def mode_collapse(cells: pd.DataFrame, collapse_share: float) -> list[str]:
    """Cells whose samples are one digit more often than `collapse_share` (uniform would be 0.10)."""
    done = cells[cells["status"] == "ok"]
    shares = done[[f"share_{digit}" for digit in range(10)]].to_numpy()
    top = shares.max(1)
    flagged = [
        f"{row.cell}: {share:.0%} of its samples are the digit {digit} (class entropy "
        f"{row.class_entropy_mnist_cnn:.3f} nats)."
        for row, share, digit in zip(done.itertuples(), top, shares.argmax(1))
        if share > collapse_share
    ]
    if flagged:
        return [
            f"Flagged where one digit takes more than {collapse_share:.0%} of the samples (uniform: 10%):",
            *flagged,
        ]
    worst = int(top.argmax())
    return [
        f"No: in every cell each digit takes at most {collapse_share:.0%} of the samples (uniform: 10%); the largest "
        f"share is {top[worst]:.0%}, digit {int(shares[worst].argmax())} in {done['cell'].iloc[worst]}."
    ]


def likelihood_bounds(groups: pd.DataFrame) -> list[str]:
    """At each network (arch, latent_dim) with non-adversarial groups of more than one family that have a
    likelihood bound: each group's importance-weighted bound on -log p(x) and active units, lowest first."""
    if "iw_nll_mean" not in groups:
        return ["The grid has no family with a likelihood bound."]
    bounded = groups[groups["iw_nll_mean"].notna() & ~groups["adversarial"].astype(bool)]
    lines = []
    for (arch, latent_dim), same in bounded.groupby(["arch", "latent_dim"]):
        if same["family"].nunique() < 2:
            continue
        same = same.sort_values("iw_nll_mean")
        listed = "; ".join(
            f"{row.group} {row.iw_nll_mean:.2f} nats, {row.active_units_mean:.0f}/{latent_dim} active units"
            for row in same.itertuples()
        )
        best, runner = same.iloc[0], same.iloc[1]
        gap = runner["iw_nll_mean"] - best["iw_nll_mean"]
        most = same["active_units_mean"].max()
        keepers = same.loc[same["active_units_mean"] == most, "group"].tolist()
        units = (
            f"all keep {most:.0f}/{latent_dim} active units"
            if len(keepers) == len(same)
            else f"{' and '.join(keepers)} keep{'s' if len(keepers) == 1 else ''} the most active units"
        )
        lines.append(
            f"{arch}, latent_dim {latent_dim}: IW bound on -log p(x), {listed}. {best['group']} is lowest, "
            f"{gap:.2f} nats below {runner['group']}; {units}."
        )
    return lines or ["The grid has no two families with a likelihood bound on the same network."]


def is_baseline(family: str) -> bool:
    return FAMILIES[family].capabilities.baseline


def baseline_comparison(groups: pd.DataFrame) -> list[str]:
    """At each latent_dim with a baseline group: each other plain group with an encoder against it, in
    reconstruction (Bernoulli nats, lower is better) and in probe and k-NN accuracy on the codes."""
    encoded = groups[groups["plain"].astype(bool) & groups["recon_bernoulli_mean"].notna()]
    sentences, outcomes = [], []
    for latent_dim, same in encoded.groupby("latent_dim"):
        baselines = same[same["family"].map(is_baseline)]
        if baselines.empty:
            continue
        base = baselines.iloc[0]
        for row in same[~same["family"].map(is_baseline)].itertuples():
            gain = base["recon_bernoulli_mean"] - row.recon_bernoulli_mean
            probe = row.probe_accuracy_mean - base["probe_accuracy_mean"]
            knn = row.knn_accuracy_mean - base["knn_accuracy_mean"]
            outcomes.append({"reconstruction": gain > 0, "probe": probe > 0, "k-NN": knn > 0})
            sentences.append(
                f"latent_dim {latent_dim}: {row.group} reconstructs {abs(gain):.2f} nats "
                f"{'better' if gain > 0 else 'worse'} than {base['group']} ({row.recon_bernoulli_mean:.2f} against "
                f"{base['recon_bernoulli_mean']:.2f}, {abs(gain) / base['recon_bernoulli_mean']:.0%} "
                f"{'lower' if gain > 0 else 'higher'}); probe accuracy {probe:+.4f} ({row.probe_accuracy_mean:.4f} "
                f"against {base['probe_accuracy_mean']:.4f}), k-NN accuracy {knn:+.4f}."
            )
    if not outcomes:
        return ["Not answered: no baseline was trained at the latent size of an autoencoder."]
    counts = tally(outcomes, ("reconstruction", "probe", "k-NN"))
    summary = f"The autoencoders beat the baseline at their latent size in {counts} comparisons."
    return [summary, *sentences]


def study_findings(cells: pd.DataFrame, groups: pd.DataFrame, collapse_share: float) -> dict[str, list[str]]:
    vae_cells, vae_groups = cells[cells["family"] == LAB_FAMILY], groups[groups["family"] == LAB_FAMILY]
    findings = {
        QUESTIONS["arch"]: conv_vs_linear(vae_cells, vae_groups),
        QUESTIONS["latent_dim"]: latent_dim_effect(vae_cells, vae_groups),
        QUESTIONS["beta"]: beta_tradeoff(vae_cells, vae_groups),
    }
    if groups["family"].nunique() > 1:
        findings |= family_findings(cells, groups)
        findings[QUESTIONS["bound"]] = likelihood_bounds(groups)
    if groups["family"].map(is_baseline).any():
        findings[QUESTIONS["baseline"]] = baseline_comparison(groups)
    if groups["adversarial"].any():
        findings[QUESTIONS["adversarial"]] = adversarial_effect(groups)
        findings[QUESTIONS["initialisation"]] = initialisation_effect(groups)
    findings[QUESTIONS["collapse"]] = mode_collapse(cells, collapse_share)
    return findings
