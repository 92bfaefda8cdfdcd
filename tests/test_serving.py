"""Using trained models: the Python API, PNG files, the CLI, the MLflow pyfunc and the champion alias."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from PIL import Image

import digitgen
from digitgen import figures
from digitgen.cli import main
from digitgen.models import ModelConfig, UnsupportedTask, build_model
from digitgen.serving import (
    DigitModel,
    InputError,
    ModelSourceError,
    generate_string,
    predict_frame,
    read_png,
    request_frame,
    write_png,
)

KINDS = ("cae", "cvae")


@pytest.fixture
def store(trained_models, monkeypatch):
    """Point MLflow at the store that holds the trained models' runs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_models["cae"].tracking_uri)
    return trained_models


@pytest.fixture
def test_images(mnist_subset) -> tuple[torch.Tensor, torch.Tensor]:
    test = mnist_subset["test"]
    return test.float_images()[:6].reshape(-1, 28, 28), test.labels[:6]


def _model(trained_models, kind: str) -> DigitModel:
    return digitgen.load(trained_models[kind].path)


# Label only: generate
@pytest.mark.parametrize("kind", KINDS)
def test_generate_gives_n_images_per_label_in_unit_range(trained_models, kind):
    images = _model(trained_models, kind).generate([3, 8], n=4, seed=0)
    assert images.shape == (8, 28, 28)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_a_seed_is_repeatable(trained_models, kind):
    model = _model(trained_models, kind)
    assert torch.equal(model.generate(7, n=3, seed=1), model.generate(7, n=3, seed=1))


def test_cvae_styles_differ_by_seed_and_are_shared_with_same_style(trained_models):
    model = _model(trained_models, "cvae")
    assert not torch.equal(model.generate(7, seed=1), model.generate(7, seed=2))
    own = model.generate([5, 5], seed=0)
    shared = model.generate([5, 5], seed=0, same_style=True)
    assert not torch.equal(own[0], own[1])
    assert torch.equal(shared[0], shared[1])


def test_generate_string_is_one_row_of_the_digits_tiles(trained_models):
    model = _model(trained_models, "cvae")
    row = generate_string(model, "2026", same_style=True, seed=3)
    assert row.shape == (28, 4 * 28)
    assert torch.equal(row, figures.tile(model.generate([2, 0, 2, 6], seed=3, same_style=True), nrow=4))


# Image only: classify and reconstruct; image and label: reconstruct and validate
@pytest.mark.parametrize("kind", KINDS)
def test_classify_gives_probabilities_and_the_most_likely_digit(trained_models, test_images, kind):
    digits, probs = _model(trained_models, kind).classify(test_images[0])
    assert probs.shape == (6, 10)
    assert torch.allclose(probs.sum(1), torch.ones(6))
    assert torch.equal(digits, probs.argmax(1))


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruct_from_images_alone_predicts_what_classify_predicts(trained_models, test_images, kind):
    model = _model(trained_models, kind)
    result = model.reconstruct(test_images[0])
    assert result.images.shape == (6, 28, 28)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert torch.allclose(result.probs, model.classify(test_images[0]).probs)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_is_the_probability_of_the_given_label_under_image_and_label(trained_models, test_images, kind):
    model = _model(trained_models, kind)
    images, labels = test_images
    probs = model.reconstruct(images, labels).probs
    assert torch.allclose(model.validate(images, labels), probs[torch.arange(6), labels])


def test_single_channel_batches_are_accepted(trained_models, test_images):
    model = _model(trained_models, "cae")
    images = test_images[0]
    expected = model.classify(images).probs
    assert torch.equal(model.classify(images[:, None]).probs, expected)  # N x 1 x 28 x 28
    assert torch.equal(model.classify(images[..., None]).probs, expected)  # N x 28 x 28 x 1


