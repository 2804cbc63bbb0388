"""The adversarial families: GAN losses against hand-computed values, one step of each player, weights copied
by init_from, determinism, and the VAE-GAN's players."""

import copy
import math

import pytest
import torch

from pipeline.config import parse_cell
from pipeline.engine import evaluate_split, model_epoch, start_training
from pipeline.models import adversarial, build_model
from pipeline.models.adversarial import discriminator_loss, generator_loss, r1_penalty
from pipeline.models.losses import kl_divergence

DEFAULTS = {
    "epochs": 1,
    "batch_size": 32,
    "lr": 1e-3,
    "likelihood": "bernoulli",
    "gaussian_std": 0.1,
    "hidden": [32],
    "channels": [4, 8],
    "device": "cpu",
}


def cell(family="gan", arch="linear", **settings):
    return parse_cell(
        f"{family}-{arch}", {"family": family, "arch": arch, "latent_dim": 3, "seed": 0, **settings}, DEFAULTS
    )


def images(count=64, seed=0):
    return torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_gan_losses_match_hand_computed_values():
    real, fake = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid: at logits 0 both terms are log 2.
    expected = [2 * math.log(2), -math.log(1 / (1 + math.exp(-2))) - math.log(1 - 1 / (1 + math.exp(1)))]
    assert discriminator_loss(real, fake).tolist() == pytest.approx(expected)
    # Two fakes (the VAE-GAN's reconstructions and prior samples) each add their term.
    assert discriminator_loss(real, fake, fake).tolist() == pytest.approx(
        [3 * math.log(2), expected[1] - math.log(1 - 1 / (1 + math.exp(1)))]
    )
    # Non-saturating: -log D(G(z)).
    assert generator_loss(torch.tensor([0.0, 3.0])).tolist() == pytest.approx(
        [math.log(2), -math.log(1 / (1 + math.exp(-3)))]
    )


def test_r1_penalty_of_a_linear_discriminator_is_the_squared_weight_norm():
    weights = torch.randn(784, generator=torch.Generator().manual_seed(1))
    x = images(4).requires_grad_(True)
    logits = x.flatten(1) @ weights + 0.3
    assert r1_penalty(logits, x).tolist() == pytest.approx([weights.pow(2).sum().item()] * 4, rel=1e-5)


@pytest.mark.parametrize("arch", ["linear", "conv"])
def test_one_discriminator_step_lowers_its_loss_and_leaves_the_generator(arch):
    torch.manual_seed(0)
    model = build_model(cell(arch=arch))
    optimizer = model.make_optimizer(1e-3)
    real, fake = images(), model.generate(torch.randn(64, 3))  # with its graph: the step must detach it
    generator_before = [p.clone() for p in model.decoder.parameters()]

    def loss() -> float:
        with torch.no_grad():
            return (
                discriminator_loss(model.discriminator(real).squeeze(1), model.discriminator(fake).squeeze(1))
                .mean()
                .item()
            )

    before = loss()
    adversarial.discriminator_step(model.discriminator, optimizer, real, [fake], r1_weight=0.0)
    assert loss() < before
    assert all(torch.equal(a, b) for a, b in zip(generator_before, model.decoder.parameters()))


@pytest.mark.parametrize("arch", ["linear", "conv"])
def test_one_generator_step_raises_d_of_fake_and_leaves_the_discriminator(arch):
    torch.manual_seed(0)
    model = build_model(cell(arch=arch))
    optimizer = model.make_optimizer(1e-3)
    z = torch.randn(64, 3)
    discriminator_before = [p.clone() for p in model.discriminator.parameters()]

    def d_of_fake() -> float:
        with torch.no_grad():
            return torch.sigmoid(model.discriminator(model.generate(z))).mean().item()

    before = d_of_fake()
    model.generator_step(model.generate(z), optimizer)
    assert d_of_fake() > before
    assert all(torch.equal(a, b) for a, b in zip(discriminator_before, model.discriminator.parameters()))
    assert all(p.requires_grad for p in model.discriminator.parameters())  # unfrozen afterwards


def test_the_optimizer_uses_the_adversarial_settings():
    model = build_model(cell(disc_lr=5e-4, adam_beta1=0.3))
    optimizer = model.make_optimizer(2e-4)
    generator_group, discriminator_group = optimizer.param_groups
    assert generator_group["lr"] == 2e-4 and discriminator_group["lr"] == 5e-4
    assert generator_group["betas"] == (0.3, 0.999)
    assert {id(p) for p in discriminator_group["params"]} == {id(p) for p in model.discriminator.parameters()}
    assert {id(p) for p in generator_group["params"]} == {id(p) for p in model.decoder.parameters()}


