"""The study's joint models, the Conditional Autoencoder (CAE) and Conditional VAE (CVAE), and the
label-conditioned CVAE.

Both read an image, a digit, or both, and write both an image and a digit:

    image (784) -> FC 512 -> ReLU -> FC 512 -> ReLU --\
                                                      (+) -> latent (decoded below)
    digit (10)  -> FC 512 -> ReLU -> FC 512 -> ReLU --/

    latent -> FC 512 -> ReLU -> FC 512 -> ReLU -> FC 784 -> sigmoid (image)
                                               \-> FC 10 -> log-softmax (digit)

The CAE projects the fused vector to the latent with one FC layer; the CVAE projects it to mu and
log sigma^2 and samples z = mu + sigma * eps. An absent input adds nothing to the fused sum, which
is what the study's random input modes (image+digit, image only, digit only) rely on.

The label-conditioned CVAE (docs/label-cvae.md) is the classic CVAE, where both
sides see the one-hot label, so the latent is left to carry the handwriting style:

    [image (784), digit (10)] -> FC 512 -> ReLU -> FC 256 -> ReLU -> mu, log sigma^2 (latent_dim 2)
    [z, digit (10)]           -> FC 256 -> ReLU -> FC 512 -> ReLU -> FC 784 -> sigmoid (image)

The prior CVAE (`pcvae`), beyond the study, keeps the three input modes and both outputs, but
its decoder also sees the digit, its latent has a per-digit prior p(z|y) = N(mu_y, sigma_y^2), learned
in training and saved with the weights, that generation draws from, its label term is weighted (MVAE),
its KL term is warmed up (to a weight beta that may be below 1), its image pathways may be convolutional,
and, with `prior_components`, it draws from a per-digit Gaussian mixture fitted after training (two-stage):

    image (28x28) -> [conv 4x4/2 -> ReLU] x len(channels) -> FC 512 -> ReLU --\
                                                                             (+) -> mu, log sigma^2 -> z
    digit (10)    -> FC 512 -> ReLU -> FC 512 -> ReLU -------------------------/
    [z, digit]    -> FC 512 -> ReLU -> FC -> [deconv 4x4/2] x len(channels) -> image logits
    z             -> FC 512 -> ReLU -> FC 10 -> log-softmax (digit)
    digit alone   -> p(z | digit) = N(mu_y, sigma_y^2): the digit-only "encoder" is the learned prior
    generating    -> z ~ the digit's fitted mixture (else its learned prior), then decoded with the digit

Every model answers the same inference calls (`generate`, `reconstruct`, `encode`, `classify`), so
evaluation and the API need not know which one they hold; a call a model cannot answer raises
`UnsupportedTask`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal

from digitgen.files import save_torch, weights_checksum
from digitgen.params import DigitgenError

IMAGE_DIM = 28 * 28
NUM_DIGITS = 10


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: stored with its weights."""

    kind: str  # "cae", "cvae" or "label_cvae"
    latent_dim: int
    hidden_dim: int = 512  # the joint models' layer width
    hidden_dims: tuple[int, ...] = (512, 256)  # the label CVAE's encoder widths; its decoder mirrors them
    channels: tuple[int, ...] = ()  # the prior CVAE's conv widths (28 -> 14 -> 7 pixels); () = fully connected
    label_weight: float = 1.0  # the prior CVAE's weight of the digit NLL against the summed pixel BCE
    kl_warmup_batches: int = 0  # the prior CVAE's KL weight rises linearly from 0 to 1 over this many batches
    prior_rate: float = 0.01  # the prior CVAE's per-batch step of each digit's prior toward its posteriors' moments
    prior_temperature: float = 1.0  # the prior CVAE generates from z = mu_y + t * sigma_y * noise
    kl_weight: float = 1.0  # the prior CVAE's beta: the KL term's weight once warmed up
    prior_components: int = 0  # the prior CVAE's Gaussians per digit fitted after training; 0: the running prior
    head_sees_image: bool = False  # the prior CVAE's digit head reads the image pathway's features beside z


