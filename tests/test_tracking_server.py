"""A shared MLflow tracking server on 127.0.0.1 (artifacts proxied through it): the pipeline and two queued
experiments running at once log to it with no run lost or doubled; on a PostgreSQL backend too, where
one can be started here."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import BIN, GIT_IDENTITY, command_env, copy_from_repo, free_port, make_params, params_raw
from mlflow.tracking import MlflowClient

from digitgen.data import MIRROR_ENV
from digitgen.train import run_train

pytestmark = pytest.mark.slow  # every test here starts an MLflow tracking server


@pytest.fixture
def start_server(tmp_path):
    """start_server(backend_uri) -> the URL of `mlflow server` on 127.0.0.1, artifacts proxied to tmp_path."""
    servers = []

    def start(backend_uri: str) -> str:
        port = free_port()
        log = open(tmp_path / f"mlflow-server-{port}.log", "w")
        server = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                (tmp_path / "artifacts").as_uri(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=command_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # one process fewer
        servers.append((server, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # seconds on an idle machine, minutes on a loaded one
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    return url
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise AssertionError((tmp_path / f"mlflow-server-{port}.log").read_text()[-3000:])

    yield start
    for server, log in servers:
        server.terminate()
        server.wait(30)
        log.close()


def _runs(url: str, experiment: str) -> list:
    client = MlflowClient(url)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def _env(url: str, mnist_dir: Path) -> dict:
    return command_env(MLFLOW_TRACKING_URI=url, **{MIRROR_ENV: str(mnist_dir)}, **GIT_IDENTITY)


def test_the_pipeline_and_two_queued_experiments_at_once_log_every_run_once_to_a_shared_server(
    tmp_path, mnist_dir, start_server
):
    url = start_server(f"sqlite:///{tmp_path / 'server.db'}")
    root = copy_from_repo(["dvc.yaml", "src", ".dvcignore"], tmp_path / "project")
    raw = params_raw(
        study={"models": ["cae"], "latent_dims": [4]}, train={"epochs": 1}, label_cvae={"latent_dim": 2}
    )  # dvc.yaml names its stages from it
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    env = _env(url, mnist_dir)

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "repro", "train@cae-4")  # download, split, train: the tiny pipeline up to the train matrix
    run("git", "add", "-A")
    run("git", "commit", "-qm", "first run")
    for lr in ("0.002", "0.003"):
        run(*dvc, "exp", "run", "--queue", "-S", f"train.lr={lr}", "train@cae-4")
    run(*dvc, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(*dvc, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2 and "Failed" not in status, status

    runs = _runs(url, "digitgen-test")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    seeds = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["train.lr"] for r in parents) == ["0.001", "0.002", "0.003"]  # none lost, none twice
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in seeds) == sorted(r.info.run_id for r in parents)
    assert {r.info.status for r in runs} == {"FINISHED"}
    for seed in seeds:  # artifacts went through the server into its artifact store
        assert seed.info.artifact_uri.startswith("mlflow-artifacts:")
        assert list((tmp_path / "artifacts").rglob(f"{seed.info.run_id}/artifacts/loss_curves.png"))


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server here (apt-get install -y postgresql)")
    return Path(found[-1]).parent


@pytest.fixture
def postgres():
    """A PostgreSQL cluster in a temporary folder on 127.0.0.1 (run as user postgres when we are root:
    initdb refuses root); its database `mlflow`, as a SQLAlchemy URI."""
    pytest.importorskip(
        "psycopg2", reason="psycopg2 is not installed (the postgres extra: uv sync --frozen --extra postgres)"
    )
    bin_dir = _postgres_bin()
    as_user = []
    data = Path(tempfile.mkdtemp(prefix="digitgen-pg-"))  # not under pytest's root-only temp folders
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        try:
            shutil.chown(data, "postgres")
        except LookupError:
            pytest.skip("running as root and there is no user postgres to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    started = subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"],
        capture_output=True,
        text=True,
    )
    if started.returncode == 0:
        started = subprocess.run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data / "db"),
                "-w",
                "-l",
                str(data / "log"),
                "-o",
                f"-h 127.0.0.1 -p {port} -k {data}",
                "start",
            ],
            capture_output=True,
            text=True,
        )
    if started.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        pytest.skip(f"PostgreSQL does not start here: {(started.stderr or started.stdout).strip()[:300]}")
    try:
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"], check=True
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(data, ignore_errors=True)


def test_a_server_on_postgresql_holds_the_configuration_and_its_seed_runs(
    tmp_path, prepared_dir, start_server, postgres, monkeypatch
):
    url = start_server(postgres)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    runs = run_train(
        make_params(train={"epochs": 1, "seeds": [0, 1]}),
        "cae",
        4,
        prepared_dir,
        tmp_path / "models",
        tmp_path / "histories",
        tmp_path / "checkpoints",
    )
    logged = _runs(url, "digitgen-test")
    assert sorted(r.info.run_id for r in logged) == sorted([runs["parent_run_id"], *runs["seed_run_ids"].values()])
    assert {r.info.status for r in logged} == {"FINISHED"}
    client = MlflowClient(url)
    assert [m.step for m in client.get_metric_history(runs["seed_run_ids"]["1"], "val/loss")] == [1]
    assert {a.path for a in client.list_artifacts(runs["seed_run_ids"]["0"])} >= {"loss_curves.png", "generations.png"}
