"""Everything MLflow logs: where the store is, run names, nesting, tags, metric names, models, the registry.

Layout in the UI: one experiment (params: tracking.experiment), one parent run per configuration
("cae-8"), one child run per seed ("cae-8/seed0"). The training loop never imports MLflow: it gets
a `SeedRun`, whose `log_epoch` is all it needs. Loading a logged model is digitgen.serving's job;
this module only logs.

Names follow MLflow's split/name scheme: train/loss, val/bce, val/accuracy, test/fid. The aggregate
stage gives each parent run the mean and std over seeds of the Table 1 metrics and the final losses
(test/fid_mean, test/fid_std, val/bce_mean, ...), so the collapsed run table compares configurations.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import requests
import sqlalchemy.exc
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from digitgen import files
from digitgen.data import md5sum
from digitgen.files import project_root
from digitgen.params import DigitgenError

with warnings.catch_warnings():  # importing MLflow's pyfunc warns about MLflow's own type hints: not ours to fix
    warnings.filterwarnings("ignore", ".*Any type hint is inferred as AnyType")
    import mlflow.pyfunc

STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
CHAMPION_ALIAS = "champion"  # the registered best configuration: models:/<model_name>@champion
MODEL_MD5_TAG = "model_md5"  # on each seed run: the md5 of the model file it wrote
FINGERPRINT_TAG = "fingerprint"  # model, training params and data: with the commit, what makes two runs the same
FAILURE_TAG = "failure"  # why a run that ended well is FAILED (params.yaml changed while it trained)
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # the tag MLflow's UI shows as the run's source version
EVALUATION_SAMPLES = "evaluation_samples.png"
# MLflow retries an unreachable tracking server for minutes by default (7 retries, 120 s timeouts);
# these fail in seconds instead. A user's own settings of the variables win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# progress bars are for a person at a terminal, not for the logs of a stage
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", str(sys.stderr.isatty()).lower())
# what a store that is down, read-only, full or corrupt raises: MLflow wraps some of the database's errors, not all
STORE_ERRORS = (MlflowException, OSError, requests.RequestException, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error)
EXPERIMENT_DESCRIPTION = (
    "digitgen: the study's joint CAE and CVAE on MNIST. One parent run per configuration (cae-8, cvae-16, ...) "
    "carries the mean and std over seeds of Table 1's metrics (test/fid_mean, test/fid_std, ...) and the final losses; "
    "expand it for one run per seed. The run named `summary` holds Table 1 and the champion decision."
)
# MLflow 3 types an experiment (tag mlflow.experimentKind); ours trains models. The 3.17 UI opens in GenAI mode
# whatever the tag says, unless the link carries ?workflowType=machine_learning (runs_link) or the browser has
# chosen "Model training" in the sidebar once (it remembers it)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_MODE = "workflowType=machine_learning"
# The saved runs view "Table 1" (the UI's Views menu; ?viewStateShareKey=table1 opens it): the configurations'
# parent runs, CAE beside CVAE by latent size, their family, latent size and epochs and Table 1's means
TABLE1_VIEW = "table1"
TABLE1_VIEW_TAG = f"mlflow.sharedViewState.{TABLE1_VIEW}"
SIGNIFICANT_DIGITS = 4  # a parent run's summaries as logged: the UI shows metrics unrounded


def default_store() -> Path:
    """The SQLite file at the project root."""
    return project_root() / STORE_FILE


def default_tracking_uri() -> str:
    return f"sqlite:///{default_store()}"


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


def require_store(uri: str) -> None:
    """A SQLite store that does not exist yet needs a folder it can be created in: asked of MLflow, a folder it
    cannot write is retried for about 100 s (10 attempts) before a long SQLAlchemy traceback."""
    if urllib.parse.urlparse(uri).scheme != "sqlite" or uri in ("sqlite://", "sqlite:///:memory:"):
        return
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    try:
        files.require_writable(path.parent)
    except files.StorageError:
        raise TrackingError(
            f"the MLflow store {uri} cannot be created: {path.parent} is not writable; make it writable (or set "
            "MLFLOW_TRACKING_URI to a store that is), then run the same command again"
        ) from None


def experiment_id(name: str) -> str:
    """Point MLflow at our store and return the experiment's id, creating it (artifacts at the root) if new."""
    uri = tracking_uri()
    require_store(uri)
    mlflow.set_tracking_uri(uri)
    with store_errors("opening the experiment"):
        found = mlflow.get_experiment_by_name(name)
        tags = {"mlflow.note.content": EXPERIMENT_DESCRIPTION, **EXPERIMENT_KIND}
        if found is not None:
            for key, value in tags.items():
                if key not in found.tags:  # made before experiments had a description, or a kind
                    MlflowClient().set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        # in our default store, artifacts sit beside it at the root (not in ./mlruns of whichever stage came first)
        location = (project_root() / ARTIFACTS_DIR).as_uri() if uri == default_tracking_uri() else None
        return mlflow.create_experiment(name, artifact_location=location, tags=tags)


