"""Download, IDX parsing and the split: what the first two stages promise."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import write_idx

from digitgen.data import MIRROR_ENV, MNIST_FILES, DataError, Digits, class_counts, download, read_idx, split
from digitgen.params import DataParams


def test_read_idx_returns_the_array_that_was_written(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x.gz", array)), array)


def test_read_idx_rejects_a_file_shorter_than_its_header_says(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.zeros((5, 28, 28), np.uint8))
    import gzip

    data = gzip.decompress(path.read_bytes())[:-10]
    path.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_read_idx_rejects_a_file_that_is_not_idx(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


@pytest.fixture
def bad_mirror(tmp_path, mnist_dir):
    """A copy of the real mirror with one file truncated."""
    mirror = tmp_path / "mirror"
    shutil.copytree(mnist_dir, mirror)
    victim = mirror / "t10k-labels-idx1-ubyte.gz"
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:1000])
    return mirror


def test_download_from_a_local_mirror_checks_and_keeps_all_four_files(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(mnist_dir))
    download([], tmp_path / "data" / "raw")
    assert sorted(p.name for p in (tmp_path / "data" / "raw").iterdir()) == sorted(MNIST_FILES)


def test_a_relative_mirror_is_read_from_the_project_root_in_any_stage_folder(tmp_path, mnist_dir, monkeypatch):
    """DVC runs the smoke pipeline's stages in pipelines/smoke with DVC_ROOT at the repository root."""
    shutil.copytree(mnist_dir, tmp_path / "shared" / "mnist")
    stage_folder = tmp_path / "repo" / "pipelines" / "smoke"
    stage_folder.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.setenv(MIRROR_ENV, "../shared/mnist")
    monkeypatch.chdir(stage_folder)
    download([], stage_folder / "data" / "raw")
    assert sorted(p.name for p in (stage_folder / "data" / "raw").iterdir()) == sorted(MNIST_FILES)


def test_a_truncated_file_is_an_error_naming_it_and_leaves_nothing_in_data(tmp_path, bad_mirror, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(bad_mirror))
    data = tmp_path / "data"
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*md5") as err:
        download([str(bad_mirror)], data / "raw")
    assert "\n" not in str(err.value)
    assert str(err.value).count(str(bad_mirror)) == 1  # tried once, though named twice
    assert not data.exists()


def test_a_bad_mirror_falls_back_to_the_next_good_one(tmp_path, bad_mirror, mnist_dir, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, str(bad_mirror))
    download([str(mnist_dir)], tmp_path / "raw")
    assert (tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz").stat().st_size == 4542


def test_a_failed_download_keeps_the_previous_good_files(tmp_path, bad_mirror, mnist_dir, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    download([str(mnist_dir)], tmp_path / "raw")
    with pytest.raises(DataError):
        download([str(bad_mirror)], tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(MNIST_FILES)


def _fake(n: int, offset: int = 0) -> Digits:
    """Digits whose first pixel is their index, so images can be traced after a split."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = (torch.arange(n) + offset) % 256
    images[:, 0, 1] = (torch.arange(n) + offset) // 256 % 256
    return Digits(images, torch.arange(n) % 10)


def _ids(d: Digits) -> set[int]:
    return set((d.images[:, 0, 0].long() + 256 * d.images[:, 0, 1].long()).tolist())


@pytest.fixture
def small_params():
    return DataParams(mirrors=["x"], train_size=800, val_size=150, test_size=100, split_seed=3)


def test_split_sizes_are_exact_and_train_val_are_disjoint(small_params):
    parts = split(_fake(1000), _fake(300), small_params)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [800, 150, 100]
    assert not _ids(parts["train"]) & _ids(parts["val"])


def test_split_is_deterministic_per_seed_and_changes_with_it(small_params):
    import dataclasses

    a, b = split(_fake(1000), _fake(300), small_params), split(_fake(1000), _fake(300), small_params)
    c = split(_fake(1000), _fake(300), dataclasses.replace(small_params, split_seed=4))
    assert torch.equal(a["train"].images, b["train"].images) and torch.equal(a["val"].labels, b["val"].labels)
    assert not torch.equal(a["train"].images, c["train"].images)


def test_full_test_set_is_the_original_in_order():
    test = _fake(300)
    parts = split(_fake(1000), test, DataParams(mirrors=["x"], train_size=800, val_size=200, test_size=300))
    assert torch.equal(parts["test"].images, test.images)


def test_class_counts_add_up_to_each_split(small_params):
    counts = class_counts(split(_fake(1000), _fake(300), small_params))
    for name, size in {"train": 800, "val": 150, "test": 100}.items():
        assert counts[name]["total"] == size == sum(counts[name][str(d)] for d in range(10))


def test_saved_split_loads_back_safely(tmp_path):
    digits = _fake(20)
    digits.save(tmp_path / "x.pt")
    back = Digits.load(tmp_path / "x.pt")  # torch.load(weights_only=True) inside
    assert back.images.dtype == torch.uint8 and torch.equal(back.images, digits.images)
    assert torch.equal(back.labels, digits.labels)
