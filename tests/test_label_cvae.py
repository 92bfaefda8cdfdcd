"""The label-conditioned CVAE: shapes, the ELBO, controlled generation, training, and its figures."""

from __future__ import annotations

import mlflow
import pytest
import torch
import torch.nn.functional as F
from conftest import make_params

from digitgen.latent import run_label_cvae_figures, style_vs_identity
from digitgen.models import LabelCVAE, ModelConfig, UnsupportedTask, build_model, kl_divergence, load_model
from digitgen.params import ParamsError
from digitgen.train import read_history, run_train

LATENT = 2
TINY = {
    "latent_dim": LATENT,
    "hidden_dims": [32, 16],
    "train": {
        "seeds": [0],
        "epochs": 1,
        "batch_size": 64,
        "lr": 0.001,
        "device": "cpu",
        "input_modes": {"image_digit": 1},
    },
    "figures": {
        "seed": 0,
        "plane_digit": 3,
        "plane_size": 4,
        "plane_extent": 2.0,
        "samples_per_digit": 2,
        "noise_seed": 0,
    },
}


@pytest.fixture
def model() -> LabelCVAE:
    torch.manual_seed(0)
    return build_model(ModelConfig("label_cvae", LATENT, hidden_dims=(32, 16))).eval()


@pytest.fixture
def batch():
    torch.manual_seed(1)
    return torch.rand(6, 784), torch.tensor([0, 1, 2, 7, 8, 9])


def test_shapes(model, batch):
    images, digits = batch
    mu, logvar = model.encode(images, digits)
    assert mu.shape == logvar.shape == (6, LATENT)
    assert model(images, digits).image_logits.shape == (6, 784)
    generated = model.generate(digits)
    assert generated.shape == (6, 784) and 0 <= generated.min() and generated.max() <= 1
    reconstructed, digit_log_probs = model.reconstruct(images, digits)
    assert reconstructed.shape == (6, 784) and digit_log_probs is None


def test_architecture_follows_the_reference():
    model = build_model(ModelConfig("label_cvae", 2))
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(794, 512), (512, 256), (256, 2), (256, 2), (12, 256), (256, 512), (512, 784)]


def test_loss_is_summed_bce_plus_kl_and_ignores_the_input_mode(model, batch):
    images, digits = batch
    torch.manual_seed(2)
    losses = model.loss(images, digits, "digit")
    torch.manual_seed(2)
    mu, logvar = model.encode(images, digits)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    bce = F.binary_cross_entropy(model.generate(digits, noise=z), images, reduction="sum") / len(images)
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
    assert torch.allclose(losses.bce, bce, rtol=1e-4)
    assert torch.allclose(losses.kl, kl) and torch.allclose(kl_divergence(mu, logvar).mean(), kl)
    assert losses.nll == 0 and torch.allclose(losses.total, losses.bce + losses.kl)
    torch.manual_seed(2)
    assert torch.equal(model.loss(images, digits, "image_digit").total, losses.total)


def test_kl_is_zero_when_the_posterior_is_the_prior(model, batch):
    for head in (model.encoder.to_mu, model.encoder.to_logvar):
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    assert model.loss(*batch, "image_digit").kl == 0


def test_digit_string_one_tile_per_digit_with_own_or_shared_style(model):
    digits = torch.tensor([2, 0, 2, 6])
    torch.manual_seed(0)
    own = model.generate(digits)  # each digit its own z
    shared_row = torch.randn(1, LATENT)
    shared = model.generate(digits, noise=shared_row)  # one z for the whole string
    strip = torch.cat(list(own.reshape(-1, 28, 28)), dim=1)
    assert strip.shape == (28, 28 * len(digits))
    assert torch.equal(shared[0], shared[2])  # same digit, same style: the same picture
    assert not torch.equal(own[0], own[2])  # same digit, own styles: different pictures
    assert torch.equal(shared, model.generate(digits, noise=shared_row.expand(4, -1)))


def test_same_seed_same_picture(model):
    digits = torch.arange(10)
    torch.manual_seed(7)
    first = model.generate(digits)
    torch.manual_seed(7)
    assert torch.equal(first, model.generate(digits))


def test_style_vs_identity_keeps_the_inputs_z(model, batch):
    images, digits = batch
    table = style_vs_identity(model, images, digits).reshape(len(images), 10, 784)
    mu, _ = model.encode(images, digits)
    for i in range(len(images)):
        expected = model.generate(torch.arange(10), noise=mu[i : i + 1])
        assert torch.allclose(table[i], expected, atol=1e-6)
    # the column of an input's own label is its reconstruction
    own = table[torch.arange(len(images)), digits]
    assert torch.allclose(own, model.reconstruct(images, digits)[0], atol=1e-6)


def test_classify_and_label_free_encoding_are_clear_errors(model, batch):
    images, _ = batch
    with pytest.raises(UnsupportedTask, match="cannot classify"):
        model.classify(images)
    with pytest.raises(UnsupportedTask, match="pass the digits"):
        model.reconstruct(images, None)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"latent_dim": 1}, "label_cvae.latent_dim"),
        ({"hidden_dims": []}, "label_cvae.hidden_dims"),
        ({"train": {**TINY["train"], "input_modes": {"image_digit": 1, "image": 1}}}, "label_cvae.train.input_modes"),
        ({"figures": {**TINY["figures"], "seed": 5}}, "label_cvae.figures.seed"),
        ({"figures": {**TINY["figures"], "plane_digit": 10}}, "label_cvae.figures.plane_digit"),
    ],
)
def test_bad_params_name_the_key(change, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        make_params(label_cvae={**TINY, **change})


@pytest.mark.slow  # trains
def test_trains_with_the_shared_loop_and_draws_its_figures(tmp_path, prepared_dir, mlflow_store):
    params = make_params(label_cvae=TINY)
    out = tmp_path / "models" / "label_cvae-2"
    runs = run_train(params, "label_cvae", LATENT, prepared_dir, out, tmp_path / "histories", tmp_path / "checkpoints")
    seed_run = mlflow.MlflowClient().get_run(runs["seed_run_ids"]["0"])
    assert seed_run.info.experiment_id == mlflow.get_experiment_by_name("digitgen-test").experiment_id
    assert seed_run.data.tags["model"] == "label_cvae" and "val/loss" in seed_run.data.metrics
    assert "val/nll" not in seed_run.data.metrics  # it predicts no digit: no NLL term to log
    assert seed_run.data.params["model.hidden_dims"] == "(32, 16)" and "model.hidden_dim" not in seed_run.data.params
    model = load_model(out / "seed0.pt")
    assert isinstance(model, LabelCVAE) and model.config.hidden_dims == (32, 16)
    (row,) = read_history(tmp_path / "histories" / "seed0.csv")
    assert row["train_nll"] == row["val_nll"] == 0 and row["val_kl"] > 0
    assert row["val_loss"] == pytest.approx(row["val_bce"] + row["val_kl"])

    written = run_label_cvae_figures(params.label_cvae.figures, out, prepared_dir, tmp_path / "figures")
    assert sorted(p.name for p in written) == [
        "latent_plane.png",
        "latent_scatter.png",
        "samples.png",
        "style_vs_identity.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    again = run_label_cvae_figures(params.label_cvae.figures, out, prepared_dir, tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]  # seeded: same pictures