@contextlib.contextmanager
def store_errors(doing: str):
    """A tracking store that is unreachable, read-only, full or corrupt, as one line naming it and the fix."""
    try:
        yield
    except STORE_ERRORS as err:
        text = str(err)
        cause = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"\(sqlite3\.\w+\) ([^\n\[]+)", text)
        reason = cause.group(1).strip() if cause else text.splitlines()[0][:200] if text else type(err).__name__
        corrupt = re.search(r"malformed|not a database", reason)
        fix = (
            "move it aside and restore a backup (or let the next command start an empty store)"
            if corrupt
            else "make it reachable and writable (or set MLFLOW_TRACKING_URI to one that is)"
        )
        raise TrackingError(
            f"the MLflow store {tracking_uri()} failed while {doing} ({reason}); {fix}, then run the same command "
            "again (a stopped training resumes from its last checkpoint)"
        ) from None


class TrackingError(DigitgenError):
    """The tracking store, or a run in it, cannot be used; the message names the store and the fix."""


# Where a run comes from: the commit, whether the checkout differed from it, the DVC stage and experiment
def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _dvc_outputs(root: Path) -> list[str]:
    """The paths (from the git root) that DVC writes: every tracked dvc.lock and the outputs it lists."""
    paths = []
    for lock in _git(root, "ls-files", "--", "dvc.lock", "*/dvc.lock").splitlines():
        paths.append(lock)
        folder = Path(lock).parent
        try:
            stages = (yaml.safe_load((root / lock).read_text()) or {}).get("stages", {})
        except (OSError, yaml.YAMLError):
            continue
        for stage in stages.values():
            for section in ("outs", "metrics", "plots"):
                paths += [os.path.normpath(folder / out["path"]) for out in stage.get(section, [])]
    return paths


def git_tags() -> dict[str, str]:
    """The commit, and git_dirty: whether a tracked file other than DVC's own outputs differs from it.

    DVC writes dvc.lock and the results/ files git keeps while a pipeline runs, so those never count;
    untracked and ignored files never do either. Asked once per process and project.
    """
    return _git_tags(project_root())


@functools.lru_cache(maxsize=8)
def _git_tags(project: Path) -> dict[str, str]:
    commit = _git(project, "rev-parse", "HEAD")
    if not commit:
        return {GIT_COMMIT_TAG: "unknown", "git_dirty": "unknown"}
    root = Path(_git(project, "rev-parse", "--show-toplevel"))
    outputs = _dvc_outputs(root)
    changed = [
        path
        for path in _git(root, "diff", "--name-only", "HEAD", "--").splitlines()
        if not any(path == out or path.startswith(out.rstrip("/") + "/") for out in outputs)
    ]
    return {GIT_COMMIT_TAG: commit, "git_dirty": str(bool(changed)).lower()}


