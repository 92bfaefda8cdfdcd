"""Stage `aggregate`: what needs the trained models and histories beside the tables, and MLflow's summary.

The tables stage (compare.py) has written Table 1, the comparisons and the headline metrics from the
per-seed evaluations; this stage writes, under results/, all at once (`files.write_together`):
  curves/<config>.csv     validation BCE and label accuracy per epoch, mean over seeds (dvc.yaml's top-level
                          plots draw CAE against CVAE from them)
  figures/*.png           loss curves per latent size, reconstruction and generation grids per model
  champion.json           the champion of these results (the best seed of the best joint model): its file under
                          models/, which a clone that pulled the models loads without this MLflow store
  environment.json        what computed them: torch, CPU model and the kernels torch picks for it, threads
and, in MLflow: each configuration's parent run gets the mean and std over seeds of Table 1's metrics and
of the final epoch's losses; a `summary` run holds the tables, the comparisons and the figures; the best
seed of the best configuration is registered, and `@champion` moves to it only when it is better (see
`champion_decision`). MLflow is written after the files: a run stopped there leaves the files whole and
consistent, and MLflow without this run's summary.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from digitgen import figures, tracking
from digitgen.compare import (
    TABLE_COLUMNS,
    configurations,
    display_name,
    load_evaluations,
    numeric_table,
    pcvae_configurations,
    study_configurations,
    summarize,
)
from digitgen.data import load_split
from digitgen.evaluate import METRICS
from digitgen.files import write_together
from digitgen.models import load_model
from digitgen.params import LABEL_CVAE, PCVAE, Params, ParamsError
from digitgen.train import TIMINGS, absent_columns, read_history

# the study's Figures 3-6 show CVAE (left) and CAE (right) side by side; the label CVAE's curves stand alone
LOSS_PANEL_ORDER = ["cvae", "cae", LABEL_CVAE, PCVAE]


def champion_seed(summary, evaluations, candidates: list[str], metric: str) -> tuple[str, str]:
    """(configuration, seed): the best seed of the best configuration (by its mean) by `metric`."""
    if metric not in METRICS:
        raise ParamsError(f"registry.champion_metric must be one of {', '.join(METRICS)}, got {metric!r}")
    higher = METRICS[metric] == "higher"  # sorted is stable: of equals, the first listed
    config = sorted(candidates, key=lambda c: summary[c][metric]["mean"], reverse=higher)[0]
    seeds = {seed: values[metric] for seed, values in evaluations[config].items()}
    return config, sorted(seeds, key=lambda seed: seeds[seed], reverse=higher)[0]


# the like-for-like learning curves across the families (val_loss holds the CVAE's KL term, the CAE has none)
CURVES = ("val_bce", "val_accuracy")


def mean_curves(configs: list[str], histories_dir: Path) -> dict[str, pd.DataFrame]:
    """{config: epochs x CURVES}, each value the mean over the configuration's seeds."""
    curves = {}
    for config in configs:
        seeds = [pd.read_csv(path, index_col="epoch") for path in sorted(Path(histories_dir, config).glob("seed*.csv"))]
        curves[config] = pd.concat(seeds).groupby(level="epoch")[list(CURVES)].mean()
    return curves


def final_losses(config: str, histories_dir: Path) -> dict[str, dict[str, float]]:
    """{history column: {mean, std}} of the last epoch over the configuration's seeds, without the loss terms
    the model does not have and without timings."""
    last = pd.DataFrame([read_history(path)[-1] for path in sorted(Path(histories_dir, config).glob("seed*.csv"))])
    absent = absent_columns(config.rsplit("-", 1)[0])
    columns = [c for c in last.columns if c not in ("epoch", *TIMINGS) and c not in absent]
    std = last[columns].std(ddof=1).fillna(0.0) if len(last) > 1 else last[columns].mean() * 0.0
    return {c: {"mean": float(last[c].mean()), "std": float(std[c])} for c in columns}


def parent_run_metrics(summary: dict[str, dict[str, float]], losses: dict[str, dict[str, float]]) -> dict[str, float]:
    """What a configuration's parent run carries: test/<metric>_mean and _std of Table 1's metrics,
    train/ and val/<loss>_mean and _std of the final epoch."""
    named = {tracking.evaluation_metric(m): summary[m] for m in TABLE_COLUMNS if m in summary}
    named.update({tracking.history_metric(k): v for k, v in losses.items()})
    return {f"{name}_{stat}": values[stat] for name, values in named.items() for stat in ("mean", "std")}


