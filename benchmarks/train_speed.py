"""Training throughput of one configuration against this machine's fp32 matmul peak.

    uv run python benchmarks/train_speed.py [--model cae] [--latent-dim 32] [--epochs 1]

Trains on data/prepared/train.pt (random pixels of the same size if the split stage has not run)
with params.yaml's batch size, learning rate and input modes, and prints samples/s, seconds per
epoch, achieved GFLOP/s and the fraction of the peak measured by a large matmul.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from torch import nn

from digitgen.data import Digits, load_split
from digitgen.models import ModelConfig, build_model
from digitgen.params import load_params
from digitgen.train import fit, mode_probabilities, validation_losses


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n**3 / (time.perf_counter() - started)


def flops_per_sample(model, probs: dict[str, float]) -> float:
    """Forward + backward (about 3x forward) FLOPs of one training sample, averaged over input modes."""
    def linear_flops(module: nn.Module) -> float:
        return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

    total = linear_flops(model)
    skipped = {"image_digit": 0.0, "image": linear_flops(model.encoder.digit_path),
               "digit": linear_flops(model.encoder.image_path)}
    return 3 * sum(p * (total - skipped[mode]) for mode, p in probs.items())


class Quiet:
    def log_epoch(self, epoch, metrics):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="cae")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    params = load_params("params.yaml")
    train_params = dataclasses.replace(params.train, epochs=args.epochs)
    if Path("data/prepared/train.pt").is_file():
        train, val = load_split("data/prepared", "train"), load_split("data/prepared", "val")
    else:
        train = Digits(torch.randint(0, 256, (params.data.train_size, 28, 28), dtype=torch.uint8),
                       torch.randint(0, 10, (params.data.train_size,)))
        val = Digits(train.images[: params.data.val_size], train.labels[: params.data.val_size])
    model = build_model(ModelConfig(args.model, args.latent_dim, params.model.hidden_dim))
    peak = matmul_peak()
    history = fit(model, train, val, train_params, 0, Quiet(), Path("/tmp/digitgen-benchmark.pt"), None,
                  torch.device("cpu"), f"{args.model}-{args.latent_dim}")
    # time of the training pass alone: epoch_seconds minus the validation pass, measured separately
    started = time.perf_counter()
    validation_losses(model, val.float_images(), val.labels, train_params, 0)
    val_seconds = time.perf_counter() - started
    epoch_seconds = min(row["epoch_seconds"] for row in history) - val_seconds
    achieved = flops_per_sample(model, mode_probabilities(train_params.input_modes)) * len(train) / epoch_seconds
    print(f"threads               {torch.get_num_threads()}")
    print(f"matmul peak           {peak / 1e9:.1f} GFLOP/s (fp32, 2048x2048)")
    print(f"training epoch        {epoch_seconds:.2f} s for {len(train)} samples "
          f"(+ {val_seconds:.2f} s validation over {len(val)})")
    print(f"throughput            {len(train) / epoch_seconds:,.0f} samples/s")
    print(f"achieved              {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of peak")


if __name__ == "__main__":
    main()
