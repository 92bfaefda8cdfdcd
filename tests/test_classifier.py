"""The separate classifier: its stage, its guard on accuracy, and its registration with torch-fidelity."""

from __future__ import annotations

import json

import pytest
import torch
import torch_fidelity
from conftest import make_params

from digitgen.classifier import ClassifierError, load_classifier, register_feature_extractor, run_classifier
from digitgen.params import ParamsError


def test_stage_writes_weights_and_their_test_accuracy(trained_classifier, mnist_subset):
    metrics = json.loads((trained_classifier.parent / "classifier.json").read_text())
    assert metrics["test_accuracy"] == load_classifier(trained_classifier).accuracy(mnist_subset["test"], 100)
    assert metrics["test_accuracy"] > 0.9  # a usable judge even from 1,000 training images


@pytest.mark.slow  # trains the classifier
def test_stage_fails_below_min_test_accuracy_and_keeps_no_weights(prepared_dir, tmp_path):
    params = make_params(classifier={"epochs": 1, "min_test_accuracy": 1.0}).classifier
    with pytest.raises(ClassifierError, match="classifier.min_test_accuracy") as err:
        run_classifier(params, prepared_dir, tmp_path / "classifier.pt", tmp_path / "classifier.json")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "classifier.pt").exists()
    assert json.loads((tmp_path / "classifier.json").read_text())["test_accuracy"] < 1.0  # still shown


@pytest.mark.slow  # trains the classifier twice
def test_training_is_seeded_and_the_extractor_name_follows_the_weights(prepared_dir, tmp_path):
    names = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        params = make_params(classifier={"epochs": 1, "seed": seed, "min_test_accuracy": 0.0}).classifier
        run_classifier(params, prepared_dir, tmp_path / f"{run}.pt", tmp_path / f"{run}.json")
        names[run] = register_feature_extractor(tmp_path / f"{run}.pt")
    assert names["a"] == names["b"]  # same seed, same weights: torch-fidelity's cached statistics stay valid
    assert names["a"] != names["c"]  # new weights never reuse another classifier's cache
    assert torch.load(tmp_path / "c.pt", weights_only=True)["sha256"][:12] in names["c"]
    assert names["c"] in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY


def test_missing_weights_name_the_stage_to_run(tmp_path):
    with pytest.raises(ClassifierError, match="dvc repro classifier"):
        load_classifier(tmp_path / "classifier.pt")


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("classifier", {"channels": [16, 32, 64, 128]}, "classifier.channels"),
        ("classifier", {"kernel_size": 4}, "classifier.kernel_size"),
        ("classifier", {"min_test_accuracy": 99}, "classifier.min_test_accuracy"),
        ("evaluate", {"n_generated": 1005}, "evaluate.n_generated"),
        ("evaluate", {"sampler": "gaussian"}, "evaluate.sampler"),
        ("evaluate", {"is_splits": 0}, "evaluate.is_splits"),
        ("evaluate", {"grid_columns": 30}, "evaluate.grid_columns"),
    ],
)
def test_bad_params_name_their_key(section, values, key):
    with pytest.raises(ParamsError, match=f"^{key} must be"):
        make_params(**{section: values})
