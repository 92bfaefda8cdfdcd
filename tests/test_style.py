"""Lint, format and types are kept by tools (pyproject.toml configures them; .pre-commit-config.yaml runs them
on each commit): this fails when one of them would."""

from __future__ import annotations

import subprocess

import pytest
from conftest import BIN, REPO

pytestmark = pytest.mark.slow  # each test starts a tool

CODE = ["src", "tests", "benchmarks"]


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", *CODE], ["ruff", "format", "--check", *CODE], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_code_passes(command):
    done = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"`uv run {' '.join(command)}` fails:\n{done.stdout}{done.stderr}"
