"""params.yaml validation: a bad value stops before any work, with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from digitgen.cli import main
from digitgen.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, edit) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_committed_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.data.train_size == 48000 and params.train.epochs == 50


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["train"].update(epochs=-1), "train.epochs must be a positive integer, got -1"),
        (lambda p: p["train"].update(epohcs=3), "train.epohcs is not a known key; allowed here: seeds, epochs"),
        (lambda p: p["train"].update(lr="fast"), "train.lr must be a number, got 'fast'"),
        (lambda p: p["study"].update(latent_dims=[8, 0]), "study.latent_dims must be a non-empty list of positive"),
        (lambda p: p["study"].update(models=["gan"]), "study.models must be a list of cae, cvae"),
        (lambda p: p["data"].update(val_size=20000), "data.val_size must be at most 60000 - train_size = 12000"),
        (lambda p: p["train"]["input_modes"].update(both=1), "train.input_modes must be keys among"),
        (lambda p: p["train"].update(batch_size=True), "train.batch_size must be an integer, got True"),
        (lambda p: p.pop("data"), "data is required but missing"),
        (lambda p: p["execution"].update(executor="slurm"), "execution.executor must be one of local, processes, ray"),
    ],
)
def test_a_bad_value_names_the_key_and_what_is_allowed(tmp_path, edit, message):
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, edit))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_cli_stops_before_any_work_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, lambda p: p["data"].update(train_size=0))
    assert main(["--params", str(path), "download", "--out", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.train_size must be a positive integer" in err
    assert not (tmp_path / "raw").exists()


def test_a_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ParamsError, match="not found; run from the folder that holds params.yaml"):
        load_params(tmp_path / "params.yaml")
