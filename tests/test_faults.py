"""Faults injected on purpose: kills, a second trainer, divergence, a full or read-only disk, a tracking store
that is down, corrupted files and bad input. Each ends in one line naming the problem and the fix, a
non-zero exit and nothing half-written; a re-run after the fix resumes where the fault struck."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pytest
import torch
import yaml
from conftest import REPO, alive, command_env, copy_from_repo, params_raw
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from digitgen import serving, tracking
from digitgen import train as train_module
from digitgen.cli import main
from digitgen.files import StorageError
from digitgen.models import load_model, save_model
from digitgen.params import DigitgenError, ParamsError, load_params, parse_params
from digitgen.tracking import TrackingError
from digitgen.train import DivergenceError, read_history, run_train

PIPELINE_FILES = ["dvc.yaml", "pyproject.toml", "src", ".dvc/config", ".dvcignore"]  # what `dvc repro` needs


def _params(**sections):
    return parse_params(params_raw(**sections))


def _train(params, prepared_dir, root, kind="cvae"):
    return run_train(params, kind, 4, prepared_dir, root / "models", root / "histories", root / "checkpoints")


class _NoLogger:
    def log_epoch(self, epoch, metrics):
        pass


def _fit_uninterrupted(params, prepared_dir, kind: str, checkpoint: Path) -> torch.nn.Module:
    """The weights a run_train that nothing interrupts reaches (the same seeding and loop, without MLflow)."""
    torch.manual_seed(0)
    model = train_module.build_model(train_module.model_setup(params, kind, 4)[0])
    train_module.fit(
        model,
        train_module.load_split(prepared_dir, "train"),
        train_module.load_split(prepared_dir, "val"),
        params.train,
        0,
        _NoLogger(),
        checkpoint,
        None,
        torch.device("cpu"),
        "uninterrupted",
    )
    return model


def _same_weights(path: Path, model: torch.nn.Module) -> bool:
    wa, wb = load_model(path).state_dict(), model.state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _status(run_id: str) -> str:
    return MlflowClient(tracking.tracking_uri()).get_run(run_id).info.status


def _one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"digitgen {command}: error: "), err
    return lines[0]


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs folders (a full or read-only disk); unmounted after the test."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        _mount_tmpfs(folder, options)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


# Kills: SIGTERM to the pipeline, kill -9 in the middle of a checkpoint write, a second trainer
@pytest.mark.slow  # runs dvc repro, kills it, runs it again
def test_sigterm_to_dvc_repro_stops_the_trainer_and_a_rerun_ends_where_an_uninterrupted_run_does(
    tmp_path, prepared_dir, monkeypatch
):
    root = copy_from_repo(PIPELINE_FILES, tmp_path / "repo")
    shutil.copytree(prepared_dir, root / "data" / "prepared")  # the split stage's output, as the fixture made it
    epochs = 60  # a tiny epoch takes ~0.1 s: enough of them that a loaded machine cannot finish before the signal
    raw = params_raw(
        study={"models": ["cae"], "latent_dims": [4]}, train={"epochs": epochs}, label_cvae={"latent_dim": 2}
    )  # dvc.yaml names its stages from it
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    repro = [sys.executable, "-m", "dvc", "repro", "--single-item", "train@cae-4"]  # the data is there already

    dvc = subprocess.Popen(repro, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint, lock = root / "checkpoints" / "cae-4" / "seed0.pt", root / "checkpoints" / "cae-4.lock"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and dvc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), dvc.communicate()[0]
    trainer = int(lock.read_text())
    dvc.send_signal(signal.SIGTERM)  # what `kill <pid>` or a CI timeout sends; DVC passes nothing on to its stage
    dvc.wait(60)
    deadline = time.monotonic() + 60
    while alive(trainer) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(trainer)  # no orphaned trainer left writing to the checkpoints
    saved = torch.load(checkpoint, weights_only=True)
    assert 1 <= len(saved["history"]) < epochs  # the last finished epoch kept, training not finished
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    assert _status(saved["run_id"]) == "KILLED"

    again = subprocess.run(repro, cwd=root, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "train@cae-4" in (root / "dvc.lock").read_text()
    assert [r["epoch"] for r in read_history(root / "histories" / "cae-4" / "seed0.csv")] == list(range(1, epochs + 1))
    assert _status(saved["run_id"]) == "FINISHED"  # the same MLflow run, resumed

    straight = _fit_uninterrupted(load_params(root / "params.yaml"), prepared_dir, "cae", tmp_path / "straight.pt")
    assert _same_weights(root / "models" / "cae-4" / "seed0.pt", straight)


KILLED_IN_THE_SECOND_CHECKPOINT_WRITE = """
import os, signal, sys
from pathlib import Path
from digitgen import files
from digitgen.params import load_params
from digitgen.train import run_train

