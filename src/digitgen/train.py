"""One training loop for every model: input modes, validation, checkpoints, history.

Stage `train` (one configuration, every seed). Each finished epoch is checkpointed beside the
outputs (weights, optimiser, random states, history, MLflow run id), so an interrupted stage resumes
from the last completed epoch and reaches the same weights it would have reached uninterrupted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from digitgen import figures, tracking
from digitgen.data import Digits, load_split, md5sum
from digitgen.models import JointAutoencoder, ModelConfig, build_model, save_model
from digitgen.params import INPUT_MODES, Params, TrainParams

class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def mode_probabilities(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {mode: weights.get(mode, 0.0) / total for mode in INPUT_MODES}


def _sum_losses(model: JointAutoencoder, images, digits, mode, batch_size) -> torch.Tensor:
    """Sum over the set of each loss term (total, bce, nll, kl), fed in `mode`."""
    sums = torch.zeros(4, device=images.device)
    for start in range(0, len(digits), batch_size):
        losses = model.loss(images[start : start + batch_size], digits[start : start + batch_size], mode)
        sums += torch.stack(losses) * len(digits[start : start + batch_size])
    return sums


@torch.no_grad()
def validation_losses(model: JointAutoencoder, images, digits, params: TrainParams, seed: int) -> dict[str, float]:
    """Each loss term on the validation set, averaged over input modes by their training probabilities.

    That is the expected value of the training objective, without the noise of a random draw. CVAE
    sampling noise is fixed by `seed` and kept apart from the training random stream.
    """
    model.eval()
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        expected = sum(p * _sum_losses(model, images, digits, mode, 1024)
                       for mode, p in mode_probabilities(params.input_modes).items() if p > 0)
    model.train()
    return {f"val_{term}": v for term, v in zip(figures.LOSS_TERMS, (expected / len(digits)).tolist())}


def fit(model: JointAutoencoder, train: Digits, val: Digits, params: TrainParams, seed: int,
        logger: EpochLogger, checkpoint: Path, state: dict | None, device: torch.device,
        label: str) -> list[dict[str, float]]:
    """Train from `state` (a checkpoint, or None for epoch 0) to params.epochs, checkpointing each epoch."""
    x_train, y_train = train.float_images().to(device), train.labels.to(device)
    x_val, y_val = val.float_images().to(device), val.labels.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    stream = torch.Generator().manual_seed(seed)  # shuffling and input-mode draws
    history: list[dict[str, float]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        stream.set_state(state["stream"])
        torch.set_rng_state(state["rng"])
        history = state["history"]
    probs = torch.tensor(list(mode_probabilities(params.input_modes).values()))
    n_batches = (len(y_train) + params.batch_size - 1) // params.batch_size
    model.train()
    for epoch in range(len(history) + 1, params.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(y_train), generator=stream).to(device)
        modes = torch.multinomial(probs, n_batches, replacement=True, generator=stream).tolist()
        sums = torch.zeros(4, device=device)
        bar = tqdm(total=n_batches, desc=f"{label} epoch {epoch}/{params.epochs}", leave=False,
                   disable=not sys.stderr.isatty())
        for b, mode in enumerate(modes):
            idx = order[b * params.batch_size : (b + 1) * params.batch_size]
            losses = model.loss(x_train[idx], y_train[idx], INPUT_MODES[mode])
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            sums += torch.stack(losses).detach() * len(idx)
            bar.update()
        bar.close()
        row = {"epoch": epoch, **{f"train_{t}": v for t, v in zip(figures.LOSS_TERMS, (sums / len(y_train)).tolist())}}
        row.update(validation_losses(model, x_val, y_val, params, seed))
        row["epoch_seconds"] = time.perf_counter() - started
        history.append(row)
        logger.log_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
        _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "stream": stream.get_state(),
                      "rng": torch.get_rng_state(), "history": history, "run_id": getattr(logger, "run_id", None),
                      "done": False}, checkpoint)
        tqdm.write(f"{label} epoch {epoch}/{params.epochs}: train_loss {row['train_loss']:.2f} "
                   f"val_loss {row['val_loss']:.2f} ({row['epoch_seconds']:.1f} s)", file=sys.stderr)
    return history


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def write_history(rows: list[dict[str, float]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def config_name(kind: str, latent_dim: int) -> str:
    return f"{kind}-{latent_dim}"


def _fingerprint(config: ModelConfig, params: TrainParams, prepared_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the model, the training params and the data."""
    blob = {"config": asdict(config), "train": asdict(params),
            "data": [md5sum(prepared_dir / f"{s}.pt") for s in ("train", "val")]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _run_params(params: Params, config: ModelConfig) -> dict:
    return {"model": asdict(config), "train": {k: v for k, v in asdict(params.train).items() if k != "seeds"},
            "data": {k: v for k, v in asdict(params.data).items() if k != "mirrors"}}


def run_train(params: Params, kind: str, latent_dim: int, prepared_dir: Path, out_dir: Path,
              history_dir: Path, checkpoint_dir: Path, device: str | None = None) -> dict:
    """Stage `train`: every seed of one configuration; returns the MLflow run ids it wrote to runs.json."""
    prepared_dir, out_dir, history_dir, checkpoint_dir = map(Path, (prepared_dir, out_dir, history_dir, checkpoint_dir))
    config = ModelConfig(kind=kind, latent_dim=latent_dim, hidden_dim=params.model.hidden_dim)
    name = config_name(kind, latent_dim)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    dev = resolve_device(device or params.train.device)

    fingerprint = _fingerprint(config, params.train, prepared_dir)
    state_file = checkpoint_dir / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("fingerprint") != fingerprint:
        if state:
            print(f"{name}: checkpoints in {checkpoint_dir} are for other params or data; starting afresh", file=sys.stderr)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        state = {"fingerprint": fingerprint}
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    tags = {"model": kind, "latent_dim": str(latent_dim)}
    run_params = _run_params(params, config)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with tracking.config_run(params.tracking.experiment, name, state.get("parent_run_id"), run_params, tags) as parent:
            state["parent_run_id"] = parent.run_id
            state_file.write_text(json.dumps(state))
            seed_runs = {}
            for seed in params.train.seeds:
                checkpoint = checkpoint_dir / f"seed{seed}.pt"
                saved = torch.load(checkpoint, weights_only=True) if checkpoint.is_file() else None
                torch.manual_seed(seed)
                model = build_model(config).to(dev)
                if saved is not None and saved["done"]:
                    model.load_state_dict(saved["model"])
                    history, run_id = saved["history"], saved["run_id"]
                else:
                    with parent.seed_run(f"{name}/seed{seed}", seed, saved and saved["run_id"], run_params, tags) as run:
                        history = fit(model, train, val, params.train, seed, run, checkpoint, saved, dev,
                                      f"{name} seed{seed}")
                        _log_seed_artifacts(model, history, val, name, seed)
                        run_id = run.run_id
                    saved = torch.load(checkpoint, weights_only=True)
                    _atomic_save({**saved, "done": True}, checkpoint)
                save_model(model.cpu(), out_dir / f"seed{seed}.pt")
                write_history(history, history_dir / f"seed{seed}.csv")
                seed_runs[str(seed)] = run_id
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    runs = {"experiment": params.tracking.experiment, "tracking_uri": tracking.tracking_uri(),
            "parent_run_id": state["parent_run_id"], "seed_run_ids": seed_runs}
    (out_dir / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    shutil.rmtree(checkpoint_dir)
    return runs


@torch.no_grad()
def _log_seed_artifacts(model: JointAutoencoder, history, val: Digits, name: str, seed: int) -> None:
    model = model.cpu().eval()
    originals = val.float_images()[:10]
    reconstructions, _ = model.reconstruct(originals, val.labels[:10])
    generated = model.generate(torch.arange(10).repeat_interleave(10))
    tracking.log_seed_artifacts(
        {"loss_curves.png": figures.loss_curves({f"seed{seed}": history}, title=name),
         "reconstructions.png": figures.digit_grid(torch.cat([originals, reconstructions]), nrow=10,
                                                   title="originals (top), reconstructions (bottom)"),
         "generations.png": figures.digit_grid(generated, nrow=10, title="generated from digits 0-9 (one row each)")},
        model, originals, val.labels[:10])
    model.train()
