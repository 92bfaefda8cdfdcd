"""The study's "separate classifier": a LeNet-like CNN that judges generated digits.

It also gives FID and IS their feature space. Inception weights cannot be downloaded on these
machines, and an ImageNet network is a poor judge of 28x28 digits anyway; a CNN trained on MNIST
knows what a digit looks like. FID compares its penultimate features, IS reads its logits.

    uint8 image 1 x 28 x 28 -> [conv k x k -> batch norm -> ReLU -> 2 x 2 max-pool] per channel entry
                            -> FC feature_dim -> ReLU (features) -> FC 10 (logits)

Stage `classifier` trains it on the training split only (the test set stays unseen) and fails when
its test accuracy is below `classifier.min_test_accuracy`. `register_feature_extractor` hands it to
torch-fidelity under a name holding a hash of its weights, because torch-fidelity keys its cache of
features and statistics by that name alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from digitgen.data import Digits, load_split
from digitgen.files import save_torch, weights_checksum, write_json
from digitgen.models import NUM_DIGITS, resolve_device
from digitgen.params import ClassifierParams, DigitgenError

IMAGE_SIDE = 28


class ClassifierError(DigitgenError):
    """A classifier that is missing or too weak to judge; the message names the fix."""


class DigitClassifier(nn.Module):
    """LeNet-like: conv blocks, then the feature layer FID compares, then the logits IS reads."""

    def __init__(self, channels: list[int], kernel_size: int, feature_dim: int):
        super().__init__()
        self.config = {"channels": list(channels), "kernel_size": kernel_size, "feature_dim": feature_dim}
        blocks, in_channels = [], 1
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        side = IMAGE_SIDE // 2 ** len(channels)
        self.convs = nn.Sequential(*blocks, nn.Flatten())
        self.features = nn.Sequential(nn.Linear(in_channels * side * side, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, NUM_DIGITS)
        # channels-last convolutions run about 1.2x faster on CPU (oneDNN), in training and in every metric
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images N x 1 x 28 x 28 (MNIST's own format; generated images are quantised to it first)
        -> (features N x feature_dim, logits N x 10)."""
        pixels = images.float().div(255.0).contiguous(memory_format=torch.channels_last)
        features = self.features(self.convs(pixels))
        return features, self.head(features)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        device = next(self.parameters()).device
        return torch.cat(
            [self(images[i : i + batch_size].to(device))[1].cpu() for i in range(0, len(images), batch_size)]
        )

    def accuracy(self, digits: Digits, batch_size: int) -> float:
        predicted = self.logits(digits.images.unsqueeze(1), batch_size).argmax(1)
        return (predicted == digits.labels).sum().item() / len(digits)


def build_classifier(params: ClassifierParams) -> DigitClassifier:
    return DigitClassifier(params.channels, params.kernel_size, params.feature_dim)


def save_classifier(model: DigitClassifier, path: Path) -> None:
    """Architecture, weights and their checksum, written atomically."""
    state_dict = model.state_dict()
    save_torch(
        {"config": model.config, "state_dict": state_dict, "sha256": weights_checksum(model.config, state_dict)}, path
    )


def read_checkpoint(path: Path) -> dict:
    """The saved classifier ({config, state_dict, sha256}), its weights checked against their checksum."""
    if not Path(path).is_file():
        raise ClassifierError(f"{path} not found; run `dvc repro classifier` (or `digitgen classifier`) first")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not (
        isinstance(blob, dict)
        and "sha256" in blob
        and weights_checksum(blob["config"], blob["state_dict"]) == blob["sha256"]
    ):
        raise ClassifierError(
            f"{path} is corrupt or not a classifier written by this version (its weights do not "
            "match a saved checksum); delete it and run `dvc repro classifier`"
        )
    return blob


def load_classifier(path: Path) -> DigitClassifier:
    blob = read_checkpoint(path)
    model = DigitClassifier(**blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def fit(model: DigitClassifier, train: Digits, params: ClassifierParams, device: torch.device) -> None:
    """Adam with a one-cycle learning rate: 99% on MNIST in a few epochs, which keeps the stage cheap."""
    images, labels = train.images.unsqueeze(1).to(device), train.labels.to(device)
    stream = torch.Generator().manual_seed(params.seed)
    n_batches = (len(labels) + params.batch_size - 1) // params.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, params.lr, total_steps=params.epochs * n_batches)
    model.train()
    for epoch in range(1, params.epochs + 1):
        started = time.perf_counter()
        order = torch.randperm(len(labels), generator=stream).to(device)
        for b in range(n_batches):
            idx = order[b * params.batch_size : (b + 1) * params.batch_size]
            loss = F.cross_entropy(model(images[idx])[1], labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(
            f"classifier epoch {epoch}/{params.epochs}: last batch loss {loss.item():.4f} "
            f"({time.perf_counter() - started:.1f} s)",
            file=sys.stderr,
        )
    model.eval()


def run_classifier(params: ClassifierParams, prepared_dir: Path, out_path: Path, metrics_path: Path) -> dict:
    """Stage `classifier`: train on the training split, write the weights and the test accuracy."""
    train, test = load_split(prepared_dir, "train"), load_split(prepared_dir, "test")
    device = resolve_device(params.device)
    torch.manual_seed(params.seed)
    model = build_classifier(params).to(device)
    fit(model, train, params, device)
    metrics = {"test_accuracy": model.accuracy(test, params.batch_size)}
    write_json(metrics, metrics_path)
    if metrics["test_accuracy"] < params.min_test_accuracy:
        raise ClassifierError(
            f"test accuracy {metrics['test_accuracy']:.4f} is below classifier.min_test_accuracy "
            f"{params.min_test_accuracy}; train longer (classifier.epochs) or widen classifier.channels"
        )
    save_classifier(model.cpu(), out_path)
    return metrics


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity's view of one trained classifier; subclasses made by `register_feature_extractor` bind
    its weights, so the registered name and the weights can never disagree."""

    checkpoint: dict  # {"config", "state_dict"}, bound per registered subclass

    def __init__(self, name: str, features_list: list[str], **kwargs):
        super().__init__(name, features_list)
        self.classifier = DigitClassifier(**self.checkpoint["config"])
        self.classifier.load_state_dict(self.checkpoint["state_dict"])
        self.classifier.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, images):
        features, logits = self.classifier(images)
        provided = {"features": features, "logits": logits}
        return tuple(provided[name] for name in self.features_list)


def register_feature_extractor(path: Path) -> str:
    """Register the classifier at `path` with torch-fidelity (once per process per weights) and return its name."""
    checkpoint = read_checkpoint(path)
    name = f"digitgen-classifier-{checkpoint['sha256'][:12]}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(
            name, type(f"ClassifierFeatures_{name[-12:]}", (ClassifierFeatures,), {"checkpoint": checkpoint})
        )
    return name
