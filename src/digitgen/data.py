"""MNIST: mirrors, checksums, IDX parsing, the seeded split, and tensors for training.

The download writes into a temporary folder beside its target and renames it only when all four
files pass their MD5, so a failed or interrupted download never leaves a file that looks good.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from digitgen.files import project_root, save_torch, write_json
from digitgen.params import DataParams, DigitgenError

MIRROR_ENV = "DIGITGEN_MNIST_MIRROR"  # a folder or URL tried before params' mirrors (CI: ../shared/mnist)

# torchvision's file list and MD5s (torchvision.datasets.MNIST.resources)
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
SPLITS = ("train", "val", "test")
_IDX_DTYPE_UBYTE = 0x08


class DataError(DigitgenError):
    """A data problem a user can fix; the message is one line naming the file and the fix."""


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mirror_list(mirrors: list[str]) -> list[str]:
    """The mirrors in the order they are tried: $DIGITGEN_MNIST_MIRROR first, then params'.

    A relative folder in $DIGITGEN_MNIST_MIRROR is read from the project root (DVC_ROOT), not from the
    stage's folder, so `../shared/mnist` works for the smoke pipeline's stages in pipelines/smoke too."""
    local = os.environ.get(MIRROR_ENV)
    if local and "://" not in local:
        local = str(project_root() / local)  # an absolute folder stays as it is
    return list(dict.fromkeys(([local] if local else []) + list(mirrors)))  # each tried once, in order


def _fetch(mirror: str, name: str, dest: Path) -> None:
    if "://" in mirror and not mirror.startswith("file://"):
        with urllib.request.urlopen(mirror.rstrip("/") + "/" + name, timeout=60) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f)
    else:
        source = Path(mirror.removeprefix("file://")) / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist")
        shutil.copyfile(source, dest)


def download(mirrors: list[str], raw_dir: Path) -> None:
    """Fetch the four MNIST files into raw_dir, each MD5-checked, mirrors tried in order."""
    raw_dir = Path(raw_dir)
    made_parent = not raw_dir.parent.exists()
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}-", dir=raw_dir.parent))
    staging.chmod(0o755)
    try:
        for name, expected in MNIST_FILES.items():
            problems = []
            for mirror in mirror_list(mirrors):
                part = staging / (name + ".part")
                try:
                    _fetch(mirror, name, part)
                except OSError as err:  # URLError and HTTPError are OSErrors
                    problems.append(f"{mirror}: {err}")
                    part.unlink(missing_ok=True)
                    continue
                actual = md5sum(part)
                if actual == expected:
                    part.rename(staging / name)
                    break
                problems.append(
                    f"{mirror}: md5 {actual} != {expected} ({part.stat().st_size} bytes; corrupt or truncated)"
                )
                part.unlink()
            else:
                raise DataError(
                    f"could not get a good {name}: "
                    + "; ".join(problems)
                    + f" - fix or replace that file, or set {MIRROR_ENV} to a folder with the original"
                )
        if raw_dir.exists():
            shutil.rmtree(raw_dir)
        staging.rename(raw_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made_parent and not any(raw_dir.parent.iterdir()):
            raw_dir.parent.rmdir()  # a failed first download leaves no trace


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} cannot be read ({err}); run `dvc repro download` to fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); run `dvc repro download` to fetch it again")
    dtype, ndim = data[2], data[3]
    if dtype != _IDX_DTYPE_UBYTE:
        raise DataError(f"{path} holds IDX type 0x{dtype:02x}; only unsigned bytes (0x08) are MNIST")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path} declares shape {shape} but holds {len(body)} bytes; it is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()


@dataclass
class Digits:
    """A set of MNIST digits: uint8 images N x 28 x 28 and int64 labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self) -> torch.Tensor:
        """Images as float pixels in [0, 1], flattened to N x 784 (the models' input)."""
        return self.images.reshape(len(self), -1).float().div_(255.0)

    def save(self, path: Path) -> None:
        save_torch({"images": self.images, "labels": self.labels}, path)

    @classmethod
    def load(cls, path: Path) -> Digits:
        if not Path(path).is_file():
            raise DataError(f"{path} not found; run `dvc repro split` first")
        blob = torch.load(path, weights_only=True)
        return cls(images=blob["images"], labels=blob["labels"])


def load_raw(raw_dir: Path, prefix: str) -> Digits:
    images = read_idx(Path(raw_dir) / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(Path(raw_dir) / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise DataError(f"{raw_dir}/{prefix}: {len(images)} images but {len(labels)} labels")
    return Digits(torch.from_numpy(images), torch.from_numpy(labels).long())


def split(full_train: Digits, test: Digits, params: DataParams) -> dict[str, Digits]:
    """Seeded split of the training file into train/val; test is the original test set (or a seeded subset)."""
    gen = torch.Generator().manual_seed(params.split_seed)
    order = torch.randperm(len(full_train), generator=gen)
    train_idx = order[: params.train_size]
    val_idx = order[params.train_size : params.train_size + params.val_size]
    test_idx = torch.randperm(len(test), generator=gen)[: params.test_size].sort().values
    return {
        "train": Digits(full_train.images[train_idx], full_train.labels[train_idx]),
        "val": Digits(full_train.images[val_idx], full_train.labels[val_idx]),
        "test": Digits(test.images[test_idx], test.labels[test_idx]),
    }


def class_counts(splits: dict[str, Digits]) -> dict[str, dict[str, int]]:
    counts = {}
    for name, digits in splits.items():
        per_digit = Counter(digits.labels.tolist())
        counts[name] = {"total": len(digits), **{str(d): per_digit.get(d, 0) for d in range(10)}}
    return counts


def run_split(params: DataParams, raw_dir: Path, out_dir: Path, counts_path: Path) -> dict[str, dict[str, int]]:
    """Stage `split`: data/raw -> data/prepared/{train,val,test}.pt plus a JSON of class counts."""
    splits = split(load_raw(raw_dir, "train"), load_raw(raw_dir, "t10k"), params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, digits in splits.items():
        digits.save(out_dir / f"{name}.pt")
    counts = class_counts(splits)
    write_json(counts, counts_path)
    return counts


def load_split(prepared_dir: Path, name: str) -> Digits:
    return Digits.load(Path(prepared_dir) / f"{name}.pt")
