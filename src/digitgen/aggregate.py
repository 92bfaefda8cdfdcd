"""Stage `aggregate`: seeds -> mean ± std, the study's Table 1 beside the paper's, figures, an MLflow summary.

Reads every configuration's per-seed metrics (results/evaluation/<config>.json, written by the
evaluate stage) and writes, under results/:
  metrics.json            the headline DVC compares: mean and std over seeds of Table 1's five metrics
  summary.json            mean, std (over seeds, ddof=1) and n of every metric (the CI gate reads it)
  table.md                Table 1's layout (mean ± std), best of each column in bold, the paper's values and our
                          difference; the models beyond the study in a block of their own below the study's
  table.csv               the same as plain numbers: mean, std, paper mean, paper std, ours - paper per metric
  fidelity.md / .csv      Table 1's companion: FID, KID, precision, recall, FID per digit and distinct fraction
                          of every configuration, with the reference points (results/reference.json) beside them
  curves/<config>.csv     validation BCE and label accuracy per epoch, mean over seeds (dvc.yaml's top-level
                          plots draw CAE against CVAE from them)
  figures/*.png           loss curves per latent size, reconstruction and generation grids per model
  champion.json           the champion of these results (the best seed of the best joint model): its file under
                          models/, which a clone that pulled the models loads without this MLflow store
  environment.json        what computed them: torch, CPU model and the kernels torch picks for it, threads
and, in MLflow: each configuration's parent run gets the mean and std over seeds of Table 1's metrics and
of the final epoch's losses; a `summary` run holds the table and figures; the best seed of the best
configuration is registered, and `@champion` moves to it only when it is better (see `champion_decision`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from digitgen import figures, tracking
from digitgen.data import load_split
from digitgen.evaluate import METRICS
from digitgen.files import write_atomic, write_json
from digitgen.models import load_model
from digitgen.params import BEYOND_KINDS, LABEL_CVAE, DigitgenError, Params, ParamsError, config_name
from digitgen.train import TIMINGS, absent_columns, read_history

# Table 1's five columns, in the study's order and words
TABLE_COLUMNS = {
    "gen_accuracy": "Generated Images Accuracy",
    "fid": "FID",
    "inception_score": "Inception Score",
    "classification_accuracy": "Classification Accuracy",
    "reconstruction_error": "Reconstruction Error",
}

# the study's Figures 3-6 show CVAE (left) and CAE (right) side by side; the label CVAE's curves stand alone
LOSS_PANEL_ORDER = ["cvae", "cae", LABEL_CVAE, *BEYOND_KINDS]
BEYOND_BLOCK = "*beyond the study*"  # the heading row of Table 1's block of models beyond the study

# Table 1's companion: how far generated images sit from real ones, beside the reference points
FIDELITY_COLUMNS = {
    "fid": "FID",
    "kid": "KID",
    "precision": "Precision",
    "recall": "Recall",
    "fid_per_digit": "FID per digit (mean)",
    "distinct_fraction": "Distinct fraction",
    "gen_accuracy": "Generated Images Accuracy",
}
REFERENCE_POINTS = {  # results/reference.json's points, as the companion table names them
    "held_out_real": "reference: held-out real images",
    "blurred_real": "reference: blurred real images",
    "digit_means": "reference: the ten per-digit means",
    "uniform_noise": "reference: uniform noise",
}


def display_name(config: str) -> str:
    """cae-8 -> CAE (8), the study's row names."""
    kind, latent_dim = config.rsplit("-", 1)
    return f"{kind.upper().replace('_', '-')} ({latent_dim})"


def study_configurations(params: Params) -> list[str]:
    """Table 1's rows in the study's order: CAE (8), CVAE (8), CAE (16), ..."""
    return [config_name(kind, d) for d in params.study.latent_dims for kind in params.study.models]


def beyond_configurations(params: Params) -> list[str]:
    """The rows beyond the study, by latent size: PCVAE (16), PCVAE (32)."""
    return [config_name(kind, d) for d in params.beyond.latent_dims for kind in params.beyond.models]


