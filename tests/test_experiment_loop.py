"""The DVC experiment loop as docs/experiments.md walks it, for real, on the smoke pipeline at test size.

A git repository in a temporary folder holds the project's dvc.yaml files, code and (shrunk) smoke params.
One committed `dvc repro` is shared by the tests: change a param with `dvc exp run -S`, compare
(`dvc metrics diff`, `dvc exp show --json`, `dvc plots diff`), queue a sweep (`dvc queue start -j 2`),
keep one (`dvc exp apply`, `dvc exp branch`), reproduce one configuration, and share through a remote
(`dvc push`, then `dvc pull` in a fresh clone reruns nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import GIT_IDENTITY, REPO, command_env, copy_from_repo

from digitgen.data import MIRROR_ENV

pytestmark = pytest.mark.slow  # every test here runs dvc (repro, exp run, queued sweeps) in a copy of the repository

SMOKE = "pipelines/smoke"
# The smoke params shrunk to one study configuration (CVAE, latent 16: a curves file the smoke plots name), one
# seed and tiny data: every stage still runs, and a stage costs little more than starting Python with torch and
# MLflow.
TINY = {
    "data": {"train_size": 1000, "val_size": 200, "test_size": 200},
    "study": {"models": ["cvae"], "latent_dims": [16]},
    "model": {"hidden_dim": 64},
    "train": {"seeds": [0], "epochs": 1},
    "label_cvae": {
        "hidden_dims": [64, 32],
        "train": {"seeds": [0], "epochs": 1},
        "figures": {"plane_size": 3, "samples_per_digit": 2},
    },
    "pcvae": {"hidden_dim": 64, "channels": [4, 8], "train": {"seeds": [0], "epochs": 1}},
    "classifier": {"epochs": 1, "channels": [4, 8], "feature_dim": 16, "min_test_accuracy": 0.0},
    "evaluate": {"n_generated": 100, "is_splits": 2, "batch_size": 100, "grid_columns": 2},
}


def _merge(tree: dict, changes: dict) -> dict:
    for key, value in changes.items():
        tree[key] = _merge(tree[key], value) if isinstance(value, dict) else value
    return tree


def run(cwd: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        cwd=cwd,
        env=command_env(MLFLOW_DISABLE_TELEMETRY="true", **GIT_IDENTITY),
        capture_output=True,
        text=True,
    )
    if check:
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check)


@pytest.fixture(scope="module")
def loop(tmp_path_factory, mnist_dir) -> tuple[Path, list[str], list[str]]:
    """The project with the smoke pipeline reproduced (one configuration first, then the rest) and committed,
    MLflow in the default store at its root; and the stages each of the two `dvc repro` ran."""
    root = tmp_path_factory.mktemp("loop") / "project"
    # the root's params.yaml (which experiments on the smoke pipeline must leave alone) but not its dvc.yaml:
    # `dvc exp apply` checks out every pipeline's outputs, and the main pipeline's are not in this cache
    copy_from_repo(("params.yaml", "src", ".dvcignore", ".gitignore", f"{SMOKE}/dvc.yaml"), root)
    smoke = _merge(yaml.safe_load((REPO / SMOKE / "params.yaml").read_text()), TINY)
    (root / SMOKE / "params.yaml").write_text(
        "# the smoke params at test size\n"
        + yaml.safe_dump(smoke, sort_keys=False).replace(
            "  epochs: 1\n  batch_size", "  epochs: 1  # kept by dvc exp\n  batch_size", 1
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MIRROR_ENV, str(mnist_dir))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run(root, "git", "init", "-q")
        dvc(root, "init", "-q")
        copy_from_repo((".dvc/plots",), root)  # the curves' template, beside the config `dvc init` wrote
        one = dvc(root, "repro", f"{SMOKE}/dvc.yaml:evaluate@cvae-16")  # one configuration: what it pulls in
        rest = dvc(root, "repro", f"{SMOKE}/dvc.yaml")
        run(root, "git", "add", "-A")
        run(root, "git", "commit", "-qm", "smoke run")
        yield root, _ran(one), _ran(rest)


@pytest.fixture
def project(loop) -> Path:
    return loop[0]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, mnist_dir):
    monkeypatch.setenv(MIRROR_ENV, str(mnist_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _clean(project: Path) -> None:
    """Back to the committed run, as each test expects to find it."""
    run(project, "git", "reset", "-q", "--hard")
    dvc(project, "checkout", "-q", "--force")


def test_an_experiment_on_the_smoke_params_is_compared_with_old_and_new_values(project, tmp_path):
    root_params = (project / "params.yaml").read_bytes()
    done = dvc(project, "exp", "run", "-S", f"{SMOKE}/params.yaml:train.epochs=2", f"{SMOKE}/dvc.yaml")
    assert _ran(done) == ["aggregate", "evaluate@cvae-16", "tables", "train@cvae-16"]
    assert (project / "params.yaml").read_bytes() == root_params  # the root pipeline's params untouched
    smoke_params = (project / SMOKE / "params.yaml").read_text()
    assert "epochs: 2  # kept by dvc exp" in smoke_params  # DVC keeps the comments of the file it edits

    diff = json.loads(dvc(project, "metrics", "diff", "--json").stdout)
    error = diff[f"{SMOKE}/results/metrics/16-cvae.json"]["reconstruction_error"]
    assert error["new"] < error["old"]  # a second epoch reconstructs better
    params_diff = json.loads(dvc(project, "params", "diff", "--json").stdout)
    assert {k: params_diff[f"{SMOKE}/params.yaml"]["train.epochs"][k] for k in ("old", "new")} == {"old": 1, "new": 2}

    baseline, experiments = _exp_show(project)
    (data,) = experiments.values()
    assert data["params"][f"{SMOKE}/params.yaml"]["data"]["train"]["epochs"] == 2
    assert baseline["params"][f"{SMOKE}/params.yaml"]["data"]["train"]["epochs"] == 1

    def reconstruction(rev):
        return rev["metrics"][f"{SMOKE}/results/metrics/16-cvae.json"]["data"]["reconstruction_error"]

    assert (reconstruction(baseline), reconstruction(data)) == (error["old"], error["new"])

    header = dvc(project, "exp", "show", "--only-changed", "--csv").stdout.splitlines()[0].split(",")
    # a name both params files hold is shown with its file: pipelines/smoke/params.yaml:train.epochs
    assert f"{SMOKE}/params.yaml:train.epochs" in header and f"{SMOKE}/results/metrics/16-cvae.json:fid" in header
    assert not any(column.endswith("model.hidden_dim") for column in header)  # unchanged params left out
    assert len(header) <= 20  # the changed param and the configuration's five headline metrics, readable

    plots = json.loads(dvc(project, "plots", "diff", "HEAD", "--json", "-o", str(tmp_path / "plots")).stdout)["data"]
    assert _charts(plots) == {"validation BCE", "validation accuracy"}
    _clean(project)


def _exp_show(project: Path) -> tuple[dict, dict[str, dict]]:
    """`dvc exp show --json`: the committed run's data and {experiment name: its data}."""
    (committed,) = [
        row for row in json.loads(dvc(project, "exp", "show", "--json").stdout) if row["rev"] != "workspace"
    ]
    return committed["data"], {exp["name"]: exp["revs"][0]["data"] for exp in committed.get("experiments") or []}


