"""Training time per seed of the prior CVAE (pcvae) against the study's CVAE-32, measured side by side.

    uv run python benchmarks/pcvae_speed.py [--latent-dim 32] [--batches 60] [--rounds 3]

Both models take training steps (forward, backward, Adam) on the same batches of data/prepared/train.pt
(random pixels if the split stage has not run), in alternating rounds so that a machine shared with
other work slows both alike. Each is built and trained as params.yaml says (`model`/`train` for the CVAE,
`pcvae` for the prior CVAE). The per-seed time is the median seconds per batch x batches per epoch x
that section's epochs (validation, a small share of an epoch for both, is left out). The issue's bound:
at most 3x the CVAE-32's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from bench_data import training_data

from digitgen.models import build_model
from digitgen.params import INPUT_MODES, PCVAE, load_params
from digitgen.train import mode_probabilities, model_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--batches", type=int, default=60, help="timed training batches per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    params = load_params("params.yaml")
    train, _ = training_data(params)
    images, labels = train.float_images(), train.labels
    contenders = {kind: model_setup(params, kind, args.latent_dim) for kind in ("cvae", PCVAE)}
    models = {kind: build_model(config) for kind, (config, _) in contenders.items()}
    optimizers = {kind: torch.optim.Adam(m.parameters(), lr=contenders[kind][1].lr) for kind, m in models.items()}
    seconds = {kind: [] for kind in models}
    stream = torch.Generator().manual_seed(0)
    for _ in range(args.rounds):
        for kind, model in models.items():
            train_params = contenders[kind][1]
            probs = torch.tensor(list(mode_probabilities(train_params.input_modes).values()))
            modes = torch.multinomial(probs, args.batches + 1, replacement=True, generator=stream).tolist()
            for b, mode in enumerate(modes):
                if b == 1:  # the first batch warms up allocators and kernels
                    started = time.perf_counter()
                idx = torch.randint(0, len(labels), (train_params.batch_size,), generator=stream)
                losses = model.loss(images[idx], labels[idx], INPUT_MODES[mode])
                optimizers[kind].zero_grad(set_to_none=True)
                losses.total.backward()
                optimizers[kind].step()
            seconds[kind].append((time.perf_counter() - started) / args.batches)
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds of {args.batches} batches per model")
    per_seed = {}
    for kind, per_batch in seconds.items():
        train_params = contenders[kind][1]
        batches_per_epoch = math.ceil(len(labels) / train_params.batch_size)
        median = statistics.median(per_batch)
        per_seed[kind] = median * batches_per_epoch * train_params.epochs
        print(
            f"{kind}-{args.latent_dim:<4} {median * 1000:7.1f} ms/batch  {median * batches_per_epoch:7.1f} s/epoch  "
            f"x {train_params.epochs} epochs = {per_seed[kind] / 60:6.1f} min/seed  "
            f"({per_seed[kind] / per_seed['cvae']:.2f}x CVAE-{args.latent_dim})"
        )


if __name__ == "__main__":
    main()
