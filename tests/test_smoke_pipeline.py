"""The smoke pipeline is the main pipeline at CI size: the same stages, commands and dependencies, its own params."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from digitgen.params import load_params

SMOKE = REPO / "pipelines" / "smoke"


def _as_root_sees_it(text: str) -> dict:
    """The smoke dvc.yaml with its code paths (../../src) read from the root, where they are src."""
    return yaml.safe_load(text.replace("../../src/", "src/"))


def test_smoke_stages_match_the_main_pipelines():
    smoke, main = _as_root_sees_it((SMOKE / "dvc.yaml").read_text()), yaml.safe_load((REPO / "dvc.yaml").read_text())
    smoke.pop("artifacts"), main.pop("artifacts")  # each pipeline's own champion
    smoke.pop("plots"), main.pop("plots")  # each pipeline's curves files (tests/test_dvc_views.py checks them)
    assert smoke == main, (
        "pipelines/smoke/dvc.yaml drifted from dvc.yaml; copy the root's stages into it with the "
        "code paths as ../../src/ (sed 's#- src/#- ../../src/#' dvc.yaml, then restore its header)"
    )


def test_smoke_dvc_yaml_and_its_code_are_real_files_that_dvc_reads_at_any_revision():
    assert not (SMOKE / "dvc.yaml").is_symlink() and not (SMOKE / "src").exists()
    for stage in yaml.safe_load((SMOKE / "dvc.yaml").read_text())["stages"].values():
        for dep in stage.get("deps", []):
            if dep.startswith("../../src/"):
                assert (SMOKE / dep).resolve().is_file(), dep


def test_smoke_params_are_valid_and_have_the_same_keys_as_the_main_params():
    def keys(tree, prefix=""):
        return {
            k
            for key, value in tree.items()
            for k in (keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})
        }

    smoke, main = (yaml.safe_load(p.read_text()) for p in (SMOKE / "params.yaml", REPO / "params.yaml"))
    assert keys(smoke) == keys(main)
    assert (
        load_params(SMOKE / "params.yaml").tracking.experiment != load_params(REPO / "params.yaml").tracking.experiment
    )


@pytest.mark.parametrize("path", [REPO / "params.yaml", SMOKE / "params.yaml"], ids=["main", "smoke"])
def test_dvc_exp_run_set_param_rewrites_one_line_and_keeps_every_comment(path, tmp_path):
    """`dvc exp run -S train.lr=...` rewrites the params file as DVC does (its Hydra-override path, which
    replaces every list): the lists are written the way it writes them (block style), so only the value changes,
    each knob's documentation stays, and the one other change is the blank line after the study section's last
    list, which DVC's YAML writer drops. (Flow-style lists, [0, 1, 2], made it 39 changed lines.)"""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    copy.write_text(path.read_text())
    apply_overrides(copy, ["train.lr=0.0003"])
    diff = difflib.unified_diff(path.read_text().splitlines(), copy.read_text().splitlines(), lineterm="", n=0)
    changed = [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert sorted(changed) == ["+  lr: 0.0003", "-", "-  lr: 0.001"]


@pytest.mark.parametrize("pipeline", [REPO, SMOKE], ids=["main", "smoke"])
def test_the_champion_artifact_is_the_models_folder_of_the_champion_that_aggregate_named(pipeline):
    """dvc.yaml's model-registry entry (`dvc artifacts get . champion`) is the champion configuration's models
    folder. aggregate picks the champion on every run and writes results/champion.json; when it names another
    configuration, the entry is moved by hand and committed with the results."""
    artifact = yaml.safe_load((pipeline / "dvc.yaml").read_text())["artifacts"]["champion"]
    named = pipeline / "results" / "champion.json"
    folder = str(Path(json.loads(named.read_text())["model"]).parent)
    assert artifact["type"] == "model"
    assert artifact["path"] == folder, (
        f"{named.relative_to(REPO)} names a model in {folder}: make it artifacts.champion.path in "
        f"{(pipeline / 'dvc.yaml').relative_to(REPO)}"
    )