class UnsupportedTask(DigitgenError):
    """An inference call the model cannot answer (the label CVAE cannot classify): report it as not applicable."""


class Output(NamedTuple):
    image_logits: torch.Tensor  # N x 784, before the sigmoid (BCE is computed from logits for stability)
    digit_log_probs: torch.Tensor | None  # N x 10, log-softmax; None for the label CVAE, which predicts no digit
    z: torch.Tensor  # N x latent_dim, the latent the decoder saw
    mu: torch.Tensor | None = None  # CVAE only
    logvar: torch.Tensor | None = None  # CVAE only


class Losses(NamedTuple):
    """Per-sample losses averaged over the batch, each term as the study writes it."""

    total: torch.Tensor
    bce: torch.Tensor  # binary cross-entropy summed over the 784 pixels
    nll: torch.Tensor  # negative log-likelihood of the true digit
    kl: torch.Tensor  # KL(q(z|x,y) || N(0, I)); 0 for the CAE


def _mlp(*widths: int) -> nn.Sequential:
    """FC -> ReLU from each width to the next."""
    layers = []
    for in_dim, out_dim in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(in_dim, out_dim), nn.ReLU()]
    return nn.Sequential(*layers)


def _pathway(in_dim: int, hidden_dim: int) -> nn.Sequential:
    return _mlp(in_dim, hidden_dim, hidden_dim)


def _one_hot(digits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(digits, NUM_DIGITS).to(like.dtype)


class Encoder(nn.Module):
    """Two pathways, image and digit, fused by element-wise addition."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.image_path = _pathway(IMAGE_DIM, hidden_dim)
        self.digit_path = _pathway(NUM_DIGITS, hidden_dim)

    def forward(self, images: torch.Tensor | None, digits: torch.Tensor | None) -> torch.Tensor:
        if digits is None:
            if images is None:
                raise ValueError("the encoder needs an image, a digit, or both")
            return self.image_path(images)
        from_digit = self.digit_path(_one_hot(digits, next(self.digit_path.parameters())))
        return from_digit if images is None else self.image_path(images) + from_digit


class Decoder(nn.Module):
    """Two shared layers, then an image head and a digit head."""

    def __init__(self, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.shared = _pathway(latent_dim, hidden_dim)
        self.image_head = nn.Linear(hidden_dim, IMAGE_DIM)
        self.digit_head = nn.Linear(hidden_dim, NUM_DIGITS)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.shared(z)
        return self.image_head(h), F.log_softmax(self.digit_head(h), dim=-1)


class JointAutoencoder(nn.Module):
    """What the CAE and CVAE share; subclasses say how the fused vector becomes a latent."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.hidden_dim)
        self.decoder = Decoder(config.latent_dim, config.hidden_dim)

    def encode(self, images: torch.Tensor | None, digits: torch.Tensor | None):
        """(mu, logvar): the latent's mean and log-variance; logvar is None for a deterministic latent."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor | None, digits: torch.Tensor | None, sample: bool = True) -> Output:
        """images: N x 784 floats in [0, 1] or None; digits: N int labels or None."""
        mu, logvar = self.encode(images, digits)
        z = reparameterize(mu, logvar, torch.randn_like(mu) if sample else None)
        image_logits, digit_log_probs = self.decoder(z)
        return Output(image_logits, digit_log_probs, z, mu if logvar is not None else None, logvar)

    def loss(self, images: torch.Tensor, digits: torch.Tensor, input_mode: str) -> Losses:
        """The study's loss for one batch fed in `input_mode`; targets are always the full pair."""
        out = self(images if input_mode != "digit" else None, digits if input_mode != "image" else None)
        return self.losses(out, images, digits)

    @staticmethod
    def losses(out: Output, images: torch.Tensor, digits: torch.Tensor) -> Losses:
        bce = F.binary_cross_entropy_with_logits(out.image_logits, images, reduction="none").sum(1).mean()
        assert out.digit_log_probs is not None  # the CAE and the CVAE always predict the digit
        nll = F.nll_loss(out.digit_log_probs, digits)
        kl = torch.zeros((), device=bce.device)  # the CAE's
        if out.mu is not None and out.logvar is not None:
            kl = kl_divergence(out.mu, out.logvar).mean()
        return Losses(bce + nll + kl, bce, nll, kl)

    # Inference: the three conditions of the study. Latents are the mean unless noise is given.
    def generate(self, digits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) from digits alone, the study's way: the digit-only path.

        For the CVAE z = mu + sigma * noise with noise ~ N(0, I) drawn when None; a shared noise row
        gives every digit the same style. The CAE's digit-only latent is deterministic.
        """
        mu, logvar = self.encode(None, digits)
        if logvar is not None and noise is None:
            noise = torch.randn_like(mu)
        return self.decode(reparameterize(mu, logvar, noise))

    def decode(self, z: torch.Tensor, digits: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) from latents; the digit is in z, so `digits` is not needed."""
        return self.decoder(z)[0].sigmoid()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Digit log-probabilities (N x 10) from images alone."""
        return self.decoder(self.encode(images, None)[0])[1]

    def reconstruct(
        self, images: torch.Tensor, digits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images N x 784 in [0, 1], digit log-probabilities N x 10) from images, with or without digits."""
        image_logits, digit_log_probs = self.decoder(self.encode(images, digits)[0])
        return image_logits.sigmoid(), digit_log_probs


class CAE(JointAutoencoder):
    """Conditional Autoencoder: one FC layer from the fused vector to a deterministic latent."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.to_latent = nn.Linear(config.hidden_dim, config.latent_dim)

    def encode(self, images, digits):
        return self.to_latent(self.encoder(images, digits)), None


class CVAE(JointAutoencoder):
    """Conditional VAE: FC layers to mu and log sigma^2; z = mu + sigma * eps, eps ~ N(0, I)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.to_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.to_logvar = nn.Linear(config.hidden_dim, config.latent_dim)

    def encode(self, images, digits):
        fused = self.encoder(images, digits)
        return self.to_mu(fused), self.to_logvar(fused)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """z = mu + sigma * noise, the reparameterisation trick; noise=None (or no logvar) means z = mu."""
    if logvar is None or noise is None:
        return mu
    return mu + torch.exp(0.5 * logvar) * noise


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample, in closed form: -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)