# PNG files
def test_png_round_trip_keeps_images_to_8_bits(trained_models, tmp_path):
    images = _model(trained_models, "cvae").generate([1, 2, 3], seed=0)
    write_png(images, tmp_path / "row.png")
    assert Image.open(tmp_path / "row.png").size == (3 * 28, 28)
    back = read_png(tmp_path / "row.png")
    assert back.shape == (3, 28, 28)
    assert (back - images).abs().max() <= 0.5 / 255 + 1e-6


def test_a_grid_png_is_read_as_its_tiles_row_by_row(tmp_path):
    tiles = torch.rand(6, 28, 28)
    write_png(figures.tile(tiles, nrow=3), tmp_path / "grid.png")  # 2 rows of 3
    assert torch.allclose(read_png(tmp_path / "grid.png"), tiles, atol=0.5 / 255 + 1e-6)


# MLflow: the pyfunc, the URIs and the champion
def test_load_by_run_uri_is_the_same_model_as_the_file(store):
    from_file = digitgen.load(store["cvae"].path)
    from_run = digitgen.load(f"runs:/{store['cvae'].run_id}")
    assert torch.equal(from_run.generate(range(10), seed=0), from_file.generate(range(10), seed=0))


@pytest.mark.parametrize("kind", KINDS)
def test_pyfunc_answers_every_mode_as_the_api_does(store, test_images, kind):
    import mlflow.pyfunc

    images, labels = test_images
    api = digitgen.load(store[kind].path)
    request = pd.concat(
        [
            request_frame("generate", digits=[4, 2]),
            request_frame("classify", images=images),
            request_frame("reconstruct", images=images),
            request_frame("reconstruct", images=images, digits=labels),
            request_frame("validate", images=images, digits=labels),
        ],
        ignore_index=True,
    )
    served = mlflow.pyfunc.load_model(f"runs:/{store[kind].run_id}/{kind}-4-seed0")  # <config>-seed<s>
    out = served.predict(request, params={"seed": 5, "same_style": True})
    pixels = lambda rows: torch.tensor(out.pixels[rows].tolist()).float().reshape(-1, 28, 28)  # noqa: E731
    probs = lambda rows: torch.tensor(out.probs[rows].tolist()).float()  # noqa: E731

    assert torch.equal(pixels(slice(0, 2)), api.generate([4, 2], seed=5, same_style=True))
    assert out.digit[:2].tolist() == [4, 2]
    classified = api.classify(images)
    assert out.digit[2:8].tolist() == classified.digits.tolist()
    assert torch.allclose(probs(slice(2, 8)), classified.probs)
    for rows, given in ((slice(8, 14), None), (slice(14, 20), labels)):
        expected = api.reconstruct(images, given)
        assert torch.equal(pixels(rows), expected.images)
        assert out.digit[rows].tolist() == expected.digits.tolist()
    assert torch.allclose(torch.tensor(out.probability[20:26].tolist()).float(), api.validate(images, labels))