def run_tags() -> dict[str, str]:
    """Tags of every run: where it comes from (commit, DVC stage and experiment) and which process writes it."""
    return {
        **git_tags(),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "dvc_exp_name": dvc_experiment(),
        **_process_tags(),
    }


def dvc_experiment() -> str:
    """The DVC experiment this process runs for (`dvc exp run` sets DVC_EXP_NAME), or ""."""
    return os.environ.get("DVC_EXP_NAME", "")


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: {"train": {"lr": 0.001}} -> {"train.lr": "0.001"}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


# Metric names: history and evaluation keys (train_loss, fid) as MLflow shows them (train/loss, test/fid)
def history_metric(key: str) -> str:
    """train_loss -> train/loss, val_accuracy -> val/accuracy, epoch_seconds -> train/epoch_seconds."""
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in ("train", "val") else f"train/{key}"


def evaluation_metric(key: str) -> str:
    """fid -> test/fid; an Inception Score's spread over its splits (inception_score_std) ->
    test/inception_score_splits_std, apart from the parent runs' std over seeds (test/inception_score_std)."""
    return f"test/{key.removesuffix('_std')}_splits_std" if key.endswith("_std") else f"test/{key}"


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
        run = mlflow.start_run(**start_kwargs, tags=run_tags())  # set again when a run is resumed
    try:
        yield run
    except BaseException as error:
        try:
            mlflow.end_run(_end_status(error))
        except STORE_ERRORS:  # e.g. a signal cut a store call short; a fresh call still records how the run ended
            with contextlib.suppress(*STORE_ERRORS):
                MlflowClient().set_terminated(run.info.run_id, _end_status(error))
        raise
    with store_errors("ending a run"):
        mlflow.end_run(_end_status(None))


def _process_tags() -> dict[str, str]:
    """Which process writes a run: how a later start tells a run still being written from one whose process died."""
    return {"process_host": socket.gethostname(), "process_pid": str(os.getpid())}


def _process_gone(run) -> bool:
    pid = int(run.data.tags["process_pid"])
    # a run of ours would not be RUNNING before we start one: the PID was reused
    return pid == os.getpid() or not files.process_alive(pid)


def fail_runs(run_ids: list[str], reason: str) -> None:
    """Mark runs FAILED, tagged `failure` with the reason: runs that ended well but whose results must not count
    (params.yaml changed while they trained)."""
    client = MlflowClient(tracking_uri())
    with store_errors("marking runs FAILED"):
        for run_id in run_ids:
            client.set_tag(run_id, FAILURE_TAG, reason)
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def running_seed_runs(parent_run_id: str, seed: int) -> list[str]:
    """The runs of one seed under a configuration's run still RUNNING (a worker that died left them so)."""
    client = MlflowClient(tracking_uri())
    with store_errors("looking for a seed's run"):
        experiment = client.get_run(parent_run_id).info.experiment_id
        found = client.search_runs(
            [experiment],
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND tags.seed = '{seed}' AND attributes.status = 'RUNNING'",
        )
    return [run.info.run_id for run in found]


def end_stale_runs(exp_id: str, tags: dict[str, str]) -> list[str]:
    """Mark KILLED the RUNNING runs with these tags whose trainer on this machine is gone (kill -9, a crash).

    Runs trained elsewhere are left alone: their process cannot be seen from here.
    """
    client = MlflowClient()
    where = [
        "attributes.status = 'RUNNING'",
        f"tags.process_host = '{socket.gethostname()}'",
        *(f"tags.{key} = '{value}'" for key, value in tags.items()),
    ]
    with store_errors("looking for runs left RUNNING"):
        stale = [run for run in client.search_runs([exp_id], " and ".join(where)) if _process_gone(run)]
        for run in stale:
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [run.info.run_id for run in stale]


