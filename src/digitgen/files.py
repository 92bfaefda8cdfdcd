"""Outputs on disk: written whole or not at all, checked when read back, and a folder owned by one process.

Every output goes through `write_atomic`: the bytes go to a temporary file beside the target, are
flushed to the disk, and only then renamed over it, so a kill or a full disk at any instant leaves
the old file or the new one, never half of one. Saved weights carry a checksum (`weights_checksum`)
that loading verifies. A disk that is full or read-only ends in a `StorageError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from digitgen.params import DigitgenError

_held: set[Path] = set()  # lock files this process holds (see folder_lock)


def project_root() -> Path:
    """The DVC root when run by DVC (so queued `dvc exp` runs share one store, and a stage in
    pipelines/smoke reads a relative path as its user meant it), else the working folder."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


class StorageError(DigitgenError):
    """A folder or file that cannot be written or read back; the message names the path and the fix."""


def storage_error(err: OSError, path: Path) -> StorageError:
    """One line for an OSError at `path`: what went wrong there and what to do about it."""
    if err.errno == errno.ENOSPC:
        return StorageError(
            f"no space left on {path}; free some space there (or write elsewhere) and run the same command again"
        )
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(
            f"{path} is not writable ({os.strerror(err.errno)}); make it writable or choose another output folder"
        )
    return StorageError(f"{path}: {os.strerror(err.errno) if err.errno else err}")


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` (parents created) via a synced temporary file and a rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files only their owner can read
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise storage_error(err, path) from None
    return path


def write_json(data: object, path: str | Path) -> Path:
    """`data` as indented JSON (a final newline, as git likes), written atomically: every JSON output goes
    through here."""
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def write_together(outputs: dict[Path, bytes | str], root: Path, replace: list[Path] | None = None) -> list[Path]:
    """Write a stage's outputs (under `root`) as one set, so that a reader never finds some new and others old.

    Every file is first written and synced into a staging folder under `root` (.staging-<pid>); only when all
    are there are they renamed into place, one after another with nothing computed between, and then the
    files of each `replace` folder that the set does not hold are removed. An error or a kill before the
    renames leaves every old output as it was (a staging folder left by a kill is removed by the next call);
    only a kill within the renames, a few milliseconds, can leave the set part old, part new, and `dvc repro`
    then finds outputs that are not its lock's and runs the stage again.
    """
    root = Path(root)
    for stale in root.glob(".staging-*"):  # left by a killed call: its process is gone
        if not stale.name.removeprefix(".staging-").isdigit() or not process_alive(int(stale.name.split("-")[1])):
            shutil.rmtree(stale, ignore_errors=True)
    staging = root / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staged = {path: write_atomic(staging / Path(path).relative_to(root), data) for path, data in outputs.items()}
        for path, temporary in staged.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, path)
        for folder in [Path(f) for f in replace or [] if Path(f).is_dir()]:
            for old in set(folder.iterdir()) - set(map(Path, outputs)):
                old.unlink()
    except OSError as err:
        raise storage_error(err, root) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [Path(path) for path in outputs]


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_torch(obj: object, path: str | Path) -> Path:
    """torch.save, atomically (serialised in memory first, so a disk error is an OSError naming `path`)."""
    import torch  # here, not at the top: the CLI takes folder_lock before the slow import of torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_atomic(path, buffer.getvalue())


def require_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written there, before any long work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise storage_error(err, folder) from None
    return folder


def weights_checksum(config: dict, state_dict: dict) -> str:
    """sha256 of the architecture and every weight, in order: what a saved model's file must still hold."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key, tensor in state_dict.items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def folder_lock(folder: Path, owner: str):
    """Hold an OS lock (flock) on `folder` for the with block; another holder means a StorageError naming its PID.

    The lock file sits beside the folder (<folder>.lock), so removing or recreating the folder keeps the
    lock; the kernel drops the lock when its process ends, however it ends, so it is never stale. Nested
    use of the same folder in one process holds the one lock.
    """
    lock = Path(os.path.abspath(folder.with_name(folder.name + ".lock")))
    if lock in _held:  # taken already by this process (the CLI, before its slow imports): hold it on
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as err:
        raise storage_error(err, lock) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StorageError(
                f"{folder} is in use by another {owner} (PID {holder}); wait for it to finish or stop "
                f"it (kill {holder}), then run this command again"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        _held.add(lock)
        try:
            yield
        finally:
            _held.discard(lock)
