"""Stage `tables`: seeds -> mean ± std, Table 1 beside the paper's, and the study's two comparisons, tested.

Reads only the per-seed evaluations (results/evaluation/<config>.json), the reference points and the
paper's Table 1, so it runs without the trained models, and writes under results/, all at once
(`files.write_together`: a reader never sees some of these files new and others old):
  metrics/<latent>-<model>.json  the headline `dvc metrics show/diff` and `dvc exp show` print: Table 1's five
                          means of one configuration, one file (one row) each, named so that CAE and CVAE
                          of one latent size sort together
  summary.json            mean, std (over seeds, ddof=1) and n of every metric (the CI gate reads it)
  table.md                Table 1: one cell per metric, ours (mean ± std) and the paper's mean in brackets; the
                          best of each column in bold (ties at the shown precision share it); † where ours and
                          the paper's differ at the tests' level after Holm's adjustment over the table
  table.csv               the same as plain numbers: mean, std, paper mean, paper std, ours - paper per metric
  fidelity.md / .csv      Table 1's companion: FID, KID, precision, recall, FID per digit and distinct fraction
                          of every configuration, with the reference points (results/reference.json) beside them
  comparison.md / .csv    CAE - CVAE per latent size and metric, and ours - paper per Table 1 cell: the
                          difference, its interval (Welch's t), p, Holm's p, a verdict, and for a difference
                          not separable the seeds per family that would separate it
  comparison.png          the forest plot: one panel per metric, CAE - CVAE and its interval per latent size

The tests: Welch's t with Welch-Satterthwaite degrees of freedom on each pair of families (seeds are
independent trainings; nothing pairs seed 0 of the CAE with seed 0 of the CVAE). A family with no spread
over its seeds (the CAE's generated accuracy is 1.0 on every seed) contributes no variance, and Welch's t
is then exactly a one-sample t of the other family against that constant (n - 1 degrees of freedom);
two families both without spread are equal (not separable) or different exactly. The paper gives mean and
std only; its number of seeds is `compare.paper_seeds`, an assumption.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
from scipy import stats

from digitgen import figures
from digitgen.evaluate import METRICS
from digitgen.files import write_together
from digitgen.params import LABEL_CVAE, MODEL_KINDS, PCVAE, DigitgenError, Params, config_name

# Table 1's five columns, in the study's order and words
TABLE_COLUMNS = {
    "gen_accuracy": "Generated Images Accuracy",
    "fid": "FID",
    "inception_score": "Inception Score",
    "classification_accuracy": "Classification Accuracy",
    "reconstruction_error": "Reconstruction Error",
}
# past Table 1's five: the metrics CAE and CVAE are also compared on, where both families have them (not `loss`: the
# CVAE's holds its KL term; not the ten fid_digit<d>, which fid_per_digit averages)
EXTRA_METRICS = {
    "fid_per_digit": "FID per digit (mean)",
    "kid": "KID",
    "precision": "Precision",
    "recall": "Recall",
    "distinct_fraction": "Distinct fraction",
    "reconstruction_error_image_only": "Reconstruction Error (image only)",
}
PCVAE_BLOCK = "*beyond the study*"  # the heading row of Table 1's block of prior CVAE (pcvae) rows

# Table 1's companion: how far generated images sit from real ones, beside the reference points
FIDELITY_COLUMNS = {
    "fid": "FID",
    "kid": "KID",
    "precision": "Precision",
    "recall": "Recall",
    "fid_per_digit": "FID per digit (mean)",
    "distinct_fraction": "Distinct fraction",
    "gen_accuracy": "Generated Images Accuracy",
    "recon_fid": "Floor FID",  # the decoder floor: held-out digits reconstructed (image and digit), scored the same way
    "recon_precision": "Floor precision",
    "recon_recall": "Floor recall",
}
REFERENCE_POINTS = {  # results/reference.json's points, as the companion table names them
    "held_out_real": "reference: held-out real images",
    "blurred_real": "reference: blurred real images",
    "digit_means": "reference: the ten per-digit means",
    "uniform_noise": "reference: uniform noise",
}

Summary = dict[str, dict[str, dict[str, float]]]  # {config: {metric: {mean, std, n}}}


def display_name(config: str) -> str:
    """cae-8 -> CAE (8), the study's row names."""
    kind, latent_dim = config.rsplit("-", 1)
    return f"{kind.upper().replace('_', '-')} ({latent_dim})"