class LabelEncoder(nn.Module):
    """q(z | x, y): the image and its one-hot label, concatenated, down the hidden widths to mu and log sigma^2."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.body = _mlp(IMAGE_DIM + NUM_DIGITS, *config.hidden_dims)
        self.to_mu = nn.Linear(config.hidden_dims[-1], config.latent_dim)
        self.to_logvar = nn.Linear(config.hidden_dims[-1], config.latent_dim)

    def forward(self, images: torch.Tensor, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(torch.cat([images, _one_hot(digits, images)], dim=1))
        return self.to_mu(h), self.to_logvar(h)


class LabelDecoder(nn.Module):
    """p(x | z, y): the latent and the one-hot label up the hidden widths, reversed, to 784 Bernoulli logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = config.hidden_dims[::-1]
        self.body = _mlp(config.latent_dim + NUM_DIGITS, *widths)
        self.to_image = nn.Linear(widths[-1], IMAGE_DIM)

    def forward(self, z: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        return self.to_image(self.body(torch.cat([z, _one_hot(digits, z)], dim=1)))


class LabelCVAE(nn.Module):
    """The label-conditioned CVAE: the label tells the decoder which digit, so z only has to say how it is written.

    Prior p(z) = N(0, I), so generating a digit is decoding it with a z drawn from N(0, I); a z taken
    from one image's encoding and decoded with another label writes that digit in the image's style.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = LabelEncoder(config)
        self.decoder = LabelDecoder(config)

    def encode(self, images: torch.Tensor, digits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x, y): this model's encoder needs the label as well as the image."""
        if digits is None:
            raise UnsupportedTask("the label CVAE encodes an image together with its label; pass the digits too")
        return self.encoder(images, digits)

    def forward(self, images: torch.Tensor, digits: torch.Tensor, sample: bool = True) -> Output:
        mu, logvar = self.encode(images, digits)
        z = reparameterize(mu, logvar, torch.randn_like(mu) if sample else None)
        return Output(self.decoder(z, digits), None, z, mu, logvar)

    def loss(self, images: torch.Tensor, digits: torch.Tensor, input_mode: str) -> Losses:
        """The negative ELBO: BCE summed over the pixels plus KL, per sample, averaged over the batch.

        `input_mode` is ignored: this model always sees the image and its label (which is why params
        allow it only image_digit). nll is 0: it predicts no digit.
        """
        out = self(images, digits)
        bce = F.binary_cross_entropy_with_logits(out.image_logits, images, reduction="none").sum(1).mean()
        kl = kl_divergence(out.mu, out.logvar).mean()
        return Losses(bce + kl, bce, torch.zeros_like(bce), kl)

    def generate(self, digits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) of `digits` in the styles z = noise: N x latent_dim, or one row that
        gives every digit the same style; drawn from the prior N(0, I) when None."""
        if noise is None:
            noise = torch.randn(len(digits), self.config.latent_dim, device=digits.device)
        return self.decode(noise.expand(len(digits), -1), digits)

    def decode(self, z: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) of `digits` in the styles z."""
        return self.decoder(z, digits).sigmoid()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise UnsupportedTask(
            "the label CVAE cannot classify: it predicts no digit and needs the label to encode an "
            "image; report classification accuracy as not applicable"
        )

    def reconstruct(self, images: torch.Tensor, digits: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """(images N x 784 in [0, 1], None): decoded from the posterior mean; the label is required, and
        there are no digit log-probabilities because this model predicts no digit."""
        return self.decoder(self.encode(images, digits)[0], digits).sigmoid(), None


PRIOR_MIN_VARIANCE = 1e-4  # a floor under sigma_y^2: a running second moment minus a squared mean can dip below 0


def gaussian_kl(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_logvar: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)) per sample, in closed form, summed over the latent."""
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1).sum(-1)


class ImagePathway(nn.Module):
    """The image to a hidden vector: conv blocks (4x4, stride 2, each halving the side) then FC, or the
    study's two FC layers when there are no channels."""

    def __init__(self, channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        if not channels:
            self.body = _pathway(IMAGE_DIM, hidden_dim)
            return
        layers: list[nn.Module] = [nn.Unflatten(1, (1, 28, 28))]
        in_ch = 1
        for out_ch in channels:
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = out_ch
        side = 28 >> len(channels)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(in_ch * side * side, hidden_dim), nn.ReLU())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class ImageDecoder(nn.Module):
    """p(x | z, y): the latent and the one-hot digit to 784 Bernoulli logits, mirroring ImagePathway."""

    def __init__(self, latent_dim: int, channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        if not channels:
            self.body = nn.Sequential(_pathway(latent_dim + NUM_DIGITS, hidden_dim), nn.Linear(hidden_dim, IMAGE_DIM))
            return
        side = 28 >> len(channels)
        layers = [
            *_mlp(latent_dim + NUM_DIGITS, hidden_dim, channels[-1] * side * side),
            nn.Unflatten(1, (channels[-1], side, side)),
        ]
        widths = [*channels[::-1], 1]
        for i, (in_ch, out_ch) in enumerate(zip(widths, widths[1:], strict=False)):
            layers.append(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1))
            if i < len(channels) - 1:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers, nn.Flatten())

    def forward(self, z: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([z, _one_hot(digits, z)], dim=1))


