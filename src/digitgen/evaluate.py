"""The study's five metrics for every trained seed, and the reference points beside them.

For each seed's model (stage `evaluate`, one configuration per run):
- gen_accuracy: images generated from labels alone, the fraction the separate classifier assigns to
  the conditioning digit;
- fid: Frechet distance between those images and the test images, in the classifier's feature space;
- inception_score (and its std over splits): from the classifier's logits on those images;
- classification_accuracy: the model's own digit head on the test images, image-only input;
- reconstruction_error: BCE summed over the 784 pixels, mean over the test images, with image+digit
  input (the study's) and with the image only (reconstruction_error_image_only).
Beside them, loss: the study's loss terms, bce + nll + kl, unweighted, on the test images shown with their
digits (for the CVAEs the negative ELBO of image and digit; noise drawn with the evaluation seed). Each
family has its own scale, so it compares a configuration with itself (the CI gate), not families: it is
what sees a model that scores better on every image metric because it stopped being what it claims (the
CVAE with its KL term dropped turns into a CAE, and its KL, which nothing then bounds, grows).
FID and IS go through torch-fidelity with the classifier registered as its feature extractor; with
Inception weights at hand they are also computed in Inception's space (fid_inception, ...).

Beside them, for every model, how far the generated images sit from real ones (all against the test images,
in the classifier's feature space): kid (torch-fidelity's Kernel Inception Distance, unbiased, so it
does not lean on the sample size as FID does), precision and recall (torch-fidelity's prc: the share of
generated images inside the real images' k-nearest-neighbour balls, and of real images inside the
generated ones': quality and coverage apart), fid_per_digit (the mean over digits of the FID between
one digit's generated and test images, fid_digit<d> each: whether each digit looks like itself).

Generated images are quantised to uint8, as a saved PNG would be, and every metric sees all of them:
a CAE generating the study's way (the digit-only path) draws one image per digit, and FID (the
generated covariance collapses) and distinct_fraction show that, where IS, which only asks whether
each image is a confident, class-balanced digit, cannot.

Stage `reference` computes the same numbers once for real digits: the test images taken as a
"generator" (gen_accuracy is then the classifier's test accuracy, IS the ceiling near 10) and FID of
the validation images against the test images (the real-data floor); and, under "points", the whole
set of generation metrics for reference "generators" that place a model's numbers: held-out real
images (the validation set: the floor), the same blurred (evaluate.reference_blur_sigma), the ten
per-digit mean training images (one image per digit, as the study's CAE draws) and uniform noise.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from digitgen import classifier, figures, tracking
from digitgen.data import Digits, load_split, md5sum
from digitgen.files import write_json
from digitgen.models import (
    IMAGE_DIM,
    NUM_DIGITS,
    Model,
    PriorCVAE,
    UnsupportedTask,
    load_model,
    noise_dim,
    reparameterize,
    resolve_device,
)
from digitgen.params import DigitgenError, EvaluateParams, config_name

# Every metric and which way is better: the one declaration that aggregate and the CI gate read.
# The *_std values written beside the Inception Scores are spreads over splits, not metrics.
METRICS = {
    "gen_accuracy": "higher",
    "fid": "lower",
    "inception_score": "higher",
    "classification_accuracy": "higher",
    "reconstruction_error": "lower",
    "reconstruction_error_image_only": "lower",
    "loss": "lower",  # bce + nll + kl on the test images: a configuration against itself, not across families
    "distinct_fraction": "higher",  # distinct generated images / all: what IS cannot see
    "kid": "lower",
    "precision": "higher",
    "recall": "higher",
    "fid_per_digit": "lower",  # the mean of fid_digit0..fid_digit9
    **{f"fid_digit{digit}": "lower" for digit in range(NUM_DIGITS)},
    "recon_fid": "lower",  # the decoder floor: held-out digits reconstructed, scored as generated ones
    "recon_precision": "higher",
    "recon_recall": "higher",
    "fid_inception": "lower",  # only where Inception weights are available
    "inception_score_inception": "higher",
    "kid_inception": "lower",
    "precision_inception": "higher",
    "recall_inception": "higher",
}
INCEPTION_METRICS = (
    "fid_inception",
    "inception_score_inception",
    "kid_inception",
    "precision_inception",
    "recall_inception",
)


class EvaluateError(DigitgenError):
    """Missing inputs for evaluation; the message names the file and the fix."""


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (N x 784 or N x 28 x 28) -> uint8 N x 1 x 28 x 28, MNIST's own format."""
    side = classifier.IMAGE_SIDE
    return images.detach().reshape(-1, 1, side, side).mul(255).round().clamp(0, 255).to(torch.uint8).cpu()


