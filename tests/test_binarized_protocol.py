"""The options of the binarized-MNIST protocol (Burda et al., 2016): dynamic binarization, the learning-rate
schedule and its resume, the importance-weighted bound chunked over K, and the bound against a model whose
log p(x) is computed independently."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import data, engine, tracking
from pipeline.config import cell_as_dict, parse_cell
from pipeline.evaluation.sample_quality import importance_weighted_nll, standard_error
from pipeline.models import FAMILIES, build_model
from pipeline.outputs import read_json
from pipeline.paths import PREPARED_FILE, PREPARED_SUMMARY
from pipeline.prepare import prepare
from test_data import with_data
from test_models import small_cell

GREY = torch.linspace(0.0, 1.0, 784).view(1, 1, 28, 28)  # every grey level from 0 to 1 once


def recording(model):
    """The model with every training batch it is given kept in `model.seen`."""
    model.seen = []
    step = model.train_step

    def recorded_step(x, optimizer):
        model.seen.append(x.clone())
        return step(x, optimizer)

    model.train_step = recorded_step
    return model


def test_dynamic_draws_are_binary_average_to_the_image_and_differ_between_epochs():
    cell = small_cell("vae", "linear", epochs=2, batch_size=50)
    training = engine.start_training(cell, torch.device("cpu"), binarize=True)
    recording(training.model)
    images = GREY.repeat(2000, 1, 1, 1)  # one image 2000 times: each epoch draws it 2000 times
    list(engine.epochs(training, images, GREY.repeat(10, 1, 1, 1)))
    first, second = torch.cat(training.model.seen[:40]), torch.cat(training.model.seen[40:])
    drawn = torch.cat([first, second])
    assert set(drawn.unique().tolist()) == {0.0, 1.0}
    # 4000 Bernoulli(p) draws per pixel: the mean is within 5 standard deviations (at most 0.5 / sqrt(4000)).
    assert (drawn.mean(0) - GREY[0]).abs().max() < 5 * 0.5 / math.sqrt(4000)
    assert not torch.equal(first, second)


def test_without_binarization_the_training_images_are_used_as_they_are():
    training = engine.start_training(small_cell("vae", "linear", batch_size=50), torch.device("cpu"))
    recording(training.model)
    list(engine.epochs(training, GREY.repeat(100, 1, 1, 1), GREY.repeat(10, 1, 1, 1)))
    assert training.binarizer is None
    assert all(torch.equal(x, GREY.repeat(len(x), 1, 1, 1)) for x in training.model.seen)


def test_the_schedule_sets_each_stages_rate_at_its_epochs():
    schedule = ((1, 0.01), (2, 0.005), (3, 0.001))
    assert [engine.scheduled_rate(schedule, epoch) for epoch in range(1, 7)] == [
        0.01,
        0.005,
        0.005,
        0.001,
        0.001,
        0.001,
    ]
    with pytest.raises(ValueError, match="epoch 7 is beyond the schedule's 6 epochs"):
        engine.scheduled_rate(schedule, 7)


def scheduled_cell():
    return small_cell("vae", "linear", epochs=3, batch_size=25, lr=0.01, lr_schedule=[[1, 0.01], [2, 0.001]])


def test_a_killed_run_resumes_on_the_schedule_with_the_same_draws_and_weights(tmp_path):
    images, val = torch.rand(100, 1, 28, 28), torch.rand(10, 1, 28, 28)
    device = torch.device("cpu")
    whole = engine.start_training(scheduled_cell(), device, binarize=True)
    recording(whole.model)
    rows = list(engine.epochs(whole, images, val))
    assert [row["lr"] for row in rows] == [0.01, 0.001, 0.001]
    assert [group["lr"] for group in whole.optimizer.param_groups] == [0.001]

    first = engine.start_training(scheduled_cell(), device, binarize=True)
    next(engine.epochs(first, images, val))  # epoch 1, then the run is killed after its checkpoint
    checkpoint = tmp_path / "resume.pt"
    engine.save_checkpoint(checkpoint, first, run_id="r")
    torch.manual_seed(123)  # a new process: other global random state
    resumed = engine.start_training(scheduled_cell(), device, binarize=True)
    assert engine.restore_checkpoint(checkpoint, resumed) == "r"
    recording(resumed.model)
    later = list(engine.epochs(resumed, images, val))
    assert [row["lr"] for row in later] == [0.001, 0.001]
    per_epoch = len(images) // 25
    assert all(torch.equal(a, b) for a, b in zip(whole.model.seen[per_epoch:], resumed.model.seen, strict=True))
    assert resumed.history == whole.history
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_schedule_keeps_a_discriminators_own_rate_in_proportion():
    cell = small_cell("gan", "linear", epochs=2, lr=0.01, disc_lr=0.02, lr_schedule=[[1, 0.01], [1, 0.001]])
    training = engine.start_training(cell, torch.device("cpu"))
    assert engine.set_scheduled_rate(training.optimizer, cell, 2) == 0.001
    assert [group["lr"] for group in training.optimizer.param_groups] == pytest.approx([0.001, 0.002])


def test_optimizer_settings_reach_adam():
    cell = small_cell("iwae", "linear", adam_betas=[0.8, 0.99], adam_eps=1e-4, activation="tanh")
    training = engine.start_training(cell, torch.device("cpu"))
    group = training.optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.99), 1e-4)
    assert any(isinstance(layer, nn.Tanh) for layer in training.model.decoder.modules())
    assert not any(isinstance(layer, nn.ReLU) for layer in training.model.modules())


def test_the_bound_chunked_over_k_equals_each_images_unchunked_bound():
    """K = 5000 in pieces of 2000 draws the same samples, in the same order, as one call per image."""
    torch.manual_seed(0)
    model = build_model(small_cell("vae", "linear", latent_dim=4)).eval()
    x = torch.bernoulli(torch.rand(3, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.manual_seed(1)
        chunked = importance_weighted_nll(model, x, 5000, decodes_per_chunk=2000)
        torch.manual_seed(1)
        whole = torch.cat([model.nll_bound(image, 5000) for image in x.split(1)])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-4)


class OneDimensionalDecoder(nn.Module):
    """logits = w * z + b: a 1-D latent whose log p(x) can be integrated numerically."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(784, generator=generator))
        self.b = nn.Parameter(torch.randn(784, generator=generator))

    def forward(self, z):
        return z * self.w + self.b


