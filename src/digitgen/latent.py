"""Stage `label_cvae_figures`: what the label-conditioned CVAE's latent holds, in four pictures.

- style_vs_identity.png: a test image of each digit is encoded with its label and that z is decoded
  with all ten labels: the label sets which digit is written, z how it is written.
- latent_scatter.png: the test set's latent means coloured by digit. Since the decoder is told the
  digit, z need not encode it: the digits overlap instead of forming clusters.
- latent_plane.png: one digit decoded over a grid of the first two latent axes.
- samples.png: each digit in varied styles, z ~ N(0, I).
"""

from __future__ import annotations

from pathlib import Path

import torch

from digitgen import figures
from digitgen.data import Digits, load_split
from digitgen.models import NUM_DIGITS, LabelCVAE, UnsupportedTask, load_model
from digitgen.params import LatentFigureParams


@torch.no_grad()
def style_vs_identity(model: LabelCVAE, images: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    """(N * 10) x 784: row i is image i's z (its posterior mean, given its own label) decoded as 0, 1, ..., 9."""
    mu, _ = model.encode(images, digits)
    return model.generate(torch.arange(NUM_DIGITS).repeat(len(mu)), noise=mu.repeat_interleave(NUM_DIGITS, dim=0))


@torch.no_grad()
def latent_plane(model: LabelCVAE, digit: int, size: int, extent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`digit` decoded on a size x size grid over [-extent, extent]^2 of the first two latent axes (any
    further axes at 0, the prior's mean), laid out as on a plot: z1 grows to the right, z2 upwards.
    Returns the images, row by row, and the grid's values along an axis."""
    values = torch.linspace(-extent, extent, size)
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")
    z = torch.zeros(size * size, model.config.latent_dim)
    z[:, 0], z[:, 1] = z1.flatten(), z2.flatten()
    return model.generate(torch.full((size * size,), digit), noise=z), values


@torch.no_grad()
def samples(model: LabelCVAE, per_digit: int, seed: int) -> torch.Tensor:
    """(10 * per_digit) x 784: per_digit images of each digit 0-9, each with its own z ~ N(0, I), drawn from `seed`."""
    noise = torch.randn(NUM_DIGITS * per_digit, model.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    return model.generate(torch.arange(NUM_DIGITS).repeat_interleave(per_digit), noise=noise)


def first_of_each_digit(digits: Digits) -> torch.Tensor:
    """Indices of the first image of each digit 0-9."""
    return torch.stack([(digits.labels == d).nonzero()[0, 0] for d in range(NUM_DIGITS)])


def run_label_cvae_figures(
    params: LatentFigureParams, models_dir: Path, prepared_dir: Path, out_dir: Path
) -> list[Path]:
    """Stage `label_cvae_figures`: the four PNGs from the model of seed params.seed, on the test set."""
    path = Path(models_dir) / f"seed{params.seed}.pt"
    model = load_model(path)
    if not isinstance(model, LabelCVAE):
        raise UnsupportedTask(
            f"{path} holds a {model.config.kind} model; these figures are the label CVAE's "
            "(models/label_cvae-<latent_dim>)"
        )
    test = load_split(prepared_dir, "test")
    images, labels = test.float_images(), test.labels
    with torch.no_grad():
        mu, _ = model.encode(images, labels)

    picked = first_of_each_digit(test)
    transfers = style_vs_identity(model, images[picked], labels[picked]).reshape(NUM_DIGITS, NUM_DIGITS, -1)
    table = torch.cat([images[picked].unsqueeze(1), transfers], dim=1)  # input, then its z as 0-9
    plane, values = latent_plane(model, params.plane_digit, params.plane_size, params.plane_extent)
    ticks = [f"{round(v, 1) + 0.0:.1f}" for v in values.tolist()]  # + 0.0 turns -0.0 into 0.0
    out_dir = Path(out_dir)
    return [
        figures.save(
            figures.digit_grid(
                table,
                nrow=NUM_DIGITS + 1,
                col_labels=["input", *map(str, range(NUM_DIGITS))],
                xlabel="decoded as",
                title="style vs identity: each input's z (encoded with its label) decoded with every label",
            ),
            out_dir / "style_vs_identity.png",
        ),
        figures.save(
            figures.latent_scatter(
                mu[:, :2], labels, title=f"latent means of the {len(labels)} test images (encoded with their labels)"
            ),
            out_dir / "latent_scatter.png",
        ),
        figures.save(
            figures.digit_grid(
                plane,
                nrow=params.plane_size,
                col_labels=ticks,
                row_labels=ticks[::-1],
                xlabel="z1",
                ylabel="z2",
                title=f"digit {params.plane_digit} decoded over the latent plane",
            ),
            out_dir / "latent_plane.png",
        ),
        figures.save(
            figures.digit_grid(
                samples(model, params.samples_per_digit, params.noise_seed),
                nrow=params.samples_per_digit,
                row_labels=list(map(str, range(NUM_DIGITS))),
                ylabel="digit",
                title="each digit in varied styles, z ~ N(0, I)",
            ),
            out_dir / "samples.png",
        ),
    ]