class PriorCVAE(nn.Module):
    """A joint CVAE whose digit-only condition is a learned prior p(z|y) = N(mu_y, sigma_y^2).

    Training is the study's: one input mode per batch, targets the image and its digit. With the image
    seen (image+digit, image alone) the loss is the ELBO with a weighted label term (MVAE, Wu & Goodman
    2018) and the KL taken against the digit's prior (a conditional prior, as Sohn et al. 2015's prior
    network), warmed up from 0:
        BCE(x, p(x|z,y)) + label_weight * NLL(y, p(y|z)) + beta * KL(q(z|x[,y]) || p(z|y)),  z ~ q.
    With the digit alone nothing about the image is observed: z ~ p(z|y) and the loss is
    label_weight * NLL(y, p(y|z)), which keeps the ten priors apart where the digit head can read them
    (MVAE's ELBO of the label alone; its KL to the prior is 0 by construction). Its `bce`, the pixel BCE
    of the image decoded from that z, is reported, not trained.

    The prior is learned in closed form rather than by gradient: the diagonal Gaussian that minimises
    the expected KL(q(z|x,y) || p(z|y)) over a digit's images matches the moments of their aggregate
    posterior (mean E[mu], variance E[sigma^2] + Var[mu]; VampPrior's argument that the best prior is the
    aggregate posterior, Tomczak & Welling 2018). Each training batch moves every digit's mean and second
    moment `prior_rate` of the way toward its posteriors' (a running average, saved with the weights);
    a prior moved by Adam's small steps lags the posteriors and generates off their support. Generating
    from a digit decodes z ~ p(z|y) with the digit: the prior places the digit, z the handwriting, drawn at
    a reduced temperature t (`prior_temperature`: sigma_y scaled by t, as Glow, Kingma & Dhariwal 2018, and
    NVAE, Vahdat & Kautz 2020, sample): the prior is a diagonal Gaussian fitted to a digit's aggregate
    posterior, which is not Gaussian, and its tails reach latents that decode to ambiguous digits.

    That Gaussian covers only part of a digit's aggregate posterior, so with `prior_components` K > 0 a second
    stage follows training (`fit_mixture`, as two-stage VAEs do: Dai & Wipf 2019; Ghosh et al. 2020): each
    digit's mixture of K full-covariance Gaussians is fitted by EM to one posterior draw per training image,
    saved with the weights, and is what generation draws from (each component's spread scaled by t). The
    running Gaussian stays the KL's target in training and the digit-only condition. A KL weight beta below 1
    (`kl_weight`) lets the posteriors keep more of each image, so the decoder redraws digits more sharply;
    the mixture, not the N(mu_y, sigma_y^2) the KL pulls toward, then has to cover them.
    """

    prior_mu: torch.Tensor  # the buffers registered below
    prior_second_moment: torch.Tensor
    batches_seen: torch.Tensor
    mixture_logits: torch.Tensor  # with prior_components only
    mixture_means: torch.Tensor
    mixture_scale_tril: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.image_path = ImagePathway(config.channels, config.hidden_dim)
        self.digit_path = _pathway(NUM_DIGITS, config.hidden_dim)
        self.to_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.to_logvar = nn.Linear(config.hidden_dim, config.latent_dim)
        self.register_buffer("prior_mu", torch.zeros(NUM_DIGITS, config.latent_dim))
        self.register_buffer("prior_second_moment", torch.ones(NUM_DIGITS, config.latent_dim))  # E[z^2] under q
        self.image_decoder = ImageDecoder(config.latent_dim, config.channels, config.hidden_dim)
        head_in = config.latent_dim + config.hidden_dim * config.head_sees_image
        self.digit_head = nn.Sequential(*_mlp(head_in, config.hidden_dim), nn.Linear(config.hidden_dim, NUM_DIGITS))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))  # drives the KL warm-up; saved
        if config.prior_components:  # the second stage's per-digit mixtures, fitted by fit_mixture after training
            k, d = config.prior_components, config.latent_dim
            self.register_buffer("mixture_logits", torch.zeros(NUM_DIGITS, k))
            self.register_buffer("mixture_means", torch.zeros(NUM_DIGITS, k, d))
            self.register_buffer("mixture_scale_tril", torch.eye(d).expand(NUM_DIGITS, k, d, d).clone())

    def prior(self, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_y, log sigma_y^2) of p(z | y) for each digit."""
        mu = self.prior_mu[digits]
        return mu, (self.prior_second_moment[digits] - mu.pow(2)).clamp(min=PRIOR_MIN_VARIANCE).log()

    @torch.no_grad()
    def fit_prior(self, mu: torch.Tensor, logvar: torch.Tensor, digits: torch.Tensor) -> None:
        """Move each digit's prior `prior_rate` of the way toward the moments of this batch's posteriors of it."""
        members = _one_hot(digits, mu).T  # 10 x N
        counts = members.sum(1, keepdim=True)
        rate = self.config.prior_rate * (counts > 0)
        self.prior_mu += rate * (members @ mu / counts.clamp(min=1) - self.prior_mu)
        second = members @ (mu.pow(2) + logvar.exp()) / counts.clamp(min=1)
        self.prior_second_moment += rate * (second - self.prior_second_moment)

    def encode(self, images: torch.Tensor | None, digits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z | x, y) or q(z | x); with the digit alone, of the prior p(z | y)."""
        return self._posterior(None if images is None else self.image_path(images), digits)

    def _posterior(
        self, features: torch.Tensor | None, digits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """encode, from the image pathway's features (None: no image)."""
        if features is None:
            if digits is None:
                raise ValueError("the encoder needs an image, a digit, or both")
            return self.prior(digits)
        if digits is not None:
            features = features + self.digit_path(_one_hot(digits, features))
        return self.to_mu(features), self.to_logvar(features)

    def _digit_log_probs(self, z: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """p(y | z), or with head_sees_image p(y | z, the image's features), zeros standing in for an absent image
        (as an absent input adds nothing to the encoder's sum)."""
        if self.config.head_sees_image:
            z = torch.cat([z, z.new_zeros(len(z), self.config.hidden_dim) if features is None else features], 1)
        return F.log_softmax(self.digit_head(z), dim=-1)

    def kl_weight(self) -> float:
        """beta: 0 at the first batch, config.kl_weight after kl_warmup_batches, always 1 outside training."""
        if not self.training:
            return 1.0
        if self.config.kl_warmup_batches == 0:
            return self.config.kl_weight
        return self.config.kl_weight * min(1.0, self.batches_seen.item() / self.config.kl_warmup_batches)

    def forward(self, images: torch.Tensor | None, digits: torch.Tensor | None, sample: bool = True) -> Output:
        """images: N x 784 or None; digits: N or None. The image is decoded with the given digit, else the
        predicted one."""
        features = None if images is None else self.image_path(images)
        mu, logvar = self._posterior(features, digits)
        z = reparameterize(mu, logvar, torch.randn_like(mu) if sample else None)
        digit_log_probs = self._digit_log_probs(z, features)
        shown = digits if digits is not None else digit_log_probs.argmax(1)
        return Output(self.image_decoder(z, shown), digit_log_probs, z, mu, logvar)

    def loss(self, images: torch.Tensor, digits: torch.Tensor, input_mode: str) -> Losses:
        if self.training:
            self.batches_seen += 1
        features = self.image_path(images) if input_mode != "digit" else None
        mu, logvar = self._posterior(features, digits if input_mode != "image" else None)
        z = reparameterize(mu, logvar, torch.randn_like(mu))
        nll = F.nll_loss(self._digit_log_probs(z, features), digits)
        if input_mode == "digit":
            with torch.no_grad():
                bce = (
                    F.binary_cross_entropy_with_logits(self.image_decoder(z, digits), images, reduction="none")
                    .sum(1)
                    .mean()
                )
            return Losses(self.config.label_weight * nll, bce, nll, torch.zeros_like(nll))
        bce = F.binary_cross_entropy_with_logits(self.image_decoder(z, digits), images, reduction="none").sum(1).mean()
        kl = gaussian_kl(mu, logvar, *self.prior(digits)).mean()
        if self.training:
            self.fit_prior(mu.detach(), logvar.detach(), digits)
        return Losses(bce + self.config.label_weight * nll + self.kl_weight() * kl, bce, nll, kl)

    @torch.no_grad()
    def fit_mixture(self, images: torch.Tensor, digits: torch.Tensor, seed: int, batch_size: int = 1024) -> None:
        """The second stage (Dai and Wipf 2019, "Diagnosing and Enhancing VAE Models"; Ghosh et al. 2020's ex-post
        density estimation): fit each digit's mixture of `prior_components` full-covariance Gaussians to its
        aggregate posterior, one draw z ~ q(z | x, y) per training image, by EM. Generation then draws from it."""
        generator = torch.Generator().manual_seed(seed)
        was_training = self.training
        self.eval()
        draws = []
        for start in range(0, len(digits), batch_size):
            mu, logvar = self.encode(images[start : start + batch_size], digits[start : start + batch_size])
            draws.append(reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator).to(mu)).cpu())
        z, labels = torch.cat(draws).double(), digits.cpu()
        k = self.config.prior_components
        for digit in range(NUM_DIGITS):
            if int((labels == digit).sum()) < k:
                raise DigitgenError(
                    f"pcvae.prior_components is {k}, but the training set has {int((labels == digit).sum())} images "
                    f"of digit {digit}; lower prior_components in params.yaml or train on more images"
                )
            log_weights, means, scale_tril = gaussian_mixture(z[labels == digit], k, generator)
            self.mixture_logits[digit] = log_weights.to(self.mixture_logits)
            self.mixture_means[digit] = means.to(self.mixture_means)
            self.mixture_scale_tril[digit] = scale_tril.to(self.mixture_scale_tril)
        self.train(was_training)

    def generate(self, digits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) of `digits`, z drawn from the digit's prior at temperature t: the fitted
        mixture when there is one (`noise_dim` columns of noise: the last picks the component, the rest place z in
        it), else z = mu_y + t * sigma_y * noise; one noise row gives every digit the same relative place."""
        n, d, t = len(digits), self.config.latent_dim, self.config.prior_temperature
        noise = torch.randn(n, noise_dim(self), device=digits.device) if noise is None else noise.expand(n, -1)
        if not self.config.prior_components:
            mu, logvar = self.prior(digits)
            return self.decode(reparameterize(mu, logvar, t * noise), digits)
        cdf = self.mixture_logits[digits].softmax(-1).cumsum(-1)
        component = (cdf < torch.special.ndtr(noise[:, d:])).sum(1).clamp(max=self.config.prior_components - 1)
        scale_tril = self.mixture_scale_tril[digits, component]
        z = self.mixture_means[digits, component] + t * (scale_tril @ noise[:, :d, None]).squeeze(-1)
        return self.decode(z, digits)

    def decode(self, z: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) of `digits` from latents z."""
        return self.image_decoder(z, digits).sigmoid()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Digit log-probabilities (N x 10) from images alone, read from the posterior mean."""
        features = self.image_path(images)
        return self._digit_log_probs(self._posterior(features, None)[0], features)

    def reconstruct(
        self, images: torch.Tensor, digits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images N x 784 in [0, 1], digit log-probabilities N x 10) from the posterior mean; without
        digits the image is decoded with the predicted digit."""
        out = self(images, digits, sample=False)
        return out.image_logits.sigmoid(), out.digit_log_probs