def test_the_pyfunc_refuses_bad_input_with_digitgens_own_one_line_reason(store):
    """`mlflow models serve` answers an MlflowException from predict with its message and a 400."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    served = mlflow.pyfunc.load_model(f"runs:/{store['cae'].run_id}/cae-4-seed0")
    with pytest.raises(MlflowException) as refused:
        served.predict(pd.DataFrame({"mode": ["validate"], "digit": [12.0], "pixels": [[0.5] * 783]}))
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE" and refused.value.get_http_status_code() == 400
    assert refused.value.message == "expected digit labels in 0..9, got 12"


# Bad input: each a one-line error naming what was expected
def _one_line_error(error_type, call, match: str) -> None:
    with pytest.raises(error_type, match=match) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(2, 32, 32), "expected images of 28 x 28 pixels, got 32 x 32"),
        (torch.rand(2, 3, 28, 28), "expected one channel .* got 3 channels"),
        (torch.rand(2, 28, 28, 3), "expected one channel .* got 3 channels"),
        (torch.rand(2, 28, 28) * 255, r"expected pixel values in \[0, 1\], got values from"),
        (torch.full((1, 28, 28), -0.5), r"expected pixel values in \[0, 1\]"),
        (torch.full((1, 28, 28), float("nan")), r"got 784 NaN or infinite values; replace them \(torch.nan_to_num\)"),
        (torch.zeros(2, 28, 28, dtype=torch.uint8), "expected float pixel values .*divide 8-bit images by 255"),
        (torch.rand(28, 28), "expected a batch of images shaped N x 28 x 28, got shape 28 x 28"),
        (torch.rand(5, 784), r"got shape 5 x 784; these look like flattened images: images.reshape\(-1, 28, 28\)"),
    ],
)
def test_bad_images_are_refused(trained_models, images, match):
    _one_line_error(InputError, lambda: _model(trained_models, "cae").classify(images), match)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: m.generate(10), r"expected digit labels in 0..9, got 10"),
        (lambda m, x: m.generate([-1, 3]), r"expected digit labels in 0..9, got -1"),
        (lambda m, x: m.generate(2.5), r"expected digit labels as integers 0..9"),
        (lambda m, x: m.generate(3, n=0), "expected n, the number of images per label, to be a positive integer"),
        (lambda m, x: m.reconstruct(x, [1, 2]), r"expected one label per image \(6 images\), got 2 labels"),
        (lambda m, x: m.validate(x, [12] * 6), r"expected digit labels in 0..9, got 12"),
        (lambda m, x: generate_string(m, "20a6"), "expected a string of digits 0-9, got 'a' in '20a6'"),
        (lambda m, x: generate_string(m, ""), "expected a string of digits 0-9, got an empty string"),
    ],
)
def test_bad_labels_are_refused(trained_models, test_images, call, match):
    _one_line_error(InputError, lambda: call(_model(trained_models, "cvae"), test_images[0]), match)


@pytest.mark.parametrize(
    "source, match",
    [
        ("models/nowhere/seed0.pt", "no such model file; expected a model file written by `digitgen train`"),
        ("runs:/0123456789abcdef", "no such MLflow model .* expected runs:/<run_id> or models:/<name>@<alias>"),
        ("models:/no-such-model@champion", "no such MLflow model"),
    ],
)
def test_unknown_models_are_refused(store, source, match):
    _one_line_error(ModelSourceError, lambda: digitgen.load(source), match)


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.pt").write_text("not weights")
    _one_line_error(ModelSourceError, lambda: digitgen.load(tmp_path / "notes.pt"), "not a digitgen model")


def test_mlflow_uris_without_a_store_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    _one_line_error(ModelSourceError, lambda: digitgen.load("models:/digitgen@champion"), "no MLflow store at")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "mode, size, match",
    [
        ((28, 28), "RGB", "expected one channel \\(grayscale\\), got 3 channels"),
        ((30, 28), "L", "expected 28 x 28 pixels \\(or a grid of 28 x 28 tiles\\), got 30 x 28"),
    ],
)
def test_bad_png_files_are_refused(tmp_path, mode, size, match):
    Image.new(size, mode).save(tmp_path / "bad.png")
    _one_line_error(InputError, lambda: read_png(tmp_path / "bad.png"), match)


@pytest.mark.parametrize(
    "request_rows, match",
    [
        ([{"mode": "draw", "digit": 1.0}], "expected mode to be one of generate, classify, reconstruct, validate"),
        ([{"mode": "generate", "digit": float("nan")}], "expected a digit 0-9 for mode 'generate', got none in row 0"),
        ([{"mode": "classify", "pixels": None}], "expected pixels .* for mode 'classify', got none in row 0"),
        ([{"mode": "classify", "pixels": [0.5] * 100}], r"expected 784 pixel values \(28 x 28, row by row\), got 100"),
        ([{"mode": "classify", "pixels": [2.0] * 784}], r"expected pixel values in \[0, 1\]"),
    ],
)
def test_bad_requests_are_refused(trained_models, request_rows, match):
    model = _model(trained_models, "cae")
    _one_line_error(InputError, lambda: predict_frame(model, pd.DataFrame(request_rows)), match)


def test_a_model_without_a_digit_head_serves_what_it_can_and_refuses_the_rest(test_images):
    model = DigitModel(build_model(ModelConfig("label_cvae", 2, hidden_dims=(32, 16))), "label CVAE")
    images, labels = test_images
    assert model.generate([1, 2]).shape == (2, 28, 28)
    assert model.reconstruct(images, labels).images.shape == (6, 28, 28)
    _one_line_error(UnsupportedTask, lambda: model.classify(images), "cannot classify")
    _one_line_error(UnsupportedTask, lambda: model.reconstruct(images), "pass the digits too")
    _one_line_error(UnsupportedTask, lambda: model.validate(images, labels), "cannot validate labels")


# The CLI: PNG files in and out, runnable outside the repository
def test_cli_generate_digit_and_digit_string(trained_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: inference does not need one
    model = str(trained_models["cvae"].path)
    assert main(["generate", "--model", model, "--digit", "7", "-n", "16", "--seed", "0", "--out", "sevens.png"]) == 0
    assert Image.open("sevens.png").size == (16 * 28, 28)
    assert (
        main(["generate", "--model", model, "--digits", "2026", "--same-style", "--seed", "0", "--out", "y.png"]) == 0
    )
    expected = digitgen.load(model).generate([2, 0, 2, 6], seed=0, same_style=True)
    assert torch.allclose(read_png("y.png"), expected, atol=0.5 / 255 + 1e-6)
    assert "wrote 4 images to y.png" in capsys.readouterr().out


def test_cli_classify_reconstruct_and_validate_png_files(trained_models, test_images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images, labels = test_images
    write_png(images[:1], "one.png")
    write_png(images[1:3], "two.png")
    model = digitgen.load(trained_models["cae"].path)
    quantised = torch.cat([read_png("one.png"), read_png("two.png")])
    source = str(trained_models["cae"].path)

    assert main(["classify", "--model", source, "one.png", "two.png"]) == 0
    lines = capsys.readouterr().out.splitlines()
    digits, probs = model.classify(quantised)
    assert lines[0] == "image\tdigit\tprobability"
    assert lines[1:] == [
        f"{name}\t{d}\t{p[d]:.4f}"
        for name, d, p in zip(["one.png", "two.png[0]", "two.png[1]"], digits.tolist(), probs, strict=False)
    ]

    assert (
        main(
            [
                "reconstruct",
                "--model",
                source,
                "one.png",
                "two.png",
                "--labels",
                *map(str, labels[:3].tolist()),
                "--out",
                "recon.png",
            ]
        )
        == 0
    )
    expected = model.reconstruct(quantised, labels[:3])
    assert torch.allclose(read_png("recon.png"), expected.images, atol=0.5 / 255 + 1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split("\t")[1]) for line in lines[1:]] == expected.digits.tolist()

    assert main(["validate", "--model", source, "one.png", "two.png", "--labels", "1", "2", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines[1:]] == ["1", "2", "3"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["generate", "--digits", "20x6"], "expected a string of digits 0-9, got 'x' in '20x6'"),
        (["generate", "--digits", ""], "expected a string of digits 0-9, got an empty string"),
        (["generate", "--digit", "12"], r"expected digit labels in 0..9, got 12"),
        (["generate", "--digit", "1", "--model", "runs:/0123456789abcdef"], "no such MLflow model"),
        (["generate", "--digit", "1", "--model", "missing.pt"], "missing.pt: no such model file"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(store, tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    model = [] if "--model" in args else ["--model", str(store["cvae"].path)]
    assert main([*args, *model, "--out", "out.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("digitgen generate: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(match, err)
    assert not (tmp_path / "out.png").exists()
