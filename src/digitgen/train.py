"""One training loop for every model: input modes, validation, checkpoints, history.

Stages `train` (one configuration of the study, every seed) and `train_label_cvae` (the same for the
label-conditioned CVAE, which reads its own params section). Each finished epoch is checkpointed beside the
outputs (weights, optimiser, random states, history, MLflow run id), so an interrupted stage resumes
from the last completed epoch and reaches the same weights it would have reached uninterrupted.

What the stage writes for DVC to cache (models/<config>/seed<s>.pt, histories/<config>/seed<s>.csv) is a
function of code, params, data and machine alone: no run ids, paths or timings, so retraining with
nothing changed gives the same hashes and evaluation does not rerun. Timings and run ids go to MLflow;
the seed run is found again by the md5 of its model file (tracking.MODEL_MD5_TAG).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from digitgen import figures, files, tracking
from digitgen.data import Digits, load_split, md5sum
from digitgen.models import LabelCVAE, Model, ModelConfig, build_model, save_model
from digitgen.params import (BEYOND_KINDS, INPUT_MODES, LABEL_CVAE, DigitgenError, Params, TrainParams, config_name,
                             train_section)

class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


class DivergenceError(DigitgenError):
    """Training that blew up (a NaN, or a loss past max_loss); the message names the run, the epoch and the fix."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    present = {"cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
               "mps": torch.backends.mps.is_available()}.get(device.type, True)
    if not present:
        raise DigitgenError(f"device {name} is not on this machine (torch sees {torch.cuda.device_count()} CUDA "
                            "GPUs); set the stage's device to auto or cpu in params.yaml (or pass --device cpu)")
    return device


def mode_probabilities(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {mode: weights.get(mode, 0.0) / total for mode in INPUT_MODES}


def _sum_losses(model: Model, images, digits, mode, batch_size) -> torch.Tensor:
    """Sum over the set of each loss term (total, bce, nll, kl), fed in `mode`."""
    sums = torch.zeros(4, device=images.device)
    for start in range(0, len(digits), batch_size):
        losses = model.loss(images[start : start + batch_size], digits[start : start + batch_size], mode)
        sums += torch.stack(losses) * len(digits[start : start + batch_size])
    return sums


@torch.no_grad()
def validation_losses(model: Model, images, digits, params: TrainParams, seed: int) -> dict[str, float]:
    """Each loss term on the validation set, averaged over input modes by their training probabilities,
    and the digit head's accuracy from the image alone (val_accuracy; the study's classification condition).

    The losses are the expected value of the training objective, without the noise of a random draw. CVAE
    sampling noise is fixed by `seed` and kept apart from the training random stream. val_bce and
    val_accuracy compare like for like across the families; val_loss holds the CVAE's KL term too.
    """
    model.eval()
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        expected = sum(p * _sum_losses(model, images, digits, mode, 1024)
                       for mode, p in mode_probabilities(params.input_modes).items() if p > 0)
    metrics = {f"val_{term}": v for term, v in zip(figures.LOSS_TERMS, (expected / len(digits)).tolist())}
    if not isinstance(model, LabelCVAE):  # the label CVAE has no digit head
        correct = sum((model.classify(images[start : start + 1024]).argmax(1) == digits[start : start + 1024]).sum()
                      for start in range(0, len(digits), 1024))
        metrics["val_accuracy"] = correct.item() / len(digits)
    model.train()
    return metrics


def fit(model: Model, train: Digits, val: Digits, params: TrainParams, seed: int,
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
        _check_divergence(model, row, params, label, epoch)
        history.append(row)
        logger.log_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
        files.save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "stream": stream.get_state(), "rng": torch.get_rng_state(), "history": history,
                          "run_id": getattr(logger, "run_id", None), "done": False}, checkpoint)
        tqdm.write(f"{label} epoch {epoch}/{params.epochs}: train_loss {row['train_loss']:.2f} "
                   f"val_loss {row['val_loss']:.2f} ({row['epoch_seconds']:.1f} s)", file=sys.stderr)
    return history


