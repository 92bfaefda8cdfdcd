"""The CVAE's reconstruction error and classification accuracy with the latent mean (the pipeline's
metrics) and with z sampled once per test image (z = mu + sigma * eps), per latent size, mean over seeds.

    uv run python benchmarks/cvae_sampled_latent.py [--models models] [--data data/prepared]

Reads the trained models of `dvc repro` (models/cvae-<d>/seed<k>.pt). The question it answers: does the
study evaluate its CVAE with a sampled latent? (docs/results.md, "Where we agree with the paper and where we
differ".)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from digitgen.data import load_split
from digitgen.models import load_model


@torch.no_grad()
def scores(model, images: torch.Tensor, labels: torch.Tensor, sample: bool) -> tuple[float, float]:
    """(reconstruction error from image+digit, classification accuracy from the image alone)."""
    logits = model(images, labels, sample=sample).image_logits
    error = F.binary_cross_entropy_with_logits(logits, images, reduction="none").sum(1).mean().item()
    accuracy = (model(images, None, sample=sample).digit_log_probs.argmax(1) == labels).float().mean().item()
    return error, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    args = parser.parse_args()
    test = load_split(args.data, "test")
    images, labels = test.float_images().reshape(len(test.labels), -1), test.labels
    torch.manual_seed(0)
    print("config     seeds  recon(mean z)  recon(sampled z)  class acc(mean z)  class acc(sampled z)")
    for folder in sorted(args.models.glob("cvae-*"), key=lambda p: int(p.name.split("-")[1])):
        models = [load_model(p).eval() for p in sorted(folder.glob("seed*.pt"))]
        mean_z = torch.tensor([scores(m, images, labels, sample=False) for m in models]).mean(0)
        sampled_z = torch.tensor([scores(m, images, labels, sample=True) for m in models]).mean(0)
        print(
            f"{folder.name:10} {len(models):5}  {mean_z[0]:13.2f}  {sampled_z[0]:16.2f}  {mean_z[1]:17.4f}  "
            f"{sampled_z[1]:20.4f}"
        )


if __name__ == "__main__":
    main()
