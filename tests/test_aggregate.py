"""The aggregate stage: curves, the appendix figures, the champion, MLflow's parent and summary runs."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from conftest import SEEDS, make_params
from mlflow.tracking import MlflowClient

from digitgen import figures
from digitgen.aggregate import (
    appendix_figures,
    champion_decision,
    champion_seed,
    environment,
    log_parent_runs,
    mean_curves,
    update_champion,
)
from digitgen.compare import TABLE_COLUMNS, summarize
from digitgen.params import ParamsError


def test_curves_are_the_like_for_like_terms_averaged_over_seeds_per_epoch(tmp_path):
    for config, offset in (("cae-8", 0.0), ("cvae-8", 10.0)):
        (tmp_path / config).mkdir()
        for seed in (0, 1):
            rows = "\n".join(f"{e},{200 + offset},{100 - e + offset + seed},{0.5 + e / 10 + seed / 10}" for e in (1, 2))
            (tmp_path / config / f"seed{seed}.csv").write_text("epoch,val_loss,val_bce,val_accuracy\n" + rows + "\n")
    curves = mean_curves(["cae-8", "cvae-8"], tmp_path)
    assert list(curves) == ["cae-8", "cvae-8"]
    assert list(curves["cvae-8"].columns) == ["val_bce", "val_accuracy"]  # not val_loss: the CVAE's holds its KL
    assert curves["cvae-8"]["val_bce"].tolist() == [109.5, 108.5]
    assert curves["cae-8"]["val_accuracy"].tolist() == pytest.approx([0.65, 0.75])


def test_champion_is_the_best_seed_of_the_best_study_configuration():
    summary = summarize(SEEDS)
    assert champion_seed(summary, SEEDS, ["cae-8", "cvae-8"], "fid") == ("cvae-8", "0")
    assert champion_seed(summary, SEEDS, ["cae-8", "cvae-8"], "gen_accuracy") == ("cae-8", "1")
    with pytest.raises(ParamsError, match="registry.champion_metric must be one of"):
        champion_seed(summary, SEEDS, ["cae-8"], "sharpness")


def test_appendix_figures_per_model_and_loss_curves_cvae_left_as_in_the_study(
    trained_models, mnist_subset, tmp_path, monkeypatch
):
    _pipeline_layout(trained_models, tmp_path)
    panel_orders = []
    draw = figures.loss_curve_panels
    monkeypatch.setattr(
        figures, "loss_curve_panels", lambda panels, title: panel_orders.append(list(panels)) or draw(panels, title)
    )
    test = mnist_subset["test"]
    drawn = appendix_figures(
        ["cae-4", "cvae-4"], tmp_path / "histories", tmp_path / "models", test.float_images(), test.labels, seed=0
    )
    assert set(drawn) == {
        "reconstructions_cae-4.png",
        "generations_cae-4.png",
        "reconstructions_cvae-4.png",
        "generations_cvae-4.png",
        "loss_curves_4.png",
    }
    assert all(png[:4] == b"\x89PNG" for png in drawn.values())
    assert panel_orders == [["CVAE (4)", "CAE (4)"]]


def _pipeline_layout(trained_models, root):
    """The fixture's models and histories in the pipeline's layout: models/<config>/seed0.pt, histories/<config>/."""
    for kind, trained in trained_models.items():
        (root / "models" / f"{kind}-4").mkdir(parents=True)
        (root / "models" / f"{kind}-4" / "seed0.pt").symlink_to(trained.path)
        (root / "histories" / f"{kind}-4").mkdir(parents=True)
        (root / "histories" / f"{kind}-4" / "seed0.csv").symlink_to(
            trained.path.parents[2] / "histories" / kind / "seed0.csv"
        )


def test_parent_runs_carry_mean_and_std_of_the_table_metrics_and_final_losses(trained_models, tmp_path, monkeypatch):
    """The MLflow UI's collapsed run table compares configurations by these columns."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_models["cae"].tracking_uri)
    _pipeline_layout(trained_models, tmp_path)
    seeds = {"cae-4": SEEDS["cae-8"], "cvae-4": SEEDS["cvae-8"]}
    assert (
        log_parent_runs(
            make_params(), ["cae-4", "cvae-4"], summarize(seeds), tmp_path / "histories", tmp_path / "models"
        )
        == []
    )
    client = MlflowClient()
    for kind in ("cae", "cvae"):
        parent = client.get_run(client.get_run(trained_models[kind].run_id).data.tags["mlflow.parentRunId"])
        assert parent.info.run_name == f"{kind}-4"
        metrics = parent.data.metrics
        assert {f"test/{m}_{s}" for m in TABLE_COLUMNS for s in ("mean", "std")} <= set(metrics)
        expected = summarize(seeds)[f"{kind}-4"]["fid"]
        assert (metrics["test/fid_mean"], metrics["test/fid_std"]) == pytest.approx(
            (expected["mean"], expected["std"]), rel=1e-3
        )  # to tracking.SIGNIFICANT_DIGITS
        assert {"train/loss_mean", "val/bce_mean", "val/accuracy_mean", "val/loss_std"} <= set(metrics)
        assert ("val/kl_mean" in metrics) == (kind == "cvae")  # the CAE has no KL term
    assert metrics["val/bce_mean"] == pytest.approx(
        client.get_metric_history(trained_models["cvae"].run_id, "val/bce")[-1].value, rel=1e-3
    )


