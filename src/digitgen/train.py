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
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from digitgen import figures, files, serving, tracking
from digitgen.data import Digits, load_split, md5sum
from digitgen.models import (
    ABSENT_TERMS,
    LabelCVAE,
    Model,
    ModelConfig,
    PriorCVAE,
    build_model,
    resolve_device,
    save_model,
)
from digitgen.params import (
    INPUT_MODES,
    LABEL_CVAE,
    PCVAE,
    DigitgenError,
    ExecutionParams,
    LimitsParams,
    Params,
    ParamsError,
    TrainParams,
    config_name,
    load_params,
    train_section,
)
from digitgen.stopping import stopped_by_signals


class SizeError(DigitgenError):
    """A training past params.yaml's limits; the message holds what it would cost and how to allow it."""


class ParamsChangedError(DigitgenError):
    """params.yaml changed while a configuration trained; the message names the key and the queue."""


class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


class DivergenceError(DigitgenError):
    """Training that blew up (a NaN, or a loss past max_loss); the message names the run, the epoch and the fix."""


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
        expected = sum(
            (
                p * _sum_losses(model, images, digits, mode, 1024)
                for mode, p in mode_probabilities(params.input_modes).items()
                if p > 0
            ),
            torch.zeros(()),
        )
    metrics = {f"val_{term}": v for term, v in zip(figures.LOSS_TERMS, (expected / len(digits)).tolist(), strict=False)}
    if not isinstance(model, LabelCVAE):  # the label CVAE has no digit head
        correct = sum(
            (model.classify(images[start : start + 1024]).argmax(1) == digits[start : start + 1024]).sum()
            for start in range(0, len(digits), 1024)
        )
        metrics["val_accuracy"] = correct.item() / len(digits)
    model.train()
    return metrics


def fit(
    model: Model,
    train: Digits,
    val: Digits,
    params: TrainParams,
    seed: int,
    logger: EpochLogger,
    checkpoint: Path,
    state: dict | None,
    device: torch.device,
    label: str,
) -> list[dict[str, float]]:
    """Train from `state` (a checkpoint, or None for epoch 0) to params.epochs, checkpointing each epoch."""
    x_train, y_train = train.float_images().to(device), train.labels.to(device)
    x_val, y_val = val.float_images().to(device), val.labels.to(device)
    # fused: one pass over each parameter instead of a dozen elementwise ops (about 3x faster a step on the CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, fused=True)
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
    x_epoch, y_epoch = torch.empty_like(x_train), torch.empty_like(y_train)  # the training set in this epoch's order
    model.train()
    for epoch in range(len(history) + 1, params.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(y_train), generator=stream).to(device)
        modes = torch.multinomial(probs, n_batches, replacement=True, generator=stream).tolist()
        torch.index_select(x_train, 0, order, out=x_epoch)  # one gather an epoch: each batch is then a plain slice
        torch.index_select(y_train, 0, order, out=y_epoch)
        sums = torch.zeros(4, device=device)
        bar = tqdm(
            total=n_batches, desc=f"{label} epoch {epoch}/{params.epochs}", leave=False, disable=not sys.stderr.isatty()
        )
        for b, mode in enumerate(modes):
            batch = slice(b * params.batch_size, (b + 1) * params.batch_size)
            losses = model.loss(x_epoch[batch], y_epoch[batch], INPUT_MODES[mode])
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            sums += torch.stack(losses).detach() * len(y_epoch[batch])
            bar.update()
        bar.close()
        means = (sums / len(y_train)).tolist()
        row = {"epoch": epoch, **{f"train_{t}": v for t, v in zip(figures.LOSS_TERMS, means, strict=True)}}
        row.update(validation_losses(model, x_val, y_val, params, seed))
        row["epoch_seconds"] = time.perf_counter() - started
        _check_divergence(model, row, params, label, epoch)
        history.append(row)
        logger.log_epoch(epoch, {k: v for k, v in row.items() if k != "epoch"})
        files.save_torch(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "stream": stream.get_state(),
                "rng": torch.get_rng_state(),
                "history": history,
                "run_id": getattr(logger, "run_id", None),
                "done": False,
            },
            checkpoint,
        )
        tqdm.write(
            f"{label} epoch {epoch}/{params.epochs}: train_loss {row['train_loss']:.2f} "
            f"val_loss {row['val_loss']:.2f} ({row['epoch_seconds']:.1f} s)",
            file=sys.stderr,
        )
    if isinstance(model, PriorCVAE) and model.config.prior_components:  # the second stage, on the trained encoder
        model.fit_mixture(x_train, y_train, seed)
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
    raise DivergenceError(
        f"{label} diverged at epoch {epoch}: {problem}; lower {section}.lr (now {params.lr:g}) and run again"
    )