def study_configurations(params: Params) -> list[str]:
    """Table 1's rows in the study's order: CAE (8), CVAE (8), CAE (16), ..."""
    return [config_name(kind, d) for d in params.study.latent_dims for kind in params.study.models]


def pcvae_configurations(params: Params) -> list[str]:
    """The prior CVAE's rows, beyond the study, by latent size: PCVAE (16), PCVAE (32)."""
    return [config_name(PCVAE, d) for d in params.pcvae.latent_dims]


def configurations(params: Params) -> list[str]:
    """The study's rows, the label-conditioned CVAE's as an extra row, then the prior CVAE's."""
    return (
        study_configurations(params)
        + [config_name(LABEL_CVAE, params.label_cvae.latent_dim)]
        + pcvae_configurations(params)
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


def summarize(evaluations: dict[str, dict[str, dict[str, float]]]) -> Summary:
    """Mean, sample std (0 for a single seed) and number of seeds of every numeric metric."""
    summary = {}
    for config, seeds in evaluations.items():
        frame = pd.DataFrame.from_dict(seeds, orient="index").select_dtypes("number")
        std = frame.std(ddof=1).fillna(0.0) if len(frame) > 1 else frame.mean() * 0.0
        summary[config] = {
            m: {"mean": float(frame[m].mean()), "std": float(std[m]), "n": int(frame[m].count())} for m in frame.columns
        }
    return summary


def metrics_files(summary: Summary) -> dict[str, dict[str, float]]:
    """The headline, one small file per configuration ({file name: {metric: mean}}): `dvc metrics show` prints
    one row per file, so the names put the latent size first (zero-padded: 08 sorts before 16) and CAE and CVAE of
    one size sit next to each other; the std is in summary.json, and Table 1 shows both."""
    width = max(len(config.rsplit("-", 1)[1]) for config in summary)
    files = {}
    for config, metrics in summary.items():
        kind, latent_dim = config.rsplit("-", 1)
        files[f"{latent_dim.zfill(width)}-{kind}.json"] = {m: metrics[m]["mean"] for m in TABLE_COLUMNS if m in metrics}
    return files


def paper_table() -> pd.DataFrame:
    with resources.files("digitgen").joinpath("paper_table1.csv").open() as f:
        return pd.read_csv(f, index_col="configuration")


# ---- the tests -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    """One difference a - b, tested: its interval, degrees of freedom, two-sided p and how it was computed."""

    difference: float
    low: float
    high: float
    df: float
    p: float
    note: str


def welch(a: dict[str, float], b: dict[str, float], confidence: float, names: tuple[str, str]) -> Test:
    """Welch's t on a's and b's mean, std (ddof=1) and n: a - b, its interval at `confidence`, the two-sided p.

    No spread in one family: its variance term is 0, and the same formulas are a one-sample t of the other
    family against the constant (df = n - 1), said in `note`. No spread in either: equal means are not separable
    (p = 1), different ones are separated exactly (p = 0, the interval the difference itself). A family of one
    seed has no spread to test against (p NaN: no test, left out of Holm's adjustment).
    """
    difference = a["mean"] - b["mean"]
    if min(a["n"], b["n"]) < 2:
        return Test(difference, math.nan, math.nan, math.nan, math.nan, "one seed: no spread to test against")
    va, vb = a["std"] ** 2 / a["n"], b["std"] ** 2 / b["n"]
    if va + vb == 0:
        if difference == 0:
            return Test(0.0, 0.0, 0.0, math.nan, 1.0, "no spread in either family, equal: not separable")
        return Test(difference, difference, difference, math.inf, 0.0, "no spread in either family: separated exactly")
    df = (va + vb) ** 2 / sum(v**2 / (n - 1) for v, n in ((va, a["n"]), (vb, b["n"])) if v > 0)
    se = math.sqrt(va + vb)
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    p = float(2 * stats.t.sf(abs(difference) / se, df))
    note = "Welch"
    if va == 0 or vb == 0:
        still, other = (names[0], names[1]) if va == 0 else (names[1], names[0])
        note = f"{still} has no spread: one-sample t of {other} against it"
    return Test(difference, difference - half, difference + half, df, p, note)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m - i + 1), kept monotone and at most 1.
    NaN (no test) stays NaN and is not counted in m."""
    tested = sorted((value, i) for i, value in enumerate(p) if not math.isnan(value))
    adjusted = [math.nan] * len(p)
    running = 0.0
    for rank, (value, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * value))
        adjusted[i] = running
    return adjusted


def seeds_needed(difference: float, std_a: float, std_b: float, alpha: float, power: float) -> float:
    """Seeds per family for a two-sided test at level `alpha` to separate `difference` with probability `power`,
    if the observed stds held: the smallest n with |d| / se(n) >= t(1 - alpha/2) + t(power), t with Welch's
    degrees of freedom at n (the usual shifted-t approximation of the noncentral t; the normal one for large n).
    Infinite for a difference of 0, and past 100,000 seeds."""
    if difference == 0:
        return math.inf
    for n in range(2, 100_001):
        va, vb = std_a**2 / n, std_b**2 / n
        if va + vb == 0:
            return float(n)
        df = (va + vb) ** 2 / sum(v**2 / (n - 1) for v in (va, vb) if v > 0)
        if abs(difference) / math.sqrt(va + vb) >= stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df):
            return float(n)
    return math.inf


def _seeds(a: dict, b: dict) -> str:
    return str(a["n"]) if a["n"] == b["n"] else f"{a['n']} and {b['n']}"


def family_comparison(summary: Summary, params: Params) -> pd.DataFrame:
    """CAE - CVAE per latent size and metric (Table 1's five, then the extra ones where both families have them):
    difference, interval, p, Holm's p over every row, a verdict, and for a difference not separable the seeds
    per family that would separate it at `compare.power` (at Bonferroni's level alpha / m, Holm's strictest)."""
    first, second = MODEL_KINDS
    alpha = 1 - params.compare.confidence
    rows = []
    both = set(MODEL_KINDS) <= set(params.study.models)  # a study of one family has nothing to compare
    for latent_dim in params.study.latent_dims if both else []:
        a, b = summary[config_name(first, latent_dim)], summary[config_name(second, latent_dim)]
        for metric in [m for m in (*TABLE_COLUMNS, *EXTRA_METRICS) if m in a and m in b]:
            test = welch(a[metric], b[metric], params.compare.confidence, (first.upper(), second.upper()))
            rows.append(
                {"latent_dim": latent_dim, "metric": metric, **asdict(test), "seeds": _seeds(a[metric], b[metric])}
            )
    frame = pd.DataFrame(rows, columns=["latent_dim", "metric", *Test.__dataclass_fields__, "seeds"])
    frame["p_holm"] = holm(frame["p"].tolist())
    verdicts, needed = [], []
    for row in frame.itertuples():
        a, b = summary[config_name(first, row.latent_dim)], summary[config_name(second, row.latent_dim)]
        if math.isnan(row.p_holm):
            verdicts.append(f"no test with {row.seeds} seed(s)")
            needed.append(math.nan)
        elif row.p_holm < alpha:
            winner = first if (row.difference > 0) == (METRICS[row.metric] == "higher") else second
            verdicts.append(f"{winner.upper()} better")
            needed.append(math.nan)
        else:
            verdicts.append(f"not separable with {row.seeds} seeds")
            sa, sb = a[row.metric]["std"], b[row.metric]["std"]
            needed.append(seeds_needed(row.difference, sa, sb, alpha / len(frame), params.compare.power))
    frame["verdict"], frame["seeds_needed"] = verdicts, needed
    frame.insert(2, "direction", [METRICS[m] for m in frame["metric"]])
    return frame


def paper_comparison(summary: Summary, params: Params) -> pd.DataFrame:
    """Ours - paper per Table 1 cell (the study's configurations the paper reports): Welch's t against the paper's
    mean and std with `compare.paper_seeds` seeds, Holm's p over every cell, and whether they differ."""
    paper, compare = paper_table(), params.compare
    rows = []
    for config in [c for c in study_configurations(params) if c in paper.index]:
        for metric in [m for m in TABLE_COLUMNS if m in summary[config]]:
            theirs = {
                "mean": paper.at[config, f"{metric}_mean"],
                "std": paper.at[config, f"{metric}_std"],
                "n": compare.paper_seeds,
            }
            test = welch(summary[config][metric], theirs, compare.confidence, ("ours", "the paper"))
            rows.append({"model": display_name(config), "metric": metric, **asdict(test)})
    frame = pd.DataFrame(rows)
    frame["p_holm"] = holm(frame["p"].tolist())
    frame["differs"] = frame["p_holm"] < 1 - compare.confidence
    return frame


# ---- Table 1 ---------------------------------------------------------------------------------------------------


PAPER_DECIMALS = 2  # the paper prints its means to two decimals: Table 1 shows them at ours' precision, no finer


def decimals(values: list[float]) -> int:
    """Decimals Table 1 shows for a column of means: 3 for a share (every value in [0, 1]: the accuracies), else
    three significant digits of the column's median (IS 7.80, reconstruction 82.6, FID 772)."""
    if all(0 <= v <= 1 for v in values):
        return 3
    median = abs(float(pd.Series(values).median()))
    return max(0, 2 - math.floor(math.log10(median))) if median > 0 else 3


def best_configs(summary: Summary, metrics=TABLE_COLUMNS) -> dict[str, set[str]]:
    """For each metric, the configurations whose mean is best in that metric's direction at the precision Table 1
    shows (ties share it: four CAEs at 1.000)."""
    best = {}
    for metric in metrics:
        scored = {c: s[metric]["mean"] for c, s in summary.items() if metric in s}
        shown = {c: round(v, decimals(list(scored.values()))) for c, v in scored.items()}
        top = (max if METRICS[metric] == "higher" else min)(shown.values())
        best[metric] = {c for c, v in shown.items() if v == top}
    return best


def display_table(summary: Summary, differs: dict[tuple[str, str], bool]) -> pd.DataFrame:
    """Table 1 as table.md shows it, one cell per metric: ours as mean ± std (the best in **bold**), the paper's
    mean in brackets, and † where `differs[(row name, metric)]`."""
    paper, best = paper_table(), best_configs(summary)
    places = {m: decimals([s[m]["mean"] for s in summary.values() if m in s]) for m in TABLE_COLUMNS}
    rows = {}
    for config, metrics in summary.items():
        row = {}
        for metric, label in TABLE_COLUMNS.items():
            if metric not in metrics:  # e.g. the label CVAE's classification accuracy: it has no digit head
                row[label] = "n/a"
                continue
            d = places[metric]
            cell = f"{metrics[metric]['mean']:.{d}f} ± {metrics[metric]['std']:.{d}f}"
            cell = f"**{cell}**" if config in best[metric] else cell
            if config in paper.index:
                cell += f" ({paper.at[config, f'{metric}_mean']:.{min(d, PAPER_DECIMALS)}f})" + (
                    " †" if differs.get((display_name(config), metric)) else ""
                )
            row[label] = cell
        rows[display_name(config)] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


def numeric_table(summary: Summary) -> pd.DataFrame:
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
            paper_mean = float(paper.at[config, f"{metric}_mean"]) if known else None
            row[f"{metric}_paper_mean"] = paper_mean
            row[f"{metric}_paper_std"] = float(paper.at[config, f"{metric}_std"]) if known else None
            row[f"{metric}_ours_minus_paper"] = None if paper_mean is None else ours["mean"] - paper_mean
        rows[display_name(config)] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


def with_pcvae_block(frame: pd.DataFrame, pcvae_rows: list[str]) -> pd.DataFrame:
    """Table 1 for reading: a heading row, beyond the study, above the prior CVAE's rows."""
    study = frame.drop(index=pcvae_rows)
    heading = pd.DataFrame({column: [""] for column in frame.columns}, index=[PCVAE_BLOCK])
    return pd.concat([study, heading, frame.loc[pcvae_rows]]).rename_axis(frame.index.name)


def fidelity_table(summary: Summary, points: dict[str, dict[str, float]]) -> pd.DataFrame:
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
            name: {
                label: cell(m, points[point][m], None) if m in points[point] else "n/a"
                for m, label in FIDELITY_COLUMNS.items()
            }
            for point, name in REFERENCE_POINTS.items()
        }
    )
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Model"
    return frame