@dataclass(frozen=True)
class ImageSet(Dataset):
    """uint8 images N x 1 x 28 x 28 as torch-fidelity reads them. Real sets carry a cache name (holding a hash
    of their pixels) so their features are computed once; generated sets carry none and are never cached."""

    images: torch.Tensor
    cache_name: str | None = None
    channels: int = 1  # Inception reads RGB

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].expand(self.channels, -1, -1)


def real_set(digits: Digits, name: str) -> ImageSet:
    """A set of real digits, cached by torch-fidelity under a name holding a hash of its pixels."""
    digest = hashlib.md5(digits.images.numpy().tobytes()).hexdigest()[:12]
    return ImageSet(digits.images.unsqueeze(1), f"digitgen-{name}-{digest}")


class Extractor(NamedTuple):
    """A torch-fidelity feature extractor and the suffix its metrics carry ("" for the classifier)."""

    suffix: str
    name: str
    weights_path: str | None
    channels: int


def inception_weights(configured: str | None) -> tuple[Path | None, str]:
    """Where Inception's weights are (params' path, else torch hub's cache), or None and why not."""
    if configured is not None:
        if not Path(configured).is_file():
            raise EvaluateError(
                f"evaluate.inception_weights: {configured} not found; point it at torch-fidelity's "
                f"{Path(URL_INCEPTION_V3).name} or set it to null"
            )
        return Path(configured), ""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    if cached.is_file():
        return cached, ""
    return None, (
        f"no Inception weights: evaluate.inception_weights is null and torch hub's cache has no {cached.name}"
    )


def register_inception(path: Path) -> str:
    """torch-fidelity's Inception under a name holding its weights' hash: its cache is keyed by name alone."""
    name = f"inception-v3-compat-{md5sum(path)[:12]}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, FeatureExtractorInceptionV3)
    return name