def _dataset_input(path: Path, name: str, context: str) -> DatasetInput:
    """A prepared split as an MLflow dataset: its name, the md5 of its file as digest, the file as source (a local
    file, recorded as MLflow's own local-file dataset source records one)."""
    source = json.dumps({"uri": str(Path(path).resolve())})
    dataset = Dataset(name=name, digest=md5sum(path)[:8], source_type="local", source=source)
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def _log_inputs(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """client.log_inputs, where a dataset that another run logs for the first time at the same moment is no
    failure: the store looks for the dataset, finds none, and its unique constraint then refuses the second of the
    two inserts; tried again, the dataset is there and is linked to this run."""
    try:
        client.log_inputs(run_id, inputs)
    except (MlflowException, sqlalchemy.exc.IntegrityError) as err:
        if not re.search(r"IntegrityError|UNIQUE constraint failed|duplicate key value", str(err)):
            raise
        client.log_inputs(run_id, inputs)


class SeedRun:
    """The handle the training loop logs through."""

    def __init__(self, run_id: str, absent_columns: frozenset[str]):
        self.run_id = run_id
        self.absent_columns = absent_columns

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's history row, under MLflow names, without the loss terms this model does not have."""
        named = {history_metric(key): value for key, value in metrics.items() if key not in self.absent_columns}
        with store_errors(f"logging epoch {epoch}"):
            mlflow.log_metrics(named, step=epoch)


class ConfigRun:
    """The parent run of one configuration; `seed_run` opens (or reopens, to resume) a child per seed."""

    def __init__(self, run_id: str, experiment_id: str, absent_columns: frozenset[str]):
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.absent_columns = absent_columns

    @contextlib.contextmanager
    def seed_run(
        self,
        name: str,
        seed: int,
        run_id: str | None,
        params: dict,
        tags: dict[str, str],
        datasets: dict[str, Path],
        system_metrics: bool,
    ):
        """A child run for one seed; datasets: {context: prepared split file}, logged as the run's inputs."""
        with _run(
            run_id=run_id,
            experiment_id=self.experiment_id,
            run_name=None if run_id else name,
            nested=True,
            parent_run_id=self.run_id,
            log_system_metrics=system_metrics,
            description=None if run_id else f"{name}: one seed of configuration {name.split('/')[0]}",
        ) as run:
            if run_id is None:
                with store_errors("tagging the seed run"):
                    mlflow.set_tags({**tags, "seed": str(seed)})
                    mlflow.log_params({**flatten(params), "seed": str(seed)})
                    _log_inputs(
                        MlflowClient(),
                        run.info.run_id,
                        [_dataset_input(path, f"mnist-{path.stem}", context) for context, path in datasets.items()],
                    )
            yield SeedRun(run.info.run_id, self.absent_columns)


def _same_run(exp_id: str, name: str, fingerprint: str) -> str | None:
    """The parent run of an earlier training of the same configuration, fingerprint and clean commit, if any."""
    tags = git_tags()
    if tags["git_dirty"] != "false":  # a dirty or missing checkout: the commit does not say what ran
        return None
    where = (
        f"attributes.run_name = '{name}' AND tags.{FINGERPRINT_TAG} = '{fingerprint}' AND "
        f"tags.`{GIT_COMMIT_TAG}` = '{tags[GIT_COMMIT_TAG]}' AND tags.git_dirty = 'false'"
    )
    with store_errors("looking for an earlier run of the same configuration"):
        found = [
            run
            for run in MlflowClient().search_runs([exp_id], where, order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in run.data.tags and run.info.status != "RUNNING"
        ]
    return found[0].info.run_id if found else None


@contextlib.contextmanager
def config_run(
    experiment: str,
    name: str,
    run_id: str | None,
    params: dict,
    tags: dict[str, str],
    fingerprint: str,
    absent_columns: frozenset[str] = frozenset(),
):
    """Open the parent run of a configuration: reopened by id when resuming, or the earlier run of the same
    configuration, fingerprint and clean commit (its seed runs are then replaced, not duplicated). First
    marks KILLED its runs (parent and seeds) left RUNNING by a trainer that died.

    absent_columns: history columns of loss terms the model does not have (train.absent_columns), never logged.
    """
    exp_id = experiment_id(experiment)
    stale = end_stale_runs(exp_id, tags)
    if stale:
        print(
            f"{name}: marked KILLED {len(stale)} run(s) left RUNNING by a trainer that is gone: {', '.join(stale)}",
            file=sys.stderr,
        )
    run_id = run_id or _same_run(exp_id, name, fingerprint)
    description = (
        f"{name}: every seed as a child run. After `aggregate`, test/fid_mean and test/fid_std (and so "
        "on for each of Table 1's metrics) are the mean and std over seeds; val/bce_mean, train/loss_mean "
        "and their _std those of the final epoch's losses."
    )
    with _run(
        run_id=run_id,
        experiment_id=exp_id,
        run_name=None if run_id else name,
        description=None if run_id else description,
    ) as run:
        if run_id is None:
            with store_errors("tagging the configuration run"):
                mlflow.set_tags({**tags, FINGERPRINT_TAG: fingerprint})
                mlflow.log_params(flatten(params))
        elif FAILURE_TAG in run.data.tags:  # resumed after a params.yaml change failed it
            with store_errors("resuming the configuration run"):
                MlflowClient().delete_tag(run.info.run_id, FAILURE_TAG)
        yield ConfigRun(run.info.run_id, exp_id, absent_columns)


def _pinned(*distributions: str) -> list[str]:
    """pip requirements pinned to the versions installed here (local tags such as +cpu dropped)."""
    return [f"{d}=={importlib.metadata.version(d).split('+')[0]}" for d in distributions]


def log_seed_artifacts(figures: dict[str, Figure], model_name: str, pyfunc: dict) -> None:
    """End-of-training artifacts of the active seed run: figures and the serving pyfunc model (named
    <config>-seed<s>; `pyfunc` holds serving.pyfunc_parts)."""
    with store_errors("logging the trained model"):
        for filename, figure in figures.items():
            mlflow.log_figure(figure, filename)
            plt.close(figure)
        with _quiet_model_logging():
            mlflow.pyfunc.log_model(
                name=model_name,
                **pyfunc,
                code_paths=[str(Path(__file__).parent)],  # the code travels with the model
                pip_requirements=_pinned("torch", "numpy", "pandas", "pillow", "matplotlib", "pyyaml"),
            )


@contextlib.contextmanager
def _quiet_model_logging():
    """Log a model without two notices that are MLflow's, not the user's: pandas 4 deprecating a comparison
    MLflow makes, and no pip version to pin in a uv environment (which has no pip; the requirements are pinned)."""
    environment = logging.getLogger("mlflow.utils.environment")
    level = environment.level
    environment.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Operation with range is deprecated")
            yield
    finally:
        environment.setLevel(level)


def _logged_model(client: MlflowClient, run_id: str):
    """The digitgen model a seed run logged, or None."""
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    # stores written before models were named per seed also hold a pytorch-flavour `model`: the pyfunc serves
    return next((m for m in models if m.name != "model"), None)


def logged_model_uri(run_id: str) -> str:
    """models:/<model_id> of the model a seed run logged."""
    model = _logged_model(MlflowClient(tracking_uri()), run_id)
    if model is None:
        raise TrackingError(f"run {run_id} logged no digitgen model; expected a seed run logged by `digitgen train`")
    return model.model_uri


def finish_seed_run(run_id: str, model_file: Path) -> None:
    """Tag the seed run with its model file's md5 (how evaluation and the registry find it again: run ids are
    kept out of DVC's cached outputs), then replace the earlier runs of the same seed under the same parent:
    they are deleted, and when they trained the same bytes, their evaluation moves to this run (DVC sees an
    unchanged model and does not evaluate it again)."""
    client = MlflowClient(tracking_uri())
    md5 = md5sum(model_file)
    with store_errors("tagging the seed run with its model"):
        client.set_tag(run_id, MODEL_MD5_TAG, md5)
        run = client.get_run(run_id)
        if FAILURE_TAG in run.data.tags:  # FAILED only because params.yaml changed; saved now under its own values
            client.delete_tag(run_id, FAILURE_TAG)
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent is None:
            return
        earlier = [
            r
            for r in client.search_runs(
                [run.info.experiment_id],
                f"tags.`mlflow.parentRunId` = '{parent}' AND tags.seed = '{run.data.tags['seed']}'",
            )
            if r.info.run_id != run_id
        ]
        for old in earlier:
            if old.data.tags.get(MODEL_MD5_TAG) == md5:
                _move_evaluation(client, old, run_id)
            client.delete_run(old.info.run_id)


def _move_evaluation(client: MlflowClient, old, run_id: str) -> None:
    """Copy an earlier run's evaluation (test/ metrics, evaluate. params, sample grid) to the run that replaces it."""
    metrics = {k: v for k, v in old.data.metrics.items() if k.startswith("test/")}
    params = {k: v for k, v in old.data.params.items() if k.startswith("evaluate.")}
    if not metrics:
        return
    model_id = _model_id(client, run_id)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0, model_id=model_id) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )
    with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(MlflowException, OSError):
        client.log_artifact(run_id, client.download_artifacts(old.info.run_id, EVALUATION_SAMPLES, tmp))


