"""Everything MLflow: where the store is, run names, nesting, tags, and what gets logged.

Layout in the UI: one experiment (params: tracking.experiment), one parent run per configuration
("cae-8"), one child run per seed ("cae-8/seed0"). The training loop never imports MLflow: it gets
a `SeedRun`, whose `log_epoch` is all it needs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import mlflow.pytorch
import torch
from mlflow.models import infer_signature
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

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

    def __init__(self, run_id: str, experiment_id: str):
        self.run_id = run_id
        self.experiment_id = experiment_id

    @contextlib.contextmanager
    def seed_run(self, name: str, seed: int, run_id: str | None, params: dict, tags: dict[str, str]):
        with _run(run_id=run_id, experiment_id=self.experiment_id, run_name=None if run_id else name, nested=True,
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
        yield ConfigRun(run.info.run_id, exp_id)


def log_seed_artifacts(figures: dict[str, object], model, images: torch.Tensor, digits: torch.Tensor) -> None:
    """End-of-training artifacts of the active seed run: figures and the model with its signature.

    The signature is that of `reconstruct(images, digits)`, the one call every model answers from the
    same inputs (the label CVAE needs the digits to encode).
    """
    for filename, figure in figures.items():
        mlflow.log_figure(figure, filename)
        plt.close(figure)
    with torch.no_grad():
        output, _ = model.reconstruct(images, digits)
    signature = infer_signature({"images": images.numpy(), "digits": digits.numpy()}, output.numpy())
    # pickle (not pt2 export) because forward takes optional inputs; the package travels with the model
    mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                             code_paths=[str(Path(__file__).parent)], pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def log_metrics_to_run(run_id: str, metrics: dict[str, float]) -> None:
    """Log metrics to an existing (finished) run, e.g. evaluation results to the seed's training run."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)


def log_summary(experiment: str, table, files: list[Path]) -> str:
    """A `summary` run holding Table 1 (as an MLflow table, shown in the UI's artifact view) and the results files."""
    with _run(experiment_id=experiment_id(experiment), run_name="summary") as run:
        mlflow.set_tags({"summary": "true", **git_tags(), "dvc_stage": os.environ.get("DVC_STAGE", "")})
        mlflow.log_table(data=table.reset_index(), artifact_file="table1.json")
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="figures" if path.suffix == ".png" else None)
        return run.info.run_id