@dataclass
class Judge:
    """What scores images: the classifier (its logits directly, its features through torch-fidelity) and,
    where its weights exist, Inception."""

    classifier: classifier.DigitClassifier
    extractors: list[Extractor]
    skipped: dict[str, str]  # metric -> why it was not computed
    params: EvaluateParams
    cache_root: Path
    device: torch.device

    @classmethod
    def load(cls, classifier_path: Path, params: EvaluateParams, cache_root: Path) -> Judge:
        device = resolve_device(params.device)
        model = classifier.load_classifier(classifier_path).to(device)
        extractors = [Extractor("", classifier.register_feature_extractor(classifier_path), None, 1)]
        weights, why = inception_weights(params.inception_weights)
        if weights is not None:
            extractors.append(Extractor("_inception", register_inception(weights), str(weights), 3))
        skipped = {} if weights is not None else {metric: why for metric in INCEPTION_METRICS}
        return cls(model, extractors, skipped, params, Path(cache_root), device)

    def fidelity(self, images: ImageSet, reference: ImageSet | None = None, isc: bool = True) -> dict[str, float]:
        """IS of `images` and, given a reference set, FID, KID and precision/recall against it, with every extractor."""
        metrics = {}
        for extractor in self.extractors:
            kwargs = {}
            if reference is not None:  # KID draws subsets: no larger than either set
                kwargs = {
                    "input2": replace(reference, channels=extractor.channels),
                    "input2_cache_name": reference.cache_name,
                    "kid_subset_size": min(self.params.kid_subset_size, len(images), len(reference)),
                    "kid_subsets": self.params.kid_subsets,
                    "prc_neighborhood": self.params.prc_neighborhood,
                    "prc_batch_size": self.params.batch_size,
                }
            got = torch_fidelity.calculate_metrics(
                input1=replace(images, channels=extractor.channels),
                input1_cache_name=images.cache_name,
                isc=isc,
                fid=reference is not None,
                kid=reference is not None,
                prc=reference is not None,
                feature_extractor=extractor.name,
                feature_extractor_weights_path=extractor.weights_path,
                isc_splits=self.params.is_splits,
                batch_size=self.params.batch_size,
                cuda=self.device.type == "cuda",
                rng_seed=self.params.seed,
                cache_root=str(self.cache_root),
                verbose=False,
                **kwargs,
                samples_shuffle=True,  # IS splits must mix digits: generated images come grouped by digit
                save_cpu_ram=True,
            )  # no DataLoader worker processes: the images are already in memory
            if isc:
                metrics[f"inception_score{extractor.suffix}"] = got[torch_fidelity.KEY_METRIC_ISC_MEAN]
                metrics[f"inception_score{extractor.suffix}_std"] = got[torch_fidelity.KEY_METRIC_ISC_STD]
            if reference is not None:
                metrics[f"fid{extractor.suffix}"] = got[torch_fidelity.KEY_METRIC_FID]
                metrics[f"kid{extractor.suffix}"] = got[torch_fidelity.KEY_METRIC_KID_MEAN]
                metrics[f"kid{extractor.suffix}_std"] = got[torch_fidelity.KEY_METRIC_KID_STD]
                metrics[f"precision{extractor.suffix}"] = got[torch_fidelity.KEY_METRIC_PRECISION]
                metrics[f"recall{extractor.suffix}"] = got[torch_fidelity.KEY_METRIC_RECALL]
        return metrics

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's features (FID's space) of uint8 images."""
        return torch.cat(
            [
                self.classifier(images[i : i + self.params.batch_size].to(self.device))[0].cpu().double()
                for i in range(0, len(images), self.params.batch_size)
            ]
        )

    def fid_per_digit(self, images: torch.Tensor, digits: torch.Tensor, reference: Digits) -> dict[str, float]:
        """fid_digit<d>: FID of the images drawn for digit d against the reference images of d; fid_per_digit their
        mean."""
        ours, theirs = self.features(images), self.features(reference.images.unsqueeze(1))
        metrics = {}
        for digit in range(NUM_DIGITS):
            stats = [fid_features_to_statistics(f) for f in (ours[digits == digit], theirs[reference.labels == digit])]
            metrics[f"fid_digit{digit}"] = fid_statistics_to_metric(*stats, verbose=False)[
                torch_fidelity.KEY_METRIC_FID
            ]
        metrics["fid_per_digit"] = sum(metrics.values()) / NUM_DIGITS
        return metrics

    def generation_metrics(
        self, images: torch.Tensor, digits: torch.Tensor, reference: Digits | None
    ) -> dict[str, float]:
        """gen_accuracy, distinct_fraction, IS and (given reference images) FID, KID, precision/recall and FID
        per digit of uint8 images drawn for `digits`."""
        predicted = self.classifier.logits(images, self.params.batch_size).argmax(1)
        metrics = {
            "gen_accuracy": (predicted == digits).sum().item() / len(digits),
            "distinct_fraction": len(torch.unique(images.flatten(1), dim=0)) / len(images),
        }
        metrics.update(self.fidelity(ImageSet(images), real_set(reference, "test") if reference is not None else None))
        if reference is not None:
            metrics.update(self.fid_per_digit(images, digits, reference))
        return metrics


def fitted_latents(model: Model, train: Digits, digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Latents drawn per digit from a Gaussian fitted to that digit's training latents (image+digit input).

    For the CVAE each training image contributes one posterior draw, so the fit matches the aggregate
    posterior rather than only its means. The covariance's square root comes from its eigendecomposition,
    which tolerates the near-singular covariances a CAE's latents can have.
    """
    device = next(model.parameters()).device
    mu, logvar = model.encode(train.float_images().to(device), train.labels.to(device))
    z_train = reparameterize(mu, logvar, torch.randn(mu.shape, generator=generator).to(device)).cpu()
    z = torch.empty(len(digits), z_train.shape[1])
    for digit in range(NUM_DIGITS):
        mine, chosen = z_train[train.labels == digit], digits == digit
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(mine.T))
        root = eigenvectors * eigenvalues.clamp(min=0).sqrt()  # root @ root.T == covariance
        z[chosen] = mine.mean(0) + torch.randn(int(chosen.sum()), z.shape[1], generator=generator) @ root.T
    return z.to(device)


