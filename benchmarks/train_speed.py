"""Training throughput of one configuration against this machine's fp32 matmul peak, beside a peer:
the training loop of pytorch/examples' `vae/main.py` on the same data and batch size.

    uv run python benchmarks/train_speed.py [--model cae] [--latent-dim 32] [--repeats 3] [--threads 2]

Trains on data/prepared (random pixels of the same size if the split stage has not run) with
params.yaml's batch size, learning rate and input modes. Each repeat measures the matmul peak, one
epoch of `digitgen.train.fit` (validation included) and one epoch of the peer (its test pass, over
our validation set, included) in turn, so that all three see the same load; the fastest of each counts.
FLOPs are the matmuls' as torch's FlopCounterMode counts them (forward, and backward with input
gradients only where needed); efficiency is achieved FLOP/s over the peak.

Each is timed twice: wall-clock seconds (what a run takes now), and this process's CPU seconds per
thread, which other programs sharing the cores inflate much less (the better estimate of a quiet
machine; it counts OpenMP threads' spin-waiting as work, so it flatters no one). Our epoch is timed
around the whole `fit` call: its one-time setup and the epoch's checkpoint are included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import training_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from digitgen.data import Digits
from digitgen.models import ModelConfig, build_model
from digitgen.params import INPUT_MODES, load_params
from digitgen.train import fit, mode_probabilities, validation_losses


@contextlib.contextmanager
def timed(seconds: dict[str, float]):
    """Keeps in `seconds` the fastest wall-clock and per-thread CPU time of the block over its runs."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    seconds["wall"] = min(seconds.get("wall", float("inf")), time.perf_counter() - wall)
    seconds["cpu"] = min(seconds.get("cpu", float("inf")), (time.process_time() - cpu) / torch.get_num_threads())


def matmul_seconds(seconds: dict[str, float], n: int = 2048, repeats: int = 10) -> int:
    """Times `repeats` n x n fp32 matmuls into `seconds`; returns the FLOPs of one."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b  # warm up
    for _ in range(repeats):
        with timed(seconds):
            a @ b
    return 2 * n**3


def counted_flops(work) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


class Quiet:
    def log_epoch(self, epoch, metrics):
        pass


def study_flops(config: ModelConfig, train: Digits, val: Digits, train_params) -> tuple[int, int]:
    """Matmul FLOPs of one epoch of `fit`: (training at the input modes' expected mix, validation)."""
    model = build_model(config)
    images, digits = train.float_images()[: train_params.batch_size], train.labels[: train_params.batch_size]
    per_batch = {
        mode: counted_flops(lambda mode=mode: model.loss(images, digits, mode).total.backward()) for mode in INPUT_MODES
    }
    training = sum(p * per_batch[mode] for mode, p in mode_probabilities(train_params.input_modes).items())
    validation = counted_flops(lambda: validation_losses(model, val.float_images(), val.labels, train_params, 0))
    return round(training * len(train) / train_params.batch_size), validation


def study_epoch(config: ModelConfig, train: Digits, val: Digits, train_params, checkpoint: Path) -> None:
    """One epoch of `fit` (validation and checkpoint included), from a freshly built model."""
    torch.manual_seed(0)
    model = build_model(config)
    fit(
        model,
        train,
        val,
        dataclasses.replace(train_params, epochs=1),
        0,
        Quiet(),
        checkpoint,
        None,
        torch.device("cpu"),
        "benchmark",
    )


class PeerVAE(nn.Module):
    """pytorch/examples vae/main.py's model: 784 -> 400 -> 20 (mu, log sigma^2) -> 400 -> 784."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x):
        h1 = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def peer_loss(recon, mu, logvar, x):
    """The example's classic loss: BCE summed over pixels and batch, plus the closed-form KL."""
    return F.binary_cross_entropy(recon, x, reduction="sum") - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def peer_train_step(model, optimizer, data) -> float:
    optimizer.zero_grad()
    loss = peer_loss(*model(data), data)
    loss.backward()
    optimizer.step()
    return loss.item()


def peer_epoch(train_loader: DataLoader, test_loader: DataLoader, lr: float) -> None:
    """One epoch of the example's train() then test() (its logging and image saving left out)."""
    torch.manual_seed(0)
    model = PeerVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for data, _ in train_loader:
        peer_train_step(model, optimizer, data)
    model.eval()
    with torch.no_grad():
        for data, _ in test_loader:
            peer_loss(*model(data), data).item()


def peer_flops(train_loader: DataLoader, test_loader: DataLoader, lr: float) -> tuple[int, int]:
    """Matmul FLOPs of one peer epoch: (training, test pass)."""
    model = PeerVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = next(iter(train_loader))[0]
    training = counted_flops(lambda: peer_train_step(model, optimizer, data)) * len(train_loader.dataset) / len(data)
    with torch.no_grad():
        test = counted_flops(lambda: [model(data) for data, _ in test_loader])
    return round(training), test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cae")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-peer", action="store_true", help="time only the study's model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = load_params("params.yaml")
    train, val = training_data(params)
    config = ModelConfig(args.model, args.latent_dim, params.model.hidden_dim)
    batch_size = params.train.batch_size
    train_loader = DataLoader(TensorDataset(train.float_images(), train.labels), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(val.float_images(), val.labels), batch_size=batch_size)

    ours_flops = study_flops(config, train, val, params.train)
    theirs_flops = peer_flops(train_loader, test_loader, params.train.lr)
    peak, ours, theirs = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="digitgen-benchmark-") as scratch:
        for _ in range(args.repeats):
            matmul_flops = matmul_seconds(peak)
            with timed(ours):
                study_epoch(config, train, val, params.train, Path(scratch) / "checkpoint.pt")
            if not args.no_peer:
                with timed(theirs):
                    peer_epoch(train_loader, test_loader, params.train.lr)

    print(
        f"threads {args.threads}; fastest of {args.repeats} repeats; an epoch is {len(train)} training images, "
        f"then {len(val)} validation"
    )
    print(
        f"matmul peak (fp32, 2048x2048): {matmul_flops / peak['wall'] / 1e9:.1f} GFLOP/s wall-clock, "
        f"{matmul_flops / peak['cpu'] / 1e9:.1f} GFLOP/s per CPU-second"
    )
    print(f"{'':34} {'GFLOP':>6} {'wall s':>7} {'of peak':>8} {'CPU s':>7} {'of peak':>8}")
    rows = [(f"digitgen {args.model}-{args.latent_dim} (fit)", ours, ours_flops)]
    if not args.no_peer:
        rows.append(("pytorch/examples vae (784-400-20)", theirs, theirs_flops))
    for name, seconds, (training, validation) in rows:
        flops = training + validation
        print(
            f"{name:34} {flops / 1e9:6.0f} "
            + " ".join(
                f"{seconds[clock]:7.2f} {flops / seconds[clock] / (matmul_flops / peak[clock]):8.0%}"
                for clock in ("wall", "cpu")
            )
        )
    if not args.no_peer:
        print(
            "efficiency, digitgen over the peer: "
            + ", ".join(
                f"{(sum(ours_flops) / ours[clock]) / (sum(theirs_flops) / theirs[clock]):.2f}x {clock}"
                for clock in ("wall", "cpu")
            )
        )


if __name__ == "__main__":
    main()
