"""Serving: the model a person (CLI, PNG files) or a program (Python, MLflow) uses, under the study's three conditions.

    model = digitgen.load("models/cvae-16/seed0.pt")  # or "runs:/<run_id>", "models:/digitgen@champion"
    model.generate(7, n=16)                      # label only      -> 16 x 28 x 28 images
    model.classify(images)                       # image only      -> most likely digits and probabilities
    model.reconstruct(images)                    # image only      -> reconstructions, digits, probabilities
    model.reconstruct(images, labels)            # image and label -> reconstructions conditioned on the label
    model.validate(images, labels)               # image and label -> probability each label is right

Images go in and out as float tensors in [0, 1] shaped N x 28 x 28 (one explicit channel, N x 1 x 28 x 28
or N x 28 x 28 x 1, is accepted too).
The inference math is the model's own (models.py); this module loads a model (a file, runs:/,
models:/), checks inputs, draws style noise, converts to and from PNG files and the pyfunc's request
table (`predict_frame`), and holds the pyfunc wrapper (`DigitgenPyfunc`) that MLflow serves. Bad input
stops with an `InputError` whose one line names what was expected. MLflow is imported only when a
URI is loaded or the pyfunc is built: `digitgen generate --model <file>` never waits for it.
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import re
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from digitgen import figures
from digitgen.files import write_atomic
from digitgen.models import IMAGE_DIM, NUM_DIGITS, Model, UnsupportedTask, load_model, noise_dim, save_model
from digitgen.params import DigitgenError

SIDE = 28  # MNIST images are 28 x 28 pixels
# The most images one PNG row (generate, reconstruct) or one PNG read may hold: 10,000 tiles are a
# 280,000-pixel row of 7.8 MB in memory; more is refused before any work, and so is a PNG (a
# decompression bomb) whose header claims more pixels than that.
MAX_IMAGES = 10_000
MODES = ("generate", "classify", "reconstruct", "validate")  # the pyfunc's `mode` column
MODEL_SOURCES = (
    "a model file written by `digitgen train` (models/<kind>-<latent_dim>/seed<s>.pt) "
    "or an MLflow URI (runs:/<run_id>, models:/<name>@<alias>)"
)


class InputError(DigitgenError, ValueError):
    """Images, labels or a request the model cannot take; the message names what was expected."""


class ModelSourceError(DigitgenError):
    """A model file or MLflow URI that does not lead to a digitgen model."""


class Prediction(NamedTuple):
    digits: torch.Tensor  # N, the most likely digit
    probs: torch.Tensor  # N x 10, the probability of each digit


class Reconstruction(NamedTuple):
    images: torch.Tensor  # N x 28 x 28 in [0, 1]
    digits: torch.Tensor | None  # N, the most likely digit; None for a model without a digit head
    probs: torch.Tensor | None  # N x 10


def as_images(images) -> torch.Tensor:
    """Check images (N x 28 x 28 or N x 1 x 28 x 28, floats in [0, 1]) and return them as N x 784."""
    try:
        x = torch.as_tensor(images)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"expected images as a float tensor shaped N x 28 x 28, got {type(images).__name__}") from None
    if x.ndim == 4:  # N x C x H x W, or channels last (N x H x W x C) when the last axis is the short one
        channels_last = x.shape[-1] < x.shape[1]
        channels = x.shape[-1] if channels_last else x.shape[1]
        if channels != 1:
            raise InputError(
                f"expected one channel (grayscale images N x 28 x 28), got {channels} channels in shape {_shape(x)}"
            )
        x = x[..., 0] if channels_last else x[:, 0]
    if x.ndim == 2 and x.shape[1] == IMAGE_DIM:
        raise InputError(
            f"expected a batch of images shaped N x 28 x 28, got shape {_shape(x)}; these look like "
            "flattened images: images.reshape(-1, 28, 28)"
        )
    if x.ndim != 3:
        raise InputError(
            f"expected a batch of images shaped N x 28 x 28, got shape {_shape(x)}"
            + ("; add a batch dimension: images[None]" if x.ndim == 2 else "")
        )
    if tuple(x.shape[1:]) != (SIDE, SIDE):
        raise InputError(f"expected images of 28 x 28 pixels, got {x.shape[1]} x {x.shape[2]}")
    if not x.is_floating_point():
        raise InputError(f"expected float pixel values in [0, 1], got {x.dtype} (divide 8-bit images by 255)")
    if not torch.isfinite(x).all():
        raise InputError(
            f"expected pixel values in [0, 1], got {(~torch.isfinite(x)).sum().item()} NaN or infinite "
            "values; replace them (torch.nan_to_num) before passing the images"
        )
    if len(x) and not (x.min() >= 0 and x.max() <= 1):
        raise InputError(f"expected pixel values in [0, 1], got values from {x.min().item():g} to {x.max().item():g}")
    return x.reshape(len(x), IMAGE_DIM).float()


def as_labels(labels, count: int | None = None) -> torch.Tensor:
    """Check digit labels (an int or a sequence of ints 0..9; one per image when count is given)."""
    try:
        y = torch.as_tensor(labels).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"expected digit labels as integers 0..9, got {labels!r}") from None
    if y.dtype == torch.bool or y.is_complex() or (y.is_floating_point() and not torch.equal(y, y.round())):
        raise InputError(f"expected digit labels as integers 0..9, got {y.tolist()}")
    outside = [v for v in y.tolist() if not 0 <= v < NUM_DIGITS]
    if outside:
        raise InputError(f"expected digit labels in 0..9, got {outside[0]:g}")
    if count is not None and len(y) != count:
        raise InputError(f"expected one label per image ({count} images), got {len(y)} labels")
    return y.long()


def as_seed(seed: int) -> int:
    """Check a style-noise seed: an integer torch.Generator takes."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise InputError(f"expected seed to be an integer from -2**63 to 2**64 - 1, got {seed!r}")
    return seed