def _check_divergence(model: Model, row: dict[str, float], params: TrainParams, label: str, epoch: int) -> None:
    """Stop (before the epoch is checkpointed) when a loss is NaN or past max_loss, or a weight is not finite."""
    section = train_section(model.config.kind)
    for key in ("train_loss", "val_loss"):
        if not math.isfinite(row[key]) or row[key] > params.max_loss:
            problem = f"{key} {row[key]:.3g} (limit: {section}.max_loss {params.max_loss:g})"
            break
    else:
        if all(torch.isfinite(p).all() for p in model.parameters()):
            return
        problem = "weights became NaN or infinite"
    raise DivergenceError(f"{label} diverged at epoch {epoch}: {problem}; lower {section}.lr (now {params.lr:g}) "
                          "and run again")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # Linux prctl(2): the signal this process gets when its parent dies


def _raise_keyboard_interrupt(signum, frame):
    for stop in STOP_SIGNALS:  # a second signal must not interrupt the cleanup (checkpoint kept, run marked KILLED)
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _stopped_by_signals():
    """Ctrl-C, SIGTERM and SIGHUP (unless ignored, as under nohup) end training as KeyboardInterrupt.

    Under DVC (Linux) the trainer also gets SIGTERM when its dvc process dies, so `kill <dvc pid>` never
    leaves an orphaned trainer writing to the checkpoints.
    """
    previous = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    for stop, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(stop, _raise_keyboard_interrupt)
    with_parent = sys.platform == "linux" and bool(os.environ.get("DVC_STAGE"))
    if with_parent:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    try:
        yield
    finally:
        if with_parent:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 0)
        for stop, handler in previous.items():
            signal.signal(stop, handler)


TIMINGS = ("epoch_seconds",)  # history columns that differ run to run: logged, never cached


def write_history(rows: list[dict[str, float]], path: Path) -> None:
    """The learning curves, DVC-cached: every column but the timings (those go to MLflow only)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[k for k in rows[0] if k not in TIMINGS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomic(path, text.getvalue())


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def model_setup(params: Params, kind: str, latent_dim: int) -> tuple[ModelConfig, TrainParams]:
    """What `kind` is built and trained with: the study's `model` and `train` sections, or `label_cvae`'s or
    `beyond`'s own."""
    if kind == LABEL_CVAE:
        return ModelConfig(kind, latent_dim, hidden_dims=tuple(params.label_cvae.hidden_dims)), params.label_cvae.train
    if kind in BEYOND_KINDS:
        beyond = params.beyond
        batches_per_epoch = math.ceil(params.data.train_size / beyond.train.batch_size)
        return ModelConfig(kind, latent_dim, hidden_dim=beyond.hidden_dim, channels=tuple(beyond.channels),
                           label_weight=beyond.label_weight, prior_rate=beyond.prior_rate,
                           kl_warmup_batches=round(beyond.kl_warmup_epochs * batches_per_epoch)), beyond.train
    return ModelConfig(kind, latent_dim, hidden_dim=params.model.hidden_dim), params.train