def _model_id(client: MlflowClient, run_id: str) -> str | None:
    model = _logged_model(client, run_id)
    return model and model.model_id


def seed_run_for(experiment: str, name: str, seed: str, model_file: Path, evaluation: dict[str, str]) -> str:
    """The newest finished run that trained `model_file` (by its md5) and holds no other evaluation settings,
    else a new run for it.

    A new run appears when the file was trained against another store (pulled from a DVC remote), or
    when the model is evaluated again under other settings (evaluate.* params differ; MLflow params are
    written once): the evaluation is still logged, to a run named like the training run and tagged
    with the same md5.
    """
    md5 = md5sum(model_file)
    exp_id = experiment_id(experiment)
    with store_errors("finding the seed run of a model"):
        found = MlflowClient().search_runs(
            [exp_id],
            f"tags.{MODEL_MD5_TAG} = '{md5}' AND attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
    for run in found:
        if all(run.data.params.get(k, v) == v for k, v in evaluation.items() if k != "evaluate.device"):
            return run.info.run_id
    with _run(
        experiment_id=exp_id,
        run_name=f"{name}/seed{seed}",
        description=f"{name}/seed{seed}: the evaluation of a model whose training run is not in this store "
        "or was evaluated under other settings",
    ) as run:
        mlflow.set_tags({MODEL_MD5_TAG: md5, "seed": seed, "trained_elsewhere": str(not found).lower()})
        return run.info.run_id


def log_evaluation(run_id: str, metrics: dict[str, float], evaluation: dict[str, str], test_file: Path, figure) -> None:
    """Evaluation results on a seed run: test/ metrics linked to its logged model and to the test split
    (logged as an input), the evaluation settings as params, the sample grid as an artifact."""
    client = MlflowClient(tracking_uri())
    with store_errors("logging the evaluation"):
        dataset = _dataset_input(test_file, f"mnist-{Path(test_file).stem}", "evaluation")
        _log_inputs(client, run_id, [dataset])
        model_id, now = _model_id(client, run_id), int(time.time() * 1000)
        logged = client.get_run(run_id).data.params
        client.log_batch(
            run_id,
            metrics=[
                Metric(
                    evaluation_metric(k),
                    float(v),
                    now,
                    0,
                    model_id=model_id,
                    dataset_name=dataset.dataset.name,
                    dataset_digest=dataset.dataset.digest,
                )
                for k, v in metrics.items()
            ],
            params=[Param(k, v) for k, v in evaluation.items() if k not in logged],
        )
        client.log_figure(run_id, figure, EVALUATION_SAMPLES)
    plt.close(figure)


# The aggregate stage: parent runs' summaries, the summary run, the registry
def parent_run_of(experiment: str, model_file: Path) -> str | None:
    """The parent (configuration) run of the seed run that trained `model_file`, if this store has it."""
    exp_id = experiment_id(experiment)  # first: it points MLflow at our store
    with store_errors("finding a configuration's run"):
        found = MlflowClient().search_runs(
            [exp_id], f"tags.{MODEL_MD5_TAG} = '{md5sum(model_file)}'", order_by=["attributes.start_time DESC"]
        )
    return next((r.data.tags["mlflow.parentRunId"] for r in found if "mlflow.parentRunId" in r.data.tags), None)


def run_data(run_id: str):
    """A run's params, metrics and tags (mlflow.entities.RunData)."""
    with store_errors("reading a run"):
        return MlflowClient(tracking_uri()).get_run(run_id).data


def log_to_run(run_id: str, metrics: dict[str, float]) -> None:
    """A configuration's mean and std over seeds on its parent run (step 0), to SIGNIFICANT_DIGITS as the run
    table shows them, with what tells its row apart in the Table 1 view: tags `family` (CAE, CVAE, ...) and
    `epochs`, and its latent size as the metric `latent_dim` (MLflow sorts tags as text: 16 before 8)."""
    now = int(time.time() * 1000)
    client = MlflowClient(tracking_uri())
    with store_errors("logging to a configuration's run"):
        run = client.get_run(run_id)
        kind, latent_dim = run.data.tags["model"], run.data.tags["latent_dim"]
        client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(f"{float(v):.{SIGNIFICANT_DIGITS}g}"), now, 0)
                for k, v in {**metrics, "latent_dim": float(latent_dim)}.items()
            ],
            tags=[
                RunTag("family", kind.upper().replace("_", "-")),
                RunTag("epochs", run.data.params.get("train.epochs", "")),
            ],
        )