TIMINGS = ("epoch_seconds",)  # history columns that differ run to run: logged, never cached


def absent_columns(kind: str) -> frozenset[str]:
    """History columns of the loss terms `kind` does not have (the CAE's train_kl, val_kl): its history
    holds them as 0, and neither MLflow nor the parent runs' summaries show them."""
    return frozenset(f"{split}_{term}" for split in ("train", "val") for term in ABSENT_TERMS[kind])


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
    `pcvae`'s own."""
    if kind == LABEL_CVAE:
        return ModelConfig(kind, latent_dim, hidden_dims=tuple(params.label_cvae.hidden_dims)), params.label_cvae.train
    if kind == PCVAE:
        pcvae = params.pcvae
        batches_per_epoch = math.ceil(params.data.train_size / pcvae.train.batch_size)
        return ModelConfig(
            kind,
            latent_dim,
            hidden_dim=pcvae.hidden_dim,
            channels=tuple(pcvae.channels),
            label_weight=pcvae.label_weight,
            prior_rate=pcvae.prior_rate,
            prior_temperature=pcvae.prior_temperature,
            kl_weight=pcvae.kl_weight,
            prior_components=pcvae.prior_components,
            head_sees_image=pcvae.head_sees_image,
            kl_warmup_batches=round(pcvae.kl_warmup_epochs * batches_per_epoch),
        ), pcvae.train
    return ModelConfig(kind, latent_dim, hidden_dim=params.model.hidden_dim), params.train