# ---- the written forms -----------------------------------------------------------------------------------------


def markdown(frame: pd.DataFrame, index: bool = True) -> str:
    """A pipe table, each column as wide as its widest cell or header and no wider (pandas' to_markdown pads each
    header by two more): Table 1 in about 140 characters a row."""
    frame = frame.reset_index() if index else frame
    rows = [list(map(str, frame.columns))] + [["" if v is None else str(v) for v in row] for row in frame.to_numpy()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def _seed_list(evaluations: dict, configs: list[str]) -> str:
    seeds = sorted({int(s) for c in configs for s in evaluations[c]})
    return ", ".join(map(str, seeds))


def table_markdown(frame: pd.DataFrame, evaluations: dict, params: Params) -> str:
    level = round(100 * (1 - params.compare.confidence), 2)
    return (
        f"Table 1: ours as mean ± std over seeds ({_seed_list(evaluations, study_configurations(params))}; beyond "
        f"the study: {_seed_list(evaluations, pcvae_configurations(params))}), the paper's mean in brackets; best of "
        f"each column in bold (ties at the shown precision share it); † marks a difference from the paper at the "
        f"{level:g}% level after Holm's adjustment over the table's cells (Welch's "
        f"t, the paper's std taken from {params.compare.paper_seeds} seeds: results/comparison.md). The paper's std "
        "and ours - paper are in results/table.csv.\n\n"
        + markdown(with_pcvae_block(frame, [display_name(c) for c in pcvae_configurations(params)]))
    )


def _number(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _p(value: float) -> str:
    return "-" if math.isnan(value) else "< 0.001" if value < 0.001 else f"{value:.3f}"


def _intervals(frame: pd.DataFrame) -> list[str]:
    return [f"[{_number(low)}, {_number(high)}]" for low, high in zip(frame["low"], frame["high"], strict=True)]


def comparison_markdown(families: pd.DataFrame, paper: pd.DataFrame, params: Params) -> str:
    compare = params.compare
    level, percent = 1 - compare.confidence, f"{100 * compare.confidence:g}%"
    first, second = (k.upper() for k in MODEL_KINDS)
    names = {**TABLE_COLUMNS, **EXTRA_METRICS}
    family_rows = pd.DataFrame(
        {
            "Metric": families["metric"].map(names),
            "Better": families["direction"],
            "Latent": families["latent_dim"],
            f"{first} - {second}": families["difference"].map(_number),
            f"{percent} interval": _intervals(families),
            "p": families["p"].map(_p),
            "p (Holm)": families["p_holm"].map(_p),
            "Verdict": families["verdict"],
            f"Seeds for {100 * compare.power:g}% power": families["seeds_needed"].map(
                lambda n: "" if math.isnan(n) else "never: no difference" if math.isinf(n) else f"{n:.0f}"
            ),
        }
    )
    exact = [
        f"{names[metric]} at {', '.join(map(str, rows['latent_dim']))}: {note}"
        for (metric, note), rows in families[families["note"] != "Welch"].groupby(["metric", "note"], sort=False)
    ]
    paper_rows = pd.DataFrame(
        {
            "Model": paper["model"],
            "Metric": paper["metric"].map(TABLE_COLUMNS),
            "Ours - paper": paper["difference"].map(_number),
            f"{percent} interval": _intervals(paper),
            "p": paper["p"].map(_p),
            "p (Holm)": paper["p_holm"].map(_p),
            "Differs (†)": paper["differs"].map({True: "yes †", False: "no"}),
        }
    )
    return (
        f"## {first} against {second}\n\n"
        f"{first} - {second} per latent size and metric, over the seeds of each configuration: the difference of the "
        f"means, its {percent} interval (Welch's t, Welch-Satterthwaite degrees of freedom), the two-sided p, and p "
        f"after Holm's adjustment over all {len(families)} rows. A verdict names the better family where Holm's p "
        f"is below {level:g}; otherwise the difference is not separable with these seeds, and the last column gives "
        f"the seeds per family that would separate the observed difference with {100 * compare.power:g}% power at the "
        f"observed stds (Welch's t at Bonferroni's level {level:g}/{len(families)}, the strictest of Holm's steps, "
        "its noncentral t approximated by a shifted t). A family with no spread over its seeds adds no variance: "
        "Welch's t is then a one-sample t of the other family against its constant value; two families without "
        "spread are separated exactly or, equal, not at all"
        + (f". Rows tested so: {'; '.join(exact)}" if exact else "")
        + ". results/comparison.csv holds every number, results/comparison.png draws them.\n\n"
        + markdown(family_rows, index=False)
        + f"\n\n## Ours against the paper\n\nOurs - the paper's mean per Table 1 cell: Welch's t against the paper's "
        f"mean and std, taking that std from {compare.paper_seeds} seeds (the paper does not say; an assumption, "
        f"`compare.paper_seeds`), p after Holm's adjustment over all {len(paper)} cells; † in Table 1 marks the "
        f"cells where it is below {level:g}. The paper rounds its means to two decimals, which its stds can be "
        "smaller than; the test does not widen for that.\n\n" + markdown(paper_rows, index=False)
    )


def comparison_csv(families: pd.DataFrame, paper: pd.DataFrame) -> str:
    """Both comparisons as one long table: comparison, model or latent size, metric and every number."""
    first, second = (k.upper() for k in MODEL_KINDS)
    both = pd.concat(
        [
            families.assign(comparison=f"{first} - {second}", model=""),
            paper.assign(comparison="ours - paper", latent_dim=None, direction=paper["metric"].map(METRICS)),
        ]
    )
    columns = ["comparison", "latent_dim", "model", "metric", "direction", "difference", "low", "high", "df", "p"]
    columns += ["p_holm", "verdict", "differs", "seeds_needed", "note"]
    return both[columns].to_csv(index=False, float_format="%.6g")


def forest_plot(families: pd.DataFrame, params: Params) -> bytes:
    """One panel per metric: CAE - CVAE and its interval per latent size, filled where separable."""
    first, second = (k.upper() for k in MODEL_KINDS)
    names = {**TABLE_COLUMNS, **EXTRA_METRICS}
    panels = {
        f"{names[metric]}\n({rows['direction'].iloc[0]} is better)": [
            (str(r.latent_dim), r.difference, r.low, r.high, r.p_holm < 1 - params.compare.confidence)
            for r in rows.itertuples()
        ]
        for metric, rows in families.groupby("metric", sort=False)
    }
    return figures.png(
        figures.forest(
            panels,
            f"{first} - {second} per latent size: difference of the means and its {100 * params.compare.confidence:g}% "
            "interval (Welch); filled: separable after Holm's adjustment",
            "latent size",
        )
    )


def run_tables(params: Params, eval_dir: Path, reference_path: Path, out_dir: Path) -> str:
    """Every output from the evaluations, written together; returns Table 1 as table.md holds it."""
    configs = configurations(params)
    evaluations = load_evaluations(eval_dir, configs)
    summary = summarize(evaluations)
    families, paper = family_comparison(summary, params), paper_comparison(summary, params)
    differs = {(row.model, row.metric): bool(row.differs) for row in paper.itertuples()}
    frame = display_table(summary, differs)
    table = table_markdown(frame, evaluations, params)
    fidelity = fidelity_table(summary, json.loads(Path(reference_path).read_text())["points"])
    out_dir = Path(out_dir)
    outputs: dict[Path, str | bytes] = {
        out_dir / "summary.json": json.dumps(summary, indent=2) + "\n",
        **{
            out_dir / "metrics" / name: json.dumps(values, indent=2) + "\n"
            for name, values in metrics_files(summary).items()
        },
        out_dir / "table.md": table,
        out_dir / "table.csv": numeric_table(summary).to_csv(float_format="%.6g"),
        out_dir / "fidelity.csv": fidelity.to_csv(),
        out_dir / "fidelity.md": (
            "Table 1's companion: generated images against the test images in the classifier's feature space, mean "
            "± std over seeds; KID is the unbiased MMD estimate (×1000), precision/recall torch-fidelity's k-NN (k = "
            f"{params.evaluate.prc_neighborhood}); the reference points are scored the same way (one run each). "
            "Floor: the decoder floor, the same three numbers for held-out (validation) digits reconstructed from "
            "image and digit, which no draw from the prior can beat; n/a where not computed (evaluations older "
            "than the metric, and the reference points, which decode nothing).\n\n" + markdown(fidelity)
        ),
        out_dir / "comparison.md": comparison_markdown(families, paper, params),
        out_dir / "comparison.csv": comparison_csv(families, paper),
        out_dir / "comparison.png": forest_plot(families, params),
    }
    write_together(outputs, out_dir, replace=[out_dir / "metrics"])
    return table
