"""The training loop: it learns, it is reproducible, it resumes, and MLflow sees every run."""

from __future__ import annotations

import signal
import subprocess

import mlflow
import pytest
import torch
from conftest import make_params
from mlflow.tracking import MlflowClient

import digitgen
from digitgen import train as train_module
from digitgen.data import load_split, md5sum
from digitgen.models import ModelConfig, build_model, load_model
from digitgen.train import fit, read_history, run_train


class ListLogger:
    def __init__(self):
        self.rows = []

    def log_epoch(self, epoch, metrics):
        self.rows.append((epoch, metrics))


def _fit(prepared_dir, tmp_path, kind="cae", seed=0, epochs=2):
    params = make_params(train={"epochs": epochs})
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind, latent_dim=4, hidden_dim=32))
    train, val = load_split(prepared_dir, "train"), load_split(prepared_dir, "val")
    history = fit(
        model,
        train,
        val,
        params.train,
        seed,
        ListLogger(),
        tmp_path / f"ckpt-{kind}-{seed}.pt",
        None,
        torch.device("cpu"),
        "test",
    )
    return model, history


@pytest.mark.parametrize("kind", ["cae", "cvae"])
def test_a_few_epochs_lower_the_validation_loss(kind, prepared_dir, tmp_path):
    _, history = _fit(prepared_dir, tmp_path, kind, epochs=3)
    assert history[-1]["val_loss"] < history[0]["val_loss"] < 544  # 544 = 784 * ln 2, an untrained decoder
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert set(history[0]) >= {"train_bce", "train_nll", "train_kl", "val_bce", "val_nll", "val_kl"}