def as_count(n: int) -> int:
    """Check n, the number of images per label: a positive integer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"expected n, the number of images per label, to be a positive integer, got {n!r}")
    return n


def _shape(x: torch.Tensor) -> str:
    return " x ".join(map(str, x.shape)) or "a scalar"


class DigitModel:
    """A trained joint model under the study's conditions; build one with `load`."""

    def __init__(self, net: Model, source: str):
        self.net = net.eval()
        self.source = source
        self.kind = net.config.kind
        self.latent_dim = net.config.latent_dim
        self.device = next(net.parameters()).device

    def __repr__(self) -> str:
        return f"DigitModel({self.kind}, latent_dim={self.latent_dim}, from {self.source})"

    def _run(self, method, *args):
        """Call the model on its device. A condition it was not built for raises UnsupportedTask (one line)."""
        return method(*(a.to(self.device) if a is not None else None for a in args))

    @torch.no_grad()
    def generate(self, labels, n: int = 1, *, seed: int | None = None, same_style: bool = False) -> torch.Tensor:
        """n images per label (label by label), N x 28 x 28 in [0, 1].

        Each image gets its own style noise, or one shared noise row with same_style; `seed` makes the
        noise, and so the images, repeatable. The CAE's digit-only latent has no noise: its images
        depend on the label alone.
        """
        digits = as_labels(labels).repeat_interleave(as_count(n))
        generator = torch.Generator().manual_seed(as_seed(seed)) if seed is not None else None
        noise = torch.randn(1 if same_style else len(digits), noise_dim(self.net), generator=generator)
        images = self._run(self.net.generate, digits, noise.expand(len(digits), -1))
        return images.reshape(-1, SIDE, SIDE).cpu()

    @torch.no_grad()
    def classify(self, images) -> Prediction:
        """The digit each image shows, from the image alone."""
        log_probs = self._run(self.net.classify, as_images(images))
        return _prediction(log_probs)

    @torch.no_grad()
    def reconstruct(self, images, labels=None) -> Reconstruction:
        """Reconstructions of images, from the images alone or from images and their labels."""
        x = as_images(images)
        y = as_labels(labels, count=len(x)) if labels is not None else None
        recon, log_probs = self._run(self.net.reconstruct, x, y)
        recon = recon.reshape(-1, SIDE, SIDE).cpu()
        if log_probs is None:  # a model without a digit head reconstructs but does not predict
            return Reconstruction(recon, None, None)
        return Reconstruction(recon, *_prediction(log_probs))

    @torch.no_grad()
    def validate(self, images, labels) -> torch.Tensor:
        """The probability (N) that each given label is right, in the study's image-and-label condition.

        It is the digit head's probability of the label when the model sees the image and that label.
        Seeing the label leans the model toward it, so a wrong label scores higher here than in
        classify(images).probs, the image-only view.
        """
        y = as_labels(labels)
        probs = self.reconstruct(images, y).probs
        if probs is None:
            raise UnsupportedTask(f"a {self.kind} model cannot validate labels: it has no digit head")
        return probs.gather(1, y[:, None])[:, 0]