def exact_log_px(decoder: OneDimensionalDecoder, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log integral of p(x|z) N(z; 0, 1) dz, by the trapezoid rule on [-8, 8] in float64 (the
    integrand vanishes at the ends, so the rule is a sum times the step)."""
    z = torch.linspace(-8, 8, 8001, dtype=torch.float64)
    logits = z[:, None] * decoder.w.double() + decoder.b.double()  # (Z, 784)
    log_pz = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    log_px = []
    for image in x.flatten(1).double():
        log_px_z = -F.binary_cross_entropy_with_logits(logits, image.expand_as(logits), reduction="none").sum(-1)
        log_px.append(torch.logsumexp(log_px_z + log_pz, 0) + math.log(z[1] - z[0]))
    return torch.stack(log_px)


def test_the_bound_with_5000_samples_matches_a_numerically_integrated_log_likelihood():
    torch.manual_seed(0)
    model = build_model(small_cell("vae", "linear", latent_dim=1)).eval()
    model.decoder = OneDimensionalDecoder()
    images = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x = torch.bernoulli(images, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(3)
        bound = importance_weighted_nll(model, x, 5000, decodes_per_chunk=2000).double()
        elbo = importance_weighted_nll(model, x, 1).double()
        exact = -exact_log_px(model.decoder, x)
    gap = bound - exact
    # The encoder is untrained: its one-sample bound (the ELBO) is tens of nats above -log p(x), and 5000
    # samples close the gap to within 3 standard errors of zero and a fifth of a nat on every image.
    assert (elbo - exact).mean() > 10
    assert gap.mean().abs() < 3 * standard_error(gap)
    assert gap.abs().max() < 0.2
    assert standard_error(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)


def test_prepare_binarizes_validation_and_test_once_and_keeps_training_images_grey(prepared):
    grey_summary = read_json(PREPARED_SUMMARY)
    grey = data.load_prepared(PREPARED_FILE)
    prepare(with_data(prepared, binarize="dynamic"))
    summary, arrays = read_json(PREPARED_SUMMARY), data.load_prepared(PREPARED_FILE)
    assert ("binarize" not in grey_summary, summary["binarize"]) == (True, "dynamic")
    assert np.array_equal(arrays["train_images"], grey["train_images"])
    for split in ("val", "test"):
        binary, levels = arrays[f"{split}_images"], grey[f"{split}_images"]
        assert set(np.unique(binary)) == {0, 255}
        assert np.all(binary[levels == 0] == 0) and np.all(binary[levels == 255] == 255)
        middle = (levels > 0) & (levels < 255)  # drawn: about as often on as their grey level says
        assert abs((binary[middle] == 255).mean() - (levels[middle] / 255).mean()) < 0.01
    assert tracking.prepared_dataset(summary, PREPARED_FILE).name.endswith("-binarized")
    assert (
        tracking.prepared_dataset(summary, PREPARED_FILE).digest
        != tracking.prepared_dataset(grey_summary, PREPARED_FILE).digest
    )


@pytest.mark.parametrize("family", ["vae", "ae", "dae", "cae", "gan", "vaegan", "iwae", "vqvae", "pca"])
def test_a_cell_reads_back_from_its_dict_with_the_new_keys_and_leaves_out_their_defaults(family):
    plain = small_cell(family, "linear")
    assert not {"activation", "adam_betas", "adam_eps", "lr_schedule"} & set(cell_as_dict(plain))
    changes = {"epochs": 2, "lr_schedule": [[1, 0.001], [1, 0.0005]], "activation": "tanh"}
    if FAMILIES[family].capabilities.one_pass:  # fitted in one epoch
        changes |= {"epochs": 1, "lr_schedule": [[1, 0.001]]}
    if not FAMILIES[family].capabilities.adversarial:
        changes |= {"adam_betas": [0.8, 0.99], "adam_eps": 1e-4}
    cell = small_cell(family, "linear", **changes)
    values = cell_as_dict(cell)
    assert parse_cell(values.pop("name"), values, {}) == cell