def log_parent_runs(params: Params, configs: list[str], summary, histories_dir: Path, models_dir: Path) -> list[str]:
    """Each configuration's mean and std over seeds, on its parent run; returns the configurations whose
    training runs this store does not hold (restored from DVC's cache, or pulled)."""
    missing = []
    for config in configs:
        model_file = next(iter(sorted(Path(models_dir, config).glob("seed*.pt"))))
        parent = tracking.parent_run_of(params.tracking.experiment, model_file)
        if parent is None:
            missing.append(config)
            continue
        tracking.log_to_run(parent, parent_run_metrics(summary[config], final_losses(config, histories_dir)))
    return missing


# Which evaluation settings a champion's metric was measured under: values compare only when these agree
CHAMPION_SETTINGS = ("evaluate.sampler", "evaluate.n_generated", "evaluate.is_splits", "evaluate.seed")


def champion_decision(
    metric: str, new: float, current: dict | None, settings: dict[str, str], experiment: str, force: bool
) -> tuple[bool, str]:
    """(move @champion?, why). current: the champion's {"value", "settings", "version"}, or None.

    A DVC experiment (`dvc exp run`) never takes the champion unless forced: it is a trial, not yet kept.
    """
    if force:
        return True, "forced by registry.force_champion"
    if experiment:
        return False, (
            f"kept: DVC experiment {experiment} is a trial; `dvc exp apply` it and run aggregate again, or "
            "set registry.force_champion"
        )
    if current is None:
        return True, "no champion yet"
    if current["settings"] != settings:
        return False, (
            f"kept: champion version {current['version']} was evaluated under other settings "
            f"({current['settings']} against {settings}); set registry.force_champion to move it"
        )
    better = new > current["value"] if METRICS[metric] == "higher" else new < current["value"]
    if not better:
        return False, f"kept: {metric} {new:.6g} is not better than the champion's {current['value']:.6g}"
    return True, f"moved: {metric} {new:.6g} is better than the champion's {current['value']:.6g}"


def _champion_record(version, metric: str) -> dict | None:
    """What the decision compares of the current champion: its value and settings (its version's tags, or its
    run's for a version registered before they were written)."""
    if version is None:
        return None
    run = tracking.run_data(version.run_id)
    value = version.tags.get(f"metric.{metric}") or run.metrics.get(
        tracking.evaluation_metric(metric), run.metrics.get(metric)
    )
    settings = {k: version.tags.get(f"param.{k}") or run.params.get(k) or run.tags.get(k) for k in CHAMPION_SETTINGS}
    return {"value": float("nan") if value is None else float(value), "settings": settings, "version": version.version}


def update_champion(params: Params, config: str, seed: str, metrics: dict[str, float], model_file: Path) -> dict:
    """Register the chosen seed's model as a new version (description, metrics, commit, DVC experiment,
    params as tags) and move @champion per `champion_decision`; returns the decision and both numbers."""
    registry, metric = params.registry, params.registry.champion_metric
    name = registry.model_name
    run_id = tracking.seed_run_for(params.tracking.experiment, config, seed, model_file, {})
    run = tracking.run_data(run_id)
    settings = {k: run.params.get(k) for k in CHAMPION_SETTINGS}
    current = tracking.champion(name)
    record = _champion_record(current, metric)
    if current is not None and current.run_id == run_id:
        move, why = False, "kept: this model already is the champion"
    else:
        move, why = champion_decision(
            metric, metrics[metric], record, settings, tracking.dvc_experiment(), registry.force_champion
        )
    commit = run.tags.get(tracking.GIT_COMMIT_TAG, "unknown")
    experiment = tracking.dvc_experiment()
    version = tracking.register_version(
        run_id,
        name,
        f"digitgen's best joint model by {metric}: one model for every condition of the study (generate, classify, "
        "reconstruct, validate) through one request table; @champion moves only to a better model",
        f"{config} seed{seed}: {metric} {metrics[metric]:.6g}; trained at commit {commit[:12]}"
        + (f" in DVC experiment {experiment}" if experiment else "")
        + f". {why}",
        {
            "config": config,
            "seed": seed,
            "git_commit": commit,
            "dvc_exp_name": experiment,
            "decision": why,
            **{f"metric.{m}": str(v) for m, v in metrics.items() if m in METRICS},
            **{f"param.{k}": v for k, v in run.params.items()},
        },
    )
    if move:
        tracking.set_champion(name, version.version)
    return {
        "decision": why,
        "moved": move,
        "version": version.version,
        "config": config,
        "seed": seed,
        f"new_{metric}": metrics[metric],
        **({f"current_{metric}": record["value"]} if record else {}),
    }