def _prediction(log_probs: torch.Tensor) -> Prediction:
    probs = log_probs.exp().cpu()
    return Prediction(probs.argmax(1), probs)


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # runs:/, models:/, s3://, ...; not C:\ or a plain path


def load(source: str | Path, device: str = "cpu") -> DigitModel:
    """A trained model from a file written by `digitgen train` or an MLflow model URI.

    runs:/<run_id> means the model that training seed run logged (<config>-seed<s>);
    models:/<name>@champion is the registered best configuration. MLflow URIs are resolved against
    $MLFLOW_TRACKING_URI, else mlflow.db at the project root.
    """
    text = str(source)
    if _URI.match(text):
        with pyfunc_weights(text) as path:
            return DigitModel(_load_file(path, text, device), text)
    path = Path(text)
    if not path.is_file():
        raise ModelSourceError(
            f"{text}: no such model file; expected {MODEL_SOURCES} (a pipeline's model: `dvc pull {text}` "
            "fetches it from the DVC remote, `dvc repro` trains it)"
        )
    return DigitModel(_load_file(path, text, device), text)


def _load_file(path: Path, source: str, device: str):
    try:
        return load_model(path, map_location=device)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, KeyError, TypeError, ValueError):
        raise ModelSourceError(f"{source}: not a digitgen model; expected {MODEL_SOURCES}") from None


def generate_string(model: DigitModel, text: str, same_style: bool = False, seed: int | None = None) -> torch.Tensor:
    """A digit string such as "2026" rendered as one row of 28-pixel tiles: a 28 x (28 * len) image in [0, 1].

    Each digit is drawn with its own style noise, or all with one shared noise row (same_style).
    """
    images = model.generate(digit_string(text), seed=seed, same_style=same_style)
    return figures.tile(images, nrow=len(images))


def digit_string(text: str) -> list[int]:
    """The digits of a string such as "2026"; anything but the characters 0-9 is an error."""
    if not text:
        raise InputError("expected a string of digits 0-9, got an empty string")
    odd = next((c for c in text if c not in "0123456789"), None)
    if odd is not None:
        raise InputError(f"expected a string of digits 0-9, got {odd!r} in {text!r}")
    return [int(c) for c in text]


