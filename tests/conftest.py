"""Fixtures that build tiny data sets: IDX files written by the test, or real MNIST subsets from ../shared/mnist."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from digitgen.data import Digits, load_raw
from digitgen.params import parse_params

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"
LOOPBACK = "127.0.0.1"  # every server a test starts binds here
BIN = Path(sys.executable).parent  # this environment's `dvc`, `digitgen` and `mlflow`
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}  # for the commits a test makes

# every configuration's per-seed evaluations, as the evaluate stage writes them: two seeds of CAE (8) and CVAE (8)
SEEDS = {
    "cae-8": {
        "0": {
            "gen_accuracy": 0.8,
            "fid": 30.0,
            "inception_score": 8.0,
            "classification_accuracy": 0.95,
            "reconstruction_error": 90.0,
        },
        "1": {
            "gen_accuracy": 0.9,
            "fid": 34.0,
            "inception_score": 9.0,
            "classification_accuracy": 0.97,
            "reconstruction_error": 80.0,
        },
    },
    "cvae-8": {
        "0": {
            "gen_accuracy": 0.7,
            "fid": 10.0,
            "inception_score": 7.0,
            "classification_accuracy": 0.93,
            "reconstruction_error": 100.0,
        },
        "1": {
            "gen_accuracy": 0.7,
            "fid": 12.0,
            "inception_score": 7.5,
            "classification_accuracy": 0.94,
            "reconstruction_error": 104.0,
        },
    },
}


def command_env(**extra: str) -> dict[str, str]:
    """The environment for a command a test starts: this one, with BIN first on PATH (a stage's `digitgen`,
    MLflow's `uvicorn`), plus `extra`."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def alive(pid: int) -> bool:
    """Whether process `pid` is running: it exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def copy_from_repo(names, root: Path) -> Path:
    """The repository's files and folders `names` copied into `root` (the layout a pipeline test needs)."""
    for name in names:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    return root


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as a gzipped IDX file, the MNIST format."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST} (the offline mirror beside the repository)")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def mnist_subset(mnist_dir) -> dict[str, Digits]:
    """A fixed real-MNIST subset: 1,000 train, 200 validation, 200 test images."""
    train, test = load_raw(mnist_dir, "train"), load_raw(mnist_dir, "t10k")
    return {
        "train": Digits(train.images[:1000], train.labels[:1000]),
        "val": Digits(train.images[1000:1200], train.labels[1000:1200]),
        "test": Digits(test.images[:200], test.labels[:200]),
    }


def save_prepared(splits: dict[str, Digits], out: Path) -> Path:
    """Splits saved the way the split stage saves them."""
    out.mkdir(parents=True, exist_ok=True)
    for name, digits in splits.items():
        digits.save(out / f"{name}.pt")
    return out


@pytest.fixture
def prepared_dir(tmp_path, mnist_subset) -> Path:
    """mnist_subset saved the way the split stage saves it."""
    return save_prepared(mnist_subset, tmp_path / "prepared")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder ./mlruns lands in the temp dir
    return uri


def params_raw(**sections) -> dict:
    """Valid params at test size, as params.yaml holds them; keyword arguments replace keys inside a section:
    train={"epochs": 1}."""
    train = {
        "seeds": [0],
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.001,
        "device": "cpu",
        "input_modes": {"image_digit": 1, "image": 1, "digit": 1},
    }
    raw = {
        "data": {"mirrors": ["unused"], "train_size": 1000, "val_size": 200, "test_size": 200, "split_seed": 0},
        "study": {"models": ["cae", "cvae"], "latent_dims": [4]},
        "model": {"hidden_dim": 32},
        "train": train,
        "pcvae": {
            "latent_dims": [4],
            "hidden_dim": 32,
            "channels": [4, 8],
            "label_weight": 50,
            "kl_warmup_epochs": 1,
            "train": dict(train),  # its own copy: a keyword argument train={...} changes the study's only
        },
        "tracking": {"experiment": "digitgen-test"},
        "registry": {"model_name": "digitgen-test", "champion_metric": "fid"},
        "classifier": {
            "seed": 0,
            "epochs": 8,
            "batch_size": 32,
            "lr": 0.003,
            "channels": [8, 16],
            "kernel_size": 5,
            "feature_dim": 32,
            "min_test_accuracy": 0.5,
            "device": "cpu",
        },
        "evaluate": {
            "n_generated": 200,
            "sampler": "study",
            "is_splits": 2,
            "batch_size": 100,
            "seed": 0,
            "inception_weights": None,
            "grid_columns": 4,
            "device": "cpu",
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_params(**sections):
    """params_raw, validated: the Params a stage takes."""
    return parse_params(params_raw(**sections))


@dataclass(frozen=True)
class Trained:
    """A tiny trained model: its file, its seed run and the MLflow store that holds the run."""

    path: Path
    run_id: str
    tracking_uri: str


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, mnist_subset) -> dict[str, Trained]:
    """A CAE and a CVAE (hidden_dim 32, latent_dim 4, one epoch, one seed) trained and logged once per session.

    Tests that reach the MLflow store set $MLFLOW_TRACKING_URI to `tracking_uri` themselves.
    """
    from digitgen.train import run_train

    root = tmp_path_factory.mktemp("trained")
    prepared = root / "prepared"
    prepared.mkdir()
    for name, digits in mnist_subset.items():
        digits.save(prepared / f"{name}.pt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    trained = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)  # MLflow's artifacts land beside the store
        for kind in ("cae", "cvae"):
            runs = run_train(
                make_params(train={"epochs": 1}),
                kind,
                4,
                prepared,
                root / "models" / kind,
                root / "histories" / kind,
                root / "checkpoints" / kind,
            )
            trained[kind] = Trained(root / "models" / kind / "seed0.pt", runs["seed_run_ids"]["0"], uri)
    return trained


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, mnist_subset) -> Path:
    """The classifier stage run at test size on mnist_subset (about 98% test accuracy); its weights' path."""
    from digitgen.classifier import run_classifier

    root = tmp_path_factory.mktemp("classifier")
    run_classifier(
        make_params().classifier,
        save_prepared(mnist_subset, root / "prepared"),
        root / "classifier.pt",
        root / "classifier.json",
    )
    return root / "classifier.pt"


@pytest.fixture
def ray_cluster(monkeypatch):
    """A Ray cluster on 127.0.0.1: a head that runs no tasks and two worker nodes of one CPU each."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (the ray extra: uv sync --frozen --extra ray)")
    # every node and the driver on 127.0.0.1: Ray's single-machine mode, read when ray is first imported
    assert "ray" not in sys.modules, "ray was imported before this fixture could keep it on 127.0.0.1"
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    yield cluster
    cluster.shutdown()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