def log_summary(experiment: str, table, markdown: str, files: list[Path], decision: dict[str, object]) -> str:
    """A `summary` run holding Table 1 (an MLflow table of plain numbers, and as markdown), the results files
    and the champion decision (tags champion.*, metrics champion/*)."""
    with _run(
        experiment_id=experiment_id(experiment),
        run_name="summary",
        description="Table 1 over every configuration, the figures, and the champion decision",
    ) as run:
        mlflow.set_tags({"summary": "true", **{f"champion.{k}": str(v) for k, v in decision.items()}})
        mlflow.log_metrics(
            {
                f"champion/{k}": float(v)
                for k, v in decision.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        shown = table.map(lambda v: float(f"{v:.{SIGNIFICANT_DIGITS}g}") if isinstance(v, float) else v)
        mlflow.log_table(data=shown.reset_index(), artifact_file="table1.json")
        mlflow.log_text(markdown, "table1.md")
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="figures" if path.suffix == ".png" else None)
    _show_table1(
        run.info.experiment_id,
        run.info.run_id,
        [c.removesuffix("_mean") for c in table.columns if c.endswith("_mean") and "_paper_" not in c],
    )
    print(
        f"MLflow: Table 1 in the runs view, after `uv run mlflow ui --backend-store-uri {tracking_uri()}`: "
        f"{runs_link(run.info.experiment_id)}"
    )
    return run.info.run_id


def runs_link(exp_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The UI page of the Table 1 view, in model-training mode whatever the browser chose before."""
    return f"{server}/#/experiments/{exp_id}/runs?viewStateShareKey={TABLE1_VIEW}&{UI_MODE}"


def table1_view(metrics: list[str]) -> dict:
    """The Table 1 runs view as MLflow's UI saves one: the parent runs that aggregate summarized (they carry the
    metric latent_dim), by latent size, with family, epochs, the DVC experiment and each metric's mean."""
    names = [f"{evaluation_metric(m)}_mean" for m in metrics]
    means = [f"metrics.`{name}`" for name in names]
    columns = ["tags.`family`", "metrics.`latent_dim`", "tags.`epochs`", *means, "tags.`dvc_exp_name`"]
    return {
        "searchFilter": "metrics.latent_dim >= 0",
        "orderByKey": "metrics.`latent_dim`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {"tags.`family`": 100, "metrics.`latent_dim`": 90, "tags.`epochs`": 70}
        | {f"metrics.`{name}`": 7 * len(name) + 24 for name in names},  # the whole name: test/gen_accuracy_mean
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": None,
    }


def _show_table1(exp_id: str, summary_run: str, metrics: list[str]) -> None:
    """Save the Table 1 view on the experiment, and put in its description (above the run table) one-click links:
    the summary run's Table 1 and, per latent size, CAE against CVAE in MLflow's Compare page."""
    client = MlflowClient(tracking_uri())
    now = int(time.time() * 1000)
    view = {"name": "Table 1", "createdAt": now, "updatedAt": now, "state": json.dumps(table1_view(metrics))}
    with store_errors("saving the Table 1 view"):
        parents = client.search_runs([exp_id], "metrics.latent_dim >= 0", order_by=["attributes.start_time DESC"])
        latest: dict[tuple[str | None, str | None], str] = {}  # (family, latent_dim) -> the newest parent run
        for run in parents:
            latest.setdefault((run.data.tags.get("family"), run.data.tags.get("latent_dim")), run.info.run_id)
        compare = [
            f"[CAE against CVAE at latent size {latent_dim}](#/compare-runs?runs="
            f"{urllib.parse.quote(json.dumps([latest[('CAE', latent_dim)], run_id]))}"
            f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}&{UI_MODE})"
            for (family, latent_dim), run_id in sorted(latest.items(), key=lambda item: int(item[0][1] or 0))
            if family == "CVAE" and ("CAE", latent_dim) in latest
        ]
        links = [f"[Table 1](#/experiments/{exp_id}/runs/{summary_run}/artifactPath/table1.json?{UI_MODE})", *compare]
        client.set_experiment_tag(exp_id, TABLE1_VIEW_TAG, json.dumps(view))
        client.set_experiment_tag(exp_id, "mlflow.note.content", " · ".join(links) + "\n\n" + EXPERIMENT_DESCRIPTION)


