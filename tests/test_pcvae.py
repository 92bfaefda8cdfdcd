"""The prior CVAE (pcvae), beyond the study: learned per-digit prior, weighted label term, KL warm-up."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_params

import digitgen
from digitgen.models import (
    LATER_FIELDS,
    ModelConfig,
    build_model,
    gaussian_kl,
    gaussian_mixture,
    kl_divergence,
    load_model,
    noise_dim,
    save_model,
)
from digitgen.params import INPUT_MODES, DigitgenError, ParamsError
from digitgen.train import model_setup

CONFIGS = {
    "conv": ModelConfig("pcvae", 4, hidden_dim=32, channels=(4, 8), label_weight=50.0, kl_warmup_batches=10),
    "mlp": ModelConfig("pcvae", 4, hidden_dim=32, label_weight=50.0),
}


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(6, 784, generator=gen), torch.tensor([0, 1, 2, 7, 8, 9])


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_input_mode_trains_and_every_condition_answers(config, batch):
    images, digits = batch
    model = build_model(config)
    for mode in INPUT_MODES:
        losses = model.loss(images, digits, mode)
        assert torch.isfinite(losses.total) and losses.total > 0
        losses.total.backward()
    model.eval()
    assert model.classify(images).exp().sum(1).allclose(torch.ones(6))
    for given in (digits, None):
        recon, log_probs = model.reconstruct(images, given)
        assert recon.shape == (6, 784) and log_probs.shape == (6, 10) and 0 <= recon.min() and recon.max() <= 1
    assert model.generate(digits).shape == (6, 784)


def test_generating_a_digit_decodes_a_draw_from_that_digits_learned_prior_at_its_temperature(batch):
    _, digits = batch
    model = build_model(dataclasses.replace(CONFIGS["conv"], prior_temperature=0.8)).eval()
    model.prior_mu.copy_(torch.randn(10, 4))
    model.prior_second_moment.copy_(model.prior_mu.pow(2) + 0.25)  # sigma_y = 0.5
    noise = torch.randn(6, 4)
    expected = model.decode(model.prior_mu[digits] + 0.8 * 0.5 * noise, digits)
    assert torch.allclose(model.generate(digits, noise), expected, atol=1e-6)
    assert not torch.allclose(model.generate(digits, noise), model.generate(digits, torch.zeros(6, 4)))


def test_the_kl_is_taken_against_the_digits_prior_and_warmed_up(batch):
    images, digits = batch
    mu, logvar = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(gaussian_kl(mu, logvar, mu, logvar), torch.zeros(3), atol=1e-6)
    assert torch.allclose(gaussian_kl(mu, logvar, torch.zeros(3, 4), torch.zeros(3, 4)), kl_divergence(mu, logvar))
    model = build_model(CONFIGS["conv"]).train()
    first = model.loss(images, digits, "image_digit")  # batch 1 of a 10-batch warm-up: KL weight 0.1
    assert torch.allclose(first.total, first.bce + 50.0 * first.nll + 0.1 * first.kl)
    for _ in range(20):
        model.loss(images, digits, "image")
    assert model.kl_weight() == 1.0
    assert model.eval().kl_weight() == 1.0


def test_training_moves_each_digits_prior_toward_its_posteriors_moments(batch):
    images, digits = batch
    model = build_model(ModelConfig("pcvae", 4, hidden_dim=32, prior_rate=1.0)).train()
    torch.manual_seed(0)
    model.loss(images, digits, "image_digit")
    mu, logvar = model.eval().encode(images, digits)
    assert torch.allclose(model.prior_mu[digits], mu, atol=1e-5)  # one image per digit, rate 1: its posterior
    assert torch.allclose(model.prior(digits)[1], logvar, atol=1e-4)
    assert torch.equal(model.prior_mu[3:7], torch.zeros(4, 4))  # digits not in the batch stay where they were
    before = model.prior_mu.clone()
    model.loss(images, digits, "image_digit")  # evaluation mode: the prior is left alone
    assert torch.equal(model.prior_mu, before)


def test_the_digit_only_mode_trains_the_label_term_alone(batch):
    images, digits = batch
    losses = build_model(CONFIGS["mlp"]).loss(images, digits, "digit")
    assert losses.kl == 0 and torch.allclose(losses.total, 50.0 * losses.nll)


def test_a_saved_model_keeps_its_prior_and_warm_up(tmp_path, batch):
    _, digits = batch
    model = build_model(CONFIGS["conv"])
    model.prior_mu.add_(1.0)
    model.batches_seen.fill_(7)
    save_model(model, tmp_path / "seed0.pt")
    loaded = load_model(tmp_path / "seed0.pt")
    assert loaded.batches_seen == 7 and torch.equal(loaded.prior_mu, model.prior_mu)
    noise = torch.randn(6, 4)
    assert torch.equal(loaded.generate(digits, noise), model.eval().generate(digits, noise))


def test_the_pcvae_section_builds_the_model_and_its_warm_up_in_batches():
    params = make_params(pcvae={"kl_warmup_epochs": 2, "prior_temperature": 0.7})  # 1000 images, 16 batches an epoch
    config, train = model_setup(params, "pcvae", 4)
    assert (config.channels, config.label_weight, config.kl_warmup_batches, config.prior_temperature) == (
        (4, 8),
        50.0,
        32,
        0.7,
    )
    assert train is params.pcvae.train


def test_three_conv_blocks_and_a_temperature_above_one_are_refused_in_one_line():
    with pytest.raises(ParamsError, match=r"pcvae.channels must be a list of at most 2"):
        make_params(pcvae={"channels": [4, 8, 16]})
    with pytest.raises(ParamsError, match=r"pcvae.prior_temperature must be in \(0, 1\], got 1.5"):
        make_params(pcvae={"prior_temperature": 1.5})
    with pytest.raises(ParamsError, match=r"pcvae.kl_weight must be a positive number, got 0"):
        make_params(pcvae={"kl_weight": 0})
    with pytest.raises(ParamsError, match=r"pcvae.prior_components must be a non-negative integer, got -1"):
        make_params(pcvae={"prior_components": -1})
    with pytest.raises(ParamsError, match=r"evaluate.temperatures must be a non-empty list of numbers in \(0, 1\]"):
        make_params(evaluate={"temperatures": [0.8, 1.5]})


def test_a_trained_prior_cvae_serves_the_api_from_its_file_and_its_run(mnist_subset, tmp_path, monkeypatch):
    from digitgen.train import run_train

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name, digits in mnist_subset.items():
        digits.save(prepared / f"{name}.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    runs = run_train(
        make_params(pcvae={"train": {**make_params().pcvae.train.__dict__, "epochs": 1}}),
        "pcvae",
        4,
        prepared,
        tmp_path / "models",
        tmp_path / "histories",
        tmp_path / "checkpoints",
    )
    images = mnist_subset["test"].float_images()[:4].reshape(-1, 28, 28)
    for source in (tmp_path / "models" / "seed0.pt", f"runs:/{runs['seed_run_ids']['0']}"):
        model = digitgen.load(source)
        assert model.kind == "pcvae"
        assert model.generate([3, 8], n=2, seed=0).shape == (4, 28, 28)
        assert model.classify(images).digits.shape == (4,)
        assert model.reconstruct(images).images.shape == (4, 28, 28)


def test_em_recovers_a_two_component_mixture():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(600, 2, generator=gen) * 0.3 + 4, torch.randn(200, 2, generator=gen) * 0.5 - 4])
    log_weights, means, scale_tril = gaussian_mixture(x.double(), 2, gen)
    order = means[:, 0].argsort(descending=True)
    assert log_weights[order].exp().tolist() == pytest.approx([0.75, 0.25], abs=0.01)
    assert torch.allclose(means[order], torch.tensor([[4.0, 4.0], [-4.0, -4.0]]).double(), atol=0.1)
    spread = (scale_tril @ scale_tril.mT)[order].diagonal(dim1=1, dim2=2).sqrt()
    assert torch.allclose(spread, torch.tensor([[0.3, 0.3], [0.5, 0.5]]).double(), atol=0.05)


def test_a_fitted_mixture_is_what_generation_draws_from_its_last_noise_column_picking_the_component(batch):
    images, digits = batch
    model = build_model(dataclasses.replace(CONFIGS["conv"], prior_components=2, prior_temperature=0.5)).eval()
    with pytest.raises(DigitgenError, match="has 1 images of digit 0; lower prior_components"):
        model.fit_mixture(images, digits, seed=0)
    model.fit_mixture(torch.rand(40, 784), torch.arange(10).repeat(4), seed=0)
    assert noise_dim(model) == 5
    model.mixture_logits.zero_()  # two equally likely components
    model.mixture_means.copy_(torch.randn(10, 2, 4))
    noise = torch.randn(6, 5)
    for column, component in ((-3.0, 0), (3.0, 1)):  # Phi(-3) < 1/2: the first component; Phi(3) > 1/2: the second
        noise[:, 4] = column
        z = model.mixture_means[digits, component] + 0.5 * (
            model.mixture_scale_tril[digits, component] @ noise[:, :4, None]
        ).squeeze(-1)
        assert torch.allclose(model.generate(digits, noise), model.decode(z, digits), atol=1e-6)


def test_training_with_mixture_components_fits_them_after_the_last_epoch_and_saves_them(
    mnist_subset, tmp_path, monkeypatch
):
    from digitgen.train import run_train

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name, digits in mnist_subset.items():
        digits.save(prepared / f"{name}.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    train = {**make_params().pcvae.train.__dict__, "epochs": 1, "seeds": [0]}
    params = make_params(pcvae={"train": train, "prior_components": 3, "kl_weight": 0.5})
    rmtree = shutil.rmtree  # the checkpoints are kept, as if the stage stopped before its cleanup
    monkeypatch.setattr(
        shutil, "rmtree", lambda path, **kw: None if Path(path).name == "checkpoints" else rmtree(path, **kw)
    )
    run_train(params, "pcvae", 4, prepared, tmp_path / "models", tmp_path / "histories", tmp_path / "checkpoints")
    model = load_model(tmp_path / "models" / "seed0.pt")
    assert model.config.prior_components == 3 and model.config.kl_weight == 0.5
    assert model.mixture_means.abs().sum() > 0 and model.mixture_logits.logsumexp(1).allclose(
        torch.zeros(10), atol=1e-6
    )
    checkpoint = torch.load(tmp_path / "checkpoints" / "seed0.pt", weights_only=True)
    assert checkpoint["done"] and torch.equal(checkpoint["model"]["mixture_means"], model.mixture_means)
    (
        tmp_path / "models" / "seed0.pt"
    ).unlink()  # the rerun takes the finished seed from its checkpoint, mixture and all
    run_train(params, "pcvae", 4, prepared, tmp_path / "models", tmp_path / "histories", tmp_path / "checkpoints")
    assert torch.equal(load_model(tmp_path / "models" / "seed0.pt").mixture_means, model.mixture_means)


def test_the_kl_weight_is_beta_after_the_warm_up(batch):
    images, digits = batch
    model = build_model(dataclasses.replace(CONFIGS["conv"], kl_weight=0.25)).train()
    first = model.loss(images, digits, "image_digit")  # batch 1 of 10: beta 0.25 * 0.1
    assert torch.allclose(first.total, first.bce + 50.0 * first.nll + 0.025 * first.kl)
    for _ in range(20):
        model.loss(images, digits, "image")
    assert model.kl_weight() == 0.25


def test_a_digit_head_that_sees_the_image_reads_its_features_beside_the_latent(batch):
    images, digits = batch
    sees, plain = (build_model(dataclasses.replace(CONFIGS["conv"], head_sees_image=s)) for s in (True, False))
    for mode in INPUT_MODES:  # the digit alone: zeros stand in for the absent image's features
        assert torch.isfinite(sees.loss(images, digits, mode).total)
    for model in (sees, plain):
        with torch.no_grad():  # a latent that carries nothing of the image
            model.to_mu.weight.zero_()
            model.to_mu.bias.zero_()
    assert not torch.allclose(sees.eval().classify(images)[0], sees.classify(images)[1])
    assert torch.allclose(plain.eval().classify(images), plain.classify(images)[:1].expand(6, -1))


def test_a_model_that_sets_no_later_field_is_saved_as_earlier_versions_saved_it(tmp_path):
    """So the study's model files stay byte for byte what DVC recorded, and load in earlier versions."""
    save_model(build_model(ModelConfig("cvae", 4, hidden_dim=32)), tmp_path / "cvae.pt")
    save_model(build_model(dataclasses.replace(CONFIGS["mlp"], prior_components=2)), tmp_path / "pcvae.pt")
    assert not set(LATER_FIELDS) & set(torch.load(tmp_path / "cvae.pt", weights_only=True)["config"])
    written = torch.load(tmp_path / "pcvae.pt", weights_only=True)["config"]
    assert written["prior_components"] == 2 and "kl_weight" not in written  # only what differs from the default
    loaded = load_model(tmp_path / "pcvae.pt")
    assert (loaded.config.prior_components, loaded.config.kl_weight) == (2, 1.0)