@pytest.mark.parametrize("family", ["gan", "vaegan"])
@pytest.mark.parametrize("arch", ["linear", "conv"])
def test_init_from_copies_the_vae_decoder_weight_for_weight(family, arch):
    torch.manual_seed(1)
    vae = build_model(cell("vae", arch))
    for init_discriminator in (False, True):
        model = build_model(cell(family, arch, init_discriminator=init_discriminator))
        fresh_output_layer = adversarial.layers(model.discriminator)[-1].weight.clone()
        model.start_from(vae)
        assert model.decoder.state_dict().keys() == vae.decoder.state_dict().keys()
        assert all(
            torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(), vae.decoder.state_dict().values())
        )
        body, source = adversarial.layers(model.discriminator)[:-1], adversarial.layers(vae.encoder)[:-1]
        copied = [
            torch.equal(a, b)
            for mine, theirs in zip(body, source)
            for a, b in zip(mine.state_dict().values(), theirs.state_dict().values())
        ]
        assert copied and all(copied) == init_discriminator
        assert torch.equal(
            adversarial.layers(model.discriminator)[-1].weight, fresh_output_layer
        )  # 1 logit vs 2 x latent


@pytest.mark.parametrize(
    "family, settings",
    [("gan", {}), ("gan", {"r1_weight": 0.0}), ("vaegan", {}), ("vaegan", {"recon_space": "pixels", "r1_weight": 0.0})],
)
def test_training_is_deterministic_for_a_seed_on_cpu(family, settings):
    data = images(96)

    def train() -> tuple[dict, dict]:
        training = start_training(cell(family, **settings), torch.device("cpu"))
        means = model_epoch(training.model, training.optimizer, data, 32, training.shuffle)
        return means, training.model.state_dict()

    (first, weights), (second, again) = train(), train()
    assert first == second
    assert all(torch.equal(weights[key], again[key]) for key in weights)
    expected = {"d_loss", "g_loss", "d_real", "d_fake", "loss"} | ({"r1"} if settings.get("r1_weight", 1.0) else set())
    if family == "vaegan":
        expected |= {"recon", "kl", "elbo"} | ({"feature_recon"} if settings.get("recon_space") != "pixels" else set())
    assert set(first) == expected and all(math.isfinite(v) for v in first.values())


def test_vaegan_steps_every_player_and_keeps_the_gan_gradient_out_of_the_encoder():
    torch.manual_seed(0)
    model = build_model(cell("vaegan", recon_space="pixels", beta=2.0))
    x = images(32)
    # The encoder's update is the gradient of beta * KL + reconstruction alone, computed by hand from the
    # same random draws; any GAN gradient reaching the encoder would change it.
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    mu, logvar, logits, _ = reference.fakes(x)
    own_loss = (2.0 * kl_divergence(mu, logvar) + reference.reconstruction(logits, x)).mean()
    expected = torch.autograd.grad(own_loss, list(reference.encoder.parameters()))
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    torch.manual_seed(5)
    model.train_step(x, torch.optim.SGD(model.parameters(), lr=1.0))
    steps = [before - after for before, after in zip(encoder_before, model.encoder.parameters())]
    assert all(torch.allclose(step, grad, atol=1e-6) for step, grad in zip(steps, expected))
    players = {"encoder": model.encoder, "decoder": model.decoder, "discriminator": model.discriminator}
    before = {name: [p.clone() for p in player.parameters()] for name, player in players.items()}
    model.train_step(x, model.make_optimizer(1e-3))
    for name, player in players.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], player.parameters())), name


def test_a_gan_has_no_encoder_and_validates_on_both_players_losses():
    model = build_model(cell())
    assert not model.capabilities.encoder and not model.sampler.ex_post and model.capabilities.adversarial
    with pytest.raises(TypeError, match="no encoder"):
        model.encode(images(2))
    torch.manual_seed(0)
    terms = evaluate_split(model, images(50), batch_size=20)
    assert set(terms) == {"d_loss", "g_loss", "d_real", "d_fake", "loss"}
    assert terms["loss"] == pytest.approx(terms["d_loss"] + terms["g_loss"])
    assert 0 < terms["d_real"] < 1 and 0 < terms["d_fake"] < 1


def test_a_fine_tune_resumes_only_from_a_checkpoint_of_the_same_source_model(tmp_path):
    from pipeline.engine import restore_checkpoint, save_checkpoint

    training = start_training(cell(), torch.device("cpu"))
    save_checkpoint(tmp_path / "resume.pt", training, "run-1", {"origin": "sha-of-the-old-vae"})
    again = start_training(cell(), torch.device("cpu"))
    assert restore_checkpoint(tmp_path / "resume.pt", again, {"origin": "sha-of-a-retrained-vae"}) is None
    assert restore_checkpoint(tmp_path / "resume.pt", again, {"origin": "sha-of-the-old-vae"}) == "run-1"
