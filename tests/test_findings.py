import math

import pandas as pd
import pytest

from pipeline.reporting.findings import QUESTIONS, significance, study_findings, trend
from pipeline.reporting.results import ALL_METRICS, group_name, seed_table

COLLAPSE = 0.2


def generator_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """What every real cell table has besides the metrics: no adversarial cell, uniform digits in the samples."""
    frame["adversarial"], frame["init_from"] = False, None
    for digit in range(10):
        frame[f"share_{digit}"] = 0.1
    frame["class_entropy_mnist_cnn"] = math.log(10)
    return frame


def cells_frame(rows):
    frame = pd.DataFrame(rows, columns=["cell", "arch", "latent_dim", "beta", "seed", "recon", "kl"])
    frame["elbo"] = frame["recon"] + frame["kl"]
    frame["active_units"] = frame["latent_dim"]
    frame["group"] = frame["cell"].map(group_name)
    frame["family"] = "vae"
    frame["variant"] = frame["beta"].map(lambda beta: f"β={beta:g}")
    frame["plain"] = frame["beta"] == 1.0  # the VAE compared with other families
    frame["status"] = "ok"
    return generator_columns(frame)


LAB_GRID = [
    ("linear-z2-b1-s0", "linear", 2, 1.0, 0, 149.5, 5.5),
    ("linear-z10-b1-s0", "linear", 10, 1.0, 0, 92.8, 18.0),
    ("conv-z2-b1-s0", "conv", 2, 1.0, 0, 148.3, 6.0),
    ("conv-z10-b1-s0", "conv", 10, 1.0, 0, 87.0, 18.9),
    ("linear-z10-b0p25-s0", "linear", 10, 0.25, 0, 87.2, 27.6),
    ("linear-z10-b4-s0", "linear", 10, 4.0, 0, 113.5, 9.1),
]


def findings(rows):
    cells = cells_frame(rows)
    return study_findings(cells, seed_table(cells), COLLAPSE)


def test_conv_beating_linear_follows_the_numbers():
    answer = findings(LAB_GRID)[QUESTIONS["arch"]]
    assert answer[0].startswith("Yes: the convolutional VAE has the lower (better) test ELBO in each of the 2 settings")
    assert (
        "At latent_dim 10, β 1: test ELBO conv 105.90 vs linear 110.80 nats/image; conv is lower (better) by 4.90."
        in answer
    )
    # Make the linear model better at latent_dim 10: the answer changes with the table.
    changed = [row if row[0] != "conv-z10-b1-s0" else (*row[:5], 95.0, 18.9) for row in LAB_GRID]
    answer = findings(changed)[QUESTIONS["arch"]]
    assert answer[0] == "Mixed: the convolutional VAE has the lower test ELBO in 1 of 2 settings trained with both."
    assert any("linear is lower (better) by 3.10" in sentence for sentence in answer)


def test_latent_dim_and_beta_sentences_report_the_measured_trend():
    result = findings(LAB_GRID)
    latent = result[QUESTIONS["latent_dim"]]
    assert latent[0].startswith("A larger latent_dim gives a lower (sharper) reconstruction loss in 2 of 2")
    assert any("linear, β 1, latent_dim 2 → 10: reconstruction falls (149.50 → 92.80 nats/image)" in s for s in latent)
    beta = result[QUESTIONS["beta"]]
    assert beta == [
        "linear, latent_dim 10: as β goes 0.25 → 1 → 4, KL falls (27.60 → 18.00 → 9.10 nats/image) and "
        "reconstruction rises (87.20 → 92.80 → 113.50); the lowest test ELBO is at β = 1 (110.80)."
    ]
    # A non-monotonic KL is described as such, never as a fall.
    odd = [row if row[0] != "linear-z10-b4-s0" else (*row[:5], 113.5, 30.0) for row in LAB_GRID]
    assert "KL changes non-monotonically (27.60 → 18.00 → 30.00" in findings(odd)[QUESTIONS["beta"]][0]


def test_questions_the_grid_cannot_answer_say_so():
    only_linear = findings([LAB_GRID[0]])
    assert only_linear[QUESTIONS["arch"]][0].startswith("Not answered")
    assert only_linear[QUESTIONS["latent_dim"]][0].startswith("Not answered")
    assert only_linear[QUESTIONS["beta"]][0].startswith("Not answered")


