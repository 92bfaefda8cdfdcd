"""Stage `aggregate`: seeds -> mean ± std, the study's Table 1 beside the paper's, figures, an MLflow summary.

Reads every configuration's per-seed metrics (results/evaluation/<config>.json, written by the
evaluate stage) and writes, under results/:
  metrics.json            the headline DVC compares: mean and std over seeds of Table 1's five metrics
  summary.json            mean, std (over seeds, ddof=1) and n of every metric (the CI gate reads it)
  table.md / table.csv    Table 1's layout, best of each column marked, the paper's values and our difference;
                          the models beyond the study in a block of their own below the study's
  fidelity.md / .csv      Table 1's companion: FID, KID, precision, recall, FID per digit and distinct fraction
                          of every configuration, with the reference points (results/reference.json) beside them
  curves/<config>.csv     validation BCE and label accuracy per epoch, mean over seeds (dvc.yaml's top-level
                          plots draw CAE against CVAE from them)
  figures/*.png           loss curves per latent size, reconstruction and generation grids per model
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import pandas as pd
import torch

from digitgen import figures, tracking
from digitgen.data import load_split
from digitgen.evaluate import METRICS, write_json
from digitgen.files import write_atomic
from digitgen.generate import ModelSourceError
from digitgen.models import load_model
from digitgen.params import BEYOND_KINDS, LABEL_CVAE, DigitgenError, Params, ParamsError
from digitgen.train import config_name, read_history

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
    return (study_configurations(params) + [config_name(LABEL_CVAE, params.label_cvae.latent_dim)]
            + beyond_configurations(params))


def load_evaluations(eval_dir: Path, configs: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{config: {seed: {metric: value}}}; a missing configuration is an error, never a silent gap."""
    found = {}
    for config in configs:
        path = Path(eval_dir) / f"{config}.json"
        if not path.is_file():
            raise DigitgenError(f"{path} is missing: configuration {config} has not been evaluated; "
                                f"run `dvc repro` (or `dvc repro evaluate@{config}`)")
        found[config] = json.loads(path.read_text())["seeds"]
    return found