def appendix_figures(
    configs: list[str],
    histories_dir: Path,
    models_dir: Path,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int,
) -> dict[str, bytes]:
    """The study's appendix figures, {file name: PNG}: loss curves per latent size, reconstructions and generations
    per model."""
    drawn = {}
    by_latent: dict[str, dict[str, dict[str, list]]] = {}
    for config in sorted(configs, key=lambda c: LOSS_PANEL_ORDER.index(c.rsplit("-", 1)[0])):
        latent_dim = config.rsplit("-", 1)[1]
        runs = sorted(Path(histories_dir, config).glob("seed*.csv"))
        by_latent.setdefault(latent_dim, {})[display_name(config)] = {p.stem: read_history(p) for p in runs}
        model = load_model(next(iter(sorted(Path(models_dir, config).glob("seed*.pt")))))
        with torch.no_grad():
            drawn[f"reconstructions_{config}.png"] = figures.png(
                figures.reconstruction_grid(model, test_images[:10], test_labels[:10])
            )
            drawn[f"generations_{config}.png"] = figures.png(figures.generation_grid(model, seed))
    for latent_dim, panels in by_latent.items():
        drawn[f"loss_curves_{latent_dim}.png"] = figures.png(
            figures.loss_curve_panels(panels, f"latent dimension {latent_dim}")
        )
    return drawn


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else what the platform module knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def environment(params: Params) -> dict:
    """The software and machine behind the results. A rerun reproduces them bit for bit with the same torch,
    CPU kernels (`cpu_capability`: torch's AVX512, AVX2, ... dispatch) and threads per training, and within the
    seeds' spread otherwise (docs/reproducing.md). Written by the stage that computes the
    table, in the same `dvc repro` as training on a single machine; `torch_threads` is this process's, which
    the local executor trains with unless `execution.threads` says otherwise."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "execution": asdict(params.execution),
    }


# the tables stage's outputs, logged to MLflow's summary run beside this stage's figures
TABLES = ("summary.json", "table.md", "table.csv", "fidelity.md", "fidelity.csv", "comparison.md", "comparison.csv")


def run_aggregate(
    params: Params,
    eval_dir: Path,
    histories_dir: Path,
    models_dir: Path,
    prepared_dir: Path,
    results_dir: Path,
) -> dict:
    """Curves, figures, champion and environment under `results_dir` (beside the tables stage's outputs), then
    MLflow: the parent runs' means, the champion's registration and the summary run. Returns the champion decision."""
    configs = configurations(params)
    evaluations = load_evaluations(eval_dir, configs)
    summary = summarize(evaluations)
    results_dir = Path(results_dir)
    test = load_split(prepared_dir, "test")
    drawn = appendix_figures(
        configs,
        Path(histories_dir),
        Path(models_dir),
        test.float_images(),
        test.labels,
        params.train.seeds[0],
    )
    # the champion serves every condition, so it is chosen among the joint models: the study's and the prior CVAE
    metric = params.registry.champion_metric
    config, seed = champion_seed(
        summary, evaluations, study_configurations(params) + pcvae_configurations(params), metric
    )
    model_file = Path(models_dir) / config / f"seed{seed}.pt"
    champion = {
        "config": config,
        "seed": int(seed),
        "model": model_file.as_posix(),
        metric: evaluations[config][seed][metric],
    }
    written = write_together(
        {
            **{
                results_dir / "curves" / f"{config}.csv": frame.to_csv(float_format="%.6g")
                for config, frame in mean_curves(study_configurations(params), Path(histories_dir)).items()
            },
            **{results_dir / "figures" / name: png for name, png in drawn.items()},
            results_dir / "champion.json": json.dumps(champion, indent=2) + "\n",
            results_dir / "environment.json": json.dumps(environment(params), indent=2) + "\n",
        },
        results_dir,
        replace=[results_dir / "curves", results_dir / "figures"],
    )
    missing = log_parent_runs(params, configs, summary, Path(histories_dir), Path(models_dir))
    if missing:
        print(
            f"no parent run in this MLflow store for {', '.join(missing)} (restored from DVC's run-cache, or "
            f"pulled): their means are in results/ only; `dvc repro -f train@<config>` logs them",
            file=sys.stderr,
        )
    try:
        decision = update_champion(params, config, seed, evaluations[config][seed], model_file)
    except tracking.TrackingError as err:  # a model whose training run is not in this store has nothing to register
        decision = {"decision": f"not registered: {err}"}
        print(
            f"champion not registered: {err}; the training run of {config} seed{seed} is not in this MLflow store "
            f"(restored from DVC's run-cache, or pulled from a remote): `dvc repro -f train@{config}` logs one",
            file=sys.stderr,
        )
    else:
        print(
            f"champion by {metric}: {config} seed{seed} -> models:/{params.registry.model_name} version "
            f"{decision['version']}; {decision['decision']}"
        )
    tracking.log_summary(
        params.tracking.experiment,
        numeric_table(summary),
        (results_dir / "table.md").read_text(),
        [*(results_dir / name for name in TABLES), results_dir / "comparison.png", *written],
        decision,
    )
    return decision
