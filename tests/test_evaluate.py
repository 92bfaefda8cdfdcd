"""The study's metrics: what FID, IS and gen_accuracy say about known image sets, and where results land."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, make_params, save_prepared
from mlflow.tracking import MlflowClient

from digitgen.cli import main
from digitgen.evaluate import (
    INCEPTION_METRICS,
    METRICS,
    EvaluateError,
    ImageSet,
    Judge,
    decoder_floor,
    evaluate_seed,
    generate,
    model_metrics,
    real_set,
    run_evaluate,
    run_reference,
    temperature_curve,
    to_uint8,
)
from digitgen.models import ModelConfig, build_model, load_model
from digitgen.params import SAMPLERS
from digitgen.tracking import evaluation_metric
from digitgen.train import run_train


@pytest.fixture(autouse=True)
def _no_inception(tmp_path, monkeypatch):
    """Inception weights are never there, whatever the machine's torch hub cache holds."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.fixture
def judge(trained_classifier, tmp_path) -> Judge:
    return Judge.load(trained_classifier, make_params().evaluate, tmp_path / "fidelity_cache")


def test_fid_of_a_set_against_itself_is_zero_and_against_black_images_large(judge, mnist_subset):
    test, val = ImageSet(mnist_subset["test"].images.unsqueeze(1)), ImageSet(mnist_subset["val"].images.unsqueeze(1))
    black = ImageSet(torch.zeros_like(test.images))
    floor = judge.fidelity(val, test, isc=False)["fid"]
    assert judge.fidelity(test, test, isc=False)["fid"] == pytest.approx(0, abs=1e-3)
    assert judge.fidelity(black, test, isc=False)["fid"] > 20 * floor


def test_inception_score_of_one_class_is_one_and_of_all_digits_near_ten(judge, mnist_subset):
    test = mnist_subset["test"]
    ones = ImageSet(test.images[test.labels == 1].unsqueeze(1))
    assert judge.fidelity(ones)["inception_score"] == pytest.approx(1.0, abs=0.1)
    assert judge.fidelity(ImageSet(test.images.unsqueeze(1)))["inception_score"] > 5


def test_gen_accuracy_of_a_generator_drawing_real_digits_is_the_classifier_accuracy(judge, mnist_subset):
    test = mnist_subset["test"]
    metrics = judge.generation_metrics(test.images.unsqueeze(1), test.labels, None)
    assert metrics["gen_accuracy"] == judge.classifier.accuracy(test, 100)
    assert metrics["distinct_fraction"] == 1.0


@pytest.mark.slow  # every reference point's metrics
def test_reference_reports_real_data_bounds_and_why_inception_is_skipped(
    trained_classifier, prepared_dir, tmp_path, mnist_subset
):
    reference = run_reference(
        make_params().evaluate, trained_classifier, prepared_dir, tmp_path / "reference.json", tmp_path / "cache"
    )
    assert json.loads((tmp_path / "reference.json").read_text()) == reference
    assert reference["gen_accuracy"] == pytest.approx(
        json.loads((trained_classifier.parent / "classifier.json").read_text())["test_accuracy"]
    )
    assert 0 < reference["fid"] < 50  # validation vs test images: the real-data floor
    assert set(reference["skipped"]) == set(INCEPTION_METRICS)
    assert all("no Inception weights" in why for why in reference["skipped"].values())
    assert any(
        p.name.startswith(real_set(mnist_subset["test"], "test").cache_name) for p in (tmp_path / "cache").iterdir()
    )
    points = reference["points"]
    assert points["held_out_real"]["fid"] == pytest.approx(reference["fid"], rel=0.2)  # the first n_generated of them
    for metric in ("fid", "fid_per_digit"):  # real beats blurred beats noise (at this size the other metrics may tie)
        ranked = [points[p][metric] for p in ("held_out_real", "blurred_real", "uniform_noise")]
        assert ranked == sorted(ranked), metric
    assert points["uniform_noise"]["gen_accuracy"] < 0.3 < points["held_out_real"]["gen_accuracy"]
    assert points["digit_means"]["distinct_fraction"] == pytest.approx(10 / make_params().evaluate.n_generated)
    assert points["uniform_noise"]["recall"] < 0.05 < 0.5 < points["held_out_real"]["recall"]
    assert points["held_out_real"]["kid"] < min(points[p]["kid"] for p in ("blurred_real", "uniform_noise"))