def summarize(evaluations: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, sample std (0 for a single seed) and number of seeds of every numeric metric."""
    summary = {}
    for config, seeds in evaluations.items():
        frame = pd.DataFrame.from_dict(seeds, orient="index").select_dtypes("number")
        std = frame.std(ddof=1).fillna(0.0) if len(frame) > 1 else frame.mean() * 0.0
        summary[config] = {m: {"mean": float(frame[m].mean()), "std": float(std[m]), "n": int(frame[m].count())}
                           for m in frame.columns}
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
    return {config: {metric: {"mean": values[metric]["mean"], "std": values[metric]["std"]}
                     for metric in TABLE_COLUMNS if metric in values}
            for config, values in summary.items()}


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


def table(summary: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """Table 1 with, per metric, ours (mean ± std, the best marked **bold**), the paper's, and ours - paper
    (marked † beyond the spread)."""
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


def with_beyond_block(frame: pd.DataFrame, beyond_rows: list[str]) -> pd.DataFrame:
    """Table 1 for reading: a heading row above the models beyond the study."""
    study = frame.drop(index=beyond_rows)
    heading = pd.DataFrame({column: [""] for column in frame.columns}, index=[BEYOND_BLOCK])
    return pd.concat([study, heading, frame.loc[beyond_rows]]).rename_axis(frame.index.name)


def fidelity_table(summary: dict[str, dict[str, dict[str, float]]], points: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Every configuration's FIDELITY_COLUMNS (mean ± std; n/a where not computed), then the reference points."""
    def cell(metric: str, mean: float, std: float | None) -> str:
        scale = 1000 if metric == "kid" else 1
        return f"{mean * scale:.4g}" + ("" if std is None else f" ± {std * scale:.2g}")

    rows = {display_name(config): {label: cell(m, metrics[m]["mean"], metrics[m]["std"]) if m in metrics else "n/a"
                                   for m, label in FIDELITY_COLUMNS.items()}
            for config, metrics in summary.items()}
    rows.update({name: {label: cell(m, points[point][m], None) for m, label in FIDELITY_COLUMNS.items()}
                 for point, name in REFERENCE_POINTS.items()})
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


def write_figures(configs: list[str], histories_dir: Path, models_dir: Path, test_images: torch.Tensor,
                  test_labels: torch.Tensor, out_dir: Path, seed: int) -> list[Path]:
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
            for name, fig in (("reconstructions", figures.reconstruction_grid(model, test_images[:10], test_labels[:10])),
                              ("generations", figures.generation_grid(model, seed))):
                written.append(figures.save(fig, out_dir / f"{name}_{config}.png"))
    for latent_dim, panels in by_latent.items():
        written.append(figures.save(figures.loss_curve_panels(panels, f"latent dimension {latent_dim}"),
                             out_dir / f"loss_curves_{latent_dim}.png"))
    return written


def run_aggregate(params: Params, eval_dir: Path, histories_dir: Path, models_dir: Path, prepared_dir: Path,
                  reference_path: Path, out_dir: Path) -> pd.DataFrame:
    configs = configurations(params)
    evaluations = load_evaluations(eval_dir, configs)
    summary = summarize(evaluations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(summary, out_dir / "summary.json")
    write_json(headline(summary), out_dir / "metrics.json")
    for config, frame in mean_curves(study_configurations(params), Path(histories_dir)).items():
        write_atomic(out_dir / "curves" / f"{config}.csv", frame.to_csv(float_format="%.6g"))
    frame = table(summary)
    write_atomic(out_dir / "table.csv", frame.to_csv())
    write_atomic(out_dir / "table.md",
        f"Table 1: mean ± std over seeds ({', '.join(map(str, params.train.seeds))}; beyond the study: "
        f"{', '.join(map(str, params.beyond.train.seeds))}); best of each column in bold; paper values from the "
        "study's Table 1; † marks a difference beyond the spread (the two mean ± std bands do not overlap).\n\n"
        + with_beyond_block(frame, [display_name(c) for c in beyond_configurations(params)]).to_markdown() + "\n")
    fidelity = fidelity_table(summary, json.loads(Path(reference_path).read_text())["points"])
    write_atomic(out_dir / "fidelity.csv", fidelity.to_csv())
    write_atomic(out_dir / "fidelity.md",
        "Table 1's companion: generated images against the test images in the classifier's feature space, mean ± "
        "std over seeds; KID is the unbiased MMD estimate (×1000), precision/recall torch-fidelity's k-NN (k = "
        f"{params.evaluate.prc_neighborhood}); the reference points are scored the same way (one run each).\n\n"
        + fidelity.to_markdown() + "\n")
    test = load_split(prepared_dir, "test")
    written = write_figures(configs, Path(histories_dir), Path(models_dir), test.float_images(), test.labels,
                            out_dir / "figures", params.train.seeds[0])
    tracking.log_summary(params.tracking.experiment, frame,
                         [out_dir / "summary.json", out_dir / "table.md", out_dir / "table.csv",
                          out_dir / "fidelity.md", out_dir / "fidelity.csv", *written])
    # the champion serves every condition, so it is chosen among the joint models: the study's and those beyond it
    config, seed = champion_seed(summary, evaluations, study_configurations(params) + beyond_configurations(params),
                                 params.registry.champion_metric)
    run_id = tracking.seed_run_for(params.tracking.experiment, config, seed, Path(models_dir) / config / f"seed{seed}.pt")
    try:
        version = tracking.register_champion(run_id, params.registry.model_name)
    except ModelSourceError as err:  # a model whose training run is not in this store has nothing to register
        print(f"champion not registered: {err}; the training run of {config} seed{seed} is not in this MLflow store "
              f"(restored from DVC's run-cache, or pulled from a remote): `dvc repro -f train@{config}` logs one",
              file=sys.stderr)
        return frame
    print(f"champion by {params.registry.champion_metric}: {config} seed{seed} (run {run_id}) -> "
          f"models:/{params.registry.model_name}@champion, version {version}")
    return frame