real_fsync, written = os.fsync, []

def fsync_then_die(fd):
    real_fsync(fd)
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".seed0.pt."):
        written.append(fd)
        if len(written) == 2:  # epoch 2's checkpoint is on disk under its temporary name, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)

files.os.fsync = fsync_then_die
root = Path(sys.argv[1])
run_train(load_params(root / "params.yaml"), "cvae", 4, root / "prepared", root / "models", root / "histories",
          root / "checkpoints")
"""


@pytest.mark.slow  # a trainer process, killed
def test_kill_9_during_a_checkpoint_write_keeps_the_last_checkpoint_and_a_rerun_resumes_it(
    prepared_dir, tmp_path, mlflow_store
):
    raw = params_raw(train={"epochs": 3})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert prepared_dir == tmp_path / "prepared"  # where the script looks
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_IN_THE_SECOND_CHECKPOINT_WRITE, str(tmp_path)], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.glob(".seed0.pt.*.tmp")]  # killed mid-write: the temporary file is there
    saved = torch.load(checkpoints / "seed0.pt", weights_only=True)  # and the checkpoint loads
    assert len(saved["history"]) == 1
    assert _status(saved["run_id"]) == "RUNNING"  # kill -9 leaves no chance to end the run

    # another start of the configuration (here with a new lr) finds the dead trainer's runs and ends them
    _train(_params(train={"epochs": 1, "lr": 0.002}), prepared_dir, tmp_path / "other")
    assert _status(saved["run_id"]) == "KILLED"

    resumed = _train(_params(train={"epochs": 3}), prepared_dir, tmp_path)
    assert resumed["seed_run_ids"]["0"] == saved["run_id"] and _status(saved["run_id"]) == "FINISHED"
    assert [r["epoch"] for r in read_history(tmp_path / "histories" / "seed0.csv")] == [1, 2, 3]
    straight = _fit_uninterrupted(_params(train={"epochs": 3}), prepared_dir, "cvae", tmp_path / "straight.pt")
    assert _same_weights(tmp_path / "models" / "seed0.pt", straight)


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from digitgen.files import folder_lock
with folder_lock(Path(sys.argv[1]), "trainer"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow  # a second process holds the lock
def test_a_second_trainer_on_the_same_checkpoints_stops_at_once_naming_the_first(tmp_path, prepared_dir, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw()))
    checkpoints = tmp_path / "checkpoints" / "cae-4"
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(checkpoints)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        started = time.monotonic()
        status = main(
            [
                "--params",
                str(tmp_path / "params.yaml"),
                "train",
                "--model",
                "cae",
                "--latent-dim",
                "4",
                "--data",
                str(prepared_dir),
                "--checkpoints",
                str(checkpoints),
                "--out",
                str(tmp_path / "models"),
                "--history",
                str(tmp_path / "histories"),
            ]
        )
        assert status == 2 and time.monotonic() - started < 5
        line = _one_line_error(capsys.readouterr().err, "train")
        assert f"is in use by another trainer (PID {first.pid})" in line and f"kill {first.pid}" in line
        assert not (tmp_path / "models").exists() and not checkpoints.exists()
    finally:
        first.kill()
        first.wait()


# Divergence
@pytest.mark.slow  # trains until the loss diverges
@pytest.mark.parametrize("kind", ["cae", "cvae"])
def test_a_divergent_learning_rate_fails_the_run_and_writes_no_model(kind, prepared_dir, tmp_path, mlflow_store):
    with pytest.raises(DivergenceError) as err:
        _train(_params(train={"epochs": 2, "lr": 1000}), prepared_dir, tmp_path, kind)
    message = str(err.value)
    assert message.startswith(f"{kind}-4 seed0 diverged at epoch 1: train_loss ")
    assert "lower train.lr (now 1000)" in message and "\n" not in message
    assert not list((tmp_path / "models").glob("*.pt"))
    runs = mlflow.search_runs(experiment_names=["digitgen-test"])
    assert set(runs.status) == {"FAILED"} and len(runs) == 2  # the configuration's run and the seed's


@pytest.mark.slow  # trains
def test_a_loss_past_max_loss_counts_as_divergence(prepared_dir, tmp_path, mlflow_store):
    with pytest.raises(DivergenceError, match=r"train_loss [\d.e+]+ \(limit: train.max_loss 10\); lower train.lr"):
        _train(_params(train={"epochs": 1, "max_loss": 10}), prepared_dir, tmp_path, "cae")


# The disk: full, read-only; files cut short
@pytest.mark.slow  # mounts a tmpfs; trains twice
def test_a_full_disk_names_the_path_keeps_the_last_checkpoint_and_a_rerun_resumes(
    prepared_dir, tmp_path, tmpfs, mlflow_store
):
    params = _params(train={"epochs": 2})
    straight = _fit_uninterrupted(params, prepared_dir, "cvae", tmp_path / "straight.pt")
    size_kb = (tmp_path / "straight.pt").stat().st_size * 3 // 2 // 1024  # room for one checkpoint, not two
    disk = tmpfs("disk", f"size={size_kb}k")

    with pytest.raises(StorageError) as err:
        run_train(params, "cvae", 4, prepared_dir, tmp_path / "models", tmp_path / "histories", disk / "checkpoints")
    assert str(err.value).startswith(f"no space left on {disk / 'checkpoints' / 'seed0.pt'}")
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["seed0.pt", "state.json"]  # no temp left
    saved = torch.load(disk / "checkpoints" / "seed0.pt", weights_only=True)
    assert len(saved["history"]) == 1 and _status(saved["run_id"]) == "FAILED"

    subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)  # the fix: space
    resumed = run_train(
        params, "cvae", 4, prepared_dir, tmp_path / "models", tmp_path / "histories", disk / "checkpoints"
    )
    assert resumed["seed_run_ids"]["0"] == saved["run_id"] and _status(saved["run_id"]) == "FINISHED"
    assert _same_weights(tmp_path / "models" / "seed0.pt", straight)


@pytest.mark.slow  # mounts a tmpfs
@pytest.mark.parametrize("where", ["out", "store"])
def test_a_read_only_output_folder_or_store_fails_before_training(where, prepared_dir, tmp_path, tmpfs, monkeypatch):
    read_only = tmpfs("ro", "size=10m")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.experiment_id("digitgen-test")  # a store with the experiment in it
    uri = f"sqlite:///{read_only / 'mlflow.db'}"
    if where == "store":  # its copy on a disk that then turns read-only
        shutil.copy(tmp_path / "mlflow.db", read_only / "mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    out = read_only / "models" if where == "out" else tmp_path / "models"
    started = time.monotonic()
    with pytest.raises((StorageError, TrackingError)) as err:
        run_train(_params(), "cae", 4, prepared_dir, out, tmp_path / "histories", tmp_path / "checkpoints")
    assert time.monotonic() - started < 30
    if where == "out":
        assert str(err.value).startswith(f"{out} is not writable (Read-only file system)")
    else:
        assert str(err.value).startswith(
            f"the MLflow store {uri} failed while starting a run (attempt to write a readonly database)"
        )
    assert not (tmp_path / "checkpoints" / "seed0.pt").exists()  # nothing trained


@pytest.mark.slow  # trains twice
def test_a_truncated_checkpoint_on_resume_is_one_line_naming_it(prepared_dir, tmp_path, mlflow_store, monkeypatch):
    monkeypatch.setattr(train_module, "validation_losses", _interrupt_in_epoch(2))
    with pytest.raises(KeyboardInterrupt):
        _train(_params(), prepared_dir, tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    checkpoint = tmp_path / "checkpoints" / "seed0.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(StorageError, match=f"^{checkpoint} is truncated or corrupt; delete it"):
        _train(_params(), prepared_dir, tmp_path)


def _interrupt_in_epoch(epoch: int):
    real, calls = train_module.validation_losses, []

    def validation_losses(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return validation_losses


# The tracking store: unreachable, and gone in the middle of training
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def test_an_unreachable_tracking_server_fails_in_seconds_naming_it(prepared_dir, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        _train(_params(), prepared_dir, tmp_path)
    assert time.monotonic() - started < 30  # MLflow's own defaults retry for minutes
    assert str(err.value).startswith(f"the MLflow store {uri} failed while opening the experiment (Connection refused)")


@pytest.mark.slow  # trains three times
def test_a_store_outage_during_training_is_reported_at_once_and_a_rerun_resumes(
    prepared_dir, tmp_path, mlflow_store, monkeypatch
):
    real_log = mlflow.log_metrics

    def outage_at_epoch_2(metrics, step=None, **kwargs):
        if step == 2:
            raise MlflowException(
                "API request to http://tracking:5000 failed with exception "
                "HTTPConnectionPool: Max retries exceeded ([Errno 111] Connection refused)"
            )
        return real_log(metrics, step=step, **kwargs)

    monkeypatch.setattr(mlflow, "log_metrics", outage_at_epoch_2)
    with pytest.raises(TrackingError) as err:
        _train(_params(train={"epochs": 3}), prepared_dir, tmp_path)
    assert "failed while logging epoch 2 (Connection refused)" in str(err.value)
    assert "run the same command again (a stopped training resumes from its last checkpoint)" in str(err.value)
    assert len(torch.load(tmp_path / "checkpoints" / "seed0.pt", weights_only=True)["history"]) == 1

    monkeypatch.setattr(mlflow, "log_metrics", real_log)  # the server is back
    _train(_params(train={"epochs": 3}), prepared_dir, tmp_path)
    assert [r["epoch"] for r in read_history(tmp_path / "histories" / "seed0.csv")] == [1, 2, 3]
    straight = _fit_uninterrupted(_params(train={"epochs": 3}), prepared_dir, "cvae", tmp_path / "straight.pt")
    assert _same_weights(tmp_path / "models" / "seed0.pt", straight)


# Ctrl-C
@pytest.mark.slow  # trains
def test_ctrl_c_twice_prints_one_line_and_still_marks_the_run_killed(
    prepared_dir, tmp_path, mlflow_store, monkeypatch, capsys
):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw()))
    real_end = mlflow.end_run
    # Ctrl-C as in a terminal: a shell starts background jobs (`.ci/run` runs pytest as one) with SIGINT ignored,
    # and the trainer leaves an ignored signal alone (as under nohup)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)

    def second_ctrl_c_while_ending(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # impatient user: a second Ctrl-C while the run is being ended
        return real_end(*args, **kwargs)

    def ctrl_c_during_validation(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # to this thread: os.kill may land on one of MLflow's or torch's threads
        for _ in range(1000):  # the handler raises at the next bytecode: validation never returns
            time.sleep(0.01)
        raise AssertionError("Ctrl-C was not delivered as KeyboardInterrupt within 10 s")

    monkeypatch.setattr(train_module, "validation_losses", ctrl_c_during_validation)
    monkeypatch.setattr(mlflow, "end_run", second_ctrl_c_while_ending)
    status = main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "train",
            "--model",
            "cae",
            "--latent-dim",
            "4",
            "--data",
            str(prepared_dir),
            "--out",
            "models",
            "--history",
            "histories",
            "--checkpoints",
            "checkpoints",
        ]
    )
    assert status == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "digitgen train: interrupted; finished epochs are checkpointed, run the same command (or `dvc repro`) to resume"
    )
    runs = mlflow.search_runs(experiment_names=["digitgen-test"])
    assert set(runs.status) == {"KILLED"} and len(runs) == 2
    signal.signal(signal.SIGINT, before)  # main ignores further Ctrl-C on its way out


# Files that changed on disk
def test_a_corrupted_model_file_is_refused(trained_models, tmp_path, capsys):
    corrupt = tmp_path / "seed0.pt"
    shutil.copy(trained_models["cae"].path, corrupt)
    with zipfile.ZipFile(corrupt) as archive:  # flip bytes inside the largest tensor: the zip stays readable
        largest = max(archive.infolist(), key=lambda i: i.file_size)
        start = largest.header_offset + 30 + len(largest.filename) + len(largest.extra)
    data = bytearray(corrupt.read_bytes())
    data[start + 64 : start + 96] = bytes(b ^ 0xFF for b in data[start + 64 : start + 96])
    corrupt.write_bytes(bytes(data))
    Image.new("L", (28, 28)).save(tmp_path / "one.png")

    assert main(["classify", "--model", str(corrupt), str(tmp_path / "one.png")]) == 2
    line = _one_line_error(capsys.readouterr().err, "classify")
    assert f"{corrupt} is corrupt: its weights do not match the checksum saved with them" in line


def test_a_saved_model_is_written_whole_with_its_checksum(trained_models, tmp_path):
    model = load_model(trained_models["cvae"].path)
    save_model(model, tmp_path / "again.pt")
    assert "sha256" in torch.load(tmp_path / "again.pt", weights_only=True)
    assert [p.name for p in tmp_path.iterdir()] == ["again.pt"]  # no temporary file beside it


# Bad input on the command line: one line, exit 2, nothing written
@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("L", (28 * 800, 28 * 800)).save(path)  # 500 M pixels in half a megabyte
    return path


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["train", "--model", "cae", "--latent-dim", "0"],
            "--latent-dim 0: study.latent_dims must be a non-empty list of positive integers, got [0]",
        ),
        (["train", "--model", "cvae", "--latent-dim", "-5"], "--latent-dim -5: study.latent_dims must be"),
        (
            ["train", "--model", "label_cvae", "--latent-dim", "1"],
            "--latent-dim 1: label_cvae.latent_dim must be an integer of at least 2",
        ),
        (
            ["train", "--model", "cae", "--latent-dim", "4", "--seeds", "0", "0"],
            "--seeds 0 0: train.seeds must be a non-empty list of distinct integers",
        ),
        (
            ["train", "--model", "cae", "--latent-dim", "4", "--device", "gpu"],
            "--device gpu: train.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'",
        ),
        (["evaluate", "--model", "cae", "--latent-dim", "0"], "--latent-dim 0: study.latent_dims must be"),
        (
            ["generate", "--model", "m.pt", "--digit", "3", "-n", "100000000", "--out", "x.png"],
            "expected at most 10000 images in one PNG row, got 100000000",
        ),
        (["generate", "--model", "m.pt", "--digit", "3", "--out", "."], "--out . is a folder; give a file name"),
        (
            ["generate", "--model", "m.pt", "--digit", "3", "--seed", str(2**70), "--out", "x.png"],
            "expected seed to be an integer from -2**63 to 2**64 - 1, got 1180591620717411303424",
        ),
        (["classify", "--model", "bare.pt", "one.png"], "bare.pt holds a Tensor, not a digitgen model"),
        (["classify", "--model", "m.pt", "bomb.png"], "bomb.png: more pixels than 10000 tiles of 28 x 28"),
        (
            [
                "check-regression",
                "--metrics",
                "bad.json",
                "--baseline",
                str(REPO / "pipelines/smoke/baseline.json"),
                "--thresholds",
                str(REPO / "pipelines/smoke/thresholds.yaml"),
            ],
            "metrics bad.json is not valid JSON (line 1 column 11: Expecting value)",
        ),
        (
            ["generate", "--model", "models/cae-8/seed0.pt", "--digit", "3", "--out", "x.png"],
            "(a pipeline's model: `dvc pull models/cae-8/seed0.pt` fetches it from the DVC remote",
        ),
        (["--params", "dup.yaml", "download"], "dup.yaml:3:1: duplicate key 'data'"),
        (["--params", "broken.yaml", "download"], "broken.yaml:3:5: expected ',' or ']', but got ':'"),
    ],
)
def test_bad_command_line_input_is_one_line_and_writes_nothing(args, match, bomb, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params_raw()))
    Path("dup.yaml").write_text("data:\n  train_size: 1\ndata:\n  train_size: 2\n")
    Path("broken.yaml").write_text("train:\n  epochs: [6\n  lr: 0.1\n")
    Path("bad.json").write_text('{"cae-8": ')
    torch.save(torch.zeros(3), "bare.pt")
    Image.new("L", (28, 28)).save("one.png")
    shutil.copy(bomb, "bomb.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    assert match in _one_line_error(capsys.readouterr().err, args[2] if args[0] == "--params" else args[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_s3_uri_without_the_s3_extra_names_the_package(trained_models, tmp_path, monkeypatch, capsys):
    if _has("boto3") and _has("botocore"):
        pytest.skip("the S3 client is installed here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_models["cae"].tracking_uri)
    Image.new("L", (28, 28)).save(tmp_path / "one.png")
    assert main(["classify", "--model", "s3://bucket/model", str(tmp_path / "one.png")]) == 2
    line = _one_line_error(capsys.readouterr().err, "classify")
    assert "s3://bucket/model: reading it needs the package" in line and "uv add boto3" in line


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_device_cuda_without_a_gpu_is_one_line(prepared_dir, tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params_raw(train={"device": "cuda"})))
    assert main(["train", "--model", "cae", "--latent-dim", "4", "--data", str(prepared_dir)]) == 2
    line = _one_line_error(capsys.readouterr().err, "train")
    assert "device cuda is not on this machine (torch sees 0 CUDA GPUs); set the stage's device to auto or cpu" in line
    assert not Path("models").exists()


# Issue 29: store errors MLflow does not wrap, concurrent dataset logs, late or misleading messages
def _corrupt_store(path: Path) -> None:
    """A SQLite store whose pages past the first are scribbled over: 'database disk image is malformed'."""
    data = bytearray(path.read_bytes())
    for offset in range(4096, len(data), 4096):
        data[offset : offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))


def test_a_corrupt_store_is_one_line_naming_it_from_train_and_generate(
    prepared_dir, tmp_path, mlflow_store, monkeypatch, capsys
):
    tracking.experiment_id("digitgen-test")
    _corrupt_store(tmp_path / "mlflow.db")
    capsys.readouterr()  # MLflow's notes on creating the store
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw()))
    started = time.monotonic()
    assert main(["train", "--model", "cae", "--latent-dim", "4", "--data", str(prepared_dir)]) == 2
    line = _one_line_error(capsys.readouterr().err, "train")
    assert f"the MLflow store {mlflow_store} failed while opening the experiment (database disk image" in line
    assert "move it aside and restore a backup" in line
    assert main(["generate", "--model", "runs:/0123456789abcdef", "--digit", "3", "--out", "x.png"]) == 2
    line = _one_line_error(capsys.readouterr().err, "generate")
    assert f"the MLflow store {mlflow_store} failed while loading the model runs:/" in line and "malformed" in line
    assert time.monotonic() - started < 60 and not Path("x.png").exists()
    assert not list(tmp_path.glob("[mc][oh]*/**/*.pt"))  # no model, no checkpoint


@pytest.mark.slow  # mounts a tmpfs
def test_a_store_folder_that_cannot_be_written_fails_in_seconds_naming_it(
    prepared_dir, tmp_path, tmpfs, monkeypatch, capsys
):
    read_only = tmpfs("ro", "size=1m,mode=0555")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    uri = f"sqlite:///{read_only / 'mlflow.db'}"  # no database there yet: MLflow would retry it for 100 s
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw()))
    started = time.monotonic()
    assert main(["train", "--model", "cae", "--latent-dim", "4", "--data", str(prepared_dir)]) == 2
    assert _one_line_error(capsys.readouterr().err, "train").endswith(
        f"the MLflow store {uri} cannot be created: {read_only} is not writable; make it writable (or set "
        "MLFLOW_TRACKING_URI to a store that is), then run the same command again"
    )
    assert main(["generate", "--model", "models:/digitgen@champion", "--digit", "3", "--out", "x.png"]) == 2
    assert f"the MLflow store {uri} cannot be created" in _one_line_error(capsys.readouterr().err, "generate")
    assert time.monotonic() - started < 30 and not list(tmp_path.glob("[mc][oh]*/**/*.pt"))


def test_a_dataset_logged_by_two_runs_at_once_is_no_failure(trained_models, tmp_path, monkeypatch):
    """Two queued experiments log the test split for the first time at once: the store's unique constraint refuses
    the second insert. Injected inside MLflow's client: the other run's insert lands between this one's look and
    its insert (the error is the one SQLite gives)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_models["cae"].tracking_uri)
    real, calls = MlflowClient.log_inputs, []

    def other_run_first(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:
            real(self, trained_models["cvae"].run_id, datasets)  # the concurrent run wins the race
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                "datasets.digest"
            )
        return real(self, run_id, datasets, models)

    monkeypatch.setattr(MlflowClient, "log_inputs", other_run_first)
    test_file = tmp_path / "test.pt"
    torch.save({"images": torch.zeros(2, 28, 28, dtype=torch.uint8), "labels": torch.zeros(2)}, test_file)
    figure = plt.figure()
    tracking.log_evaluation(trained_models["cae"].run_id, {"fid": 1.5}, {"evaluate.seed": "0"}, test_file, figure)
    run = MlflowClient(tracking.tracking_uri()).get_run(trained_models["cae"].run_id)
    assert run.data.metrics["test/fid"] == 1.5 and len(calls) == 2
    assert "mnist-test" in {d.dataset.name for d in run.inputs.dataset_inputs}


