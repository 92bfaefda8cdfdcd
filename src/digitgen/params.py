"""The typed, validated view of params.yaml: the one place that knows its shape.

`load_params` turns the YAML into frozen dataclasses. An unknown key, a value of the wrong type
or an impossible value stops with a `ParamsError` whose one line names the key and what is allowed,
before any stage does work.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

MNIST_TRAIN_SIZE = 60_000  # images in the original MNIST training file
MNIST_TEST_SIZE = 10_000
MODEL_KINDS = ("cae", "cvae")  # the study's two joint models
LABEL_CVAE = "label_cvae"  # the label-conditioned CVAE, trained beside the study's grid with its own params
PCVAE = "pcvae"  # the prior CVAE (pcvae), beyond the study: a joint CVAE with a learned per-digit prior
INPUT_MODES = ("image_digit", "image", "digit")  # what the model is given for a batch
# What trains the seeds of a configuration: local, one after another in the stage's process; processes,
# `workers` at once in child processes on this machine; ray, one Ray task per seed on a Ray cluster
EXECUTORS = ("local", "processes", "ray")
# How a model draws latents when generating from a label: study, the digit-only path; fitted, a Gaussian
# per digit fitted to training latents; prior, z ~ N(0, I) (the label CVAE's own way; the study's models
# carry the digit in z, so for them the prior ignores the label)
SAMPLERS = ("study", "fitted", "prior")
if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a params section


def config_name(kind: str, latent_dim: int) -> str:
    """A configuration's name in folders, stages and MLflow runs: cae-16."""
    return f"{kind}-{latent_dim}"


class DigitgenError(Exception):
    """An error a user can fix: the CLI prints its one-line message and exits with status 2."""


class ParamsError(DigitgenError, ValueError):
    """A params.yaml value that cannot be used; the message is one line naming key and fix."""


