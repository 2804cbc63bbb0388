"""The tiny study reproduced with `vaebench repro --jobs 2` (its stages two at a time in DVC workspaces, then
restored) in a temporary copy of the repository, checked through DVC and MLflow, and against a plain
`dvc repro`."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from browser import browser_page, mlflow_ui, screenshot_when_rendered
from conftest import SHARED_DATA, TINY_STUDY, copy_repo

VAE_CELLS = ["linear-z2-b1-s0", "conv-z2-b1-s0"]
IWAE_CELLS = ["iwae-linear-z2-k5-s0"]
ENCODER_CELLS = [
    *VAE_CELLS,
    *IWAE_CELLS,
    "ae-linear-z2-s0",
    "dae-linear-z2-s0",
    "cae-conv-z2-s0",
    "vaegan-linear-z2-s0",
    "vqvae-linear-z2-s0",
    "pca-z2-s0",
]
QUANTISED_CELLS = ["vqvae-linear-z2-s0"]  # a code of codebook entries: no contraction; perplexity and dead codes
BOUND_CELLS = [*VAE_CELLS, *IWAE_CELLS, "vaegan-linear-z2-s0"]
GAN_CELLS = ["gan-conv-z2-s0", "gan-linear-z2-ft-s0"]
CELLS = [*ENCODER_CELLS, *GAN_CELLS]
ADVERSARIAL_CURVES = ["train_d_loss", "train_g_loss", "val_d_real", "val_d_fake", "val_fid_probe"]
SAMPLE_SCORES = ["fid_mnist_cnn", "kid_mnist_cnn_mean", "is_mnist_cnn", "precision_mnist_cnn", "recall_mnist_cnn"]
EVERY_FAMILY = [
    "recon",
    "recon_bernoulli",
    "recon_mse",
    "noisy_recon_mse",
    "masked_recon_mse",
    "probe_accuracy",
    "knn_accuracy",
    *SAMPLE_SCORES,
]
BOUND_ONLY = ["kl", "elbo", "active_units", "iw_nll"]
LATENT_DIM = 2  # of every cell of the tiny study

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("repo"), TINY_STUDY)


def run(repo, *command):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VAEBENCH_DATA_ROOT": str(SHARED_DATA),
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def mlflow_client(repo):
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def study_runs(repo):
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("vaebench-tiny")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def reproduced(repo):
    return run(repo, sys.executable, "-m", "pipeline", "repro", "--jobs", "2")


def test_repro_writes_every_stage_output(repo, reproduced):
    assert (repo / "results/prepare/mnist.npz").is_file()
    floor = json.loads((repo / "results/floor/floor.json").read_text())  # the floor stage: real digits' scores
    assert set(SAMPLE_SCORES) <= set(floor) and sum(floor["class_shares"]) == pytest.approx(1.0)
    report = (repo / "reports/tiny/report.md").read_text()
    assert f"| real training digits (floor) | {floor['fid_mnist_cnn']:.3f} |" in report
    for cell in CELLS:
        assert (repo / f"results/tiny/train/{cell}/model.pt").is_file()
        history = json.loads((repo / f"results/tiny/train/{cell}/history.json").read_text())
        assert [row["epoch"] for row in history] == [1]
        metrics = json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text())
        assert set(SAMPLE_SCORES) <= set(metrics)
        if cell in GAN_CELLS:  # no encoder: samples only, "–" in the tables
            assert not (set(EVERY_FAMILY) - set(SAMPLE_SCORES)) & set(metrics)
            assert set(ADVERSARIAL_CURVES) <= set(history[0])
            continue
        assert set(EVERY_FAMILY) <= set(metrics)
        assert 0 <= metrics["probe_accuracy"] <= 1 and 0 <= metrics["knn_accuracy"] <= 1
        assert metrics["recon_mse"] > 0
        if cell in QUANTISED_CELLS:
            assert "contraction" not in metrics and 1 <= metrics["codebook_perplexity"] <= 16
        else:
            assert metrics["contraction"] > 0 and "codebook_perplexity" not in metrics
        kl_dims = json.loads((repo / f"results/tiny/evaluate/{cell}/kl_per_dim.json").read_text())
        if cell not in BOUND_CELLS:
            assert not set(BOUND_ONLY) & set(metrics) and kl_dims is None
            continue
        assert metrics["recon_bernoulli"] == metrics["recon"]  # the VAE cells are Bernoulli
        assert len(kl_dims) == 2  # the relations between the numbers: the next two tests
        for image in ("reconstructions.png", "samples.png"):
            assert (repo / f"results/tiny/evaluate/{cell}/images/{image}").stat().st_size > 0
    report = (repo / "reports/tiny/report.md").read_text()
    assert all(f"| {cell} |" in report for cell in CELLS)
    for heading in (
        "Does adversarial training make samples more realistic",
        "Does starting from the VAE's decoder help",
        "Does any generator collapse",
        "The decoder as a generator",
        "Digits in the samples",
    ):
        assert heading in report
    assert "vae (β=1) → gan (R1 γ=1, from linear-z2-b1): precision" in report
    for figure in ("adversarial_curves.png", "finetuning.png", "latent_map.png"):
        assert (repo / "reports/tiny" / figure).stat().st_size > 0
    assert (repo / "reports/tiny/report.html").stat().st_size > 0


def test_every_cells_test_metrics_obey_their_definitions_relations_and_ranges(repo, reproduced):
    """What holds for any trained model on any machine: a wrong formula or a mixed-up metric breaks one."""
    for cell in CELLS:
        folder = repo / f"results/tiny/evaluate/{cell}"
        metrics = json.loads((folder / "metrics.json").read_text())
        for suffix in ("", "_recon") if cell not in GAN_CELLS else ("",):
            assert metrics[f"fid_mnist_cnn{suffix}"] >= 0, cell
            assert metrics[f"kid_mnist_cnn_std{suffix}"] >= 0, cell
            assert 0 <= metrics[f"precision_mnist_cnn{suffix}"] <= 1, cell
            assert 0 <= metrics[f"recall_mnist_cnn{suffix}"] <= 1, cell
            assert 1 - 1e-9 <= metrics[f"is_mnist_cnn{suffix}"] <= 10 + 1e-9, cell  # 1 (one class) to 10 (ten, sure)
            assert 0 <= metrics[f"class_entropy_mnist_cnn{suffix}"] + 1e-12 <= math.log(10) + 1e-9, cell
        shares = json.loads((folder / "class_shares.json").read_text())["samples"]
        assert len(shares) == 10 and min(shares) >= 0 and sum(shares) == pytest.approx(1.0)
        entropy = -sum(share * math.log(share) for share in shares if share > 0)
        assert metrics["class_entropy_mnist_cnn"] == pytest.approx(entropy, abs=1e-9), cell
        history = json.loads((repo / f"results/tiny/train/{cell}/history.json").read_text())
        if cell in GAN_CELLS:
            assert all(0 < row["val_d_real"] < 1 and 0 < row["val_d_fake"] < 1 for row in history)
            assert all(row["val_loss"] == pytest.approx(row["val_d_loss"] + row["val_g_loss"]) for row in history)
            continue
        # Nats per image of 784 pixels in [0, 1]; squared errors between two images in [0, 1].
        assert 0 < metrics["recon_bernoulli"] < 784 * 20, cell
        for key in ("recon_mse", "noisy_recon_mse", "masked_recon_mse"):
            assert 0 <= metrics[key] <= 1, (cell, key)
        assert 0 <= metrics["probe_accuracy"] <= 1 and 0 <= metrics["knn_accuracy"] <= 1
        assert metrics.get("contraction", 0) >= 0
        if cell not in BOUND_CELLS:
            continue
        kl_dims = json.loads((folder / "kl_per_dim.json").read_text())
        assert len(kl_dims) == LATENT_DIM and all(kl >= 0 for kl in kl_dims), cell
        assert metrics["kl"] == pytest.approx(sum(kl_dims)) and metrics["kl"] >= 0
        assert metrics["elbo"] == pytest.approx(metrics["recon"] + metrics["kl"])  # the negative ELBO, nats/image
        assert metrics["iw_nll"] > 0
        assert isinstance(metrics["active_units"], int) and 0 <= metrics["active_units"] <= LATENT_DIM
        for row in history:
            assert row["val_elbo"] == pytest.approx(row["val_recon"] + row["val_kl"]) and row["val_kl"] >= 0


def plain_vae(state: dict):
    """The linear VAE cell's encoder and decoder (784-hidden-2x2, 2-hidden-784 MLPs) as plain tensor code."""
    import torch

    def linear(x, layer):
        return x @ state[f"{layer}.weight"].T + state[f"{layer}.bias"]

    def posterior(x):
        out = linear(torch.relu(linear(x.flatten(1), "encoder.1.0")), "encoder.1.2")
        return out[:, :LATENT_DIM], out[:, LATENT_DIM:]

    def decode(z):
        return linear(torch.relu(linear(z, "decoder.0")), "decoder.2")

    return posterior, decode