# The pyfunc's request table: one schema for every condition, one row per image asked for.
#   in:  mode    generate | classify | reconstruct | validate
#        digit   0-9: required by generate and validate, optional for reconstruct, ignored by classify
#        pixels  784 values in [0, 1], the image row by row: required by all modes but generate
#   out: digit        the digit asked for (generate, validate) or the most likely one (classify, reconstruct)
#        probability  the model's probability of that digit; empty for generate
#        probs        the 10 digit probabilities (classify, reconstruct)
#        pixels       the generated or reconstructed image, 784 values
def request_frame(mode: str, images=None, digits=None) -> pd.DataFrame:
    """Rows of one mode for `predict_frame` (or, as JSON, for `mlflow models serve`)."""
    if mode not in MODES:
        raise InputError(f"expected mode to be one of {', '.join(MODES)}, got {mode!r}")
    if images is None and digits is None:
        raise InputError("expected images, digits or both")
    x = as_images(images).tolist() if images is not None else None
    y = as_labels(digits, len(x) if x is not None else None).double().tolist() if digits is not None else None
    count = len(x) if x is not None else len(y or [])  # y is given where x is not
    return pd.DataFrame({"mode": [mode] * count, "digit": y or [math.nan] * count, "pixels": x or [None] * count})


def predict_frame(
    model: DigitModel, frame: pd.DataFrame, seed: int | None = None, same_style: bool = False
) -> pd.DataFrame:
    """Answer a request table (see above) with the same calls the Python API makes, batched by mode.

    The generate rows, in order, are one `model.generate` call, so `seed` and `same_style` act as there.
    """
    if "mode" not in frame:
        raise InputError(f"expected a column 'mode' with one of {', '.join(MODES)} per row")
    n = len(frame)
    modes = frame["mode"].tolist()
    for i, mode in enumerate(modes):
        if mode not in MODES:
            raise InputError(f"expected mode to be one of {', '.join(MODES)}, got {mode!r} in row {i}")
    given = [None if _missing(v) else v for v in (frame["digit"] if "digit" in frame else [None] * n)]
    cells = frame["pixels"].tolist() if "pixels" in frame else [None] * n
    out: dict[str, list[Any]] = {"digit": given[:], **{name: [None] * n for name in ("probability", "probs", "pixels")}}

    def labels(rows: list[int], mode: str) -> torch.Tensor:
        for i in rows:
            if given[i] is None:
                raise InputError(f"expected a digit 0-9 for mode {mode!r}, got none in row {i}")
        return as_labels([given[i] for i in rows])

    def images(rows: list[int], mode: str) -> torch.Tensor:
        return torch.stack([_pixels(cells[i], i, mode) for i in rows])

    def fill(rows: list[int], **columns) -> None:
        for name, values in columns.items():
            for i, value in zip(rows, values, strict=False):
                out[name][i] = value.item() if value.ndim == 0 else value.reshape(-1).tolist()

    def rows_of(mode: str, with_digit: bool | None = None) -> list[int]:
        return [
            i for i in range(n) if modes[i] == mode and (with_digit is None or (given[i] is not None) == with_digit)
        ]

    if rows := rows_of("generate"):
        digits = labels(rows, "generate")
        fill(rows, digit=digits, pixels=model.generate(digits, seed=seed, same_style=same_style))
    if rows := rows_of("classify"):
        digits, probs = model.classify(images(rows, "classify"))
        fill(rows, digit=digits, probability=probs.gather(1, digits[:, None])[:, 0], probs=probs)
    for with_digit in (False, True):
        if rows := rows_of("reconstruct", with_digit):
            result = model.reconstruct(images(rows, "reconstruct"), labels(rows, "reconstruct") if with_digit else None)
            fill(rows, pixels=result.images)
            if result.digits is not None and result.probs is not None:
                fill(
                    rows,
                    digit=result.digits,
                    probability=result.probs.gather(1, result.digits[:, None])[:, 0],
                    probs=result.probs,
                )
    if rows := rows_of("validate"):
        digits = labels(rows, "validate")
        fill(rows, digit=digits, probability=model.validate(images(rows, "validate"), digits))
    # object columns keep None where a row has no value, which serves as JSON null (a float NaN would not)
    return pd.DataFrame(
        {
            "digit": pd.array([int(d) for d in out["digit"]], dtype="int64"),
            **{name: pd.Series(out[name], dtype=object) for name in ("probability", "probs", "pixels")},
        }
    )


def _missing(value) -> bool:
    """An empty request cell: None, NaN or pandas' NA (a cell of pixels is a list, never missing here)."""
    return value is None or (np.isscalar(value) and pd.isna(value)) or value is pd.NA