def configurations(params: Params) -> list[str]:
    """The study's rows, the label-conditioned CVAE's as an extra row, then the models beyond the study."""
    return (
        study_configurations(params)
        + [config_name(LABEL_CVAE, params.label_cvae.latent_dim)]
        + beyond_configurations(params)
    )


def load_evaluations(eval_dir: Path, configs: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{config: {seed: {metric: value}}}; a missing configuration is an error, never a silent gap."""
    found = {}
    for config in configs:
        path = Path(eval_dir) / f"{config}.json"
        if not path.is_file():
            raise DigitgenError(
                f"{path} is missing: configuration {config} has not been evaluated; "
                f"run `dvc repro` (or `dvc repro evaluate@{config}`)"
            )
        found[config] = json.loads(path.read_text())["seeds"]
    return found


def summarize(evaluations: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, sample std (0 for a single seed) and number of seeds of every numeric metric."""
    summary = {}
    for config, seeds in evaluations.items():
        frame = pd.DataFrame.from_dict(seeds, orient="index").select_dtypes("number")
        std = frame.std(ddof=1).fillna(0.0) if len(frame) > 1 else frame.mean() * 0.0
        summary[config] = {
            m: {"mean": float(frame[m].mean()), "std": float(std[m]), "n": int(frame[m].count())} for m in frame.columns
        }
    return summary


def best_configs(summary: dict[str, dict[str, dict[str, float]]], metrics=TABLE_COLUMNS) -> dict[str, str]:
    """For each metric, the configuration whose mean is best in that metric's direction."""
    best = {}
    for metric in metrics:
        scored = {c: s[metric]["mean"] for c, s in summary.items() if metric in s}
        pick = max if METRICS[metric] == "higher" else min
        best[metric] = pick(scored, key=scored.get)
    return best


def champion_seed(summary, evaluations, candidates: list[str], metric: str) -> tuple[str, str]:
    """(configuration, seed): the best seed of the best configuration by `metric`."""
    if metric not in METRICS:
        raise ParamsError(f"registry.champion_metric must be one of {', '.join(METRICS)}, got {metric!r}")
    config = best_configs({c: summary[c] for c in candidates}, [metric])[metric]
    seeds = {seed: values[metric] for seed, values in evaluations[config].items()}
    return config, (max if METRICS[metric] == "higher" else min)(seeds, key=seeds.get)


def headline(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """What `dvc metrics show/diff` and `dvc exp show` print: mean and std of Table 1's metrics per configuration."""
    return {
        config: {
            metric: {"mean": values[metric]["mean"], "std": values[metric]["std"]}
            for metric in TABLE_COLUMNS
            if metric in values
        }
        for config, values in summary.items()
    }


# the like-for-like learning curves across the families (val_loss holds the CVAE's KL term, the CAE has none)
CURVES = ("val_bce", "val_accuracy")


def mean_curves(configs: list[str], histories_dir: Path) -> dict[str, pd.DataFrame]:
    """{config: epochs x CURVES}, each value the mean over the configuration's seeds."""
    curves = {}
    for config in configs:
        seeds = [pd.read_csv(path, index_col="epoch") for path in sorted(Path(histories_dir, config).glob("seed*.csv"))]
        curves[config] = pd.concat(seeds).groupby(level="epoch")[list(CURVES)].mean()
    return curves


def paper_table() -> pd.DataFrame:
    with resources.files("digitgen").joinpath("paper_table1.csv").open() as f:
        return pd.read_csv(f, index_col="configuration")


def _digits(mean: float) -> int:
    return 4 if abs(mean) < 10 else 2


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.{_digits(mean)}f} ± {std:.{_digits(mean)}f}"


def _difference(mean: float, std: float, paper_mean: float, paper_std: float) -> str:
    """ours - paper, marked † where the two mean ± std bands do not overlap (a gap beyond the spread over seeds)."""
    gap = mean - paper_mean
    return f"{gap:+.{_digits(paper_mean)}f}" + (" †" if abs(gap) > std + paper_std else "")


def display_table(summary: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """Table 1 as table.md shows it: per metric, ours (mean ± std, the best marked **bold**), the paper's,
    and ours - paper (marked † beyond the spread)."""
    paper = paper_table()
    best = best_configs(summary)
    rows = {}
    for config, metrics in summary.items():
        row = {}
        for metric, label in TABLE_COLUMNS.items():
            if metric not in metrics:  # e.g. the label CVAE's classification accuracy: it has no digit head
                row.update({label: "n/a", f"{label} (paper)": "-", f"{label} (ours - paper)": "-"})
                continue
            mean, std = metrics[metric]["mean"], metrics[metric]["std"]
            ours = _fmt(mean, std)
            row[label] = f"**{ours}**" if best[metric] == config else ours
            if config in paper.index:
                paper_mean, paper_std = paper.at[config, f"{metric}_mean"], paper.at[config, f"{metric}_std"]
                row[f"{label} (paper)"] = _fmt(paper_mean, paper_std)
                row[f"{label} (ours - paper)"] = _difference(mean, std, paper_mean, paper_std)
            else:
                row.update({f"{label} (paper)": "-", f"{label} (ours - paper)": "-"})
        rows[display_name(config)] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


def numeric_table(summary: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """Table 1 as plain numbers (table.csv, the MLflow table): per metric our mean and std, the paper's, and
    ours - paper; empty where a model or the paper has no value."""
    paper = paper_table()
    rows = {}
    for config, metrics in summary.items():
        row = {}
        for metric in TABLE_COLUMNS:
            ours = metrics.get(metric, {})
            row[f"{metric}_mean"], row[f"{metric}_std"] = ours.get("mean"), ours.get("std")
            known = config in paper.index and metric in metrics
            row[f"{metric}_paper_mean"] = paper.at[config, f"{metric}_mean"] if known else None
            row[f"{metric}_paper_std"] = paper.at[config, f"{metric}_std"] if known else None
            row[f"{metric}_ours_minus_paper"] = ours["mean"] - row[f"{metric}_paper_mean"] if known else None
        rows[display_name(config)] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


def with_beyond_block(frame: pd.DataFrame, beyond_rows: list[str]) -> pd.DataFrame:
    """Table 1 for reading: a heading row above the models beyond the study."""
    study = frame.drop(index=beyond_rows)
    heading = pd.DataFrame({column: [""] for column in frame.columns}, index=[BEYOND_BLOCK])
    return pd.concat([study, heading, frame.loc[beyond_rows]]).rename_axis(frame.index.name)


def fidelity_table(
    summary: dict[str, dict[str, dict[str, float]]], points: dict[str, dict[str, float]]
) -> pd.DataFrame:
    """Every configuration's FIDELITY_COLUMNS (mean ± std; n/a where not computed), then the reference points."""

    def cell(metric: str, mean: float, std: float | None) -> str:
        scale = 1000 if metric == "kid" else 1
        return f"{mean * scale:.4g}" + ("" if std is None else f" ± {std * scale:.2g}")

    rows = {
        display_name(config): {
            label: cell(m, metrics[m]["mean"], metrics[m]["std"]) if m in metrics else "n/a"
            for m, label in FIDELITY_COLUMNS.items()
        }
        for config, metrics in summary.items()
    }
    rows.update(
        {
            name: {label: cell(m, points[point][m], None) for m, label in FIDELITY_COLUMNS.items()}
            for point, name in REFERENCE_POINTS.items()
        }
    )
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


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


def write_figures(
    configs: list[str],
    histories_dir: Path,
    models_dir: Path,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    out_dir: Path,
    seed: int,
) -> list[Path]:
    """The study's appendix figures: loss curves per latent size, reconstructions and generations per model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_latent: dict[str, dict[str, dict[str, list]]] = {}
    for config in sorted(configs, key=lambda c: LOSS_PANEL_ORDER.index(c.rsplit("-", 1)[0])):
        latent_dim = config.rsplit("-", 1)[1]
        runs = sorted(Path(histories_dir, config).glob("seed*.csv"))
        by_latent.setdefault(latent_dim, {})[display_name(config)] = {p.stem: read_history(p) for p in runs}
        model = load_model(next(iter(sorted(Path(models_dir, config).glob("seed*.pt")))))
        with torch.no_grad():
            for name, fig in (
                ("reconstructions", figures.reconstruction_grid(model, test_images[:10], test_labels[:10])),
                ("generations", figures.generation_grid(model, seed)),
            ):
                written.append(figures.save(fig, out_dir / f"{name}_{config}.png"))
    for latent_dim, panels in by_latent.items():
        written.append(
            figures.save(
                figures.loss_curve_panels(panels, f"latent dimension {latent_dim}"),
                out_dir / f"loss_curves_{latent_dim}.png",
            )
        )
    return written


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
    seeds' spread otherwise (README: Reproducing on another machine). Written by the stage that computes the
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


def run_aggregate(
    params: Params,
    eval_dir: Path,
    histories_dir: Path,
    models_dir: Path,
    prepared_dir: Path,
    reference_path: Path,
    out_dir: Path,
) -> pd.DataFrame:
    configs = configurations(params)
    evaluations = load_evaluations(eval_dir, configs)
    summary = summarize(evaluations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(summary, out_dir / "summary.json")
    write_json(headline(summary), out_dir / "metrics.json")
    write_json(environment(params), out_dir / "environment.json")
    for config, frame in mean_curves(study_configurations(params), Path(histories_dir)).items():
        write_atomic(out_dir / "curves" / f"{config}.csv", frame.to_csv(float_format="%.6g"))
    frame, numbers = display_table(summary), numeric_table(summary)
    write_atomic(out_dir / "table.csv", numbers.to_csv(float_format="%.6g"))
    markdown = (
        f"Table 1: mean ± std over seeds ({', '.join(map(str, params.train.seeds))}; beyond the study: "
        f"{', '.join(map(str, params.beyond.train.seeds))}); best of each column in bold; paper values from "
        "the study's Table 1; † marks a difference beyond the spread (the two mean ± std bands do not "
        "overlap).\n\n"
        + with_beyond_block(frame, [display_name(c) for c in beyond_configurations(params)]).to_markdown()
        + "\n"
    )
    write_atomic(out_dir / "table.md", markdown)
    fidelity = fidelity_table(summary, json.loads(Path(reference_path).read_text())["points"])
    write_atomic(out_dir / "fidelity.csv", fidelity.to_csv())
    write_atomic(
        out_dir / "fidelity.md",
        "Table 1's companion: generated images against the test images in the classifier's feature space, mean ± "
        "std over seeds; KID is the unbiased MMD estimate (×1000), precision/recall torch-fidelity's k-NN (k = "
        f"{params.evaluate.prc_neighborhood}); the reference points are scored the same way (one run each).\n\n"
        + fidelity.to_markdown()
        + "\n",
    )
    test = load_split(prepared_dir, "test")
    written = write_figures(
        configs,
        Path(histories_dir),
        Path(models_dir),
        test.float_images(),
        test.labels,
        out_dir / "figures",
        params.train.seeds[0],
    )
    missing = log_parent_runs(params, configs, summary, Path(histories_dir), Path(models_dir))
    if missing:
        print(
            f"no parent run in this MLflow store for {', '.join(missing)} (restored from DVC's run-cache, or "
            f"pulled): their means are in results/ only; `dvc repro -f train@<config>` logs them",
            file=sys.stderr,
        )
    # the champion serves every condition, so it is chosen among the joint models: the study's and those beyond it
    metric = params.registry.champion_metric
    config, seed = champion_seed(
        summary, evaluations, study_configurations(params) + beyond_configurations(params), metric
    )
    model_file = Path(models_dir) / config / f"seed{seed}.pt"
    write_json(
        {
            "config": config,
            "seed": int(seed),
            "model": model_file.as_posix(),
            metric: evaluations[config][seed][metric],
        },
        out_dir / "champion.json",
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
        numbers,
        markdown,
        [
            out_dir / "summary.json",
            out_dir / "table.md",
            out_dir / "table.csv",
            out_dir / "fidelity.md",
            out_dir / "fidelity.csv",
            *written,
        ],
        decision,
    )
    return frame
