"""A real `dvc repro` of the data stages in a temporary copy of the repository, offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import command_env, copy_from_repo

from digitgen.data import MIRROR_ENV

pytestmark = pytest.mark.slow  # every test here runs `dvc repro` in a copy of the repository

COPIED = ["dvc.yaml", "params.yaml", "pyproject.toml", "src", ".dvc/config", ".dvcignore"]


@pytest.fixture
def repo_copy(tmp_path, mnist_dir, monkeypatch) -> Path:
    root = copy_from_repo(COPIED, tmp_path / "repo")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    monkeypatch.setenv(MIRROR_ENV, str(mnist_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return root


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=command_env(), capture_output=True, text=True
    )


def test_repro_downloads_splits_then_does_nothing_and_a_seed_change_reruns_only_split(repo_copy):
    first = dvc(repo_copy, "repro", "split")
    assert first.returncode == 0, first.stderr + first.stdout
    assert sorted(p.name for p in (repo_copy / "data" / "prepared").iterdir()) == ["test.pt", "train.pt", "val.pt"]
    counts = yaml.safe_load((repo_copy / "results" / "split_counts.json").read_text())
    assert [counts[s]["total"] for s in ("train", "val", "test")] == [48000, 12000, 10000]

    again = dvc(repo_copy, "repro", "split")
    assert again.returncode == 0 and "Running stage" not in again.stdout

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["data"]["split_seed"] += 1
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = dvc(repo_copy, "repro", "split")
    assert changed.returncode == 0, changed.stderr
    assert "Running stage 'split'" in changed.stdout and "Running stage 'download'" not in changed.stdout


def test_a_corrupt_mirror_file_fails_the_stage_with_one_line_and_leaves_data_empty(
    repo_copy, tmp_path, mnist_dir, monkeypatch
):
    mirror = tmp_path / "corrupt"
    shutil.copytree(mnist_dir, mirror)
    victim = mirror / "train-labels-idx1-ubyte.gz"
    victim.chmod(0o644)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["data"]["mirrors"] = [str(mirror)]  # no network in tests: the corrupt copy is the only mirror
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    result = dvc(repo_copy, "repro", "download")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("digitgen download: error:")]
    assert len(ours) == 1 and "train-labels-idx1-ubyte.gz" in ours[0] and "md5" in ours[0]
    data = repo_copy / "data"
    assert (list(data.rglob("*")) if data.exists() else []) == []