def _fingerprint(config: ModelConfig, params: TrainParams, prepared_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the model, the training params and the data."""
    blob = {"config": asdict(config), "train": asdict(params),
            "data": [md5sum(prepared_dir / f"{s}.pt") for s in ("train", "val")]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _run_params(params: Params, config: ModelConfig, train_params: TrainParams) -> dict:
    return {"model": asdict(config), "train": {k: v for k, v in asdict(train_params).items() if k != "seeds"},
            "data": {k: v for k, v in asdict(params.data).items() if k != "mirrors"}}


def run_train(params: Params, kind: str, latent_dim: int, prepared_dir: Path, out_dir: Path,
              history_dir: Path, checkpoint_dir: Path, device: str | None = None,
              seeds: list[int] | None = None) -> dict:
    """Stages `train` and `train_label_cvae`: every seed (params', or `seeds`) of one configuration;
    returns the MLflow run ids: {"parent_run_id": ..., "seed_run_ids": {seed: ...}}.

    The trainer owns checkpoint_dir while it runs (a second trainer stops at once, naming this one's
    PID) and stops on Ctrl-C, SIGTERM or SIGHUP keeping its last finished epoch.
    """
    with files.folder_lock(Path(checkpoint_dir), "trainer"), _stopped_by_signals():
        return _train_configuration(params, kind, latent_dim, prepared_dir, out_dir, history_dir, checkpoint_dir,
                                    device, seeds)


def _read_checkpoint(path: Path) -> dict | None:
    """A seed's checkpoint, or None when there is none yet; a damaged one stops with one line."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        raise files.StorageError(f"{path} is truncated or corrupt; delete it (that seed then starts again from "
                                 "epoch 1) and run the same command again") from None


def _read_state(path: Path) -> dict:
    """checkpoint_dir/state.json (fingerprint, parent run id), or {} when there is none yet."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise files.StorageError(f"{path} is truncated or corrupt; delete {path.parent} (training then starts "
                                 "afresh) and run the same command again") from None


def _train_configuration(params: Params, kind: str, latent_dim: int, prepared_dir: Path, out_dir: Path,
                         history_dir: Path, checkpoint_dir: Path, device: str | None,
                         seeds: list[int] | None) -> dict:
    prepared_dir, out_dir, history_dir, checkpoint_dir = map(Path, (prepared_dir, out_dir, history_dir, checkpoint_dir))
    config, train_params = model_setup(params, kind, latent_dim)
    if seeds is not None:
        train_params = replace(train_params, seeds=seeds)
    name = config_name(kind, latent_dim)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    dev = resolve_device(device or train_params.device)

    fingerprint = _fingerprint(config, train_params, prepared_dir)
    state_file = checkpoint_dir / "state.json"
    state = _read_state(state_file)
    if state.get("fingerprint") != fingerprint:
        if state:
            print(f"{name}: checkpoints in {checkpoint_dir} are for other params or data; starting afresh", file=sys.stderr)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        state = {"fingerprint": fingerprint}
    for folder in (checkpoint_dir, out_dir, history_dir):  # a read-only or missing folder fails now, not after training
        files.require_writable(folder)

    tags = {"model": kind, "latent_dim": str(latent_dim)}
    run_params = _run_params(params, config, train_params)
    with tracking.config_run(params.tracking.experiment, name, state.get("parent_run_id"), run_params, tags) as parent:
        state["parent_run_id"] = parent.run_id
        files.write_atomic(state_file, json.dumps(state))
        seed_runs = {}
        for seed in train_params.seeds:
            checkpoint = checkpoint_dir / f"seed{seed}.pt"
            saved = _read_checkpoint(checkpoint)
            torch.manual_seed(seed)
            model = build_model(config).to(dev)
            if saved is not None and saved["done"]:
                model.load_state_dict(saved["model"])
                history, run_id = saved["history"], saved["run_id"]
            else:
                with parent.seed_run(f"{name}/seed{seed}", seed, saved and saved["run_id"], run_params, tags) as run:
                    history = fit(model, train, val, train_params, seed, run, checkpoint, saved, dev,
                                  f"{name} seed{seed}")
                    _log_seed_artifacts(model, history, val, name, seed)
                    run_id = run.run_id
                saved = torch.load(checkpoint, weights_only=True)
                files.save_torch({**saved, "done": True}, checkpoint)
            save_model(model.cpu(), out_dir / f"seed{seed}.pt")
            tracking.tag_model_file(run_id, out_dir / f"seed{seed}.pt")
            write_history(history, history_dir / f"seed{seed}.csv")
            seed_runs[str(seed)] = run_id
    shutil.rmtree(checkpoint_dir)
    return {"parent_run_id": state["parent_run_id"], "seed_run_ids": seed_runs}


@torch.no_grad()
def _log_seed_artifacts(model: Model, history, val: Digits, name: str, seed: int) -> None:
    model = model.cpu().eval()
    originals = val.float_images()[:10]
    tracking.log_seed_artifacts(
        {"loss_curves.png": figures.loss_curve_panels({name: {f"seed{seed}": history}}),
         "reconstructions.png": figures.reconstruction_grid(model, originals, val.labels[:10]),
         "generations.png": figures.generation_grid(model, seed)},
        model, originals, val.labels[:10])
    model.train()