def _require(ok: bool, key: str, allowed: str, value: object) -> None:
    if not ok:
        raise ParamsError(f"{key} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class DataParams:
    mirrors: list[str]
    train_size: int = 48_000
    val_size: int = 12_000
    test_size: int = MNIST_TEST_SIZE
    split_seed: int = 0

    def __post_init__(self) -> None:
        _require(len(self.mirrors) > 0, "mirrors", "a non-empty list of URLs or folders", self.mirrors)
        _require(self.train_size > 0, "train_size", "a positive integer", self.train_size)
        _require(self.val_size > 0, "val_size", "a positive integer", self.val_size)
        _require(
            self.train_size + self.val_size <= MNIST_TRAIN_SIZE,
            "val_size",
            f"at most {MNIST_TRAIN_SIZE} - train_size = {MNIST_TRAIN_SIZE - self.train_size}",
            self.val_size,
        )
        _require(0 < self.test_size <= MNIST_TEST_SIZE, "test_size", f"in 1..{MNIST_TEST_SIZE}", self.test_size)


@dataclass(frozen=True)
class StudyParams:
    """The grid of configurations: dvc.yaml's train matrix reads these lists."""

    models: list[str] = field(default_factory=lambda: list(MODEL_KINDS))
    latent_dims: list[int] = field(default_factory=lambda: [8, 16, 32, 64])

    def __post_init__(self) -> None:
        for kind in self.models:
            _require(kind in MODEL_KINDS, "models", f"a list of {', '.join(MODEL_KINDS)}", self.models)
        _require(len(self.models) > 0, "models", "a non-empty list", self.models)
        _require(
            bool(self.latent_dims) and all(d > 0 for d in self.latent_dims),
            "latent_dims",
            "a non-empty list of positive integers",
            self.latent_dims,
        )


@dataclass(frozen=True)
class ModelParams:
    hidden_dim: int = 512

    def __post_init__(self) -> None:
        _require(self.hidden_dim > 0, "hidden_dim", "a positive integer", self.hidden_dim)


@dataclass(frozen=True)
class TrainParams:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    # Relative weight of each input mode when drawing one per batch (normalised to probabilities).
    input_modes: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in INPUT_MODES})
    device: str = "auto"  # auto: CUDA when present, else CPU
    max_loss: float = 1000.0  # an epoch's mean training loss above this (or any NaN) stops training as diverged

    def __post_init__(self) -> None:
        _require(
            len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
            "seeds",
            "a non-empty list of distinct integers",
            self.seeds,
        )
        _require(self.epochs > 0, "epochs", "a positive integer", self.epochs)
        _require(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        _require(self.lr >= 0, "lr", "a non-negative number", self.lr)
        for mode in self.input_modes:
            _require(mode in INPUT_MODES, "input_modes", f"keys among {', '.join(INPUT_MODES)}", mode)
        _require(
            all(w >= 0 for w in self.input_modes.values()) and sum(self.input_modes.values()) > 0,
            "input_modes",
            "non-negative weights with a positive sum",
            self.input_modes,
        )
        _require_device(self.device)
        _require(self.max_loss > 0, "max_loss", "a positive number", self.max_loss)


@dataclass(frozen=True)
class ExecutionParams:
    """How the train stages run their seeds: where, not what they learn. No stage lists this section in
    dvc.yaml, so changing it retrains nothing: for a given thread count the weights are bit-identical
    whichever executor trains them (as for today's default, the thread count is the machine's)."""

    executor: str = "local"
    workers: int = 2  # seeds trained at once by the processes executor
    threads: int | None = None  # torch threads per training; None: the cores shared among those at once (ray: 1)
    retries: int = 2  # ray: runs again of a seed whose worker died, each resuming the seed's checkpoint

    def __post_init__(self) -> None:
        _require(self.executor in EXECUTORS, "executor", f"one of {', '.join(EXECUTORS)}", self.executor)
        _require(self.workers > 0, "workers", "a positive integer", self.workers)
        _require(self.threads is None or self.threads > 0, "threads", "a positive integer or null", self.threads)
        _require(self.retries >= 0, "retries", "a non-negative integer", self.retries)


def _require_device(device: str) -> None:
    _require(
        device == "auto" or device.split(":")[0] in ("cpu", "cuda", "mps"),
        "device",
        "auto, cpu, cuda, cuda:N or mps",
        device,
    )


@dataclass(frozen=True)
class ClassifierParams:
    """The separate classifier (a LeNet-like CNN) that judges generated digits and gives FID/IS their features."""

    seed: int = 0
    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.003  # the peak of a one-cycle schedule
    channels: list[int] = field(default_factory=lambda: [16, 32])  # one conv+pool block per entry
    kernel_size: int = 5
    feature_dim: int = 128  # the penultimate layer: FID's feature space
    min_test_accuracy: float = 0.99  # below this the stage fails: a weaker judge would blur every metric
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "epochs", "a positive integer", self.epochs)
        _require(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        _require(self.lr > 0, "lr", "a positive number", self.lr)
        # each block halves the 28-pixel side; three blocks leave 3 x 3
        _require(
            1 <= len(self.channels) <= 3 and all(c > 0 for c in self.channels),
            "channels",
            "a list of 1 to 3 positive integers",
            self.channels,
        )
        _require(
            self.kernel_size > 0 and self.kernel_size % 2 == 1,
            "kernel_size",
            "a positive odd integer (padding keeps the image size)",
            self.kernel_size,
        )
        _require(self.feature_dim > 0, "feature_dim", "a positive integer", self.feature_dim)
        _require(0 <= self.min_test_accuracy <= 1, "min_test_accuracy", "in 0..1", self.min_test_accuracy)
        _require_device(self.device)


@dataclass(frozen=True)
class EvaluateParams:
    """How every trained seed is scored: the study's five metrics and the reference points beside them."""

    n_generated: int = 10_000  # images generated from labels alone, equally many per digit (the study: 1,000 in all)
    sampler: str = "study"
    is_splits: int = 10  # Inception Score: mean and std over this many splits
    batch_size: int = 1000
    seed: int = 0  # generation noise and IS split shuffling; the same for every seed (common random numbers)
    inception_weights: str | None = None  # torch-fidelity's Inception file; else the torch hub cache; else skipped
    grid_columns: int = 10  # samples per digit in the sample grid
    kid_subset_size: int = 1000  # KID: images per random subset (capped at the sizes of the two sets)
    kid_subsets: int = 10  # KID: how many random subsets it averages (torch-fidelity's 100 cost 19 s a call on 1 core)
    prc_neighborhood: int = 3  # precision/recall: the k of the k-nearest-neighbour balls
    reference_blur_sigma: float = 1.0  # the blurred-real reference point: Gaussian blur, in pixels
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8, 0.9, 1.0])  # the pcvae's curve
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(self.kid_subset_size > 1, "kid_subset_size", "an integer of at least 2", self.kid_subset_size)
        _require(self.kid_subsets > 0, "kid_subsets", "a positive integer", self.kid_subsets)
        _require(self.prc_neighborhood > 0, "prc_neighborhood", "a positive integer", self.prc_neighborhood)
        _require(
            bool(self.temperatures) and all(0 < t <= 1 for t in self.temperatures),
            "temperatures",
            "a non-empty list of numbers in (0, 1]",
            self.temperatures,
        )
        _require(
            self.reference_blur_sigma > 0,
            "reference_blur_sigma",
            "a positive number (pixels)",
            self.reference_blur_sigma,
        )
        _require(
            self.n_generated >= 10 and self.n_generated % 10 == 0,
            "n_generated",
            "a positive multiple of 10 (equally many images per digit)",
            self.n_generated,
        )
        _require(self.sampler in SAMPLERS, "sampler", f"one of {', '.join(SAMPLERS)}", self.sampler)
        _require(1 <= self.is_splits <= self.n_generated, "is_splits", "in 1..n_generated", self.is_splits)
        _require(self.batch_size > 0, "batch_size", "a positive integer", self.batch_size)
        _require(
            self.inception_weights is None or bool(self.inception_weights.strip()),
            "inception_weights",
            "a path or null",
            self.inception_weights,
        )
        _require(
            1 <= self.grid_columns <= self.n_generated // 10, "grid_columns", "in 1..n_generated/10", self.grid_columns
        )
        _require_device(self.device)