def plain_classifier_features(state: dict, images):
    """The MNIST classifier's 128 features (two 3x3 conv + ReLU + 2x2 max-pool, a linear layer + ReLU)."""
    import torch.nn.functional as F

    h = F.max_pool2d(F.relu(F.conv2d(images, state["body.0.weight"], state["body.0.bias"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, state["body.3.weight"], state["body.3.bias"], padding=1)), 2)
    return F.relu(h.flatten(1) @ state["body.7.weight"].T + state["body.7.bias"])


def test_the_linear_vaes_test_metrics_recomputed_from_its_model_and_the_prepared_data(repo, reproduced):
    """The evaluate stage's numbers for linear-z2-b1-s0, recomputed here with plain tensor code from model.pt,
    the classifier and the prepared test split: the negative ELBO (one z per image, drawn after
    torch.manual_seed(evaluate.seed) batch by batch as the stage draws them), the KL per dimension, the active
    units, the importance-weighted bound (its K draws after torch.manual_seed(sample_quality.seed)) and the
    sample FID (by scipy's matrix square root, not torchmetrics)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from scipy import linalg

    cell = "linear-z2-b1-s0"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    evaluate, quality = params["evaluate"], params["sample_quality"]
    assert params["cells"][cell]["family"] == "vae" and params["train"]["likelihood"] == "bernoulli"
    assert not quality["binarize"]
    metrics = json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the stage's device: auto
    saved = torch.load(repo / f"results/tiny/train/{cell}/model.pt", map_location=device, weights_only=True)
    state = saved["state_dict"]
    posterior, decode = plain_vae(state)
    test_images = np.load(repo / "results/prepare/mnist.npz")["test_images"]
    x = torch.from_numpy(test_images).float().div(255).unsqueeze(1).to(device)

    def bernoulli_nats(logits, target):  # -log p(x|z) summed over the pixels
        target = target.flatten(1)
        return -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).sum(1)

    with torch.no_grad():
        torch.manual_seed(evaluate["seed"])
        recon, kl_dims, means = [], [], []
        for batch in x.split(evaluate["batch_size"]):
            mu, logvar = posterior(batch)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            recon.append(bernoulli_nats(decode(z), batch))
            kl_dims.append(0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar))
            means.append(mu)
        recon, kl_dims, means = torch.cat(recon), torch.cat(kl_dims), torch.cat(means)
        assert metrics["recon"] == pytest.approx(recon.mean().item(), rel=1e-5)
        assert metrics["kl"] == pytest.approx(kl_dims.sum(1).mean().item(), rel=1e-5, abs=1e-7)
        assert metrics["elbo"] == pytest.approx((recon + kl_dims.sum(1)).mean().item(), rel=1e-5)
        kl_per_dim = json.loads((repo / f"results/tiny/evaluate/{cell}/kl_per_dim.json").read_text())
        assert kl_per_dim == pytest.approx(kl_dims.mean(0).tolist(), rel=1e-5, abs=1e-7)
        assert metrics["active_units"] == int((means.var(0, unbiased=False) > 0.01).sum())

        # The importance-weighted bound: -log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x).
        k, subset = quality["iw_samples"], x[: quality["iw_images"]]
        torch.manual_seed(quality["seed"])
        mu, logvar = posterior(subset)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn(k, *mu.shape, device=device)  # (K, images, latent)
        log_px_z = -bernoulli_nats(decode(z.flatten(0, 1)), subset.repeat(k, 1, 1, 1)).view(k, -1)
        normal = torch.distributions.Normal
        log_w = log_px_z + normal(0.0, 1.0).log_prob(z).sum(-1) - normal(mu, std).log_prob(z).sum(-1)
        iw_nll = -(torch.logsumexp(log_w, 0) - math.log(k))
        assert metrics["iw_nll"] == pytest.approx(iw_nll.mean().item(), rel=1e-5)
        # Tighter than the ELBO of the same images: by Jensen's inequality on the same draws, and against the
        # ELBO with its KL in closed form.
        assert (iw_nll <= (-log_w).mean(0) + 1e-4).all()
        elbo = (-log_px_z).mean(0) + (0.5 * (mu.pow(2) + std.pow(2) - 1) - torch.log(std)).sum(1)
        assert metrics["iw_nll"] < elbo.mean().item()

        # The samples' FID against the test digits in the classifier's features: decoded z ~ N(0, I).
        noise = torch.randn(quality["n_samples"], LATENT_DIM, generator=torch.Generator().manual_seed(quality["seed"]))
        classifier = torch.load(repo / "results/classifier/model.pt", map_location=device, weights_only=True)
        fake = plain_classifier_features(classifier, torch.sigmoid(decode(noise.to(device))).view(-1, 1, 28, 28))
        real = plain_classifier_features(classifier, x)
        saved_real = torch.load(repo / "results/classifier/test_features.pt", map_location=device, weights_only=True)
        assert torch.allclose(real, saved_real, rtol=1e-4, atol=1e-5)
    real, fake = real.double().cpu().numpy(), fake.double().cpu().numpy()
    covariance_real, covariance_fake = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = linalg.sqrtm(covariance_real @ covariance_fake).real
    fid = np.sum((real.mean(0) - fake.mean(0)) ** 2) + np.trace(covariance_real + covariance_fake - 2 * root)
    assert metrics["fid_mnist_cnn"] == pytest.approx(fid, rel=1e-3, abs=1e-4)


def test_dvc_knows_that_the_fine_tuned_generator_depends_on_its_vae(repo, reproduced):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    deps = [dep["path"] for dep in lock["finetune@gan-linear-z2-ft-s0"]["deps"]]
    assert "results/tiny/train/linear-z2-b1-s0" in deps
    assert '"train@linear-z2-b1-s0" -> "finetune@gan-linear-z2-ft-s0"' in run(repo, "dvc", "dag", "--dot")


def test_dvc_is_up_to_date_and_lists_every_cell_metric(repo, reproduced):
    assert "up to date" in run(repo, "dvc", "status")
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    files = next(iter(shown.values()))["data"]
    for cell in CELLS:
        expected = SAMPLE_SCORES if cell in GAN_CELLS else EVERY_FAMILY
        assert set(expected) <= set(files[f"results/tiny/evaluate/{cell}/metrics.json"]["data"])
    assert "test_accuracy" in files["results/classifier/metrics.json"]["data"]


def test_mlflow_has_one_parent_and_a_child_per_cell(repo, reproduced):
    runs = study_runs(repo)
    parents = [r for r in runs if r.data.tags.get("vaebench.role") == "study"]
    children = [r for r in runs if r.data.tags.get("vaebench.role") == "cell"]
    assert len(parents) == 1 and parents[0].info.run_name == "tiny"
    assert sorted(r.info.run_name for r in children) == sorted(CELLS)
    client = mlflow_client(repo)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        name = child.info.run_name
        fine_tuned = name.endswith("-ft-s0")
        stages = (
            {"finetune@" + name, "evaluate-finetuned@" + name} if fine_tuned else {"train@" + name, "evaluate@" + name}
        )
        assert child.data.tags["vaebench.dvc_stage"] in stages
        expected = SAMPLE_SCORES if name in GAN_CELLS else EVERY_FAMILY
        assert {f"test_{metric}" for metric in expected} <= set(child.data.metrics)
        has_bound = name in BOUND_CELLS
        assert ({f"test_{metric}" for metric in BOUND_ONLY} <= set(child.data.metrics)) == has_bound
        expected_family = "vae" if name in VAE_CELLS else name.split("-")[0]
        assert child.data.params["cell.family"] == expected_family
        assert child.data.params.get("cell.init_from") == ("linear-z2-b1-s0" if fine_tuned else None)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == [1]
        images = ["images/samples.png"] if name in GAN_CELLS else ["images/reconstructions.png", "images/samples.png"]
        assert [a.path for a in client.list_artifacts(child.info.run_id, "images")] == images
        assert sorted(a.path for a in client.list_artifacts(child.info.run_id, "model")) == [
            "model/cell.json",
            "model/state_dict.pt",
        ]


def test_second_repro_runs_nothing_and_logs_no_duplicate_run(repo, reproduced):
    before = len(study_runs(repo))
    output = run(repo, "dvc", "repro")
    assert "Running stage" not in output
    assert len(study_runs(repo)) == before


def test_dvc_plots_show_draws_the_curves_from_every_cell_history(repo, reproduced, tmp_path):
    run(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    for cell in CELLS:  # each cell's validation loss per epoch, read from its history.json
        history = json.loads((repo / f"results/tiny/train/{cell}/history.json").read_text())
        assert f"validation loss per epoch of {cell}" in page
        assert f'"val_loss": {json.dumps(history[0]["val_loss"])}' in page
    # the report's loss curves as an image, which the page shows without the network
    assert (tmp_path / "plots" / "static" / "workspace_reports_tiny_loss_curves.png").stat().st_size > 0


def test_the_study_metrics_are_committed_with_git_and_list_every_cell(repo, reproduced):
    committed = json.loads((repo / "results/tiny/metrics.json").read_text())
    assert committed == {
        cell: json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text()) for cell in CELLS
    }
    assert run(repo, "git", "status", "--porcelain", "--untracked-files=all", "results").splitlines() == [
        "?? results/tiny/metrics.json"
    ]
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    assert next(iter(shown.values()))["data"]["results/tiny/metrics.json"]["data"] == committed


def test_dvc_exp_run_of_one_cell_reruns_it_and_its_fine_tuned_cells_and_logs_to_the_repository_store(
    repo, reproduced, tmp_path
):
    # Its own copy of the reproduced repository (the other tests keep theirs unedited), with a store of its
    # own (a copied store is refused: tests/test_failures.py); the original's artifacts stay untouched.
    source_artifacts = repo / "mlartifacts"
    before = sorted(source_artifacts.rglob("*"))
    repo = Path(
        shutil.copytree(
            repo, tmp_path / "copy", symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts")
        )
    )
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    run(repo, *git, "add", "-A")
    run(repo, *git, "commit", "-q", "-m", "the tiny study")
    runs_before = {r.info.run_id for r in study_runs(repo)}

    # In a temporary workspace under .dvc/tmp/exps, which DVC throws away afterwards.
    output = run(repo, "dvc", "exp", "run", "--temp", "-n", "beta05", "-S", "cells.linear-z2-b1-s0.beta=0.5")
    ran = sorted(line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage"))
    # the edited VAE cell, the GAN fine-tuned from it and the report; nothing else
    assert ran == [
        "evaluate-finetuned@gan-linear-z2-ft-s0",
        "evaluate@linear-z2-b1-s0",
        "finetune@gan-linear-z2-ft-s0",
        "report",
        "train@linear-z2-b1-s0",
    ]
    new = [r for r in study_runs(repo) if r.info.run_id not in runs_before]
    assert sorted((r.info.run_name, r.info.status) for r in new) == [  # the copy's store starts its parent run
        ("gan-linear-z2-ft-s0", "FINISHED"),
        ("linear-z2-b1-s0", "FINISHED"),
        ("tiny", "FINISHED"),
    ]
    assert next(r for r in new if r.info.run_name == "linear-z2-b1-s0").data.params["cell.beta"] == "0.5"
    assert sorted(source_artifacts.rglob("*")) == before

    diff = json.loads(run(repo, "dvc", "metrics", "diff", "HEAD", "beta05", "--json"))["results/tiny/metrics.json"]
    assert {key.split(".")[0] for key in diff} == {"linear-z2-b1-s0", "gan-linear-z2-ft-s0"}, diff
    assert diff["linear-z2-b1-s0.kl"]["old"] != diff["linear-z2-b1-s0.kl"]["new"]
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    experiments = [exp for baseline in shown for exp in baseline.get("experiments") or []]
    assert any(exp.get("name") == "beta05" for exp in experiments)


def test_logged_decoder_loads_and_decodes_in_a_process_without_the_package(repo, reproduced, tmp_path, monkeypatch):
    import torch

    from pipeline.tracking import load_logged_model

    cell = "linear-z2-b1-s0"
    run_id = json.loads((repo / f"results/tiny/train/{cell}/mlflow_run.json").read_text())["run_id"]
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name("vaebench-tiny").experiment_id
    models = {m.name: m for m in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")}
    assert set(models) == {"decoder", "encoder"}
    assert {"test_elbo", "test_fid_mnist_cnn"} <= {
        m.key for m in models["decoder"].metrics
    }  # metrics linked to the model
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    torch.save(z, tmp_path / "z.pt")
    script = f"""
import importlib.abc, sys
class NoPipeline(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "pipeline":
            raise ImportError("this process must not import " + name)
sys.meta_path.insert(0, NoPipeline())
import mlflow, torch
mlflow.set_tracking_uri({f"sqlite:///{repo / 'mlflow.db'}"!r})
decoder = mlflow.pytorch.load_model("models:/{models["decoder"].model_id}")
torch.save(decoder(torch.load({str(tmp_path / "z.pt")!r})), {str(tmp_path / "images.pt")!r})
print(mlflow.models.get_model_info("models:/{models["decoder"].model_id}").signature.inputs.to_dict())
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "(-1, 2)" in result.stdout  # the signature: a batch of 2-D codes
    images = torch.load(tmp_path / "images.pt", weights_only=True)
    # the same run's weights rebuilt by this package (its model/ artifact), decoding the same z
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    model = load_logged_model(run_id)
    assert images.shape == (5, 1, 28, 28)
    assert torch.allclose(images, torch.sigmoid(model.decode(z)), atol=1e-6)


def test_registry_aliases_name_the_best_cells_and_the_parent_run_holds_the_study_numbers(repo, reproduced):
    client = mlflow_client(repo)
    metrics = {cell: json.loads((repo / f"results/tiny/evaluate/{cell}/metrics.json").read_text()) for cell in CELLS}
    scored = lambda key: {cell: m[key] for cell, m in metrics.items() if key in m}  # noqa: E731
    # elbo is the negative bound (recon + KL, nats/image): lower is better, as for the other two
    expected = {
        alias: min(scored(key).items(), key=lambda kv: kv[1])
        for alias, key in (("best-elbo", "elbo"), ("best-nll", "iw_nll"), ("best-fid", "fid_mnist_cnn"))
    }
    for alias, (cell, _) in expected.items():
        version = client.get_model_version_by_alias("vaebench-tiny-decoder", alias)
        assert version.tags["vaebench.cell"] == cell, alias
        run_id = json.loads((repo / f"results/tiny/train/{cell}/mlflow_run.json").read_text())["run_id"]
        assert version.run_id == run_id
    runs = study_runs(repo)
    parent = next(r for r in runs if r.data.tags.get("vaebench.role") == "study")
    assert parent.data.metrics["cells_evaluated"] == len(CELLS)
    assert parent.data.metrics["best_elbo"] == pytest.approx(expected["best-elbo"][1])
    assert parent.data.tags["vaebench.best_fid_mnist_cnn"] == expected["best-fid"][0]
    # its duration spans the study: it ends after every cell's run, not the moment it was created
    assert parent.info.end_time >= max(r.info.end_time for r in runs if r.data.tags.get("vaebench.role") == "cell")
    assert any(a.path == "report/report.md" for a in client.list_artifacts(parent.info.run_id, "report"))


def test_cell_runs_carry_their_group_and_the_prepared_data_set(repo, reproduced):
    prepared = json.loads((repo / "results/prepare/summary.json").read_text())
    for child in (r for r in study_runs(repo) if r.data.tags.get("vaebench.role") == "cell"):
        assert child.data.tags["vaebench.group"] == child.info.run_name.removesuffix("-s0")
        (data_input,) = child.inputs.dataset_inputs
        assert data_input.dataset.name == "mnist-500-100-200"
        assert [(tag.key, tag.value) for tag in data_input.tags] == [("mlflow.data.context", "training")]
        assert (
            data_input.dataset.digest == hashlib.sha256(json.dumps(prepared, sort_keys=True).encode()).hexdigest()[:16]
        )
        assert child.data.params["data.train_size"] == "500" and child.data.params["evaluate.n_images"] == "16"


@pytest.mark.browser
def test_mlflow_ui_shows_the_study_and_the_registry(repo, reproduced, tmp_path):
    """The real MLflow UI over the study's store, in headless Chromium: the study's run with every cell's run
    under it, and the registry page with the best-elbo alias on its version."""
    from playwright.sync_api import expect

    model_name, alias = "vaebench-tiny-decoder", "best-elbo"
    client = mlflow_client(repo)
    experiment_id = client.get_experiment_by_name("vaebench-tiny").experiment_id
    version = client.get_model_version_by_alias(model_name, alias).version
    with mlflow_ui(repo) as url, browser_page() as page:
        page.goto(f"{url}/#/experiments/{experiment_id}/runs")
        # The runs table (ag-grid) gives each run a role=row element; the study's row is the one holding the
        # link named exactly "tiny". Its only button is the nesting expander (an icon button with no label:
        # hide and pin are checkbox inputs in labels, not buttons).
        parent_row = page.get_by_role("row").filter(has=page.get_by_role("link", name="tiny", exact=True))
        expect(parent_row).to_have_count(1, timeout=30_000)
        # The cells hang under the study's run: collapsed, none of them is a row of its own yet.
        expect(page.get_by_role("link", name=CELLS[0], exact=True)).to_have_count(0)
        parent_row.get_by_role("button").click()
        screenshot_when_rendered(page, ["tiny", *CELLS], tmp_path / "mlflow_experiment.png")

        page.goto(f"{url}/#/models/{urllib.parse.quote(model_name)}")
        # The versions table: the row of the aliased version shows the alias as a tag "@ best-elbo".
        version_row = page.get_by_role("row").filter(
            has=page.get_by_role("link", name=f"Version {version}", exact=True)
        )
        expect(version_row).to_contain_text(f"@ {alias}", timeout=30_000)
        screenshot_when_rendered(page, [model_name, f"Version {version}"], tmp_path / "mlflow_registry.png")


SERIAL_CELLS = ["linear-z2-b1-s0", "gan-linear-z2-ft-s0"]


@pytest.fixture(scope="module")
def serial_repo(tmp_path_factory):
    """Two of the tiny study's cells (one fine-tuned from the other) reproduced from clean with a plain
    `dvc repro`, one stage at a time, in a repository (and DVC cache, and MLflow store) of its own."""
    study = yaml.safe_load(TINY_STUDY.read_text())
    study["cells"] = {name: cell for name, cell in study["cells"].items() if name in SERIAL_CELLS}
    params = tmp_path_factory.mktemp("params") / "params.yaml"
    params.write_text(yaml.safe_dump(study, sort_keys=False))
    root = copy_repo(tmp_path_factory.mktemp("serial"), params)
    run(root, "dvc", "repro")
    return root


def test_jobs_2_gives_bitwise_the_models_and_metrics_of_a_plain_dvc_repro(repo, reproduced, serial_repo):
    assert "[job 1]" in reproduced and "[job 2]" in reproduced  # both workers took pieces
    assert "is cached - skipping run, checking out outputs" in reproduced  # and DVC restored them here
    assert not (repo / ".dvc/tmp/vaebench-jobs").exists()  # the workspaces are gone
    for cell in SERIAL_CELLS:
        for name in (
            "evaluate/{}/metrics.json",
            "evaluate/{}/kl_per_dim.json",
            "evaluate/{}/class_shares.json",
            "train/{}/model.pt",
            "train/{}/history.json",
        ):
            path = f"results/tiny/{name.format(cell)}"
            assert (repo / path).read_bytes() == (serial_repo / path).read_bytes(), path
