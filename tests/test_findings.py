import pandas as pd
import pytest

from pipeline.findings import QUESTIONS, significance, study_findings, trend
from pipeline.results import group_name, seed_table


def cells_frame(rows):
    frame = pd.DataFrame(rows, columns=["cell", "arch", "latent_dim", "beta", "seed", "recon", "kl"])
    frame["elbo"] = frame["recon"] + frame["kl"]
    frame["active_units"] = frame["latent_dim"]
    frame["group"] = frame["cell"].map(group_name)
    frame["status"] = "ok"
    return frame


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
    return study_findings(cells, seed_table(cells))


def test_conv_beating_linear_follows_the_numbers():
    answer = findings(LAB_GRID)[QUESTIONS["arch"]]
    assert answer[0].startswith("Yes: the convolutional VAE has the lower (better) test ELBO in each of the 2 settings")
    assert "At latent_dim 10, β 1: test ELBO conv 105.90 vs linear 110.80 nats/image; conv is lower (better) by 4.90." in answer
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
    return study_findings(cells, seed_table(cells))[QUESTIONS["latent_dim"]]


def test_sample_fid_findings_follow_the_scores():
    fid = {"linear-z2-b1-s0": 20.0, "linear-z10-b1-s0": 35.0, "conv-z2-b1-s0": 18.0, "conv-z10-b1-s0": 30.0}
    answer = with_sample_scores(LAB_GRID[:4], fid)
    assert any(s.startswith("Samples: a larger latent_dim gives a worse (higher) sample FID in 2 of 2 comparisons") for s in answer)
    assert any("holds in 0 of 2 comparisons when artefacts are read as lower precision, and in 2 of 2 when read as a higher FID" in s for s in answer)
    assert any("conv, β 1, latent_dim 2 → 10: sample FID (MNIST-CNN features, lower is better) rises (18.00 → 30.00)" in s for s in answer)
    fid["conv-z10-b1-s0"] = 10.0
    answer = with_sample_scores(LAB_GRID[:4], fid)
    assert any("worse (higher) sample FID in 1 of 2 comparisons" in s for s in answer)
    assert any("and in 1 of 2 when read as a higher FID" in s for s in answer)
    without = findings(LAB_GRID)[QUESTIONS["latent_dim"]]
    assert without[-1].startswith("Sample quality is not scored")