def test_a_model_from_an_unreachable_server_names_the_server_not_a_missing_model(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    assert main(["generate", "--model", "models:/digitgen@champion", "--digit", "3", "--out", "x.png"]) == 2
    line = _one_line_error(capsys.readouterr().err, "generate")
    assert line.startswith(
        f"digitgen generate: error: the MLflow store {uri} failed while loading the model models:/digitgen@champion"
    )
    assert "no such" not in line and "make it reachable" in line and time.monotonic() - started < 30


@pytest.mark.parametrize(
    "args, match",
    [
        (["reconstruct", "one.png", "--labels", "12", "--out", "r.png"], "expected digit labels in 0..9, got 12"),
        (["reconstruct", "one.png", "--labels", "1", "2", "--out", "r.png"], "expected one label per image (1 images)"),
        (["validate", "one.png", "--labels", "10"], "expected digit labels in 0..9, got 10"),
        (["generate", "--digit", "3", "-n", "0", "--out", "g.png"], "expected n, the number of images per label"),
        (["generate", "--digits", "12a", "--out", "g.png"], "expected a string of digits 0-9, got 'a'"),
        (["classify", "nothere.png"], "nothere.png: no such file"),
    ],
)
def test_bad_labels_and_digits_are_refused_before_the_model_loads(args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.new("L", (28, 28)).save("one.png")

    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(serving, "load", too_late)
    assert main([args[0], "--model", "models:/digitgen@champion", *args[1:]]) == 2
    assert match in _one_line_error(capsys.readouterr().err, args[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]


def test_a_float_written_as_yaml_1_2_does_is_read_as_dvc_reads_it(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw()).replace("lr: 0.001", "lr: 1e-3"))
    assert "lr: 1e-3" in (tmp_path / "params.yaml").read_text()  # PyYAML alone reads the string '1e-3'
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == 0.001 and params.pcvae.train.lr == 0.001 and params.train.epochs == 2


def test_a_latent_size_that_is_not_a_number_names_params_yaml(prepared_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params_raw(study={"latent_dims": [4, "sixteen"]})))
    # the command dvc.yaml's matrix makes of it: stage train@cae-sixteen
    assert main(["train", "--model", "cae", "--latent-dim", "sixteen", "--data", str(prepared_dir)]) == 2
    assert _one_line_error(capsys.readouterr().err, "train").endswith(
        "params.yaml: study.latent_dims must be an integer, got 'sixteen'"
    )
    Path("params.yaml").write_text(yaml.safe_dump(params_raw()))
    assert main(["evaluate", "--model", "cae", "--latent-dim", "sixteen"]) == 2
    assert _one_line_error(capsys.readouterr().err, "evaluate").endswith(
        "--latent-dim sixteen: expected an integer, a latent size of study.latent_dims in params.yaml"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepared"]


# Issue 29: params.yaml changed under a trainer, sizes past their limits, evaluate stopped with its dvc
@pytest.mark.slow  # trains, then saves
def test_params_changed_while_training_fail_the_runs_save_nothing_and_a_rerun_recovers(
    prepared_dir, tmp_path, mlflow_store, monkeypatch, capsys
):
    """Two `dvc exp run` at once in one workspace: each writes its value into params.yaml before DVC's lock stops
    the second, so the first trains with one value while DVC would record the other. Injected as that write,
    during the first epoch's validation."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_raw()))
    real = train_module.validation_losses

    def second_exp_run_writes_params(*args, **kwargs):
        params_file.write_text(yaml.safe_dump(params_raw(train={"lr": 0.0003})))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "validation_losses", second_exp_run_writes_params)
    argv = ["--params", str(params_file), "train", "--model", "cae", "--latent-dim", "4", "--data", str(prepared_dir)]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the epochs' progress lines
    assert line.startswith("digitgen train: error: ")
    assert f"{params_file} changed while cae-4 trained: train.lr was 0.001 when training started and is 0.0003" in line
    assert "Run experiments side by side through the queue (dvc exp run --queue -S ..., then dvc queue start)" in line
    assert not list(tmp_path.glob("models/**/*.pt")) and not list(tmp_path.glob("histories/**/*.csv"))
    runs = mlflow.search_runs(experiment_names=["digitgen-test"])
    assert set(runs.status) == {"FAILED"} and len(runs) == 2  # the configuration's run and the seed's
    assert runs["tags.failure"].str.contains("changed while cae-4 trained: train.lr").all()

    monkeypatch.setattr(train_module, "validation_losses", real)
    params_file.write_text(yaml.safe_dump(params_raw()))  # the values it trained with, restored
    assert main(argv) == 0  # the finished checkpoint is saved, not retrained
    assert (tmp_path / "models" / "cae-4" / "seed0.pt").is_file()
    runs = mlflow.search_runs(experiment_names=["digitgen-test"])
    assert set(runs.status) == {"FINISHED"} and len(runs) == 2 and "tags.failure" not in runs  # the tags cleared


@pytest.mark.parametrize(
    "train, match",
    [
        (
            {"epochs": 2_000_000_000},
            "train.epochs: 2000000000 epochs is past limits.epochs 1000; cae-4's 1 seed(s) x 2000000000 epochs of "
            "1000 images would take about 55,555.6 hours (limits.epoch_seconds_per_1000_images 0.1) and ",
        ),
        ({"seeds": list(range(1000))}, "train.seeds: 1000 seeds is past limits.seeds 20; cae-4's 1000 seed(s) x 2"),
    ],
)
def test_a_size_past_its_limit_stops_at_once_with_its_cost_and_the_override(
    train, match, prepared_dir, tmp_path, mlflow_store, capsys
):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw(train=train)))
    started = time.monotonic()
    assert main(["train", "--model", "cae", "--latent-dim", "4", "--data", str(prepared_dir)]) == 2
    line = _one_line_error(capsys.readouterr().err, "train")
    assert match in line and "MB of disk" in line and "to go on, set limits." in line
    assert time.monotonic() - started < 10
    assert not list(tmp_path.glob("[mc][oh]*/**/*.pt")) and not (tmp_path / "mlflow.db").exists()  # no run either
    # the override: a limit raised in params.yaml lets the size through
    raised = _params(train=train, limits={"epochs": 2_000_000_000, "seeds": 1000})
    config, train_params = train_module.model_setup(raised, "cae", 4)
    train_module._require_within_limits(raised.limits, config, train_params, "train", "cae-4", 1000)


def test_an_evaluation_past_its_image_limit_is_refused_with_its_memory(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_raw(evaluate={"n_generated": 10_000_000})))
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert str(err.value).endswith(
        "evaluate.n_generated: 10000000 images is past limits.n_generated 100000; they take 31.4 GB of memory at "
        "once for each seed evaluated; to go on, set limits.n_generated in params.yaml to at least 10000000"
    )


def _child_running(parent: int, word: str) -> int | None:
    """The PID of a child of `parent` whose command line holds `word`, once it has loaded torch (by then the
    command has asked to die with its parent)."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except FileNotFoundError:
        return None
    for pid in map(int, children):
        try:
            if word in Path(f"/proc/{pid}/cmdline").read_text() and "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return pid
        except (FileNotFoundError, ProcessLookupError):
            continue
    return None


@pytest.mark.slow
def test_sigterm_to_dvc_repro_stops_the_evaluator_and_a_rerun_records_the_evaluation(
    tmp_path, prepared_dir, trained_models, trained_classifier
):
    root = copy_from_repo(PIPELINE_FILES, tmp_path / "repo")
    shutil.copytree(prepared_dir, root / "data" / "prepared")
    (root / "models" / "cae-4").mkdir(parents=True)
    shutil.copy(trained_models["cae"].path, root / "models" / "cae-4" / "seed0.pt")
    shutil.copy(trained_classifier, root / "models" / "classifier.pt")
    raw = params_raw(study={"models": ["cae"], "latent_dims": [4]}, label_cvae={"latent_dim": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    repro = [sys.executable, "-m", "dvc", "repro", "--single-item", "evaluate@cae-4"]

    dvc = subprocess.Popen(repro, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, evaluator = time.monotonic() + 240, None
    while evaluator is None and dvc.poll() is None and time.monotonic() < deadline:
        evaluator = _child_running(dvc.pid, "evaluate")
        time.sleep(0.05)
    assert evaluator is not None, dvc.communicate()[0]
    dvc.send_signal(signal.SIGTERM)
    dvc.wait(60)
    deadline = time.monotonic() + 60
    while alive(evaluator) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(evaluator)  # no orphan writing an evaluation dvc.lock does not record
    assert not (root / "results" / "evaluation" / "cae-4.json").exists()

    again = subprocess.run(repro, cwd=root, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr + again.stdout
    assert (root / "results" / "evaluation" / "cae-4.json").is_file()
    assert "evaluate@cae-4" in (root / "dvc.lock").read_text()


def _kill_the_worker_of(checkpoint: Path, not_pid: int | None, killed: list) -> None:
    """Kill -9 the Ray worker that trains the seed of `checkpoint` (its run's process_pid, once not `not_pid`)."""
    client, deadline = MlflowClient(tracking.tracking_uri()), time.monotonic() + 300
    while time.monotonic() < deadline:
        if checkpoint.exists():
            run = client.get_run(torch.load(checkpoint, weights_only=True)["run_id"])
            pid = int(run.data.tags["process_pid"])
            if run.info.status == "RUNNING" and pid != not_pid:
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, run.info.run_id))
                return
        time.sleep(0.1)


@pytest.mark.slow
def test_a_ray_worker_killed_mid_training_is_retried_and_past_its_retries_its_run_is_failed(
    prepared_dir, tmp_path, mlflow_store, ray_cluster
):
    checkpoint, killed = tmp_path / "checkpoints" / "seed0.pt", []

    def train(retries: int) -> dict:
        params = _params(train={"epochs": 40}, execution={"executor": "ray", "threads": 1, "retries": retries})
        last = killed[-1][0] if killed else None
        killer = threading.Thread(target=_kill_the_worker_of, args=(checkpoint, last, killed))
        killer.start()
        try:
            return _train(params, prepared_dir, tmp_path, "cae")
        finally:
            killer.join()

    with pytest.raises(DigitgenError) as err:  # no retries: the seed is lost, its run FAILED, not left RUNNING
        train(retries=0)
    pid, run_id = killed[0]
    assert str(err.value).startswith("cae-4 seed0: its Ray worker died on each of 1 tries (WorkerCrashedError; ")
    assert "run the same command again (or raise execution.retries)" in str(err.value) and "\n" not in str(err.value)
    assert _status(run_id) == "FAILED"

    runs = train(retries=1)  # killed again, and retried: the retry resumes the checkpoint and the same run
    assert len(killed) == 2 and runs["seed_run_ids"]["0"] == run_id and _status(run_id) == "FINISHED"
    assert [r["epoch"] for r in read_history(tmp_path / "histories" / "seed0.csv")] == list(range(1, 41))


def test_a_champion_looked_up_in_a_failing_store_is_an_error_not_no_champion(monkeypatch):
    """aggregate moves @champion only to a better model: a store that fails must not read as 'no champion yet'."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match=f"^the MLflow store {uri} failed while looking up the champion"):
        tracking.champion("digitgen")