def test_seeds_bring_a_welch_test_and_its_verdict():
    rows = []
    for seed, (linear, conv) in enumerate([(110.0, 100.0), (111.0, 101.0), (112.0, 99.0)]):
        rows += [
            (f"linear-z10-b1-s{seed}", "linear", 10, 1.0, seed, linear, 0.0),
            (f"conv-z10-b1-s{seed}", "conv", 10, 1.0, seed, conv, 0.0),
        ]
    answer = findings(rows)[QUESTIONS["arch"]]
    assert "Welch's t-test over 3 and 3 seeds" in answer[1] and "significant at α = 0.05" in answer[1]
    assert "not significant" not in answer[1]
    assert significance([1.0, 2.0], [3.0, 4.0]) == ""  # fewer than 3 seeds: no test
    assert "not significant" in significance([1.0, 5.0, 3.0], [2.0, 4.0, 3.5])


def test_seed_table_aggregates_mean_and_std():
    rows = [(f"conv-z2-b1-s{s}", "conv", 2, 1.0, s, r, 1.0) for s, r in enumerate([10.0, 12.0, 14.0])]
    groups = seed_table(cells_frame(rows))
    assert len(groups) == 1 and groups.loc[0, "seeds"] == 3
    assert groups.loc[0, "recon_mean"] == pytest.approx(12.0) and groups.loc[0, "recon_std"] == pytest.approx(2.0)


def test_trend():
    assert (trend([1, 2, 3]), trend([3, 2, 1]), trend([1, 3, 2])) == ("rises", "falls", "changes non-monotonically")


def with_sample_scores(rows, fid):
    cells = cells_frame(rows)
    cells["fid_mnist_cnn"] = cells["cell"].map(fid)
    cells["precision_mnist_cnn"] = 0.8
    cells["recall_mnist_cnn"] = 0.5
    return study_findings(cells, seed_table(cells), COLLAPSE)[QUESTIONS["latent_dim"]]


def test_sample_fid_findings_follow_the_scores():
    fid = {"linear-z2-b1-s0": 20.0, "linear-z10-b1-s0": 35.0, "conv-z2-b1-s0": 18.0, "conv-z10-b1-s0": 30.0}
    answer = with_sample_scores(LAB_GRID[:4], fid)
    assert any(
        s.startswith("Samples: a larger latent_dim gives a worse (higher) sample FID in 2 of 2 comparisons")
        for s in answer
    )
    assert any(
        "holds in 0 of 2 comparisons when artefacts are read as lower precision, and in 2 of 2 when read as a "
        "higher FID" in s
        for s in answer
    )
    assert any(
        "conv, β 1, latent_dim 2 → 10: sample FID (MNIST-CNN features, lower is better) rises (18.00 → 30.00)" in s
        for s in answer
    )
    fid["conv-z10-b1-s0"] = 10.0
    answer = with_sample_scores(LAB_GRID[:4], fid)
    assert any("worse (higher) sample FID in 1 of 2 comparisons" in s for s in answer)
    assert any("and in 1 of 2 when read as a higher FID" in s for s in answer)
    without = findings(LAB_GRID)[QUESTIONS["latent_dim"]]
    assert without[-1].startswith("Sample quality is not scored")


FAMILY_COLUMNS = [
    "cell",
    "family",
    "variant",
    "seed",
    "recon_bernoulli",
    "recon_mse",
    "probe_accuracy",
    "knn_accuracy",
    "noisy_recon_mse",
    "masked_recon_mse",
    "fid_mnist_cnn",
]
FAMILIES = [  # one seed each, linear, latent_dim 10
    ("linear-z10-b1-s0", "vae", "β=1", 0, 92.8, 0.030, 0.90, 0.95, 0.040, 0.050, 270.0),
    ("ae-linear-z10-s0", "ae", "", 0, 70.1, 0.010, 0.85, 0.96, 0.060, 0.045, 300.0),
    ("dae-linear-z10-s0", "dae", "σ=0.5", 0, 75.0, 0.012, 0.88, 0.96, 0.020, 0.040, 310.0),
    ("cae-linear-z10-s0", "cae", "λ=0.1", 0, 72.0, 0.011, 0.91, 0.97, 0.050, 0.030, 290.0),
    ("linear-z10-b4-s0", "vae", "β=4", 0, 113.5, 0.050, 0.95, 0.90, 0.010, 0.010, 200.0),  # not the plain VAE
]