def _pixels(cell, row: int, mode: str) -> torch.Tensor:
    """One request cell as a 28 x 28 tensor (range checked later, with the batch)."""
    if _missing(cell) or len(cell) == 0:
        raise InputError(f"expected pixels (784 values in [0, 1]) for mode {mode!r}, got none in row {row}")
    try:
        values = torch.as_tensor(np.asarray(cell, dtype=np.float64))
    except (TypeError, ValueError):
        raise InputError(f"expected pixels as 784 numbers in [0, 1], got something else in row {row}") from None
    if values.numel() != IMAGE_DIM:
        raise InputError(f"expected 784 pixel values (28 x 28, row by row), got {values.numel()} in row {row}")
    return values.reshape(SIDE, SIDE)


def example_request(model: DigitModel, image: torch.Tensor, digit: int) -> pd.DataFrame:
    """One row for each condition the model supports, from one image and its digit: the pyfunc's input example."""
    candidates = [
        request_frame("generate", digits=[digit]),
        request_frame("classify", images=image[None]),
        request_frame("reconstruct", images=image[None]),
        request_frame("reconstruct", images=image[None], digits=[digit]),
        request_frame("validate", images=image[None], digits=[digit]),
    ]
    supported = []
    for frame in candidates:
        try:
            predict_frame(model, frame, seed=0)
        except UnsupportedTask:
            continue
        supported.append(frame)
    return pd.concat(supported, ignore_index=True)