def test_configured_inception_weights_that_are_missing_stop_with_the_key(trained_classifier, tmp_path):
    params = make_params(evaluate={"inception_weights": str(tmp_path / "inception.pth")}).evaluate
    with pytest.raises(EvaluateError, match="^evaluate.inception_weights: .* not found"):
        Judge.load(trained_classifier, params, tmp_path / "cache")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, mnist_subset, trained_classifier):
    """Two seeds of a tiny CAE, trained into a fresh MLflow store, then evaluated."""
    root = tmp_path_factory.mktemp("evaluated")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        mp.setattr(torch.hub, "get_dir", lambda: str(root / "hub"))
        params = make_params(train={"epochs": 1, "seeds": [0, 1]})
        prepared = save_prepared(mnist_subset, root / "prepared")
        runs = run_train(params, "cae", 4, prepared, root / "models", root / "histories", root / "checkpoints")
        result = run_evaluate(
            params.evaluate,
            params.tracking.experiment,
            "cae",
            4,
            root / "models",
            trained_classifier,
            prepared,
            root / "results",
            root / "cache",
        )
        yield {"root": root, "runs": runs, "result": result, "params": params, "prepared": prepared}


def test_metrics_land_on_each_seeds_training_run(evaluated):
    client, runs = MlflowClient(f"sqlite:///{evaluated['root'] / 'mlflow.db'}"), evaluated["runs"]
    seeds = evaluated["result"]["seeds"]
    assert set(seeds) == {"0", "1"}
    for seed, metrics in seeds.items():
        run = client.get_run(runs["seed_run_ids"][seed])
        assert {k: run.data.metrics[evaluation_metric(k)] for k in metrics} == pytest.approx(metrics)
        assert run.data.params["evaluate.sampler"] == "study" and run.data.params["evaluate.device"] == "cpu"
        assert "evaluation_samples.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "mnist-test" in {d.dataset.name for d in run.inputs.dataset_inputs}
        (model,) = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        linked = {m.key: m.value for m in client.get_logged_model(model.model_id).metrics}
        assert linked["test/fid"] == pytest.approx(metrics["fid"])  # the metrics belong to the logged model
    assert "test/fid" not in client.get_run(runs["parent_run_id"]).data.metrics
    written = json.loads((evaluated["root"] / "results" / "cae-4.json").read_text())
    assert written == evaluated["result"]
    assert (evaluated["root"] / "results" / "cae-4-samples.png").stat().st_size > 0


def test_results_name_no_path_of_the_machine_that_ran_them(evaluated):
    """results/ is committed: an absolute path (the torch hub cache's) would differ on every machine."""
    written = (evaluated["root"] / "results" / "cae-4.json").read_text()
    assert str(evaluated["root"]) not in written and "/hub" not in written
    assert "weights-inception-2015-12-05" in written  # the skipped reason still names the missing file