def family_findings(rows, seeds=(0,)):
    frame = pd.DataFrame(
        [(f"{row[0][:-3]}-s{seed}", *row[1:3], seed, *row[4:]) for row in rows for seed in seeds],
        columns=FAMILY_COLUMNS,
    )
    frame["arch"], frame["latent_dim"], frame["status"] = "linear", 10, "ok"
    for metric in FAMILY_COLUMNS[4:]:  # seeds differ, as real ones do
        frame[metric] *= frame["seed"].map({0: 1.0, 1: 1.013, 2: 0.992})
    frame["beta"] = [4.0 if v == "β=4" else 1.0 if v == "β=1" else float("nan") for v in frame["variant"]]
    frame["plain"] = frame["variant"] != "β=4"
    frame["recon"], frame["kl"], frame["elbo"], frame["active_units"] = frame["recon_bernoulli"], 1.0, 1.0, 10
    frame["group"] = frame["cell"].map(group_name)
    generator_columns(frame)
    return study_findings(frame, seed_table(frame), COLLAPSE)


def test_family_questions_are_answered_from_the_numbers_of_the_controlled_cells():
    found = family_findings(FAMILIES)
    recon = found[QUESTIONS["family_recon"]]
    assert (
        recon[0]
        == "Test reconstruction in Bernoulli nats/image (lower is better): ae is best in 1 of 1 setting compared."
    )
    assert recon[1].startswith(
        "linear, latent_dim 10: test reconstruction in Bernoulli nats/image (lower is better), "
        "best first: ae 70.10, cae (λ=0.1) 72.00, dae (σ=0.5) 75.00, vae (β=1) 92.80; ae leads cae (λ=0.1) by 1.90"
    )
    assert "(one seed per cell: a ranking of single runs, not tested for significance)" in recon[1]
    assert found[QUESTIONS["family_codes"]][0].endswith(": cae (λ=0.1) is best in 1 of 1 setting compared.")
    assert found[QUESTIONS["family_robustness"]][0].endswith(": dae (σ=0.5) is best in 1 of 1 setting compared.")
    samples = found[QUESTIONS["family_samples"]]
    assert ": vae (β=1) is best in 1 of 1" in samples[0] and "ex-post density estimation" in samples[0]
    assert all("β=4" not in sentence for answer in found.values() for sentence in answer if "best first" in sentence)
    # Another table gives another answer.
    changed = [row if row[1] != "ae" else (*row[:4], 95.0, *row[5:]) for row in FAMILIES]
    assert family_findings(changed)[QUESTIONS["family_recon"]][0].endswith(
        ": cae (λ=0.1) is best in 1 of 1 setting compared."
    )


def test_family_ranking_with_three_seeds_comes_with_a_t_test():
    recon = family_findings(FAMILIES, seeds=(0, 1, 2))[QUESTIONS["family_recon"]]
    assert "Welch's t-test over 3 and 3 seeds" in recon[1]


def test_a_vae_only_study_asks_no_family_question():
    assert QUESTIONS["family_recon"] not in findings(LAB_GRID)


ADVERSARIAL_GRID = [  # cell, family, init_from, precision, FID, recall, class entropy
    ("linear-z10-b1-s0", "vae", None, 0.60, 30.0, 0.80, 2.29),
    ("gan-linear-z10-s0", "gan", None, 0.75, 20.0, 0.40, 2.10),
    ("gan-linear-z10-ft-s0", "gan", "linear-z10-b1-s0", 0.85, 12.0, 0.60, 2.25),
]


def adversarial_findings(rows, shares=None):
    frame = generator_columns(
        pd.DataFrame(
            [(cell, family, p, f, r) for cell, family, _, p, f, r, _ in rows],
            columns=["cell", "family", "precision_mnist_cnn", "fid_mnist_cnn", "recall_mnist_cnn"],
        )
    )
    frame["init_from"] = [row[2] for row in rows]
    frame["class_entropy_mnist_cnn"] = [row[6] for row in rows]
    frame["adversarial"] = frame["family"] != "vae"
    frame["arch"], frame["latent_dim"], frame["seed"], frame["status"] = "linear", 10, 0, "ok"
    frame["beta"] = [1.0 if family == "vae" else float("nan") for family in frame["family"]]
    frame["plain"] = True
    frame["variant"] = [
        "β=1" if family == "vae" else (f"from {init}" if init else "")
        for family, init in zip(frame["family"], frame["init_from"])
    ]
    for metric in ALL_METRICS:  # the rest is not measured here
        if metric not in frame:
            frame[metric] = float("nan")
    frame["group"] = frame["cell"].map(group_name)
    for cell, values in (shares or {}).items():
        for digit, share in enumerate(values):
            frame.loc[frame["cell"] == cell, f"share_{digit}"] = share
    return study_findings(frame, seed_table(frame), COLLAPSE)