def gaussian_mixture(
    x: torch.Tensor, components: int, generator: torch.Generator, iterations: int = 100, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log weights K, means K x d, Cholesky factors K x d x d) of a full-covariance Gaussian mixture fitted to
    the rows of x by EM, started from `components` distinct rows and the data's covariance; `ridge` times the
    mean variance is added to each covariance's diagonal so that no component collapses onto a few points."""
    n, d = x.shape
    means = x[torch.randperm(n, generator=generator)[:components]]
    floor = ridge * x.var(0).mean() * torch.eye(d, dtype=x.dtype)
    covariance = (torch.cov(x.T) + floor).expand(components, d, d).clone()
    log_weights = torch.full((components,), -math.log(components), dtype=x.dtype)
    for _ in range(iterations):
        log_resp = MultivariateNormal(means, covariance).log_prob(x[:, None, :]) + log_weights
        resp = (log_resp - log_resp.logsumexp(1, keepdim=True)).exp()  # n x K
        counts = resp.sum(0) + 1e-9
        log_weights = (counts / n).log()
        means = resp.T @ x / counts[:, None]
        centred = x[:, None, :] - means  # n x K x d
        covariance = torch.einsum("nk,nki,nkj->kij", resp, centred, centred) / counts[:, None, None] + floor
    return log_weights, means, torch.linalg.cholesky(covariance)