@pytest.mark.slow  # evaluates again
def test_a_model_trained_against_another_store_gets_a_new_run_for_its_metrics(
    evaluated, trained_classifier, tmp_path, monkeypatch
):
    """Models pulled from a DVC remote arrive without their MLflow store: evaluation still logs, to a new run
    tagged with the model file's md5."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.chdir(tmp_path)
    params = evaluated["params"]
    result = run_evaluate(
        params.evaluate,
        params.tracking.experiment,
        "cae",
        4,
        evaluated["root"] / "models",
        trained_classifier,
        evaluated["prepared"],
        tmp_path / "results",
        tmp_path / "cache",
    )
    assert result["seeds"] == evaluated["result"]["seeds"]
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(params.tracking.experiment).experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["cae-4/seed0", "cae-4/seed1"]
    assert all(r.data.metrics["test/fid"] == pytest.approx(result["seeds"][r.data.tags["seed"]]["fid"]) for r in runs)


def test_every_reported_metric_declares_its_direction(evaluated):
    result = evaluated["result"]
    for metrics in result["seeds"].values():
        reported = {k for k in metrics if not k.endswith("_std")}
        assert reported <= set(METRICS)
        assert set(METRICS) == reported | set(result["skipped"])
    assert set(METRICS.values()) == {"higher", "lower"}


def test_study_sampler_cae_draws_one_image_per_digit_and_metrics_show_it(evaluated, mnist_subset):
    """The CAE's digit-only path is deterministic: all its samples of a digit are one image. Every metric sees all
    200 of them; the fitted sampler gives it variety."""
    params = evaluated["params"].evaluate
    model = load_model(evaluated["root"] / "models" / "seed0.pt")
    digits = torch.arange(10).repeat_interleave(params.n_generated // 10)
    study = evaluated["result"]["seeds"]["0"]
    assert study["distinct_fraction"] == 10 / params.n_generated
    fitted = generate(model, digits, "fitted", mnist_subset["train"], torch.Generator().manual_seed(0))
    assert len(torch.unique(to_uint8(fitted).flatten(1), dim=0)) == params.n_generated


def test_evaluation_is_seeded_from_params(evaluated, trained_classifier, mnist_subset, tmp_path):
    params = make_params(evaluate={"sampler": "fitted"}).evaluate
    judge = Judge.load(trained_classifier, params, tmp_path / "cache")
    model = load_model(evaluated["root"] / "models" / "seed1.pt")
    splits = mnist_subset["train"], mnist_subset["val"], mnist_subset["test"]
    first, images = evaluate_seed(model, judge, *splits)
    again, images_again = evaluate_seed(model, judge, *splits)
    assert first == again and torch.equal(images, images_again)


def test_cli_reports_an_untrained_configuration_in_one_line(tmp_path, capsys):
    status = main(
        [
            "--params",
            str(REPO / "params.yaml"),
            "evaluate",
            "--model",
            "cae",
            "--latent-dim",
            "8",
            "--models",
            str(tmp_path / "cae-8"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "no trained seeds" in err and "dvc repro train@cae-8" in err


KINDS = [ModelConfig("cae", 4, 32), ModelConfig("cvae", 4, 32), ModelConfig("label_cvae", 2, hidden_dims=(32, 16))]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("config", KINDS, ids=lambda c: c.kind)
def test_every_sampler_generates_images_for_every_model_kind(sampler, config, mnist_subset):
    model = build_model(config).eval()
    digits = torch.arange(10).repeat(2)
    images = generate(model, digits, sampler, mnist_subset["train"], torch.Generator().manual_seed(0))
    assert images.shape == (20, 784) and images.min() >= 0 and images.max() <= 1


def test_a_model_without_a_digit_head_has_no_classification_accuracy(mnist_subset):
    metrics = model_metrics(build_model(KINDS[2]).eval(), mnist_subset["test"], seed=0)
    assert set(metrics) == {"reconstruction_error", "loss"}  # n/a in the table, never a made-up number


def test_the_loss_metric_is_the_unweighted_loss_terms_under_the_evaluation_seed(mnist_subset):
    # the prior CVAE trains on 50 x its digit NLL; the metric sums the terms as the study writes them, so a
    # mistake in how the training loss weighs (or drops) a term cannot hide from it
    model = build_model(ModelConfig("pcvae", 4, 32, label_weight=50)).eval()
    test = mnist_subset["test"]
    loss = model_metrics(model, test, seed=3)["loss"]
    assert model_metrics(model, test, seed=3)["loss"] == loss  # the same noise: the same number
    torch.manual_seed(3)
    terms = model.loss(test.float_images(), test.labels, "image_digit")
    assert loss == pytest.approx((terms.bce + terms.nll + terms.kl).item())
    assert terms.kl > 0 and loss < terms.total.item()


class _Redrawer(torch.nn.Module):
    """A stand-in decoder that redraws each image exactly, or as a blank page."""

    def __init__(self, blank: bool):
        super().__init__()
        self.blank = blank
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter: where evaluation finds the device

    def reconstruct(self, images, digits):
        return (torch.zeros_like(images) if self.blank else images), None


def test_the_decoder_floor_scores_held_out_reconstructions_as_generated_images_are_scored(judge, mnist_subset):
    """A decoder that redraws every held-out digit exactly sits at real data's own floor (held-out against test
    images); one that redraws blank pages sits far above it."""
    val, test = mnist_subset["val"], mnist_subset["test"]
    n = judge.params.n_generated
    exact = decoder_floor(_Redrawer(blank=False), judge, val, test)
    real = judge.fidelity(ImageSet(val.images[:n].unsqueeze(1)), real_set(test, "test"), isc=False)
    assert exact == pytest.approx(
        {"recon_fid": real["fid"], "recon_precision": real["precision"], "recon_recall": real["recall"]}
    )
    assert decoder_floor(_Redrawer(blank=True), judge, val, test)["recon_fid"] > 20 * exact["recon_fid"]


def test_the_temperature_curve_scores_each_temperature_against_the_validation_images(judge, mnist_subset):
    model = build_model(ModelConfig("pcvae", 4, hidden_dim=32, prior_temperature=0.8)).eval()
    model.prior_mu.copy_(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))
    curve = temperature_curve(model, judge, mnist_subset["val"])
    assert [row["temperature"] for row in curve] == judge.params.temperatures
    assert model.config.prior_temperature == 0.8  # the model is left drawing at its own temperature
    row = next(row for row in curve if row["temperature"] == 0.8)
    digits = torch.arange(10).repeat_interleave(judge.params.n_generated // 10)
    images = to_uint8(generate(model, digits, "study", mnist_subset["train"], torch.Generator().manual_seed(0)))
    val = mnist_subset["val"]
    on_val = judge.fidelity(ImageSet(images), real_set(val, "val"), isc=False)
    assert row["fid"] == pytest.approx(on_val["fid"]) and row["recall"] == pytest.approx(on_val["recall"])
    assert row["fid"] != pytest.approx(
        judge.fidelity(ImageSet(images), real_set(mnist_subset["test"], "test"), isc=False)["fid"]
    )