# PNG files: what the CLI reads and writes.
def read_png(path: str | Path) -> torch.Tensor:
    """A grayscale PNG of 28 x 28 pixels, or a grid of 28 x 28 tiles (what `write_png` writes), as N x 28 x 28."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected a 28 x 28 grayscale PNG")
    too_big = InputError(
        f"{path}: more pixels than {MAX_IMAGES} tiles of 28 x 28 (or a decompression bomb); "
        "split it into smaller PNG files"
    )
    try:
        with Image.open(path) as image:  # reads the header only: size is known before any pixel is decompressed
            if image.width * image.height > MAX_IMAGES * SIDE * SIDE:
                raise too_big
            image.load()
    except Image.DecompressionBombError:
        raise too_big from None
    except (UnidentifiedImageError, OSError):
        raise InputError(f"{path}: not an image file; expected a 28 x 28 grayscale PNG") from None
    width, height = image.size
    bands = image.getbands()
    if len(bands) > 1:
        raise InputError(
            f"{path}: expected one channel (grayscale), got {len(bands)} channels ({image.mode}); "
            "convert it to grayscale first"
        )
    if image.mode not in ("L", "1"):
        raise InputError(f"{path}: expected 8-bit grayscale pixels, got image mode {image.mode}")
    if width % SIDE or height % SIDE or not width or not height:
        raise InputError(f"{path}: expected 28 x 28 pixels (or a grid of 28 x 28 tiles), got {width} x {height}")
    pixels = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255)
    return pixels.reshape(height // SIDE, SIDE, width // SIDE, SIDE).permute(0, 2, 1, 3).reshape(-1, SIDE, SIDE)


def write_png(image: torch.Tensor, path: str | Path) -> None:
    """Write images (N x 28 x 28, side by side in one row) or one image (H x W), values in [0, 1], as an 8-bit PNG."""
    image = image.detach().cpu()
    canvas = figures.tile(image, nrow=len(image)) if image.ndim == 3 else image
    buffer = io.BytesIO()
    Image.fromarray((canvas * 255).round().to(torch.uint8).numpy()).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def require_png_path(out: Path, count: int) -> None:
    """Refuse, before the model loads, an --out that is a folder or a row longer than MAX_IMAGES."""
    if count > MAX_IMAGES:
        raise InputError(
            f"expected at most {MAX_IMAGES} images in one PNG row, got {count}; "
            "run the command several times with fewer"
        )
    if Path(out).is_dir():
        raise InputError(f"--out {out} is a folder; give a file name such as {Path(out) / 'digits.png'}")


def read_pngs(paths: Sequence[str | Path]) -> tuple[torch.Tensor, list[str]]:
    """Every image in the files, in order, and a name for each: the path, with [i] for a tile of a grid."""
    batches = [read_png(p) for p in paths]
    names = [str(p) if len(b) == 1 else f"{p}[{i}]" for p, b in zip(paths, batches, strict=True) for i in range(len(b))]
    return torch.cat(batches), names


# The CLI's commands: one function each.
def run_generate(
    source: str,
    out: Path,
    digit: int | None = None,
    n: int | None = None,
    digits: str | None = None,
    same_style: bool = False,
    seed: int | None = None,
) -> int:
    """`digitgen generate`: n images of one digit (default 1), or a digit string, as one PNG row; returns the count."""
    if (digit is None) == (digits is None):
        raise InputError("expected either a digit (with n) or a digit string")
    if digits is not None:  # bad input stops here, before the (slow) model load
        if n is not None:
            raise InputError("expected n only with a single digit; a digit string draws one image per character")
        digit_string(digits)
    else:
        as_labels(digit)
        as_count(1 if n is None else n)
    require_png_path(out, len(digits) if digits is not None else 1 if n is None else n)
    if seed is not None:
        as_seed(seed)
    model = load(source)
    if digits is not None:
        image, count = generate_string(model, digits, same_style, seed), len(digits)
    else:
        count = 1 if n is None else n
        image = model.generate(digit, count, seed=seed, same_style=same_style)
    write_png(image, out)
    return count


def run_classify(source: str, paths: list[Path]) -> list[tuple[str, int, float]]:
    """`digitgen classify`: (image, most likely digit, its probability) for every image in the files."""
    images, names = read_pngs(paths)
    digits, probs = load(source).classify(images)
    return [(name, int(d), float(p[d])) for name, d, p in zip(names, digits, probs, strict=False)]


def run_reconstruct(
    source: str, paths: list[Path], out: Path, labels: list[int] | None = None
) -> list[tuple[str, int | None, float | None]]:
    """`digitgen reconstruct`: reconstructions as one PNG row; (image, digit, probability) for each."""
    images, names = read_pngs(paths)
    require_png_path(out, len(images))
    if labels is not None:  # bad labels stop here, before the (slow) model load
        as_labels(labels, count=len(images))
    result = load(source).reconstruct(images, labels)
    write_png(result.images, out)
    if result.digits is None or result.probs is None:
        return [(name, None, None) for name in names]
    return [(name, int(d), float(p[d])) for name, d, p in zip(names, result.digits, result.probs, strict=False)]


def run_validate(source: str, paths: list[Path], labels: list[int]) -> list[tuple[str, int, float]]:
    """`digitgen validate`: (image, given label, probability the label is right) for every image in the files."""
    images, names = read_pngs(paths)
    as_labels(labels, count=len(images))  # before the (slow) model load
    probs = load(source).validate(images, labels)
    return [(name, int(y), float(p)) for name, y, p in zip(names, labels, probs, strict=False)]


# MLflow: loading a logged model's weights, and the pyfunc wrapper every seed run logs.
WEIGHTS_FILE = "model.pt"  # the pyfunc's weights artifact, as models.save_model writes them


@contextlib.contextmanager
def pyfunc_weights(uri: str):
    """The weights file of the digitgen pyfunc at an MLflow model URI, downloaded for the with block.

    runs:/<run_id> alone means the model that seed run logged.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from digitgen import tracking

    if tracking.tracking_uri() == tracking.default_tracking_uri() and not tracking.default_store().is_file():
        raise ModelSourceError(
            f"no MLflow store at {tracking.default_store()}; run from the repository root or set MLFLOW_TRACKING_URI"
        )
    tracking.require_store(tracking.tracking_uri())
    mlflow.set_tracking_uri(tracking.tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # a store that is down, read-only or corrupt is named as such; only a model it does not hold is "no such"
            with tracking.store_errors(f"loading the model {uri}"):
                try:
                    if re.fullmatch(r"runs:/[^/]+/?", uri):
                        uri = tracking.logged_model_uri(uri.removeprefix("runs:/").rstrip("/"))
                    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
                except MlflowException as err:
                    if not tracking.not_found(err):
                        raise
                    raise ModelSourceError(
                        f"{uri}: no such MLflow model in {tracking.tracking_uri()} ({str(err).splitlines()[0]}); "
                        "expected runs:/<run_id> or models:/<name>@<alias>"
                    ) from None
            weights = Model.load(local).flavors["python_function"]["artifacts"]["weights"]["path"]
        except ImportError as err:  # s3://, gs://, ... need their client package
            raise ModelSourceError(
                f"{uri}: reading it needs the package {err.name}, which is not installed; "
                "install it (s3://: `uv add boto3`) or download the model file and pass "
                "its path"
            ) from None
        except (OSError, KeyError, TypeError):
            raise ModelSourceError(
                f"{uri}: not a digitgen pyfunc model; expected the model `digitgen train` logs in every seed run"
            ) from None
        yield local / weights


def pyfunc_signature():
    """The request and answer tables of predict_frame. digit is a double on the way in because integer
    columns cannot hold the gaps a mixed request has (MLflow's advice for missing integers)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "mode"),
                ColSpec("double", "digit", required=False),
                ColSpec(Array("double"), "pixels", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("long", "digit"),
                ColSpec("double", "probability", required=False),
                ColSpec(Array("double"), "probs", required=False),
                ColSpec(Array("double"), "pixels", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("seed", "long", None), ParamSpec("same_style", "boolean", False)]),
    )


def _pyfunc_class() -> type:
    """DigitgenPyfunc, built on first use (digitgen.serving.DigitgenPyfunc) so that importing this module does
    not import MLflow. It holds no state: the weights travel as an artifact and load with weights_only=True."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from digitgen import tracking  # noqa: F401 (first: it imports MLflow's pyfunc without MLflow's own warnings)

    # isort: split
    from mlflow.pyfunc import PythonModel

    class DigitgenPyfunc(PythonModel):
        """Serves every condition of the study through one request table (predict_frame)."""

        def load_context(self, context) -> None:
            self.model = load(context.artifacts["weights"])

        def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
            try:
                return predict_frame(self.model, model_input, **(params or {}))
            except DigitgenError as err:  # bad input or a condition the model lacks: the 400 answer's message
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None

    DigitgenPyfunc.__module__, DigitgenPyfunc.__qualname__ = __name__, "DigitgenPyfunc"
    return DigitgenPyfunc


def __getattr__(name: str):
    if name == "DigitgenPyfunc":  # built once: from then on the module's own attribute answers
        globals()[name] = _pyfunc_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The pyfunc as MLflow's "models from code": this file travels with the model and names the wrapper, so
# nothing is pickled (the digitgen package itself travels as the model's code_paths).
PYFUNC_CODE = """import mlflow
from digitgen.serving import DigitgenPyfunc

mlflow.models.set_model(DigitgenPyfunc())
"""


def pyfunc_parts(net, image: torch.Tensor, digit: int, folder: str | Path) -> dict:
    """What mlflow.pyfunc.log_model needs to log `net` as the digitgen pyfunc: the wrapper's code, its weights
    (both written to `folder`), signature and an input example of every condition the model supports."""
    weights, code = Path(folder) / WEIGHTS_FILE, Path(folder) / "digitgen_pyfunc.py"
    save_model(net, weights)
    write_atomic(code, PYFUNC_CODE)
    example = example_request(DigitModel(net, "training"), image, digit)
    return {
        "python_model": str(code),
        "artifacts": {"weights": str(weights)},
        "signature": pyfunc_signature(),
        "input_example": (example, {"seed": 0}),
    }
