"""The study's joint models: the Conditional Autoencoder (CAE) and Conditional VAE (CVAE).

Both read an image, a digit, or both, and write both an image and a digit:

    image (784) -> FC 512 -> ReLU -> FC 512 -> ReLU --\
                                                      (+) -> latent -> FC 512 -> ReLU -> FC 512 -> ReLU -> FC 784 -> sigmoid (image)
    digit (10)  -> FC 512 -> ReLU -> FC 512 -> ReLU --/                                                -> FC 10 -> log-softmax (digit)

The CAE projects the fused vector to the latent with one FC layer; the CVAE projects it to mu and
log sigma^2 and samples z = mu + sigma * eps. An absent input adds nothing to the fused sum, which
is what the study's random input modes (image+digit, image only, digit only) rely on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_DIM = 28 * 28
NUM_DIGITS = 10


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: stored with its weights."""

    kind: str  # "cae" or "cvae"
    latent_dim: int
    hidden_dim: int = 512


class Output(NamedTuple):
    image_logits: torch.Tensor  # N x 784, before the sigmoid (BCE is computed from logits for stability)
    digit_log_probs: torch.Tensor  # N x 10, log-softmax
    z: torch.Tensor  # N x latent_dim, the latent the decoder saw
    mu: torch.Tensor | None = None  # CVAE only
    logvar: torch.Tensor | None = None  # CVAE only


class Losses(NamedTuple):
    """Per-sample losses averaged over the batch, each term as the study writes it."""

    total: torch.Tensor
    bce: torch.Tensor  # binary cross-entropy summed over the 784 pixels
    nll: torch.Tensor  # negative log-likelihood of the true digit
    kl: torch.Tensor  # KL(q(z|x,y) || N(0, I)); 0 for the CAE


def _pathway(in_dim: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())


class Encoder(nn.Module):
    """Two pathways, image and digit, fused by element-wise addition."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.image_path = _pathway(IMAGE_DIM, hidden_dim)
        self.digit_path = _pathway(NUM_DIGITS, hidden_dim)

    def forward(self, images: torch.Tensor | None, digits: torch.Tensor | None) -> torch.Tensor:
        if images is None and digits is None:
            raise ValueError("the encoder needs an image, a digit, or both")
        fused = 0
        if images is not None:
            fused = fused + self.image_path(images)
        if digits is not None:
            fused = fused + self.digit_path(F.one_hot(digits, NUM_DIGITS).to(self.digit_path[0].weight.dtype))
        return fused


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

    @staticmethod
    def latent(mu: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
        """z = mu + sigma * noise (the reparameterisation); noise=None means z = mu."""
        if logvar is None or noise is None:
            return mu
        return mu + torch.exp(0.5 * logvar) * noise

    def forward(self, images: torch.Tensor | None, digits: torch.Tensor | None, sample: bool = True) -> Output:
        """images: N x 784 floats in [0, 1] or None; digits: N int labels or None."""
        mu, logvar = self.encode(images, digits)
        z = self.latent(mu, logvar, torch.randn_like(mu) if sample else None)
        image_logits, digit_log_probs = self.decoder(z)
        return Output(image_logits, digit_log_probs, z, mu if logvar is not None else None, logvar)

    def loss(self, images: torch.Tensor, digits: torch.Tensor, input_mode: str) -> Losses:
        """The study's loss for one batch fed in `input_mode`; targets are always the full pair."""
        out = self(images if input_mode != "digit" else None, digits if input_mode != "image" else None)
        return self.losses(out, images, digits)

    @staticmethod
    def losses(out: Output, images: torch.Tensor, digits: torch.Tensor) -> Losses:
        bce = F.binary_cross_entropy_with_logits(out.image_logits, images, reduction="none").sum(1).mean()
        nll = F.nll_loss(out.digit_log_probs, digits)
        kl = kl_divergence(out.mu, out.logvar).mean() if out.mu is not None else torch.zeros((), device=bce.device)
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
        return self.decoder(self.latent(mu, logvar, noise))[0].sigmoid()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Digit log-probabilities (N x 10) from images alone."""
        return self.decoder(self.encode(images, None)[0])[1]

    def reconstruct(self, images: torch.Tensor, digits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample, in closed form: -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)


MODELS: dict[str, type[JointAutoencoder]] = {"cae": CAE, "cvae": CVAE}


def build_model(config: ModelConfig) -> JointAutoencoder:
    if config.kind not in MODELS:
        raise ValueError(f"unknown model kind {config.kind!r}; expected one of {', '.join(MODELS)}")
    return MODELS[config.kind](config)


def save_model(model: JointAutoencoder, path: Path) -> None:
    """Weights plus the config that rebuilds them; loadable with torch.load(weights_only=True)."""
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, path)


def load_model(path: Path, map_location: str | torch.device = "cpu") -> JointAutoencoder:
    blob = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()