@dataclass(frozen=True)
class LatentFigureParams:
    """Stage label_cvae_figures: which model it shows and the size of each picture."""

    seed: int = 0  # which trained seed's model the figures show
    plane_digit: int = 7  # the digit decoded over the 2-D latent plane
    plane_size: int = 15  # images per side of that grid
    plane_extent: float = 3.0  # the grid spans [-extent, extent] on both axes, in prior standard deviations
    samples_per_digit: int = 10  # varied-style samples per digit, z ~ N(0, I)
    noise_seed: int = 0  # seeds those draws, so the figure is the same on every run

    def __post_init__(self) -> None:
        _require(0 <= self.plane_digit <= 9, "plane_digit", "a digit 0-9", self.plane_digit)
        _require(self.plane_size > 1, "plane_size", "an integer of at least 2", self.plane_size)
        _require(self.plane_extent > 0, "plane_extent", "a positive number", self.plane_extent)
        _require(self.samples_per_digit > 0, "samples_per_digit", "a positive integer", self.samples_per_digit)


@dataclass(frozen=True)
class LabelCVAEParams:
    """The label-conditioned CVAE: its architecture, its training (same keys as `train`) and its figures."""

    latent_dim: int = 2
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])  # encoder widths; the decoder mirrors them
    train: TrainParams = field(default_factory=lambda: TrainParams(input_modes={"image_digit": 1.0}))
    figures: LatentFigureParams = field(default_factory=LatentFigureParams)

    def __post_init__(self) -> None:
        _require(
            self.latent_dim >= 2,
            "latent_dim",
            "an integer of at least 2 (the figures draw a 2-D latent plane)",
            self.latent_dim,
        )
        _require(
            len(self.hidden_dims) > 0 and all(d > 0 for d in self.hidden_dims),
            "hidden_dims",
            "a non-empty list of positive integers",
            self.hidden_dims,
        )
        modes = {mode for mode, weight in self.train.input_modes.items() if weight > 0}
        _require(
            modes == {"image_digit"},
            "train.input_modes",
            "{image_digit: 1} (this model always sees the image and its label)",
            self.train.input_modes,
        )
        _require(
            self.figures.seed in self.train.seeds,
            "figures.seed",
            f"one of train.seeds {self.train.seeds} (the figures show that seed's model)",
            self.figures.seed,
        )


