"""Past one configuration at a time: seeds in parallel processes, seeds as Ray tasks on a cluster of
several nodes (on 127.0.0.1), and the error that keeps a remote cluster off a store only this machine sees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import alive, make_params, params_raw
from mlflow.tracking import MlflowClient

from digitgen.models import load_model
from digitgen.params import DigitgenError
from digitgen.train import run_train

pytestmark = pytest.mark.slow  # every test here starts seed workers: processes or a Ray cluster


def _train(params, prepared_dir, root: Path, kind="cvae") -> dict:
    return run_train(params, kind, 4, prepared_dir, root / "models", root / "histories", root / "checkpoints")


def _weights(root: Path, seed: int) -> dict[str, torch.Tensor]:
    return load_model(root / "models" / f"seed{seed}.pt").state_dict()


def _assert_same_weights(a: Path, b: Path, seeds) -> None:
    for seed in seeds:
        wa, wb = _weights(a, seed), _weights(b, seed)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"seed {seed}"


def _seed_runs(runs: dict) -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(runs["parent_run_id"])
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


TWO_SEEDS = {"seeds": [0, 1], "epochs": 1}
ONE_THREAD = {"threads": 1}


def test_seeds_trained_in_parallel_processes_reach_the_weights_each_reaches_alone(prepared_dir, tmp_path, mlflow_store):
    alone = _train(make_params(train=TWO_SEEDS, execution=ONE_THREAD), prepared_dir, tmp_path / "alone")
    parallel = _train(
        make_params(train=TWO_SEEDS, execution={**ONE_THREAD, "executor": "processes", "workers": 2}),
        prepared_dir,
        tmp_path / "parallel",
    )
    _assert_same_weights(tmp_path / "alone", tmp_path / "parallel", [0, 1])
    assert (tmp_path / "alone" / "histories" / "seed1.csv").read_text() == (
        tmp_path / "parallel" / "histories" / "seed1.csv"
    ).read_text()
    children = _seed_runs(parallel)
    assert sorted(c.info.run_name for c in children) == ["cvae-4/seed0", "cvae-4/seed1"]
    assert {c.info.status for c in children} == {"FINISHED"}
    pids = {c.data.tags["process_pid"] for c in children}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes, not this one
    assert alone["seed_run_ids"].keys() == parallel["seed_run_ids"].keys()


TRAINER = """
import sys
from pathlib import Path
from digitgen.params import load_params
from digitgen.train import run_train

root = Path(sys.argv[1])
run_train(load_params(root / "params.yaml"), "cae", 4, root / "prepared", root / "models", root / "histories",
          root / "checkpoints")
"""


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_sigterm_to_a_trainer_with_seed_workers_keeps_their_checkpoints_marks_runs_killed_and_leaves_no_orphan(
    prepared_dir, tmp_path, mlflow_store
):
    epochs = 5000  # a tiny epoch takes ~0.1 s: a worker cannot finish while a loaded machine still starts the other
    raw = params_raw(
        train={"seeds": [0, 1], "epochs": epochs},
        execution={"executor": "processes", "workers": 2, "threads": 1},
        limits={"epochs": epochs},  # past the default limit: raised, as a user would
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    checkpoints = [tmp_path / "checkpoints" / f"seed{s}.pt" for s in (0, 1)]
    deadline = time.monotonic() + 600  # a loaded machine takes minutes to start the trainer and its workers
    while not all(c.exists() for c in checkpoints) and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(c.exists() for c in checkpoints), trainer.communicate()[0]
    workers = _children(trainer.pid)
    assert len(workers) >= 2
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(60) != 0
    deadline = time.monotonic() + 30
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))  # no worker left training
    client = MlflowClient(mlflow_store)
    for checkpoint in checkpoints:
        saved = torch.load(checkpoint, weights_only=True)
        assert 1 <= len(saved["history"]) < epochs  # the last finished epoch kept
        assert client.get_run(saved["run_id"]).info.status == "KILLED"
    parent = json.loads((tmp_path / "checkpoints" / "state.json").read_text())["parent_run_id"]
    assert client.get_run(parent).info.status == "KILLED"


def test_a_remote_ray_cluster_with_a_store_only_this_machine_reaches_is_one_line_naming_the_fix(
    prepared_dir, tmp_path, mlflow_store, monkeypatch
):
    monkeypatch.setenv("RAY_ADDRESS", "ray://198.51.100.7:10001")  # TEST-NET-2: another machine, never reachable
    started = time.monotonic()
    with pytest.raises(DigitgenError) as err:
        _train(make_params(execution={"executor": "ray"}), prepared_dir, tmp_path)
    assert time.monotonic() - started < 30  # refused before any connection is tried
    assert str(err.value) == (
        f"RAY_ADDRESS ray://198.51.100.7:10001 is another machine, which cannot reach the MLflow "
        f"store {mlflow_store}; set MLFLOW_TRACKING_URI to a tracking server every node can "
        "reach (docs/scaling-out.md)"
    )
    assert not (tmp_path / "checkpoints" / "seed0.pt").exists()


def test_seeds_as_ray_tasks_on_two_worker_nodes_reach_the_local_executors_weights(
    prepared_dir, tmp_path, mlflow_store, ray_cluster
):
    on_ray = _train(
        make_params(train=TWO_SEEDS, execution={**ONE_THREAD, "executor": "ray"}), prepared_dir, tmp_path / "ray"
    )
    local = _train(make_params(train=TWO_SEEDS, execution=ONE_THREAD), prepared_dir, tmp_path / "local")
    _assert_same_weights(tmp_path / "local", tmp_path / "ray", [0, 1])
    children = _seed_runs(on_ray)
    assert {c.info.status for c in children} == {"FINISHED"} and len(children) == 2
    assert len({c.data.tags["process_pid"] for c in children}) == 2  # one task on each worker node
    assert on_ray["seed_run_ids"].keys() == local["seed_run_ids"].keys()
    assert not (tmp_path / "ray" / "checkpoints").exists()
