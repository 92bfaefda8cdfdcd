"""The study's CAE and CVAE: shapes, loss terms and input modes."""

from __future__ import annotations

import pytest
import torch

from digitgen.models import CVAE, ModelConfig, build_model, kl_divergence, load_model, save_model
from digitgen.params import INPUT_MODES

KINDS = ["cae", "cvae"]


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(6, 784, generator=gen), torch.tensor([0, 1, 2, 7, 8, 9])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", INPUT_MODES)
def test_every_input_mode_gives_an_image_and_a_digit_distribution(kind, mode, batch):
    images, digits = batch
    model = build_model(ModelConfig(kind, latent_dim=8, hidden_dim=32))
    out = model(images if mode != "digit" else None, digits if mode != "image" else None)
    assert out.image_logits.shape == (6, 784) and out.z.shape == (6, 8)
    assert torch.allclose(out.digit_log_probs.exp().sum(1), torch.ones(6))
    losses = model.loss(images, digits, mode)
    assert torch.isfinite(losses.total) and losses.total > 0


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_summed_pixel_bce_plus_digit_nll_plus_kl_per_sample(kind, batch):
    images, digits = batch
    model = build_model(ModelConfig(kind, latent_dim=8, hidden_dim=32))
    torch.manual_seed(1)
    losses = model.loss(images, digits, "image_digit")
    torch.manual_seed(1)
    out = model(images, digits)
    recon = out.image_logits.sigmoid()
    bce = -(images * recon.log() + (1 - images) * (1 - recon).log()).sum(1).mean()
    nll = -out.digit_log_probs[torch.arange(6), digits].mean()
    assert torch.allclose(losses.bce, bce, rtol=1e-4)
    assert torch.allclose(losses.nll, nll, rtol=1e-5)
    assert torch.allclose(losses.total, losses.bce + losses.nll + losses.kl)
    assert (losses.kl == 0) if kind == "cae" else (losses.kl > 0)


def test_cae_is_deterministic(batch):
    images, digits = batch
    model = build_model(ModelConfig("cae", latent_dim=8, hidden_dim=32))
    assert torch.equal(model(images, digits).image_logits, model(images, digits).image_logits)
    assert torch.equal(model.generate(digits), model.generate(digits))


def test_cvae_samples_its_latent_but_not_when_asked_for_the_mean(batch):
    images, digits = batch
    model = build_model(ModelConfig("cvae", latent_dim=8, hidden_dim=32))
    assert not torch.equal(model(images, digits).z, model(images, digits).z)
    assert torch.equal(model(images, digits, sample=False).z, model(images, digits, sample=False).z)


def test_kl_is_exactly_zero_for_the_standard_normal():
    assert torch.equal(kl_divergence(torch.zeros(3, 8), torch.zeros(3, 8)), torch.zeros(3))
    assert torch.allclose(kl_divergence(torch.ones(1, 2), torch.zeros(1, 2)), torch.tensor([1.0]))


def test_cvae_kl_term_is_zero_when_mu_and_logvar_are_zero(batch):
    images, digits = batch
    model = build_model(ModelConfig("cvae", latent_dim=8, hidden_dim=32))
    for head in (model.to_mu, model.to_logvar):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    assert model.loss(images, digits, "image").kl == 0


def test_an_absent_input_adds_nothing_to_the_fused_sum(batch):
    images, digits = batch
    encoder = build_model(ModelConfig("cae", latent_dim=8, hidden_dim=32)).encoder
    both = encoder(images, digits)
    only_image, only_digit = encoder(images, None), encoder(None, digits)
    assert torch.allclose(both, only_image + only_digit, atol=1e-6)


def test_shared_noise_gives_one_style_and_generation_follows_the_noise(batch):
    _, digits = batch
    model = build_model(ModelConfig("cvae", latent_dim=8, hidden_dim=32))
    noise = torch.randn(1, 8).expand(6, 8)
    assert torch.equal(model.generate(digits, noise), model.generate(digits, noise))
    assert not torch.equal(model.generate(digits, noise), model.generate(digits, noise + 1))


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_reloads_with_weights_only(kind, tmp_path, batch):
    images, digits = batch
    model = build_model(ModelConfig(kind, latent_dim=4, hidden_dim=16)).eval()
    save_model(model, tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ModelConfig(**blob["config"]) == ModelConfig(kind, latent_dim=4, hidden_dim=16)  # every field, plain data
    back = load_model(tmp_path / "m.pt")
    assert torch.equal(back.classify(images), model.classify(images))


def test_cvae_is_the_cae_plus_a_variance_head():
    cae = build_model(ModelConfig("cae", latent_dim=8, hidden_dim=32))
    cvae = build_model(ModelConfig("cvae", latent_dim=8, hidden_dim=32))
    assert isinstance(cvae, CVAE)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(cvae) - n(cae) == 32 * 8 + 8
