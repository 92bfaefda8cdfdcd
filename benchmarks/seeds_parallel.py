"""Seeds one after another on all cores, or in parallel processes of fewer threads: which trains faster?

    uv run python benchmarks/seeds_parallel.py [--params params.yaml] [--model cae] [--latent-dim 32]
        [--epochs 1] [--seeds 2]

On C cores (os.sched_getaffinity: pin with `taskset -c 0,1` to measure a 2-core machine), trains --seeds
seeds for --epochs epochs in each layout: 1 process of C threads training the seeds one after another
(execution.executor: local), and P processes of C/P threads training them side by side (execution.executor:
processes, execution.workers: P, for each P up to the seeds that divides C; 3 seeds on 2 processes: 2, then 1).
Data: data/prepared, else random pixels of the params' sizes (pipelines/smoke/params.yaml: a smaller, quicker
set). The clock starts when every process has loaded torch and the data (a stage pays that start-up once, not
per epoch) and stops when the last seed's last epoch, validation
included, ends. Prints seconds per epoch-equivalent (wall time / seed-epochs) and the speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_data import training_data

from digitgen.models import ModelConfig, build_model
from digitgen.params import load_params
from digitgen.train import fit


class Quiet:
    def log_epoch(self, epoch, metrics):
        pass


def _worker(args, threads: int, seeds: list[int], start, seconds) -> None:
    torch.set_num_threads(threads)
    params = load_params(args.params)
    train_params = dataclasses.replace(params.train, epochs=args.epochs)
    train, val = training_data(params)
    start.wait()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # each process its own checkpoint path
        for seed in seeds:
            torch.manual_seed(seed)
            model = build_model(ModelConfig(args.model, args.latent_dim, params.model.hidden_dim))
            fit(
                model,
                train,
                val,
                train_params,
                seed,
                Quiet(),
                Path(tmp) / f"seed{seed}.pt",
                None,
                torch.device("cpu"),
                f"{threads} threads seed{seed}",
            )
    seconds.put(time.perf_counter() - started)


def layout_seconds(args, processes: int, cores: int) -> float:
    """Wall seconds for args.seeds seeds split over `processes` processes of cores/processes threads."""
    context = multiprocessing.get_context("spawn")
    start, seconds = context.Barrier(processes), context.Queue()
    seeds = list(range(args.seeds))
    children = [
        context.Process(target=_worker, args=(args, cores // processes, seeds[i::processes], start, seconds))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    wall = max(seconds.get() for _ in children)
    for child in children:
        child.join()
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="cae")
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    epochs = args.seeds * args.epochs
    print(f"{args.model}-{args.latent_dim}: {args.seeds} seeds x {args.epochs} epochs on {cores} cores")
    baseline = None
    for processes in [p for p in range(1, min(cores, args.seeds) + 1) if cores % p == 0]:
        wall = layout_seconds(args, processes, cores)
        baseline = baseline or wall
        print(
            f"{processes} process(es) x {cores // processes} thread(s): {wall:7.1f} s, "
            f"{wall / epochs:6.2f} s per epoch-equivalent, {baseline / wall:4.2f}x"
        )


if __name__ == "__main__":
    main()