def _ran(done: subprocess.CompletedProcess) -> list[str]:
    """The stages a `dvc repro` or `dvc exp run` ran, by name."""
    return sorted(
        line.split("'")[1].rsplit(":", 1)[-1] for line in done.stdout.splitlines() if line.startswith("Running stage")
    )


def test_the_headline_metrics_are_few_and_readable(project):
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)[""]["data"]
    smoke = {path: file["data"] for path, file in shown.items() if path.startswith(SMOKE)}
    headline = [f"{SMOKE}/results/metrics/{name}.json" for name in ("02-label_cvae", "08-pcvae", "16-cvae")]
    assert set(smoke) == {*headline, f"{SMOKE}/results/classifier.json"}  # one file, one row, per configuration
    assert list(smoke[headline[2]]) == [
        "gen_accuracy",
        "fid",
        "inception_score",
        "classification_accuracy",
        "reconstruction_error",
    ]
    values = [leaf for data in smoke.values() for leaf in _leaves(data)]
    # the CVAE and the prior CVAE (5 means), the label CVAE (no classification: 4), the classifier's accuracy
    assert len(values) == 5 * 2 + 4 + 1


def _leaves(tree):
    for value in tree.values():
        yield from (_leaves(value) if isinstance(value, dict) else [value])


def test_the_plots_overlay_cae_and_cvae_and_the_figures_stay_images(project, tmp_path):
    plots = json.loads(dvc(project, "plots", "show", "--json", "-o", str(tmp_path / "plots")).stdout)["data"]
    assert _charts(plots) == {"validation BCE", "validation accuracy"}
    images = [name for name, defs in plots.items() if [d["type"] for d in defs] == ["image"]]
    assert f"{SMOKE}/results/figures/generations_cvae-16.png" in images