@dataclass(frozen=True)
class PCVAEParams:
    """The prior CVAE (pcvae), beyond the study: its latent sizes, architecture, loss weights and training (same
    keys as `train`)."""

    latent_dims: list[int] = field(default_factory=lambda: [16, 32])
    hidden_dim: int = 512
    channels: list[int] = field(default_factory=lambda: [16, 32])  # conv widths; [] = fully connected
    label_weight: float = 50.0  # the digit NLL's weight against the pixel BCE summed over 784 pixels (MVAE)
    kl_warmup_epochs: float = 2.0  # the KL weight rises linearly from 0 to 1 over these epochs
    prior_rate: float = 0.01  # each batch moves a digit's prior this share of the way toward its posteriors' moments
    prior_temperature: float = 0.8  # generation draws z = mu_y + t * sigma_y * noise
    kl_weight: float = 1.0  # beta: the KL term's weight once warmed up
    prior_components: int = 0  # Gaussians per digit fitted to the posteriors after training; 0: the running prior
    head_sees_image: bool = False  # the digit head reads the image pathway's features beside z
    train: TrainParams = field(default_factory=TrainParams)

    def __post_init__(self) -> None:
        _require(
            bool(self.latent_dims) and all(d > 0 for d in self.latent_dims),
            "latent_dims",
            "a non-empty list of positive integers",
            self.latent_dims,
        )
        _require(self.hidden_dim > 0, "hidden_dim", "a positive integer", self.hidden_dim)
        _require(
            len(self.channels) <= 2 and all(c > 0 for c in self.channels),
            "channels",
            "a list of at most 2 positive integers (each conv halves the 28-pixel side)",
            self.channels,
        )
        _require(self.label_weight > 0, "label_weight", "a positive number", self.label_weight)
        _require(0 < self.prior_rate <= 1, "prior_rate", "in (0, 1]", self.prior_rate)
        _require(0 < self.prior_temperature <= 1, "prior_temperature", "in (0, 1]", self.prior_temperature)
        _require(self.kl_weight > 0, "kl_weight", "a positive number", self.kl_weight)
        _require(self.prior_components >= 0, "prior_components", "a non-negative integer", self.prior_components)
        _require(self.kl_warmup_epochs >= 0, "kl_warmup_epochs", "a non-negative number", self.kl_warmup_epochs)


def train_section(kind: str) -> str:
    """The params.yaml section that trains `kind`."""
    return {LABEL_CVAE: "label_cvae.train", PCVAE: "pcvae.train"}.get(kind, "train")


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = "digitgen"
    system_metrics: bool = False  # MLflow samples CPU, memory (and GPU) use into each seed run (train/ stages)

    def __post_init__(self) -> None:
        _require(bool(self.experiment.strip()), "experiment", "a non-empty name", self.experiment)


@dataclass(frozen=True)
class RegistryParams:
    """The MLflow model registry: the aggregate stage registers the best run as <model_name>@champion."""

    model_name: str = "digitgen"
    champion_metric: str = "fid"  # the metric that picks the best configuration (its direction: digitgen.evaluate)
    force_champion: bool = False  # move @champion to this run's best model even when it is not better

    def __post_init__(self) -> None:
        # the name ends up in URIs like models:/<name>@champion, so no slashes, colons or @
        _require(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name) is not None,
            "model_name",
            "a name of letters, digits, '.', '_' or '-'",
            self.model_name,
        )
        _require(bool(self.champion_metric.strip()), "champion_metric", "a metric name", self.champion_metric)


@dataclass(frozen=True)
class CompareParams:
    """The tables stage's tests: CAE - CVAE per latent size and metric, ours against the paper per Table 1 cell."""

    confidence: float = 0.95  # the intervals' level; 1 - confidence is the tests' level after Holm's adjustment
    power: float = 0.8  # for a difference not separable: the seeds per family that would separate it this often
    paper_seeds: int = 3  # the seeds behind the paper's std (it does not say): an assumption of the paper test

    def __post_init__(self) -> None:
        _require(0 < self.confidence < 1, "confidence", "a number in (0, 1)", self.confidence)
        _require(0 < self.power < 1, "power", "a number in (0, 1)", self.power)
        _require(self.paper_seeds >= 2, "paper_seeds", "an integer of at least 2", self.paper_seeds)