def _fingerprint(config: ModelConfig, params: TrainParams, prepared_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the model, the training params and the data."""
    blob = {
        "config": asdict(config),
        "train": asdict(params),
        "data": [md5sum(prepared_dir / f"{s}.pt") for s in ("train", "val")],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _run_params(params: Params, config: ModelConfig, train_params: TrainParams, device: str | torch.device) -> dict:
    """What shapes a run, as used: the architecture keys of this kind only, the device the run trained on."""
    unused = "hidden_dim" if config.kind == LABEL_CVAE else "hidden_dims"
    return {
        "model": {k: v for k, v in asdict(config).items() if k != unused},
        "train": {**{k: v for k, v in asdict(train_params).items() if k != "seeds"}, "device": str(device)},
        "data": {k: v for k, v in asdict(params.data).items() if k != "mirrors"},
        "execution": asdict(params.execution),
    }  # what epoch_seconds were measured under


def run_train(
    params: Params,
    kind: str,
    latent_dim: int,
    prepared_dir: Path,
    out_dir: Path,
    history_dir: Path,
    checkpoint_dir: Path,
    device: str | None = None,
    seeds: list[int] | None = None,
    params_file: Path | None = None,
) -> dict:
    """Stages `train` and `train_label_cvae`: every seed (params', or `seeds`) of one configuration;
    returns the MLflow run ids: {"parent_run_id": ..., "seed_run_ids": {seed: ...}}.

    The trainer owns checkpoint_dir while it runs (a second trainer stops at once, naming this one's
    PID) and stops on Ctrl-C, SIGTERM or SIGHUP keeping its last finished epoch. params_file, the file
    `params` was read from, is read again as each seed finishes: nothing is saved when what it says this
    configuration trains with changed meanwhile.
    """
    with files.folder_lock(Path(checkpoint_dir), "trainer"), stopped_by_signals(bool(os.environ.get("DVC_STAGE"))):
        return _train_configuration(
            params, kind, latent_dim, prepared_dir, out_dir, history_dir, checkpoint_dir, device, seeds, params_file
        )


def _require_within_limits(
    limits: LimitsParams, config: ModelConfig, params: TrainParams, section: str, name: str, images: int
) -> None:
    """Stop, before any run or checkpoint, a training past limits.epochs or limits.seeds, saying what it would
    cost: hours at limits.epoch_seconds_per_1000_images, and the disk its models and checkpoints take."""
    seeds, epochs = len(params.seeds), params.epochs
    sizes = (("epochs", epochs, limits.epochs), ("seeds", seeds, limits.seeds))
    over = [(key, value, limit) for key, value, limit in sizes if value > limit]
    if not over:
        return
    key, value, limit = over[0]
    hours = seeds * epochs * images / 1000 * limits.epoch_seconds_per_1000_images / 3600
    model_mb = sum(p.numel() for p in build_model(config).parameters()) * 4 / 1e6  # float32 weights
    raise SizeError(
        f"{section}.{key}: {value} {key} is past limits.{key} {limit}; {name}'s {seeds} seed(s) x {epochs} epochs "
        f"of {images} images would take about {hours:,.1f} hours (limits.epoch_seconds_per_1000_images "
        f"{limits.epoch_seconds_per_1000_images:g}) and {5 * seeds * model_mb:,.1f} MB of disk ({seeds} model(s) of "
        f"{model_mb:,.1f} MB, as much again in MLflow, checkpoints of 3x while training); to go on, set limits.{key} "
        f"in params.yaml to at least {value}"
    )


def _trained_with(params: Params, kind: str, latent_dim: int) -> dict[str, str]:
    """What a configuration trains with, by key: its model, its train section and the data split."""
    config, train_params = model_setup(params, kind, latent_dim)
    return tracking.flatten(
        {"model": asdict(config), train_section(kind): asdict(train_params), "data": asdict(params.data)}
    )


def _require_params_unchanged(params_file: Path | None, params: Params, kind: str, latent_dim: int, runs: list) -> None:
    """Stop, marking the runs FAILED, when params_file no longer says what this configuration trained with.

    Two `dvc exp run` in one workspace each write their values into params.yaml before DVC's lock stops the
    second, so a trainer can train with one value while DVC records the other; `runs`: the parent run's id
    and the seeds' results so far."""
    if params_file is None:
        return
    started = _trained_with(params, kind, latent_dim)
    try:
        now = _trained_with(load_params(params_file), kind, latent_dim)
        key = next((k for k in started if started[k] != now.get(k)), None)
        change = key and f"{key} was {started[key]} when training started and is {now.get(key)} now"
    except ParamsError as err:
        change = f"it no longer reads ({err})"
    if not change:
        return
    message = (
        f"{params_file} changed while {config_name(kind, latent_dim)} trained: {change}. Another `dvc exp run` in "
        "this workspace (or an edit) wrote it, and DVC would record these results under values they were not "
        "trained with, so nothing was saved and the runs are FAILED. Run experiments side by side through the "
        "queue (dvc exp run --queue -S ..., then dvc queue start), restore the params and run this again"
    )
    tracking.fail_runs([run if isinstance(run, str) else run.run_id for run in runs], message)
    raise ParamsChangedError(message)


def _read_checkpoint(path: Path) -> dict | None:
    """A seed's checkpoint, or None when there is none yet; a damaged one stops with one line."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        raise files.StorageError(
            f"{path} is truncated or corrupt; delete it (that seed then starts again from "
            "epoch 1) and run the same command again"
        ) from None


def _read_state(path: Path) -> dict:
    """checkpoint_dir/state.json (fingerprint, parent run id), or {} when there is none yet."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise files.StorageError(
            f"{path} is truncated or corrupt; delete {path.parent} (training then starts "
            "afresh) and run the same command again"
        ) from None


def _train_configuration(
    params: Params,
    kind: str,
    latent_dim: int,
    prepared_dir: Path,
    out_dir: Path,
    history_dir: Path,
    checkpoint_dir: Path,
    device: str | None,
    seeds: list[int] | None,
    params_file: Path | None,
) -> dict:
    prepared_dir, out_dir, history_dir, checkpoint_dir = map(Path, (prepared_dir, out_dir, history_dir, checkpoint_dir))
    config, train_params = model_setup(params, kind, latent_dim)
    if seeds is not None:
        train_params = replace(train_params, seeds=seeds)
    name = config_name(kind, latent_dim)
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    _require_within_limits(params.limits, config, train_params, train_section(kind), name, len(train.labels))
    execution = params.execution
    # the device the seeds train on, as run params record it; a device missing here fails now, not in a worker.
    # Ray's nodes resolve their own (they may have one this machine lacks): recorded as asked for.
    asked = device or train_params.device
    dev = asked if execution.executor == "ray" else resolve_device(asked)

    fingerprint = _fingerprint(config, train_params, prepared_dir)
    state_file = checkpoint_dir / "state.json"
    state = _read_state(state_file)
    if state.get("fingerprint") != fingerprint:
        if state:
            print(
                f"{name}: checkpoints in {checkpoint_dir} are for other params or data; starting afresh",
                file=sys.stderr,
            )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        state = {"fingerprint": fingerprint}
    for folder in (checkpoint_dir, out_dir, history_dir):  # a read-only or missing folder fails now, not after training
        files.require_writable(folder)

    tags = {"model": kind, "latent_dim": str(latent_dim)}
    run_params = _run_params(params, config, train_params, dev)
    datasets = {"training": prepared_dir / "train.pt", "validation": prepared_dir / "val.pt"}
    with tracking.config_run(
        params.tracking.experiment,
        name,
        state.get("parent_run_id"),
        run_params,
        tags,
        fingerprint[:16],
        absent_columns(kind),
    ) as parent:
        state["parent_run_id"] = parent.run_id
        files.write_atomic(state_file, json.dumps(state))
        tasks = [
            SeedTask(
                config,
                train_params,
                seed,
                name,
                (checkpoint_dir / f"seed{seed}.pt").resolve(),
                device or train_params.device,
                tracking.tracking_uri(),
                parent.experiment_id,
                parent.run_id,
                run_params,
                tags,
                datasets,
                params.tracking.system_metrics,
            )
            for seed in train_params.seeds
        ]
        results: list[SeedResult] = []
        for result in EXECUTE[execution.executor](tasks, train, val, execution):  # saved once every seed is done
            results.append(result)
            _require_params_unchanged(params_file, params, kind, latent_dim, [parent.run_id, *results])
        seed_runs = {}
        for result in results:
            model = build_model(config)
            model.load_state_dict(result.weights)
            save_model(model, out_dir / f"seed{result.seed}.pt")
            tracking.finish_seed_run(result.run_id, out_dir / f"seed{result.seed}.pt")
            write_history(result.history, history_dir / f"seed{result.seed}.csv")
            seed_runs[str(result.seed)] = result.run_id
    shutil.rmtree(checkpoint_dir)
    return {"parent_run_id": state["parent_run_id"], "seed_run_ids": dict(sorted(seed_runs.items()))}


@dataclass(frozen=True)
class SeedTask:
    """One seed of one configuration: all a process on any machine needs, besides the data, to train it."""

    config: ModelConfig
    params: TrainParams
    seed: int
    name: str  # the configuration's: cae-16
    checkpoint: Path
    device: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str  # the seed's run is nested under its configuration's
    run_params: dict
    tags: dict[str, str]
    datasets: dict[str, Path]  # {context: prepared split file}, the seed run's inputs
    system_metrics: bool


@dataclass(frozen=True)
class SeedResult:
    seed: int
    weights: dict[str, torch.Tensor]  # on the CPU
    history: list[dict[str, float]]
    run_id: str


def train_seed(task: SeedTask, train: Digits, val: Digits) -> SeedResult:
    """Train one seed, resuming its checkpoint, logged to its own MLflow run under the configuration's.

    Every executor calls this; for a given thread count the weights are the same whichever runs it.
    """
    dev = resolve_device(task.device)
    saved = _read_checkpoint(task.checkpoint)
    torch.manual_seed(task.seed)
    model = build_model(task.config).to(dev)
    if saved is not None and saved["done"]:
        model.load_state_dict(saved["model"])
        history, run_id = saved["history"], saved["run_id"]
    else:
        parent = tracking.ConfigRun(task.parent_run_id, task.experiment_id, absent_columns(task.config.kind))
        with parent.seed_run(
            f"{task.name}/seed{task.seed}",
            task.seed,
            saved["run_id"] if saved else None,
            task.run_params,
            task.tags,
            task.datasets,
            task.system_metrics,
        ) as run:
            history = fit(
                model,
                train,
                val,
                task.params,
                task.seed,
                run,
                task.checkpoint,
                saved,
                dev,
                f"{task.name} seed{task.seed}",
            )
            _log_seed_artifacts(model, history, val, task.name, task.seed)
            run_id = run.run_id
        saved = torch.load(task.checkpoint, weights_only=True)
        files.save_torch({**saved, "model": model.state_dict(), "done": True}, task.checkpoint)
    return SeedResult(task.seed, {k: v.cpu() for k, v in model.state_dict().items()}, history, run_id)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` (None: left as they are) for the with block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_locally(
    tasks: list[SeedTask], train: Digits, val: Digits, execution: ExecutionParams
) -> Iterator[SeedResult]:
    """Executor `local`: one seed after another in this process (the stage's signal handling covers them)."""
    for task in tasks:
        with _torch_threads(execution.threads):
            yield train_seed(task, train, val)


def _seed_worker_started(threads: int) -> None:
    torch.set_num_threads(threads)


def _train_seed_in_worker(task: SeedTask, train: Digits, val: Digits) -> SeedResult:
    tracking.use_store(task.tracking_uri)
    with stopped_by_signals(die_with_parent=True):  # Ctrl-C, SIGTERM, or the trainer gone: checkpoint kept, run KILLED
        return train_seed(task, train, val)


def _train_in_processes(
    tasks: list[SeedTask], train: Digits, val: Digits, execution: ExecutionParams
) -> Iterator[SeedResult]:
    """Executor `processes`: execution.workers seeds at once, each in a child process of execution.threads threads
    (None: the cores shared among them). Children are spawned (not forked: torch's and MLflow's threads
    do not survive a fork); when this process stops, by a signal or an error, each child gets SIGTERM, so it
    keeps its checkpoint and marks its run KILLED, and is waited for."""
    workers = min(execution.workers, len(tasks))
    threads = execution.threads or max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_seed_worker_started, initargs=(threads,)
    ) as pool:
        futures = [pool.submit(_train_seed_in_worker, task, train, val) for task in tasks]
        try:
            for done in as_completed(futures):
                yield done.result()
        except BaseException:
            for future in futures:
                future.cancel()
            for child in multiprocessing.active_children():  # the pool's workers, the only children we start
                child.terminate()  # SIGTERM
            raise


def _require_ray():
    try:
        import ray
    except ImportError:
        raise DigitgenError(
            "execution.executor is ray but Ray is not installed; install the extra (uv sync --frozen "
            "--extra ray) or set execution.executor to local or processes"
        ) from None
    return ray


def _ray_address_is_remote(address: str) -> bool:
    """Whether RAY_ADDRESS (host:port, ray://host:port or auto) names a cluster on another machine."""
    if address in ("", "auto", "local"):
        return False
    host = urllib.parse.urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    try:
        with socket.socket() as probe:
            probe.bind((socket.gethostbyname(host), 0))  # only an address of this machine can be bound
    except OSError:
        return True
    return False


def _train_on_ray(
    tasks: list[SeedTask], train: Digits, val: Digits, execution: ExecutionParams
) -> Iterator[SeedResult]:
    """Executor `ray`: one Ray task per seed (execution.threads CPUs each, 1 when null) on the cluster at
    $RAY_ADDRESS, or on a Ray started on this machine for the stage when it is unset. The data travels
    through Ray's object store and the weights come back here, so nodes need the project's environment
    but not its files. Checkpoints are written at the same path on the node that trains the seed: on a
    shared filesystem an interrupted stage resumes there, elsewhere a rerun retrains the unfinished seeds."""
    address = os.environ.get("RAY_ADDRESS", "")
    if _ray_address_is_remote(address) and tracking.store_on_this_machine(tasks[0].tracking_uri):
        raise DigitgenError(
            f"RAY_ADDRESS {address} is another machine, which cannot reach the MLflow store "
            f"{tasks[0].tracking_uri}; set MLFLOW_TRACKING_URI to a tracking server every node "
            "can reach (docs/scaling-out.md)"
        )
    ray = _require_ray()
    threads = execution.threads or 1
    ray.init(address=address or None, include_dashboard=False, log_to_driver=True)
    try:
        # a task is run again when its worker dies, never for an error of its own (retry_exceptions is off)
        remote = ray.remote(_train_seed_with_threads).options(num_cpus=threads, max_retries=execution.retries)
        data = ray.put(train), ray.put(val)
        task_of = {remote.remote(task, *data, threads): task for task in tasks}
        pending = list(task_of)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:  # the task's own error (divergence, the store...)
                    raise err.cause from None
                except ray.exceptions.RayError as err:  # its worker died on every try (WorkerCrashedError, ...)
                    raise _seed_lost(task_of[done[0]], err, execution.retries) from None
                yield result
        except BaseException:
            for ref in pending:  # Ray raises KeyboardInterrupt in the task: checkpoint kept, run KILLED
                ray.cancel(ref)
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=60)
            raise
    finally:
        ray.shutdown()


def _seed_lost(task: SeedTask, err: Exception, retries: int) -> DigitgenError:
    """A seed whose Ray worker died on each try: its run, left RUNNING by the dead worker, is marked FAILED."""
    message = (
        f"{task.name} seed{task.seed}: its Ray worker died on each of {retries + 1} tries ({type(err).__name__}; "
        f"execution.retries is {retries}); its MLflow run is marked FAILED and its checkpoint on that node keeps "
        "the last finished epoch: run the same command again (or raise execution.retries)"
    )
    tracking.fail_runs(tracking.running_seed_runs(task.parent_run_id, task.seed), message)
    return DigitgenError(message)


def _train_seed_with_threads(task: SeedTask, train: Digits, val: Digits, threads: int) -> SeedResult:
    tracking.use_store(task.tracking_uri)
    with _torch_threads(threads):
        return train_seed(task, train, val)


EXECUTE = {"local": _train_locally, "processes": _train_in_processes, "ray": _train_on_ray}  # params.EXECUTORS


@torch.no_grad()
def _log_seed_artifacts(model: Model, history, val: Digits, name: str, seed: int) -> None:
    model = model.cpu().eval()
    originals = val.float_images()[:10]
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_seed_artifacts(
            {
                "loss_curves.png": figures.loss_curve_panels({name: {f"seed{seed}": history}}),
                "reconstructions.png": figures.reconstruction_grid(model, originals, val.labels[:10]),
                "generations.png": figures.generation_grid(model, seed),
            },
            f"{name}-seed{seed}",
            serving.pyfunc_parts(model, originals[0].reshape(28, 28), int(val.labels[0]), tmp),
        )
    model.train()
