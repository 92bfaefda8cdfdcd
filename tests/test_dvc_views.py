"""What `dvc metrics show` and `dvc plots show` print for the committed results of both pipelines: few narrow
rows, CAE beside CVAE, and every plot drawn without a warning."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from conftest import REPO, command_env

from digitgen.compare import TABLE_COLUMNS, study_configurations
from digitgen.params import load_params

PIPELINES = {"main": REPO, "smoke": REPO / "pipelines" / "smoke"}


def dvc(*args: str) -> str:
    return subprocess.run(
        ["dvc", *args], cwd=REPO, env=command_env(COLUMNS="400"), capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.slow  # runs dvc
def test_metrics_show_prints_one_row_per_configuration_within_200_columns():
    shown = dvc("metrics", "show").splitlines()
    main = [line for line in shown if line.startswith("results/")]
    assert max(map(len, main)) <= 200
    rows = [line.split()[0] for line in main if line.startswith("results/metrics/")]
    assert rows == [
        "results/metrics/02-label_cvae.json",
        "results/metrics/08-cae.json",
        "results/metrics/08-cvae.json",
        "results/metrics/16-cae.json",
        "results/metrics/16-cvae.json",
        "results/metrics/16-pcvae.json",
        "results/metrics/32-cae.json",
        "results/metrics/32-cvae.json",
        "results/metrics/32-pcvae.json",
        "results/metrics/64-cae.json",
        "results/metrics/64-cvae.json",
    ]  # CAE beside CVAE of each latent size
    header = next(line for line in shown if line.startswith("Path")).split()
    assert set(header) == {"Path", *TABLE_COLUMNS, "test_accuracy"}  # Table 1's five means and the classifier's


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_curves_charts_name_exactly_the_files_aggregate_writes_for_the_pipelines_params(pipeline):
    folder = PIPELINES[pipeline]
    params = load_params(folder / "params.yaml")
    expected = {f"results/curves/{config}.csv" for config in study_configurations(params)}
    plots = yaml.safe_load((folder / "dvc.yaml").read_text())["plots"]
    charts = [definition for entry in plots if isinstance(entry, dict) for definition in entry.values()]
    assert [set(chart["y"]) for chart in charts] == [expected, expected]


@pytest.mark.slow  # runs dvc
def test_plots_show_draws_every_plot_of_both_pipelines_without_a_warning(tmp_path):
    shown = json.loads(dvc("plots", "show", "--json", "-o", str(tmp_path)))
    assert shown.get("errors", []) == []
    images = [name for name, drawn in shown["data"].items() if drawn and drawn[0]["type"] == "image"]
    assert len(images) <= 6  # the forest plot and one latent size's generations per pipeline, not every figure
    charts = [name for name, drawn in shown["data"].items() if drawn and drawn[0]["type"] == "vega"]
    assert len(charts) == 4  # BCE and accuracy curves of each pipeline
    titles = {drawn[0]["content"]["title"] for name, drawn in shown["data"].items() if name in charts}
    assert {title.split(":")[0] for title in titles} == {"digitgen", "digitgen-smoke"}  # which pipeline