def not_found(err: MlflowException) -> bool:
    """Whether MLflow refused because the store holds no such model, version, alias or run (not because it failed)."""
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def champion(model_name: str):
    """The model version `champion` points at, or None."""
    mlflow.set_tracking_uri(tracking_uri())
    with store_errors("looking up the champion"):  # a store that fails is not "no champion yet"
        try:
            return MlflowClient().get_model_version_by_alias(model_name, CHAMPION_ALIAS)
        except MlflowException as err:
            if not not_found(err):
                raise
            return None  # no such model or alias yet


def register_version(run_id: str, model_name: str, model_description: str, description: str, tags: dict[str, str]):
    """A version of `model_name` holding the seed run's logged model (the one registered before, when this run's
    model already has one), with its description and tags."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    with store_errors("registering the model"):
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name, description=model_description)
        source = logged_model_uri(run_id)
        version = next(
            (v for v in client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")), None
        )
        if version is None:
            version = client.create_model_version(
                model_name, source, run_id=run_id, description=description, model_id=source.removeprefix("models:/")
            )
        else:
            client.update_model_version(model_name, version.version, description=description)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version.version, key, value)
        return client.get_model_version(model_name, version.version)


def set_champion(model_name: str, version: str) -> None:
    with store_errors("moving the champion alias"):
        MlflowClient(tracking_uri()).set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