def _charts(plots: dict) -> set[str]:
    """The names of the drawn charts (not images) of `dvc plots show/diff --json`, without their dvc.yaml."""
    return {name.rsplit("::", 1)[-1] for name, defs in plots.items() if any(d["type"] == "vega" for d in defs)}


def test_a_queued_sweep_runs_two_at_once_and_the_best_is_kept_as_a_branch(project):
    dvc(project, "exp", "run", "--queue", "-S", f"{SMOKE}/params.yaml:train.lr=0.003,0.0003", f"{SMOKE}/dvc.yaml")
    dvc(project, "queue", "start", "-j", "2")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc(project, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 2 and "Failed" not in status, status
    _, experiments = _exp_show(project)
    lrs = {name: data["params"][f"{SMOKE}/params.yaml"]["data"]["train"]["lr"] for name, data in experiments.items()}
    sweep = {name: lr for name, lr in lrs.items() if lr in (0.003, 0.0003)}
    assert sorted(sweep.values()) == [0.0003, 0.003]
    best = min(
        sweep,
        key=lambda n: experiments[n]["metrics"][f"{SMOKE}/results/metrics/16-cvae.json"]["data"][
            "reconstruction_error"
        ],
    )

    dvc(project, "exp", "apply", best)
    assert yaml.safe_load((project / SMOKE / "params.yaml").read_text())["train"]["lr"] == lrs[best]
    assert dvc(project, "status", f"{SMOKE}/dvc.yaml").stdout.strip().startswith("Data and pipelines are up to date")
    _clean(project)
    dvc(project, "exp", "branch", best, "best-lr")
    assert "best-lr" in run(project, "git", "branch").stdout
    # every run of the sweep is in the one MLflow store at the project root (DVC_ROOT), none lost
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digitgen-smoke")
    seed_runs = client.search_runs([experiment.experiment_id], "tags.seed = '0' AND tags.model = 'cvae'")
    swept = [r.data.params["train.lr"] for r in seed_runs if r.data.params["train.lr"] in ("0.003", "0.0003")]
    assert sorted(swept) == ["0.0003", "0.003"]  # one run each: none lost, none duplicated
    assert all("test/fid" in r.data.metrics for r in seed_runs)  # and evaluation logged to each


def test_reproducing_one_configuration_runs_what_it_needs_and_nothing_else(loop):
    _, one, rest = loop
    assert one == ["classifier", "download", "evaluate@cvae-16", "split", "train@cvae-16"]
    assert rest == [
        "aggregate",
        "evaluate_label_cvae",
        "evaluate_pcvae@8",
        "label_cvae_figures",
        "reference",
        "tables",
        "train_label_cvae",
        "train_pcvae@8",
    ]


def test_retraining_with_nothing_changed_changes_no_hash_and_evaluation_does_not_rerun(project):
    _clean(project)
    forced = dvc(project, "repro", "-f", "-s", f"{SMOKE}/dvc.yaml:train@cvae-16")
    assert _ran(forced) == ["train@cvae-16"]
    assert run(project, "git", "status", "--porcelain").stdout.strip() == ""  # dvc.lock unchanged
    again = dvc(project, "repro", f"{SMOKE}/dvc.yaml")
    assert "Running stage" not in again.stdout


def test_a_fresh_clone_pulls_from_the_remote_reruns_nothing_and_generates(project, tmp_path):
    _clean(project)
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "-f", "storage", str(remote))
    run(project, "git", "commit", "-qam", "a default remote")
    dvc(project, "push")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    dvc(clone, "pull")
    assert dvc(clone, "repro", f"{SMOKE}/dvc.yaml").stdout.count("Running stage") == 0
    champion = json.loads((clone / SMOKE / "results" / "champion.json").read_text())  # no MLflow store in a clone
    out = tmp_path / "sevens.png"
    run(
        clone / SMOKE,
        "digitgen",
        "generate",
        "--model",
        champion["model"],
        "--digits",
        "77",
        "--seed",
        "0",
        "--out",
        str(out),
    )
    assert out.stat().st_size > 0
