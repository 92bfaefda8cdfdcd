"""The study's joint models, the Conditional Autoencoder (CAE) and Conditional VAE (CVAE), and the
label-conditioned CVAE.

Both read an image, a digit, or both, and write both an image and a digit:

    image (784) -> FC 512 -> ReLU -> FC 512 -> ReLU --\
                                                      (+) -> latent -> FC 512 -> ReLU -> FC 512 -> ReLU -> FC 784 -> sigmoid (image)
    digit (10)  -> FC 512 -> ReLU -> FC 512 -> ReLU --/                                                -> FC 10 -> log-softmax (digit)

The CAE projects the fused vector to the latent with one FC layer; the CVAE projects it to mu and
log sigma^2 and samples z = mu + sigma * eps. An absent input adds nothing to the fused sum, which
is what the study's random input modes (image+digit, image only, digit only) rely on.

The label-conditioned CVAE (reference: label_conditioned_cvae.md) is the classic CVAE, where both
sides see the one-hot label, so the latent is left to carry the handwriting style:

    [image (784), digit (10)] -> FC 512 -> ReLU -> FC 256 -> ReLU -> mu, log sigma^2 (latent_dim 2)
    [z, digit (10)]           -> FC 256 -> ReLU -> FC 512 -> ReLU -> FC 784 -> sigmoid (image)

Every model answers the same inference calls (`generate`, `reconstruct`, `encode`, `classify`), so
evaluation and the API need not know which one they hold; a call a model cannot answer raises
`UnsupportedTask`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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
    for in_dim, out_dim in zip(widths, widths[1:]):
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
        if images is None and digits is None:
            raise ValueError("the encoder needs an image, a digit, or both")
        fused = 0
        if images is not None:
            fused = fused + self.image_path(images)
        if digits is not None:
            fused = fused + self.digit_path(_one_hot(digits, self.digit_path[0].weight))
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
        return self.decode(reparameterize(mu, logvar, noise))

    def decode(self, z: torch.Tensor, digits: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N x 784 in [0, 1]) from latents; the digit is in z, so `digits` is not needed."""
        return self.decoder(z)[0].sigmoid()

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
        raise UnsupportedTask("the label CVAE cannot classify: it predicts no digit and needs the label to encode an "
                              "image; report classification accuracy as not applicable")

    def reconstruct(self, images: torch.Tensor, digits: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """(images N x 784 in [0, 1], None): decoded from the posterior mean; the label is required, and
        there are no digit log-probabilities because this model predicts no digit."""
        return self.decoder(self.encode(images, digits)[0], digits).sigmoid(), None


Model = JointAutoencoder | LabelCVAE
# Loss terms a kind does not have (its Losses hold a constant 0 there): the CAE has no KL, the label CVAE no digit NLL
ABSENT_TERMS: dict[str, tuple[str, ...]] = {"cae": ("kl",), "cvae": (), "label_cvae": ("nll",)}
MODELS: dict[str, type[Model]] = {"cae": CAE, "cvae": CVAE, "label_cvae": LabelCVAE}


def resolve_device(name: str) -> torch.device:
    """The device a stage's `device` param names (auto: CUDA when present, else CPU), refused when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    present = {"cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
               "mps": torch.backends.mps.is_available()}.get(device.type, True)
    if not present:
        raise DigitgenError(f"device {name} is not on this machine (torch sees {torch.cuda.device_count()} CUDA "
                            "GPUs); set the stage's device to auto or cpu in params.yaml (or pass --device cpu)")
    return device


def build_model(config: ModelConfig) -> Model:
    if config.kind not in MODELS:
        raise ValueError(f"unknown model kind {config.kind!r}; expected one of {', '.join(MODELS)}")
    return MODELS[config.kind](config)


class ModelNotFoundError(DigitgenError):
    """A model file that is not there; the message names it and how to make it."""


class ModelFileError(DigitgenError):
    """A model file that is there but is not a whole digitgen model; the message names it and the fix."""


def save_model(model: Model, path: Path) -> None:
    """Weights, the config that rebuilds them and their checksum, written atomically; loadable with
    torch.load(weights_only=True)."""
    config, state_dict = asdict(model.config), model.state_dict()
    save_torch({"config": config, "state_dict": state_dict, "sha256": weights_checksum(config, state_dict)}, path)


def load_model(path: Path, map_location: str | torch.device = "cpu") -> Model:
    """The model saved at `path`; a file whose weights no longer match their checksum is refused.

    (Files written before checksums were saved, which have none, load unchecked.)
    """
    if not Path(path).is_file():
        raise ModelNotFoundError(f"{path} not found; train it first (`dvc repro`) or give the path of a trained model")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not (isinstance(blob, dict) and {"config", "state_dict"} <= blob.keys()):
        raise ModelFileError(f"{path} holds a {type(blob).__name__}, not a digitgen model (a dict of config and "
                             "state_dict); give a model file written by `digitgen train`")
    if "sha256" in blob and weights_checksum(blob["config"], blob["state_dict"]) != blob["sha256"]:
        raise ModelFileError(f"{path} is corrupt: its weights do not match the checksum saved with them; delete it "
                             "and retrain (`dvc repro`) or fetch a good copy")
    model = build_model(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()