@torch.no_grad()
def generate(
    model: Model, digits: torch.Tensor, sampler: str, train: Digits, generator: torch.Generator
) -> torch.Tensor:
    """Images N x 784 in [0, 1] from digits alone. study: the model's own way (the digit-only path for the
    study's models: CVAE z = mu + sigma * noise, the CAE deterministic); fitted: latents from
    `fitted_latents`; prior: z ~ N(0, I)."""
    device = next(model.parameters()).device
    digits = digits.to(device)
    noise = torch.randn(len(digits), noise_dim(model), generator=generator).to(device)
    if sampler == "study":
        return model.generate(digits, noise)
    return model.decode(fitted_latents(model, train, digits, generator) if sampler == "fitted" else noise, digits)


@torch.no_grad()
def model_metrics(model: Model, test: Digits, seed: int) -> dict[str, float]:
    """The model's own digit head, reconstructions and loss terms on the test images (noise from `seed`).

    A model without a digit head (the label CVAE) has no classification accuracy and cannot encode an
    image without its label: those metrics are left out, and the results table shows them as n/a.
    """
    device = next(model.parameters()).device
    images, labels = test.float_images().to(device), test.labels.to(device)

    def bce(reconstructed: torch.Tensor) -> float:
        return F.binary_cross_entropy(reconstructed, images, reduction="none").sum(1).mean().item()

    metrics = {"reconstruction_error": bce(model.reconstruct(images, labels)[0])}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        terms = model.loss(images, labels, "image_digit")
    metrics["loss"] = (terms.bce + terms.nll + terms.kl).item()  # the terms, not the (possibly weighted) total
    try:
        metrics["classification_accuracy"] = (model.classify(images).argmax(1) == labels).sum().item() / len(labels)
        metrics["reconstruction_error_image_only"] = bce(model.reconstruct(images, None)[0])
    except UnsupportedTask:
        pass
    return metrics


@torch.no_grad()
def decoder_floor(model: Model, judge: Judge, held_out: Digits, test: Digits) -> dict[str, float]:
    """recon_fid, recon_precision, recon_recall: held-out digits reconstructed from image and digit (n_generated of
    them), scored against the test images as generated ones are. No prior draws better than its decoder redraws
    real digits, so this is the floor under the model's FID: the rest of its FID is its prior's."""
    device = next(model.parameters()).device
    n = judge.params.n_generated
    images, labels = held_out.float_images()[:n].to(device), held_out.labels[:n].to(device)
    step = judge.params.batch_size
    redrawn = torch.cat([model.reconstruct(images[i : i + step], labels[i : i + step])[0] for i in range(0, n, step)])
    got = judge.fidelity(ImageSet(to_uint8(redrawn)), real_set(test, "test"), isc=False)
    return {f"recon_{metric}": got[metric] for metric in ("fid", "precision", "recall")}


def temperature_curve(model: PriorCVAE, judge: Judge, held_out: Digits) -> list[dict[str, float]]:
    """Generation at each of evaluate.temperatures against the validation images, where a temperature is chosen
    (never the test images): gen_accuracy, fid, precision, recall per temperature, noise common to all."""
    params, trained = judge.params, model.config
    digits = generated_digits(params)
    real = Digits(held_out.images[: params.n_generated], held_out.labels[: params.n_generated])
    curve = []
    try:
        for temperature in params.temperatures:
            model.config = replace(trained, prior_temperature=temperature)
            generator = torch.Generator().manual_seed(params.seed)
            images = to_uint8(generate(model, digits, "study", held_out, generator))
            predicted = judge.classifier.logits(images, params.batch_size).argmax(1)
            got = judge.fidelity(ImageSet(images), real_set(real, "val"), isc=False)
            curve.append(
                {
                    "temperature": temperature,
                    "gen_accuracy": (predicted == digits).sum().item() / len(digits),
                    **{metric: got[metric] for metric in ("fid", "precision", "recall")},
                }
            )
    finally:
        model.config = trained
    return curve


