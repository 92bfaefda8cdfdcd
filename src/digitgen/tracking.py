"""Everything MLflow: where the store is, run names, nesting, tags, and what gets logged.

Layout in the UI: one experiment (params: tracking.experiment), one parent run per configuration
("cae-8"), one child run per seed ("cae-8/seed0"). The training loop never imports MLflow: it gets
a `SeedRun`, whose `log_epoch` is all it needs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import pandas as pd
import requests
import torch
from mlflow.entities import Metric, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from digitgen import generate
from digitgen.data import md5sum
from digitgen.models import save_model
from digitgen.params import DigitgenError

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PYFUNC_NAME = "pyfunc"  # each seed run's serving model: runs:/<run_id>/pyfunc
CHAMPION_ALIAS = "champion"  # the registered best configuration: models:/<model_name>@champion
WEIGHTS_FILE = "model.pt"  # the pyfunc's weights, as models.save_model writes them
MODEL_MD5_TAG = "model_md5"  # on each seed run: the md5 of the model file it wrote
# MLflow retries an unreachable tracking server for minutes by default (7 retries, 120 s timeouts);
# these fail in seconds instead. A user's own settings of the variables win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
STORE_ERRORS = (MlflowException, OSError, requests.RequestException)  # what a store that is down or read-only raises


def project_root() -> Path:
    """The DVC root when run by DVC (so queued `dvc exp` runs share one store), else the working folder."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def default_tracking_uri() -> str:
    """The SQLite file at the project root."""
    return f"sqlite:///{project_root() / STORE_FILE}"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else the default store.

    (mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI itself, so "is it set?" cannot tell a user's
    store from ours: compare with default_tracking_uri() instead.)
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def use_store(uri: str) -> None:
    """Point this process at the store `uri`: how a seed trained in another process or on another machine
    logs to the store its stage opened."""
    mlflow.set_tracking_uri(uri)  # exports $MLFLOW_TRACKING_URI too, which tracking_uri() reads


def store_on_this_machine(uri: str) -> bool:
    """A store only this machine can reach: a local path, a file: or a sqlite: URI (not a tracking server)."""
    return urllib.parse.urlparse(uri).scheme in ("", "file", "sqlite")


def experiment_id(name: str) -> str:
    """Point MLflow at our store and return the experiment's id, creating it (artifacts at the root) if new."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_errors("opening the experiment"):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # in our default store, artifacts sit beside it at the root (not in ./mlruns of whichever stage came first)
        location = (project_root() / ARTIFACTS_DIR).as_uri() if uri == default_tracking_uri() else None
        return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def store_errors(doing: str):
    """A tracking store that is unreachable, read-only or full, as one line naming it and the fix."""
    try:
        yield
    except STORE_ERRORS as err:
        text = str(err)
        cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"\(sqlite3\.\w+\) ([^\n\[]+)", text)
        reason = cause.group(1).strip() if cause else text.splitlines()[0][:200] if text else type(err).__name__
        raise TrackingError(f"the MLflow store {tracking_uri()} failed while {doing} ({reason}); make it reachable "
                            "and writable (or set MLFLOW_TRACKING_URI to one that is), then run the same command "
                            "again (a stopped training resumes from its last checkpoint)") from None


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
    """mlflow.start_run that ends as FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED, never left RUNNING.

    (Unless the store itself is gone: then the next start marks it KILLED, or resumes it.)
    """
    with store_errors("starting a run"):
        run = mlflow.start_run(**start_kwargs, tags=_process_tags())  # set again when a run is resumed
    try:
        yield run
    except BaseException as error:
        with contextlib.suppress(*STORE_ERRORS):
            mlflow.end_run(_end_status(error))
        raise
    with store_errors("ending a run"):
        mlflow.end_run(_end_status(None))


def _process_tags() -> dict[str, str]:
    """Which process writes a run: how a later start tells a run still being written from one whose process died."""
    return {"process_host": socket.gethostname(), "process_pid": str(os.getpid())}


def _process_gone(run) -> bool:
    pid = int(run.data.tags["process_pid"])
    if pid == os.getpid():  # a run of ours would not be RUNNING before we start one: the PID was reused
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def end_stale_runs(exp_id: str, tags: dict[str, str]) -> list[str]:
    """Mark KILLED the RUNNING runs with these tags whose trainer on this machine is gone (kill -9, a crash).

    Runs trained elsewhere are left alone: their process cannot be seen from here.
    """
    client = MlflowClient()
    where = ["attributes.status = 'RUNNING'", f"tags.process_host = '{socket.gethostname()}'",
             *(f"tags.{key} = '{value}'" for key, value in tags.items())]
    with store_errors("looking for runs left RUNNING"):
        stale = [run for run in client.search_runs([exp_id], " and ".join(where)) if _process_gone(run)]
        for run in stale:
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [run.info.run_id for run in stale]


class SeedRun:
    """The handle the training loop logs through."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        with store_errors(f"logging epoch {epoch}"):
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
                with store_errors("tagging the seed run"):
                    mlflow.set_tags({**tags, "seed": str(seed)})
                    mlflow.log_params({**flatten(params), "seed": str(seed)})
            yield SeedRun(run.info.run_id)


