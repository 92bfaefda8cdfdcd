"""Everything MLflow: where the store is, run names, nesting, tags, and what gets logged.

Layout in the UI: one experiment (params: tracking.experiment), one parent run per configuration
("cae-8"), one child run per seed ("cae-8/seed0"). The training loop never imports MLflow: it gets
a `SeedRun`, whose `log_epoch` is all it needs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import mlflow.pytorch
import torch
from mlflow.models import infer_signature
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from digitgen.params import DigitgenError

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def project_root() -> Path:
    """The DVC root when run by DVC (so queued `dvc exp` runs share one store), else the working folder."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else the SQLite file at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def experiment_id(name: str) -> str:
    """Point MLflow at our store and return the experiment's id, creating it (artifacts at the root) if new."""
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (project_root() / ARTIFACTS_DIR).as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_tags() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=project_root()).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD")
    return {
        "git_commit": commit or "unknown",
        "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower() if commit else "unknown",
    }


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: {"train": {"lr": 0.001}} -> {"train.lr": "0.001"}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _end_status(error: BaseException | None) -> str:
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


@contextlib.contextmanager
def _run(**start_kwargs):
    """mlflow.start_run that ends as FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED, never left RUNNING."""
    run = mlflow.start_run(**start_kwargs)
    try:
        yield run
    except BaseException as error:
        mlflow.end_run(_end_status(error))
        raise
    mlflow.end_run(_end_status(None))


class SeedRun:
    """The handle the training loop logs through."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=epoch)


class ConfigRun:
    """The parent run of one configuration; `seed_run` opens (or reopens, to resume) a child per seed."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    @contextlib.contextmanager
    def seed_run(self, name: str, seed: int, run_id: str | None, params: dict, tags: dict[str, str]):
        with _run(run_id=run_id, run_name=None if run_id else name, nested=True,
                  parent_run_id=self.run_id) as run:
            if run_id is None:
                mlflow.set_tags({**tags, "seed": str(seed)})
                mlflow.log_params({**flatten(params), "seed": str(seed)})
            yield SeedRun(run.info.run_id)


@contextlib.contextmanager
def config_run(experiment: str, name: str, run_id: str | None, params: dict, tags: dict[str, str]):
    """Open the parent run of a configuration (reopened by id when resuming)."""
    exp_id = experiment_id(experiment)
    with _run(run_id=run_id, experiment_id=exp_id, run_name=None if run_id else name) as run:
        if run_id is None:
            mlflow.set_tags({**tags, **git_tags(), "dvc_stage": os.environ.get("DVC_STAGE", "")})
            mlflow.log_params(flatten(params))
        yield ConfigRun(run.info.run_id)


def log_seed_artifacts(figures: dict[str, object], model, input_example) -> None:
    """End-of-training artifacts of the active seed run: figures and the model with its signature."""
    for filename, figure in figures.items():
        mlflow.log_figure(figure, filename)
        plt.close(figure)
    with torch.no_grad():
        output, _ = model.reconstruct(input_example)
    signature = infer_signature(input_example.numpy(), output.numpy())
    # pickle (not pt2 export) because forward takes optional inputs; the package travels with the model
    mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                             code_paths=[str(Path(__file__).parent)], pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


class TrackingError(DigitgenError):
    """A run that evaluation must log to is not in the store; the message names the store and the fix."""


def _client_for_run(run_id: str, uri: str | None) -> MlflowClient:
    """A client of the store at `uri` (default: ours), checked to hold the run."""
    client = MlflowClient(uri or tracking_uri())
    try:
        client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"run {run_id} is not in the MLflow store {client.tracking_uri}; restore the store that "
                            "trained the model (runs.json's tracking_uri) or train the configuration again") from None
    return client


def log_metrics_to_run(run_id: str, metrics: dict[str, float], uri: str | None = None,
                       tags: dict[str, str] | None = None) -> None:
    """Log metrics (and tags) to an existing (finished) run, e.g. evaluation results to the seed's training run.

    uri: the store that holds the run (the tracking_uri recorded in runs.json); default: `tracking_uri()`.
    """
    client = _client_for_run(run_id, uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, value) for key, value in (tags or {}).items()])


def log_figure_to_run(run_id: str, figure, filename: str, uri: str | None = None) -> None:
    """Log a figure as an artifact of an existing run (closing it), e.g. generated samples beside their metrics."""
    client = _client_for_run(run_id, uri)
    client.log_figure(run_id, figure, filename)
    plt.close(figure)