def noise_dim(model: Model) -> int:
    """Columns of the noise `generate` reads: the latent's, and one more that picks a fitted mixture's component."""
    return model.config.latent_dim + (model.config.prior_components > 0)


Model = JointAutoencoder | LabelCVAE | PriorCVAE
# Loss terms a kind does not have (its Losses hold a constant 0 there): the CAE has no KL, the label CVAE no digit NLL
ABSENT_TERMS: dict[str, tuple[str, ...]] = {"cae": ("kl",), "cvae": (), "label_cvae": ("nll",), "pcvae": ()}
MODELS: dict[str, type[Model]] = {"cae": CAE, "cvae": CVAE, "label_cvae": LabelCVAE, "pcvae": PriorCVAE}


def resolve_device(name: str) -> torch.device:
    """The device a stage's `device` param names (auto: CUDA when present, else CPU), refused when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    present = {
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, True)
    if not present:
        raise DigitgenError(
            f"device {name} is not on this machine (torch sees {torch.cuda.device_count()} CUDA "
            "GPUs); set the stage's device to auto or cpu in params.yaml (or pass --device cpu)"
        )
    return device


def build_model(config: ModelConfig) -> Model:
    if config.kind not in MODELS:
        raise ValueError(f"unknown model kind {config.kind!r}; expected one of {', '.join(MODELS)}")
    return MODELS[config.kind](config)


class ModelNotFoundError(DigitgenError):
    """A model file that is not there; the message names it and how to make it."""


class ModelFileError(DigitgenError):
    """A model file that is there but is not a whole digitgen model; the message names it and the fix."""


# ModelConfig's fields added after the first model files, written only where they differ from their defaults: a model
# that does not use them is saved byte for byte as before (DVC sees the same output) and loads in earlier versions
LATER_FIELDS = ("kl_weight", "prior_components", "head_sees_image")


def save_model(model: Model, path: Path) -> None:
    """Weights, the config that rebuilds them and their checksum, written atomically; loadable with
    torch.load(weights_only=True)."""
    defaults = ModelConfig(model.config.kind, model.config.latent_dim)
    config = {
        name: value
        for name, value in asdict(model.config).items()
        if name not in LATER_FIELDS or value != getattr(defaults, name)
    }
    state_dict = model.state_dict()
    save_torch({"config": config, "state_dict": state_dict, "sha256": weights_checksum(config, state_dict)}, path)


def load_model(path: Path, map_location: str | torch.device = "cpu") -> Model:
    """The model saved at `path`; a file whose weights no longer match their checksum is refused.

    (Files written before checksums were saved, which have none, load unchecked.)
    """
    if not Path(path).is_file():
        raise ModelNotFoundError(f"{path} not found; train it first (`dvc repro`) or give the path of a trained model")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not (isinstance(blob, dict) and {"config", "state_dict"} <= blob.keys()):
        raise ModelFileError(
            f"{path} holds a {type(blob).__name__}, not a digitgen model (a dict of config and "
            "state_dict); give a model file written by `digitgen train`"
        )
    if "sha256" in blob and weights_checksum(blob["config"], blob["state_dict"]) != blob["sha256"]:
        raise ModelFileError(
            f"{path} is corrupt: its weights do not match the checksum saved with them; delete it "
            "and retrain (`dvc repro`) or fetch a good copy"
        )
    model = build_model(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()