def test_champion_moves_only_to_a_better_model_never_for_a_dvc_experiment_unless_forced(trained_models, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_models["cae"].tracking_uri)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    name = f"champion-{uuid.uuid4().hex[:8]}"
    params = make_params(registry={"model_name": name})
    # this store by name: MlflowClient() would follow mlflow.set_tracking_uri of an earlier test in this process
    client = MlflowClient(trained_models["cae"].tracking_uri)

    def champion(kind, fid, params=params):
        decision = update_champion(
            params, f"{kind}-4", "0", {"fid": fid, "gen_accuracy": 0.9}, trained_models[kind].path
        )
        alias = client.get_model_version_by_alias(name, "champion")
        return decision, client.get_run(alias.run_id).data.tags["model"]

    decision, holder = champion("cae", 30.0)
    assert decision["moved"] and holder == "cae" and decision["decision"] == "no champion yet"
    decision, holder = champion("cvae", 40.0)  # worse: registered, alias left where it was
    assert not decision["moved"] and holder == "cae"
    assert (decision["new_fid"], decision["current_fid"]) == (40.0, 30.0)
    worse = client.get_model_version(name, decision["version"])
    assert worse.tags["metric.fid"] == "40.0" and worse.tags["decision"].startswith("kept: fid 40")
    assert "git_commit" in worse.tags and "param.train.lr" in worse.tags and worse.description
    decision, holder = champion("cvae", 20.0)  # better: the alias moves
    assert decision["moved"] and holder == "cvae" and decision["current_fid"] == 30.0
    monkeypatch.setenv("DVC_EXP_NAME", "quick-look")  # a `dvc exp run`: a trial never takes the champion
    decision, holder = champion("cae", 1.0)
    assert not decision["moved"] and holder == "cvae" and "quick-look" in decision["decision"]
    decision, holder = champion("cae", 90.0, make_params(registry={"model_name": name, "force_champion": True}))
    assert decision["moved"] and holder == "cae"
    assert client.get_registered_model(name).description


def test_a_champion_measured_under_other_settings_is_not_compared():
    current = {"value": 30.0, "settings": {"evaluate.n_generated": "10000"}, "version": "3"}
    move, why = champion_decision("fid", 5.0, current, {"evaluate.n_generated": "200"}, "", False)
    assert not move and "other settings" in why and "registry.force_champion" in why
    assert champion_decision("gen_accuracy", 0.9, {**current, "value": 0.8}, current["settings"], "", False)[0]


def test_the_environment_names_what_bit_identical_reproduction_needs():
    """results/environment.json: rerunning on the same torch, CPU kernels and threads reproduces the numbers
    bit for bit; it is read from this process, so another thread count shows as one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        env = environment(make_params(execution={"executor": "processes", "workers": 3}))
    finally:
        torch.set_num_threads(threads)
    assert env["torch_threads"] == 1
    assert env["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu"] and env["cpu_count"] >= 1
    assert env["execution"] == {**env["execution"], "executor": "processes", "workers": 3, "threads": None}
    json.dumps(env)  # written as JSON beside the results