@contextlib.contextmanager
def config_run(experiment: str, name: str, run_id: str | None, params: dict, tags: dict[str, str]):
    """Open the parent run of a configuration (reopened by id when resuming), first marking KILLED its
    runs (parent and seeds) left RUNNING by a trainer that died."""
    exp_id = experiment_id(experiment)
    stale = end_stale_runs(exp_id, tags)
    if stale:
        print(f"{name}: marked KILLED {len(stale)} run(s) left RUNNING by a trainer that is gone: {', '.join(stale)}",
              file=sys.stderr)
    with _run(run_id=run_id, experiment_id=exp_id, run_name=None if run_id else name) as run:
        if run_id is None:
            with store_errors("tagging the configuration run"):
                mlflow.set_tags({**tags, **git_tags(), "dvc_stage": os.environ.get("DVC_STAGE", "")})
                mlflow.log_params(flatten(params))
        yield ConfigRun(run.info.run_id, exp_id)


def _pinned(*distributions: str) -> list[str]:
    """pip requirements pinned to the versions installed here (local tags such as +cpu dropped)."""
    return [f"{d}=={importlib.metadata.version(d).split('+')[0]}" for d in distributions]


def log_seed_artifacts(figures: dict[str, object], model, images: torch.Tensor, digits: torch.Tensor) -> None:
    """End-of-training artifacts of the active seed run: figures, the PyTorch model and the serving pyfunc.

    images (N x 784 in [0, 1]) and their digits are examples for the signatures. The PyTorch model's
    signature is that of `reconstruct(images, digits)`, the one call every model answers from the same
    inputs (the label CVAE needs the digits to encode).
    """
    with store_errors("logging the trained model"):
        for filename, figure in figures.items():
            mlflow.log_figure(figure, filename)
            plt.close(figure)
        with torch.no_grad():
            output, _ = model.reconstruct(images, digits)
        signature = infer_signature({"images": images.numpy(), "digits": digits.numpy()}, output.numpy())
        # pickle (not pt2 export) because forward takes optional inputs; the package travels with the model
        mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                                 code_paths=[str(Path(__file__).parent)], pip_requirements=_pinned("torch"))
        _log_pyfunc(model, images[0].reshape(28, 28), int(digits[0]))


class DigitgenPyfunc(mlflow.pyfunc.PythonModel):
    """Serves every condition of the study through one request table (generate.predict_frame).

    Stateless when pickled: the weights travel as an artifact and load with weights_only=True.
    """

    def load_context(self, context) -> None:
        self.model = generate.load(context.artifacts["weights"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return generate.predict_frame(self.model, model_input, **(params or {}))


# The request and answer tables of generate.predict_frame. digit is a double on the way in because
# integer columns cannot hold the gaps a mixed request has (MLflow's advice for missing integers).
PYFUNC_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "mode"), ColSpec("double", "digit", required=False),
                   ColSpec(Array("double"), "pixels", required=False)]),
    outputs=Schema([ColSpec("long", "digit"), ColSpec("double", "probability", required=False),
                    ColSpec(Array("double"), "probs", required=False),
                    ColSpec(Array("double"), "pixels", required=False)]),
    params=ParamSchema([ParamSpec("seed", "long", None), ParamSpec("same_style", "boolean", False)]))


def _log_pyfunc(model, image: torch.Tensor, digit: int) -> None:
    example = generate.example_request(generate.DigitModel(model, "training"), image, digit)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_model(model, weights)
        # A pickled PythonModel (MLflow warns about pickles) rather than models-from-code: the
        # instance holds no state, only a reference to this class, which code_paths ships.
        mlflow.pyfunc.log_model(
            name=PYFUNC_NAME, python_model=DigitgenPyfunc(), artifacts={"weights": str(weights)},
            signature=PYFUNC_SIGNATURE, input_example=(example, {"seed": 0}),
            code_paths=[str(Path(__file__).parent)],
            pip_requirements=_pinned("torch", "numpy", "pandas", "pillow", "matplotlib", "pyyaml"))