def generated_digits(params: EvaluateParams) -> torch.Tensor:
    """The digits a generator is asked for: 0-9, n_generated / 10 each, grouped by digit."""
    return torch.arange(NUM_DIGITS).repeat_interleave(params.n_generated // NUM_DIGITS)


def evaluate_seed(
    model: Model, judge: Judge, train: Digits, val: Digits, test: Digits
) -> tuple[dict[str, float], torch.Tensor]:
    """Every metric of one trained model, and its generated images (uint8, grouped by digit)."""
    params = judge.params
    digits = generated_digits(params)
    generator = torch.Generator().manual_seed(params.seed)
    images = to_uint8(generate(model, digits, params.sampler, train, generator))
    metrics = judge.generation_metrics(images, digits, test)
    metrics.update(model_metrics(model, test, params.seed))
    metrics.update(decoder_floor(model, judge, val, test))
    return metrics, images


def sample_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """The first `columns` images of each digit, one row per digit, as floats in [0, 1]."""
    per_digit = images.reshape(NUM_DIGITS, -1, IMAGE_DIM)[:, :columns]
    return per_digit.reshape(-1, IMAGE_DIM).float().div(255.0)


def seed_models(models_dir: Path) -> dict[str, Path]:
    """{seed: model file} of one trained configuration (models/<config>/seed<s>.pt), in seed order."""
    found = {path.stem.removeprefix("seed"): path for path in Path(models_dir).glob("seed*.pt")}
    if not found:
        raise EvaluateError(
            f"no trained seeds (seed*.pt) in {models_dir}; train this configuration first "
            f"(`dvc repro train@{Path(models_dir).name}`)"
        )
    return dict(sorted(found.items(), key=lambda item: int(item[0])))


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """uint8 images N x 1 x 28 x 28 under a Gaussian blur of `sigma` pixels (kernel to 3 sigma, edges padded
    with black, as MNIST's are)."""
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = images.float()
    x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return x.round().clamp(0, 255).to(torch.uint8)


def reference_points(
    params: EvaluateParams, train: Digits, held_out: Digits
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (uint8 images, the digits they are for)}: the "generators" that place a model's numbers."""
    digits = generated_digits(params)
    real = Digits(held_out.images[: params.n_generated], held_out.labels[: params.n_generated])
    means = torch.stack([train.images[train.labels == d].float().mean(0) for d in range(NUM_DIGITS)])
    noise = torch.rand(len(digits), IMAGE_DIM, generator=torch.Generator().manual_seed(params.seed))
    return {
        "held_out_real": (real.images.unsqueeze(1), real.labels),
        "blurred_real": (blurred(real.images.unsqueeze(1), params.reference_blur_sigma), real.labels),
        "digit_means": (means.round().to(torch.uint8)[digits].unsqueeze(1), digits),
        "uniform_noise": (to_uint8(noise), digits),
    }


def run_reference(
    params: EvaluateParams, classifier_path: Path, prepared_dir: Path, out_path: Path, cache_root: Path
) -> dict:
    """Stage `reference`: the metrics of real digits, once, the test set's cached features, and every
    generation metric for the reference points (`reference_points`) against the test images."""
    judge = Judge.load(classifier_path, params, cache_root)
    train, val, test = (load_split(prepared_dir, split) for split in ("train", "val", "test"))
    test_set = real_set(test, "test")
    reference: dict[str, Any] = judge.generation_metrics(test_set.images, test.labels, None)
    reference.update(judge.fidelity(real_set(val, "val"), test_set, isc=False))
    reference["points"] = {
        name: judge.generation_metrics(images, digits, test)
        for name, (images, digits) in reference_points(params, train, val).items()
    }
    reference["skipped"] = judge.skipped
    write_json(reference, out_path)
    return reference


@dataclass
class ConfigEvaluation:
    """One configuration's evaluation: its trained seeds, the judge, and the data every seed is scored on."""

    name: str
    experiment: str  # the MLflow experiment of the seeds' training runs, which get the metrics
    models: dict[str, Path]  # {seed: model file}
    judge: Judge
    train: Digits  # for the fitted sampler
    val: Digits  # the decoder floor's reconstructions and the temperature curve's reference
    test: Digits
    test_file: Path  # the prepared test split, logged as the evaluation's dataset

    @classmethod
    def load(
        cls,
        params: EvaluateParams,
        experiment: str,
        kind: str,
        latent_dim: int,
        models_dir: Path,
        classifier_path: Path,
        prepared_dir: Path,
        cache_root: Path,
    ) -> ConfigEvaluation:
        models = seed_models(models_dir)
        judge = Judge.load(classifier_path, params, cache_root)
        test = load_split(prepared_dir, "test")
        return cls(
            config_name(kind, latent_dim),
            experiment,
            models,
            judge,
            load_split(prepared_dir, "train"),
            load_split(prepared_dir, "val"),
            test,
            Path(prepared_dir) / "test.pt",
        )

    def seeds(self) -> list[str]:
        return list(self.models)

    def evaluate(self, seed: str) -> tuple[dict[str, float], torch.Tensor, list[dict[str, float]]]:
        """Score one seed's model, log metrics, settings (as params, with the device used) and samples to its
        training run; return the metrics, its sample grid and (a model drawn at a temperature) its temperature
        curve."""
        params = self.judge.params
        model = load_model(self.models[seed]).to(self.judge.device)
        metrics, images = evaluate_seed(model, self.judge, self.train, self.val, self.test)
        curve = temperature_curve(model, self.judge, self.val) if isinstance(model, PriorCVAE) else []
        grid = sample_grid(images, params.grid_columns)
        settings = tracking.flatten({"evaluate": {**asdict(params), "device": str(self.judge.device)}})
        run_id = tracking.seed_run_for(self.experiment, self.name, seed, self.models[seed], settings)
        title = f"{self.name} seed{seed}: digits 0-9, one per row ({params.sampler} sampler)"
        tracking.log_evaluation(
            run_id, metrics, settings, self.test_file, figures.digit_grid(grid, params.grid_columns, title)
        )
        return metrics, grid, curve


def run_evaluate(
    params: EvaluateParams,
    experiment: str,
    kind: str,
    latent_dim: int,
    models_dir: Path,
    classifier_path: Path,
    prepared_dir: Path,
    out_dir: Path,
    cache_root: Path,
) -> dict:
    """Stage `evaluate`: every seed of one configuration; metrics to JSON and to each seed's training run."""
    evaluation = ConfigEvaluation.load(
        params, experiment, kind, latent_dim, models_dir, classifier_path, prepared_dir, cache_root
    )
    name, seeds, grids, curves = evaluation.name, {}, [], {}
    for seed in evaluation.seeds():
        started = time.perf_counter()
        seeds[seed], grid, curve = evaluation.evaluate(seed)
        grids.append(grid)
        if curve:
            curves[seed] = curve
        print(
            f"{name} seed{seed}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in seeds[seed].items())
            + f" ({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
    result = {
        "config": name,
        "sampler": params.sampler,
        "n_generated": params.n_generated,
        "seeds": seeds,
        "skipped": evaluation.judge.skipped,
    }
    if curves:
        result["temperature_curve"] = curves
        trained = load_model(evaluation.models[next(iter(curves))]).config.prior_temperature
        figures.save(figures.temperature_curve(curves, trained, name), Path(out_dir) / f"{name}-temperature.png")
    write_json(result, Path(out_dir) / f"{name}.json")
    figures.save(
        figures.digit_grid(
            torch.cat(grids),
            params.grid_columns,
            f"{name} ({params.sampler} sampler): digits 0-9 per row, seed after seed",
        ),
        Path(out_dir) / f"{name}-samples.png",
    )
    return result