@pytest.mark.slow  # trains three times
def test_same_seed_gives_identical_weights_and_another_seed_does_not(prepared_dir, tmp_path):
    a, _ = _fit(prepared_dir, tmp_path, "cvae", seed=0)
    b, _ = _fit(prepared_dir, tmp_path, "cvae", seed=0)
    c, _ = _fit(prepared_dir, tmp_path, "cvae", seed=1)
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name
    assert not all(torch.equal(wa, wc) for wa, wc in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def _run(params, prepared_dir, root, kind="cvae"):
    return run_train(params, kind, 4, prepared_dir, root / "models", root / "histories", root / "checkpoints")


@pytest.mark.slow  # trains three times
def test_an_interrupted_run_resumes_from_its_last_epoch_and_ends_where_an_uninterrupted_one_does(
    prepared_dir, tmp_path, mlflow_store, monkeypatch
):
    params = make_params(train={"epochs": 3, "seeds": [0]})
    straight = _run(params, prepared_dir, tmp_path / "straight")

    real_validation = train_module.validation_losses
    calls = []

    def killed_during_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # what `kill` or a CI timeout sends (to this thread, not MLflow's)
        return real_validation(*args, **kwargs)

    monkeypatch.setattr(train_module, "validation_losses", killed_during_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _run(params, prepared_dir, tmp_path / "resumed")
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "seed0.pt", weights_only=True)
    assert len(checkpoint["history"]) == 1  # epoch 1 finished, epoch 2 did not
    client = MlflowClient()
    assert client.get_run(checkpoint["run_id"]).info.status == "KILLED"

    monkeypatch.setattr(train_module, "validation_losses", real_validation)
    resumed = _run(params, prepared_dir, tmp_path / "resumed")
    assert resumed["seed_run_ids"]["0"] == checkpoint["run_id"]  # the same MLflow run, continued
    assert client.get_run(checkpoint["run_id"]).info.status == "FINISHED"
    assert [r["epoch"] for r in read_history(tmp_path / "resumed" / "histories" / "seed0.csv")] == [1, 2, 3]
    a = load_model(tmp_path / "straight" / "models" / "seed0.pt").state_dict()
    b = load_model(tmp_path / "resumed" / "models" / "seed0.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # cleaned up after success
    assert straight["seed_run_ids"]["0"] != resumed["seed_run_ids"]["0"]


@pytest.mark.slow  # trains twice
def test_changed_params_do_not_resume_a_stale_checkpoint(prepared_dir, tmp_path, mlflow_store, monkeypatch):
    monkeypatch.setattr(train_module, "validation_losses", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run(make_params(train={"epochs": 2, "seeds": [0]}), prepared_dir, tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    runs = _run(make_params(train={"epochs": 2, "seeds": [0], "lr": 0.002}), prepared_dir, tmp_path)
    assert [r["epoch"] for r in read_history(tmp_path / "histories" / "seed0.csv")] == [1, 2]
    assert MlflowClient().get_run(runs["seed_run_ids"]["0"]).data.params["train.lr"] == "0.002"


@pytest.mark.slow  # trains two seeds
def test_mlflow_holds_one_parent_per_configuration_and_one_child_per_seed(prepared_dir, tmp_path, mlflow_store):
    params = make_params(train={"epochs": 2, "seeds": [0, 1]})
    runs = _run(params, prepared_dir, tmp_path, kind="cae")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["seed0.pt", "seed1.pt"]  # no run ids

    client = MlflowClient()
    experiment = client.get_experiment_by_name("digitgen-test")
    parent = client.get_run(runs["parent_run_id"])
    assert parent.info.run_name == "cae-4" and parent.info.experiment_id == experiment.experiment_id
    assert parent.data.tags["model"] == "cae" and parent.data.tags["latent_dim"] == "4"
    where = {"mlflow.source.git.commit", "git_dirty", "dvc_stage", "dvc_exp_name"}
    assert where <= set(parent.data.tags)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["cae-4/seed0", "cae-4/seed1"]
    for child in children:
        seed = child.data.tags["seed"]
        assert runs["seed_run_ids"][seed] == child.info.run_id and child.info.status == "FINISHED"
        assert where <= set(child.data.tags)
        assert child.data.params["train.lr"] == "0.001" and child.data.params["model.latent_dim"] == "4"
        assert child.data.params["train.device"] == "cpu" and "model.hidden_dims" not in child.data.params
        assert child.data.params["seed"] == seed
        val_loss = client.get_metric_history(child.info.run_id, "val/loss")
        assert [m.step for m in val_loss] == [1, 2]
        assert {
            "train/loss",
            "train/bce",
            "train/nll",
            "val/bce",
            "val/nll",
            "val/accuracy",
            "train/epoch_seconds",
        } <= set(child.data.metrics)
        assert not {"train/kl", "val/kl"} & set(child.data.metrics)  # the CAE has no KL term
        assert child.data.tags["model_md5"] == md5sum(tmp_path / "models" / f"seed{seed}.pt")
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"loss_curves.png", "reconstructions.png", "generations.png"} <= artifacts
        inputs = {d.dataset.name: d for d in child.inputs.dataset_inputs}
        assert set(inputs) == {"mnist-train", "mnist-val"}
        assert inputs["mnist-train"].dataset.digest == md5sum(prepared_dir / "train.pt")[:8]
        (logged,) = client.search_logged_models(
            [experiment.experiment_id], filter_string=f"source_run_id = '{child.info.run_id}'"
        )
        assert logged.name == f"cae-4-seed{seed}"
    served = digitgen.load(f"runs:/{runs['seed_run_ids']['0']}")
    saved = load_model(tmp_path / "models" / "seed0.pt")
    images = load_split(prepared_dir, "test").float_images()[:5]
    assert torch.allclose(served.net.classify(images), saved.classify(images))


@pytest.mark.slow  # git, and trains twice
def test_training_again_at_the_same_clean_commit_replaces_its_runs_instead_of_duplicating(
    prepared_dir, tmp_path, mlflow_store
):
    """A forced re-run (`dvc repro -f`) of one configuration, seed, commit and params keeps one run per seed."""
    for command in (
        ["init", "-q"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "code"],
    ):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    params = make_params(train={"epochs": 1, "seeds": [0]})
    first = _run(params, prepared_dir, tmp_path, kind="cae")
    second = _run(params, prepared_dir, tmp_path, kind="cae")
    assert second["parent_run_id"] == first["parent_run_id"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digitgen-test").experiment_id
    (seed_run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{first['parent_run_id']}'")
    assert seed_run.info.run_id == second["seed_run_ids"]["0"]
    assert client.get_run(first["seed_run_ids"]["0"]).info.lifecycle_stage == "deleted"
    assert seed_run.data.tags["git_dirty"] == "false"


@pytest.mark.slow  # trains two seeds twice
def test_retraining_with_nothing_changed_writes_the_same_bytes_so_dvc_sees_no_change(
    prepared_dir, tmp_path, mlflow_store
):
    """What DVC caches (model files, histories) holds no run ids, paths or timings: `dvc repro -f train@...`
    with unchanged code, params and machine leaves every hash, so evaluation does not rerun."""
    params = make_params(train={"epochs": 2, "seeds": [0, 1]})

    def outputs():
        return {
            p.relative_to(tmp_path): p.read_bytes() for d in ("models", "histories") for p in (tmp_path / d).rglob("*")
        }

    first_runs = _run(params, prepared_dir, tmp_path, kind="cae")
    first = outputs()
    second_runs = _run(params, prepared_dir, tmp_path, kind="cae")
    assert outputs() == first and len(first) == 4
    assert first_runs["seed_run_ids"] != second_runs["seed_run_ids"]  # new MLflow runs, same cached bytes
    assert "epoch_seconds" not in (tmp_path / "histories" / "seed0.csv").read_text()


def test_the_default_store_is_the_sqlite_file_at_the_dvc_root_with_artifacts_beside_it(tmp_path, monkeypatch):
    from digitgen import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)  # not the root: like a stage of pipelines/smoke
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = mlflow.get_experiment(tracking.experiment_id("digitgen-test"))
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert (tmp_path / "mlflow.db").is_file()