def test_adversarial_questions_are_answered_from_the_numbers():
    found = adversarial_findings(ADVERSARIAL_GRID)
    realism = found[QUESTIONS["adversarial"]]
    assert realism[0] == (
        "Against the VAE of the same networks, adversarial training improved precision in 2 of 2, "
        "FID in 2 of 2 models (higher precision, lower FID); it lowered recall in 2 of 2, class entropy in 2 of 2."
    )
    assert (
        "linear, latent_dim 10: vae (β=1) → gan (from linear-z10-b1-s0): precision 0.600 → 0.850, FID 30.0 → 12.0, "
        "recall 0.800 → 0.600, class entropy 2.290 → 2.250."
    ) in realism
    start = found[QUESTIONS["initialisation"]]
    assert (
        start[0]
        == "Starting from the VAE's decoder improved FID in 1 of 1, precision in 1 of 1, recall in 1 of 1 comparisons."
    )
    assert "from scratch → gan (from linear-z10-b1-s0): precision 0.750 → 0.850, FID 20.0 → 12.0" in start[1]
    # A worse fine-tuned GAN changes the answer.
    worse = [row if row[0] != "gan-linear-z10-ft-s0" else (*row[:3], 0.70, 25.0, 0.30, 2.0) for row in ADVERSARIAL_GRID]
    assert adversarial_findings(worse)[QUESTIONS["initialisation"]][0].startswith(
        "Starting from the VAE's decoder improved FID in 0 of 1, precision in 0 of 1, recall in 0 of 1"
    )
    without_scratch = adversarial_findings([ADVERSARIAL_GRID[0], ADVERSARIAL_GRID[2]])
    assert without_scratch[QUESTIONS["initialisation"]][0].startswith("Not answered")


def test_mode_collapse_is_flagged_above_the_threshold():
    found = adversarial_findings(ADVERSARIAL_GRID)[QUESTIONS["collapse"]]
    assert found == [
        "No: in every cell each digit takes at most 20% of the samples (uniform: 10%); the largest share "
        "is 10%, digit 0 in linear-z10-b1-s0."
    ]
    collapsed = [0.02] * 10
    collapsed[1] = 0.82
    found = adversarial_findings(ADVERSARIAL_GRID, {"gan-linear-z10-s0": collapsed})[QUESTIONS["collapse"]]
    assert found == [
        "Flagged where one digit takes more than 20% of the samples (uniform: 10%):",
        "gan-linear-z10-s0: 82% of its samples are the digit 1 (class entropy 2.100 nats).",
    ]
    assert QUESTIONS["adversarial"] not in findings(LAB_GRID)  # asked only where a study has adversarial cells


def test_the_bound_question_compares_the_likelihood_families_on_one_network():
    rows = [  # cell, family, variant, iw_nll, active units
        ("linear-z20-b1-s0", "vae", "β=1", 96.9, 14),
        ("iwae-linear-z20-k5-s0", "iwae", "k=5", 95.8, 17),
        ("ae-linear-z20-s0", "ae", "", float("nan"), float("nan")),  # no bound: not compared
    ]
    frame = pd.DataFrame(rows, columns=["cell", "family", "variant", "iw_nll", "active_units"])
    frame["arch"], frame["latent_dim"], frame["seed"], frame["status"] = "linear", 20, 0, "ok"
    frame["beta"], frame["plain"] = [1.0, float("nan"), float("nan")], True
    frame["recon"], frame["kl"], frame["elbo"] = 80.0, 20.0, 100.0
    for metric in FAMILY_COLUMNS[4:]:  # the other family questions' metrics
        frame[metric] = 1.0
    frame["group"] = frame["cell"].map(group_name)
    generator_columns(frame)
    answer = study_findings(frame, seed_table(frame), COLLAPSE)[QUESTIONS["bound"]]
    assert answer == [
        "linear, latent_dim 20: IW bound on -log p(x), iwae-linear-z20-k5 95.80 nats, 17/20 active units; "
        "linear-z20-b1 96.90 nats, 14/20 active units. iwae-linear-z20-k5 is lowest, 1.10 nats below linear-z20-b1; "
        "iwae-linear-z20-k5 keeps the most active units."
    ]
    frame.loc[frame["family"] == "iwae", "iw_nll"] = 97.5  # another table, another answer
    frame.loc[frame["family"] == "iwae", "active_units"] = 14
    answer = study_findings(frame, seed_table(frame), COLLAPSE)[QUESTIONS["bound"]]
    assert answer[0].endswith(
        "linear-z20-b1 is lowest, 0.60 nats below iwae-linear-z20-k5; all keep 14/20 active units."
    )
