"""`digitgen compare`: Table 1 at git revisions and DVC experiments beside the workspace, CAE beside CVAE."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import GIT_IDENTITY, command_env

from digitgen.cli import main

pytestmark = pytest.mark.slow  # every test here starts git (a repository of two commits and an experiment ref)

HEADER = "Model,gen_accuracy_mean,gen_accuracy_std,fid_mean,fid_std,fid_paper_mean,fid_paper_std\n"
BEFORE = HEADER + "CAE (16),1,0,857.57,14.6,426.09,3.56\nCVAE (16),0.7763,0.019,966.45,30.8,417.84,6.23\n"
AFTER = HEADER + "CAE (16),1,0,857.57,14.6,426.09,3.56\nCVAE (16),0.8,0.02,900.1,30.8,417.84,6.23\n"


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, env=command_env(**GIT_IDENTITY), capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A git repository with two commits of results/table.csv (the second: a better CVAE), and a DVC experiment
    ref (refs/exps/...) on the first."""
    table = tmp_path / "results" / "table.csv"
    table.parent.mkdir()
    git(tmp_path, "init", "-q")
    for text, message in ((BEFORE, "before"), (AFTER, "after")):
        table.write_text(text)
        git(tmp_path, "add", "results/table.csv")
        git(tmp_path, "commit", "-qm", message)
    first = git(tmp_path, "rev-parse", "HEAD~1").strip()
    git(tmp_path, "update-ref", f"refs/exps/{first[:2]}/{first[2:]}/quick-epochs", first)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_compare_puts_cae_beside_cvae_per_revision_and_marks_what_moved(project, capsys):
    assert main(["compare", "HEAD~1"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("latent"))
    assert header.split() == [
        "latent",
        "metric",
        "CAE",
        "HEAD~1",
        "CAE",
        "workspace",
        "CVAE",
        "HEAD~1",
        "CVAE",
        "workspace",
    ]
    fid = next(line for line in out.splitlines() if " fid " in f" {line} ")
    assert fid.split()[-3:] == ["966.5", "900.1", "-6.9%▲"]  # lower is better: marked better
    accuracy = next(line for line in out.splitlines() if "gen_accuracy" in line)
    assert accuracy.split()[-3:] == ["0.7763", "0.8", "+3.1%▲"]
    assert accuracy.split()[2:4] == ["1", "1"]  # CAE unchanged: nothing marked


def test_a_dvc_experiment_is_named_like_a_revision(project, capsys):
    assert main(["compare", "quick-epochs", "HEAD"]) == 0
    out = capsys.readouterr().out
    assert "quick-epochs against HEAD against workspace" in out
    assert "-6.9%▲" in out


def test_compare_fits_120_columns_for_three_revisions_and_writes_markdown(project, capsys):
    assert main(["compare", "HEAD~1", "HEAD"]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 120
    assert main(["compare", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("### Table 1's means, HEAD against workspace")
    assert markdown.splitlines()[4].split("|")[1:3] == [" latent   ", " metric       "]


def test_an_unknown_revision_is_one_line_naming_it(project, capsys):
    assert main(["compare", "no-such-thing"]) == 2
    assert "no-such-thing is neither a git revision nor a DVC experiment" in capsys.readouterr().err