def _require_store() -> None:
    """Point MLflow at our store; refuse to create an empty default store where none was meant to be."""
    uri = tracking_uri()
    if uri == default_tracking_uri() and not (project_root() / STORE_FILE).is_file():
        raise generate.ModelSourceError(f"no MLflow store at {project_root() / STORE_FILE}; run from the "
                                        "repository root or set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)


@contextlib.contextmanager
def pyfunc_weights(uri: str):
    """The weights file of the digitgen pyfunc at an MLflow model URI, downloaded for the with block.

    runs:/<run_id> alone means that run's pyfunc model.
    """
    _require_store()
    if re.fullmatch(r"runs:/[^/]+/?", uri):
        uri = f"{uri.rstrip('/')}/{PYFUNC_NAME}"
    # no progress bars on the terminal of a CLI user waiting for one small model
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            weights = Model.load(local).flavors["python_function"]["artifacts"]["weights"]["path"]
        except MlflowException as err:
            reason = str(err).splitlines()[0]
            raise generate.ModelSourceError(f"{uri}: no such MLflow model in {tracking_uri()} ({reason}); "
                                            "expected runs:/<run_id> or models:/<name>@<alias>") from None
        except ImportError as err:  # s3://, gs://, ... need their client package
            raise generate.ModelSourceError(f"{uri}: reading it needs the package {err.name}, which is not installed; "
                                            "install it (s3://: `uv add boto3`) or download the model file and pass "
                                            "its path") from None
        except (OSError, KeyError, TypeError):
            raise generate.ModelSourceError(f"{uri}: not a digitgen pyfunc model; expected the '{PYFUNC_NAME}' "
                                            "model that `digitgen train` logs in every seed run") from None
        yield local / weights


def register_champion(run_id: str, model_name: str) -> str:
    """Register the run's pyfunc model as model_name and point alias `champion` at it; returns the version.

    Idempotent: when the champion already is this run's model, no new version is made.
    """
    _require_store()
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:  # no such model or alias yet
        current = None
    if current is not None and current.run_id == run_id:
        return current.version
    run = client.get_run(run_id)
    logged = client.search_logged_models([run.info.experiment_id], max_results=1,
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{PYFUNC_NAME}'")
    if not logged:
        raise generate.ModelSourceError(f"run {run_id} has no '{PYFUNC_NAME}' model; expected a seed run "
                                        "logged by `digitgen train`")
    version = mlflow.register_model(logged[0].model_uri, model_name)
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    return version.version


class TrackingError(DigitgenError):
    """The tracking store, or a run in it, cannot be used; the message names the store and the fix."""


def tag_model_file(run_id: str, path: Path) -> None:
    """Tag the seed run with its model file's md5: how evaluation and the registry find the run again
    (run ids are kept out of DVC's cached outputs, which must not change when nothing else does)."""
    MlflowClient(tracking_uri()).set_tag(run_id, MODEL_MD5_TAG, md5sum(path))


def seed_run_for(experiment: str, name: str, seed: str, model_file: Path) -> str:
    """The newest finished run that trained `model_file` (by its md5), else a new run for it.

    A new run appears when the file was trained against another store, e.g. pulled from a DVC remote:
    the evaluation is still logged, to a run named like the training run and tagged with the same md5.
    """
    md5 = md5sum(model_file)
    exp_id = experiment_id(experiment)
    found = MlflowClient().search_runs([exp_id], f"tags.{MODEL_MD5_TAG} = '{md5}' AND attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    with _run(experiment_id=exp_id, run_name=f"{name}/seed{seed}") as run:
        mlflow.set_tags({MODEL_MD5_TAG: md5, "seed": seed, "trained_elsewhere": "true"})
        return run.info.run_id


def log_metrics_to_run(run_id: str, metrics: dict[str, float], tags: dict[str, str] | None = None) -> None:
    """Log metrics (and tags) to an existing (finished) run, e.g. evaluation results to the seed's training run."""
    client = MlflowClient(tracking_uri())
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, value) for key, value in (tags or {}).items()])


def log_figure_to_run(run_id: str, figure, filename: str) -> None:
    """Log a figure as an artifact of an existing run (closing it), e.g. generated samples beside their metrics."""
    MlflowClient(tracking_uri()).log_figure(run_id, figure, filename)
    plt.close(figure)


def log_summary(experiment: str, table, files: list[Path]) -> str:
    """A `summary` run holding Table 1 (as an MLflow table, shown in the UI's artifact view) and the results files."""
    with _run(experiment_id=experiment_id(experiment), run_name="summary") as run:
        mlflow.set_tags({"summary": "true", **git_tags(), "dvc_stage": os.environ.get("DVC_STAGE", "")})
        mlflow.log_table(data=table.reset_index(), artifact_file="table1.json")
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="figures" if path.suffix == ".png" else None)
        return run.info.run_id