@dataclass(frozen=True)
class LimitsParams:
    """Sizes past which a stage stops before it starts, saying what the size would cost; raising a limit in
    params.yaml is the override. No stage lists this section: a limit changes what may run, not what it computes."""

    epochs: int = 1000  # per seed, in every train section
    seeds: int = 20  # per configuration
    n_generated: int = 100_000  # evaluate: images generated per seed, held in memory at once (3.1 kB each)
    epoch_seconds_per_1000_images: float = 0.1  # the estimate's speed: 4-5 s a 48,000-image epoch on 2 cores

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "epochs", "a positive integer", self.epochs)
        _require(self.seeds > 0, "seeds", "a positive integer", self.seeds)
        _require(self.n_generated > 0, "n_generated", "a positive integer", self.n_generated)
        _require(
            self.epoch_seconds_per_1000_images > 0,
            "epoch_seconds_per_1000_images",
            "a positive number",
            self.epoch_seconds_per_1000_images,
        )


@dataclass(frozen=True)
class Params:
    data: DataParams
    study: StudyParams = field(default_factory=StudyParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    execution: ExecutionParams = field(default_factory=ExecutionParams)
    label_cvae: LabelCVAEParams = field(default_factory=LabelCVAEParams)
    pcvae: PCVAEParams = field(default_factory=PCVAEParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    limits: LimitsParams = field(default_factory=LimitsParams)
    compare: CompareParams = field(default_factory=CompareParams)

    def __post_init__(self) -> None:
        n, limit = self.evaluate.n_generated, self.limits.n_generated
        if n > limit:
            raise ParamsError(
                f"evaluate.n_generated: {n} images is past limits.n_generated {limit}; they take "
                f"{n * 28 * 28 * 4 / 1e9:,.1f} GB of memory at once for each seed evaluated; to go on, set "
                f"limits.n_generated in params.yaml to at least {n}"
            )


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> object:
    """Check `value` against the annotation `tp`, building nested dataclasses; raise on mismatch."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = next(t for t in options if t is not type(None))
        return _convert(value, inner, key)
    if origin is list:
        _require(isinstance(value, list), key, f"a list of {_type_name(typing.get_args(tp)[0])}", value)
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, key) for v in value]
    if origin is dict:
        _require(isinstance(value, dict), key, "a mapping", value)
        key_tp, item_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    _require(isinstance(value, tp), key, f"a {_type_name(tp)}", value)
    return value


def _build(cls: type, raw: Any, prefix: str) -> object:
    where = f"{prefix}." if prefix else ""
    _require(isinstance(raw, dict), prefix or "params.yaml", "a mapping of keys to values", raw)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(f"{where}{unknown[0]} is not a known key; allowed here: {', '.join(names)}")
    kwargs = {name: _convert(raw[name], hints[name], f"{where}{name}") for name in names if name in raw}
    try:
        return cls(**kwargs)
    except ParamsError as err:
        raise ParamsError(f"{where}{err}") from None
    except TypeError as err:  # a required key is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        raise ParamsError(f"{where}{missing[0] if missing else '?'} is required but missing") from err


def parse_params(raw: object) -> Params:
    """Validate an already-loaded params mapping."""
    return typing.cast(Params, _build(Params, raw, ""))


def override(section: T, key: str, argument: str, **values) -> T:
    """A params section (at `key`) with command-line values put in, checked by the rules params.yaml is checked by.

    The error names the argument and the rule: `--latent-dim 0: study.latent_dims must be ...`.
    """
    try:
        return dataclasses.replace(section, **values)
    except ParamsError as err:
        given = " ".join(map(str, v)) if isinstance(v := next(iter(values.values())), list) else v
        raise ParamsError(f"{argument} {given}: {key}.{err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML forbids it, DVC refuses it,
    PyYAML would keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 (what DVC reads) writes a float without a dot, 1e-3; PyYAML follows YAML 1.1, which needs one (1.0e-3),
# and would read the string "1e-3". Resolved after PyYAML's own float and int patterns, so 1 stays an integer.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> Any:
    """A YAML file's contents; a syntax error or a duplicate key is a ParamsError naming line and column."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if (mark := err.problem_mark) else str(path)
        raise ParamsError(f"{where}: {err.problem}; fix the YAML there") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found; run from the folder that holds params.yaml (the repository root)")
    raw = read_yaml(path)
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
