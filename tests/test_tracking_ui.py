"""What a first visitor of the MLflow UI gets: a model-training experiment and a saved Table 1 view of the
configurations' parent runs, with rounded means and the params that tell runs apart."""

from __future__ import annotations

import json
from urllib.parse import quote

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from digitgen import tracking


def test_a_new_experiment_is_a_model_training_one(mlflow_store):
    exp_id = tracking.experiment_id("digitgen-test")
    tags = MlflowClient().get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "workflowType=machine_learning" in tracking.runs_link(exp_id)  # what the 3.17 UI reads, per link


def test_the_summary_saves_the_table1_view_and_links_table1_from_the_description(mlflow_store, capsys):
    exp_id = tracking.experiment_id("digitgen-test")
    parents = {}
    for kind in ("cae", "cvae"):
        with mlflow.start_run(experiment_id=exp_id, run_name=f"{kind}-16", tags={"model": kind, "latent_dim": "16"}):
            mlflow.log_param("train.epochs", 8)
            parents[kind] = mlflow.active_run().info.run_id
    tracking.log_to_run(parents["cvae"], {"test/fid_mean": 966.4512345, "test/gen_accuracy_mean": 0.7763333333})

    run = MlflowClient().get_run(parents["cvae"]).data
    assert run.metrics == {"test/fid_mean": 966.5, "test/gen_accuracy_mean": 0.7763, "latent_dim": 16.0}
    assert (run.tags["family"], run.tags["epochs"]) == ("CVAE", "8")
    tracking.log_to_run(parents["cae"], {"test/fid_mean": 857.57})

    table = pd.DataFrame(
        {"gen_accuracy_mean": [1.0], "gen_accuracy_std": [0.0], "fid_mean": [857.57], "fid_paper_mean": [426.09]},
        index=pd.Index(["CAE (16)"], name="Model"),
    )
    summary = tracking.log_summary("digitgen-test", table, "| Table 1 |", [], {"decision": "kept"})
    assert tracking.runs_link(exp_id) in capsys.readouterr().out  # the link the stage prints

    experiment = MlflowClient().get_experiment(exp_id)
    view = json.loads(json.loads(experiment.tags[tracking.TABLE1_VIEW_TAG])["state"])
    assert view["searchFilter"] == "metrics.latent_dim >= 0"  # the parent runs aggregate summarized, nothing else
    assert view["orderByKey"] == "metrics.`latent_dim`"
    assert view["selectedColumns"][:5] == [
        "tags.`family`",
        "metrics.`latent_dim`",
        "tags.`epochs`",
        "metrics.`test/gen_accuracy_mean`",
        "metrics.`test/fid_mean`",
    ]
    description = experiment.tags["mlflow.note.content"]
    assert description.startswith(f"[Table 1](#/experiments/{exp_id}/runs/{summary}/artifactPath/table1.json")
    assert (
        f"[CAE against CVAE at latent size 16](#/compare-runs?runs={quote(json.dumps(list(parents.values())))}"
        in description
    )
