"""The tables stage: Table 1 beside the paper's, and CAE against CVAE and ours against the paper, tested."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, SEEDS, make_params
from scipy import stats

from digitgen import compare, files
from digitgen.compare import (
    PCVAE_BLOCK,
    REFERENCE_POINTS,
    TABLE_COLUMNS,
    best_configs,
    configurations,
    display_table,
    family_comparison,
    fidelity_table,
    holm,
    load_evaluations,
    metrics_files,
    numeric_table,
    paper_comparison,
    run_tables,
    seeds_needed,
    study_configurations,
    summarize,
    welch,
    with_pcvae_block,
)
from digitgen.params import CompareParams, DigitgenError, load_params

PARAMS = make_params(study={"models": ["cae", "cvae"], "latent_dims": [8]})


def _stats(values) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "n": len(values)}


def _families(cae: dict[str, list[float]], cvae: dict[str, list[float]]) -> dict:
    """A summary of one latent size from per-seed values {metric: [seed values]} of each family."""
    return {
        "cae-8": {metric: _stats(values) for metric, values in cae.items()},
        "cvae-8": {metric: _stats(values) for metric, values in cvae.items()},
    }


# ---- the tests themselves --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b",
    [
        ([771.6, 780.2, 763.0], [760.7, 748.1, 773.3]),  # FID-like, spread in both
        ([0.962, 0.964, 0.960, 0.961, 0.965], [0.951, 0.953, 0.955]),  # unequal seeds and spreads
        ([1.0, 1.0, 1.0], [0.9856, 0.9842, 0.9869]),  # the CAE's generated accuracy: no spread in one family
    ],
    ids=["spread", "unequal-n", "one-without-spread"],
)
def test_welch_agrees_with_scipy_on_the_same_numbers(a, b):
    ours = welch(_stats(a), _stats(b), 0.95, ("CAE", "CVAE"))
    theirs = stats.ttest_ind(a, b, equal_var=False)
    interval = theirs.confidence_interval(0.95)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours.df == pytest.approx(theirs.df, rel=1e-9)
    assert (ours.low, ours.high) == pytest.approx((interval.low, interval.high), rel=1e-9)
    assert ours.difference == pytest.approx(np.mean(a) - np.mean(b))


def test_no_spread_in_one_family_is_a_one_sample_t_of_the_other_and_says_so():
    cae, cvae = [1.0, 1.0, 1.0], [0.9856, 0.9842, 0.9869]
    ours = welch(_stats(cae), _stats(cvae), 0.95, ("CAE", "CVAE"))
    one_sample = stats.ttest_1samp(cvae, 1.0)
    assert ours.p == pytest.approx(one_sample.pvalue) and ours.df == pytest.approx(2)
    assert ours.note == "CAE has no spread: one-sample t of CVAE against it"


def test_no_spread_in_either_family_is_equal_or_separated_exactly():
    same = welch(_stats([1.0, 1.0, 1.0]), _stats([1.0, 1.0, 1.0]), 0.95, ("CAE", "CVAE"))
    assert (same.difference, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    assert "not separable" in same.note
    apart = welch(_stats([0.001] * 3), _stats([1.0] * 3), 0.95, ("CAE", "CVAE"))
    assert apart.p == 0.0 and apart.low == apart.high == pytest.approx(-0.999)
    assert "separated exactly" in apart.note


def test_one_seed_is_no_test():
    single = welch({"mean": 1.0, "std": 0.0, "n": 1}, _stats([0.9, 0.8]), 0.95, ("CAE", "CVAE"))
    assert math.isnan(single.p) and "one seed" in single.note


def test_holm_on_the_textbook_example():
    """R's p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02; a NaN (no test) is not counted."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.01, math.nan, 0.04, 0.03, 0.005])
    assert math.isnan(adjusted[1]) and [adjusted[i] for i in (0, 2, 3, 4)] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([0.04, 0.03]) == [0.06, 0.06]  # capped at 1, kept monotone


def test_seeds_needed_follow_the_textbook_sample_size_and_grow_with_noise():
    """d = 1, sd = 1 in each family, 5% two-sided, 80% power: the normal approximation's 2 (1.96 + 0.84)^2 = 15.7,
    so 16 per family; the t correction adds a seed."""
    assert seeds_needed(1.0, 1.0, 1.0, 0.05, 0.8) == 17
    assert seeds_needed(1.0, 2.0, 2.0, 0.05, 0.8) > seeds_needed(1.0, 1.0, 1.0, 0.05, 0.8)
    assert seeds_needed(0.0, 1.0, 1.0, 0.05, 0.8) == math.inf


# ---- CAE against CVAE ------------------------------------------------------------------------------------------


def test_two_identical_families_are_not_separated():
    values = {"fid": [770.0, 760.0, 780.0], "gen_accuracy": [0.98, 0.99, 0.97]}
    frame = family_comparison(_families(values, values), PARAMS)
    assert (frame["verdict"] == "not separable with 3 seeds").all()
    assert (frame["difference"] == 0).all() and frame["p"].tolist() == pytest.approx([1.0, 1.0])
    assert (frame["seeds_needed"] == math.inf).all()  # no observed difference: no number of seeds separates it


@pytest.mark.parametrize("higher_is_better", [True, False], ids=["gen_accuracy", "fid"])
def test_a_large_difference_is_separated_in_the_metrics_direction(higher_is_better):
    metric = "gen_accuracy" if higher_is_better else "fid"
    low, high = [0.50, 0.51, 0.49, 0.50], [0.90, 0.91, 0.89, 0.90]
    frame = family_comparison(_families({metric: high}, {metric: low}), PARAMS)  # the CAE's values are higher
    (row,) = frame.itertuples()
    assert row.difference == pytest.approx(0.4) and row.low > 0 and row.p_holm < 0.05
    assert row.verdict == ("CAE better" if higher_is_better else "CVAE better")
    assert math.isnan(row.seeds_needed)  # separated already


def test_raised_seeds_flow_into_the_verdicts():
    params = make_params(study={"models": ["cae", "cvae"], "latent_dims": [8]}, train={"seeds": [0, 1, 2, 3, 4]})
    values = {"fid": [770.0, 760.0, 780.0, 775.0, 765.0]}
    frame = family_comparison(_families(values, values), params)
    assert frame.at[0, "verdict"] == "not separable with 5 seeds"


def test_every_comparison_is_holm_adjusted_over_the_table():
    cae = {"fid": [770.0, 760.0, 780.0], "gen_accuracy": [1.0, 1.0, 1.0], "kid": [1.0, 2.0, 3.0]}
    cvae = {"fid": [750.0, 745.0, 755.0], "gen_accuracy": [0.98, 0.99, 0.985], "kid": [1.5, 2.5, 3.0]}
    frame = family_comparison(_families(cae, cvae), PARAMS)
    assert list(frame["metric"]) == ["gen_accuracy", "fid", "kid"]  # Table 1's order, then the extra metrics
    assert frame["p_holm"].tolist() == pytest.approx(holm(frame["p"].tolist()))
    not_separable = frame[frame["verdict"].str.startswith("not separable")]
    assert not_separable["seeds_needed"].notna().all() and (not_separable["seeds_needed"] >= 2).all()


# ---- ours against the paper, and Table 1 ------------------------------------------------------------------------


def test_the_paper_test_assumes_its_seeds_and_marks_differences_after_holm():
    params = load_params(REPO / "params.yaml")  # the committed full run's evaluations
    summary = summarize(load_evaluations(REPO / "results" / "evaluation", study_configurations(params)))
    paper = paper_comparison(summary, params)
    assert len(paper) == 40 and paper["p_holm"].tolist() == pytest.approx(holm(paper["p"].tolist()))
    assert (paper["differs"] == (paper["p_holm"] < 0.05)).all()
    fid = paper[(paper["model"] == "CAE (8)") & (paper["metric"] == "fid")].iloc[0]
    theirs = stats.ttest_ind_from_stats(
        summary["cae-8"]["fid"]["mean"], summary["cae-8"]["fid"]["std"], 3, 424.12, 3.19, 3, equal_var=False
    )
    assert fid["p"] == pytest.approx(theirs.pvalue)
    more = paper_comparison(summary, dataclasses.replace(params, compare=CompareParams(paper_seeds=10)))
    fid_10 = more[(more["model"] == "CAE (8)") & (more["metric"] == "fid")].iloc[0]
    assert fid_10["p"] == pytest.approx(
        stats.ttest_ind_from_stats(
            summary["cae-8"]["fid"]["mean"], summary["cae-8"]["fid"]["std"], 3, 424.12, 3.19, 10, equal_var=False
        ).pvalue
    )


def test_table_one_is_one_cell_per_metric_ours_then_the_papers_mean():
    summary = summarize(SEEDS)
    frame = display_table(summary, {("CAE (8)", "fid"): True})
    assert list(frame.columns) == list(TABLE_COLUMNS.values())
    assert frame.at["CVAE (8)", "FID"] == "**11.0 ± 1.4** (419.5)"
    assert frame.at["CAE (8)", "FID"] == "32.0 ± 2.8 (424.1) †"
    # the paper's 0.90 as it prints it
    assert frame.at["CAE (8)", "Generated Images Accuracy"] == "**0.850 ± 0.071** (0.90)"


def test_ties_at_the_shown_precision_share_the_bold():
    tied = {c: {"gen_accuracy": {"mean": m, "std": 0.0, "n": 3}} for c, m in (("a-8", 1.0), ("b-8", 0.99996))}
    assert best_configs({**tied, "c-8": {"gen_accuracy": {"mean": 0.98, "std": 0.0, "n": 3}}}, ["gen_accuracy"]) == {
        "gen_accuracy": {"a-8", "b-8"}
    }


def test_the_committed_table_one_fits_about_140_characters_a_row():
    params = load_params(REPO / "params.yaml")
    evaluations = load_evaluations(REPO / "results" / "evaluation", configurations(params))
    table = compare.table_markdown(display_table(summarize(evaluations), {}), evaluations, params)
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert max(map(len, rows)) <= 145
    assert sum("**1.000 ± 0.000**" in row for row in rows) == 4  # the four CAEs' generated accuracy, tied


def test_table_csv_keeps_its_plain_number_columns():
    frame = numeric_table(summarize(SEEDS))
    assert frame.at["CVAE (8)", "fid_mean"] == 11.0 and frame.at["CVAE (8)", "fid_std"] == pytest.approx(1.4142136)
    assert frame.at["CAE (8)", "fid_paper_mean"] == 424.12 and frame.at["CAE (8)", "fid_paper_std"] == 3.19
    assert frame.at["CAE (8)", "fid_ours_minus_paper"] == pytest.approx(32.0 - 424.12)
    assert not frame.map(lambda v: isinstance(v, str)).any().any()  # no "**bold**", no "±": numbers


def test_mean_and_sample_std_over_seeds():
    summary = summarize(SEEDS)
    assert summary["cae-8"]["fid"] == {"mean": 32.0, "std": pytest.approx(2.8284271), "n": 2}
    assert summarize({"cae-8": {"0": SEEDS["cae-8"]["0"]}})["cae-8"]["fid"] == {
        "mean": 30.0,
        "std": 0.0,
        "n": 1,
    }


def test_a_missing_configuration_is_an_error_naming_it(tmp_path):
    (tmp_path / "cae-8.json").write_text(json.dumps({"seeds": SEEDS["cae-8"]}))
    with pytest.raises(DigitgenError, match=r"cvae-8.json is missing.*evaluate@cvae-8"):
        load_evaluations(tmp_path, ["cae-8", "cvae-8"])


def test_rows_follow_the_studys_order_then_the_label_cvae_then_the_pcvae():
    params = make_params(
        study={"models": ["cae", "cvae"], "latent_dims": [8, 16]},
        label_cvae={"latent_dim": 2},
        pcvae={"latent_dims": [16, 32]},
    )
    assert study_configurations(params) == ["cae-8", "cvae-8", "cae-16", "cvae-16"]
    assert configurations(params) == ["cae-8", "cvae-8", "cae-16", "cvae-16", "label_cvae-2", "pcvae-16", "pcvae-32"]
    shown = with_pcvae_block(display_table(summarize({**SEEDS, "pcvae-16": SEEDS["cvae-8"]}), {}), ["PCVAE (16)"])
    assert list(shown.index) == ["CAE (8)", "CVAE (8)", PCVAE_BLOCK, "PCVAE (16)"]


def test_a_metric_a_model_cannot_have_is_na_and_never_best():
    label = {seed: {k: v for k, v in m.items() if k != "classification_accuracy"} for seed, m in SEEDS["cae-8"].items()}
    frame = display_table(summarize({**SEEDS, "label_cvae-2": {s: {**m, "fid": 1.0} for s, m in label.items()}}), {})
    assert frame.at["LABEL-CVAE (2)", "Classification Accuracy"] == "n/a"
    assert frame.at["LABEL-CVAE (2)", "FID"] == "**1.0 ± 0.0**"  # best FID, and no paper value: no brackets
    assert frame.at["CAE (8)", "Classification Accuracy"].startswith("**")


def test_the_companion_table_puts_kid_precision_recall_beside_the_reference_points():
    fidelity = {"kid": 0.002, "precision": 0.9, "recall": 0.8, "fid_per_digit": 40.0, "distinct_fraction": 1.0}
    seeds = {config: {seed: {**values, **fidelity} for seed, values in runs.items()} for config, runs in SEEDS.items()}
    points = {point: {**SEEDS["cae-8"]["0"], **fidelity, "fid": 1.5} for point in REFERENCE_POINTS}
    frame = fidelity_table(summarize({**seeds, "label_cvae-2": SEEDS["cae-8"]}), points)
    assert frame.at["CVAE (8)", "FID"] == "11 ± 1.4" and frame.at["CVAE (8)", "KID"] == "2 ± 0"  # KID x 1000
    assert frame.at["LABEL-CVAE (2)", "Precision"] == "n/a"
    assert list(frame.index[-len(REFERENCE_POINTS) :]) == list(REFERENCE_POINTS.values())


def test_the_companion_table_shows_the_decoder_floor_where_it_was_measured():
    floor = {"recon_fid": 20.0, "recon_precision": 0.9, "recon_recall": 0.5}
    seeds = {"cvae-8": {seed: {**values, **floor} for seed, values in SEEDS["cvae-8"].items()}, "cae-8": SEEDS["cae-8"]}
    points = {point: {**SEEDS["cae-8"]["0"], "fid": 1.5} for point in REFERENCE_POINTS}
    frame = fidelity_table(summarize(seeds), points)
    assert frame.loc["CVAE (8)", ["Floor FID", "Floor precision", "Floor recall"]].tolist() == [
        "20 ± 0",
        "0.9 ± 0",
        "0.5 ± 0",
    ]
    assert frame.at["CAE (8)", "Floor FID"] == "n/a"  # an evaluation older than the metric
    assert frame.at[REFERENCE_POINTS["held_out_real"], "Floor FID"] == "n/a"  # a reference point decodes nothing


# ---- the headline metrics and the written set ------------------------------------------------------------------


def test_the_headline_is_one_small_file_per_configuration_cae_and_cvae_of_a_size_together():
    summary = summarize(
        {
            **SEEDS,
            "cae-16": SEEDS["cae-8"],
            "cvae-16": SEEDS["cvae-8"],
            "label_cvae-2": SEEDS["cae-8"],
        }
    )
    written = metrics_files(summary)
    assert sorted(written) == ["02-label_cvae.json", "08-cae.json", "08-cvae.json", "16-cae.json", "16-cvae.json"]
    assert all(set(values) == set(TABLE_COLUMNS) for values in written.values())  # means only: five columns
    assert written["08-cvae.json"]["fid"] == 11.0


def _inputs(root, seeds=SEEDS):
    (root / "evaluation").mkdir(parents=True)
    params = make_params(
        study={"models": ["cae", "cvae"], "latent_dims": [8]},
        label_cvae={"latent_dim": 2},
        pcvae={"latent_dims": [16]},
    )
    for config in configurations(params):
        runs = seeds.get(config, SEEDS["cae-8"])
        (root / "evaluation" / f"{config}.json").write_text(json.dumps({"config": config, "seeds": runs}))
    point = {**SEEDS["cae-8"]["0"], "kid": 0.0, "precision": 1.0, "recall": 1.0, "fid_per_digit": 1.0}
    (root / "reference.json").write_text(
        json.dumps({"points": {p: {**point, "distinct_fraction": 1.0} for p in REFERENCE_POINTS}})
    )
    return params


def test_the_stage_writes_every_output_from_the_evaluations_alone(tmp_path):
    params = _inputs(tmp_path)
    table = run_tables(params, tmp_path / "evaluation", tmp_path / "reference.json", tmp_path / "results")
    out = tmp_path / "results"
    names = {"summary.json", "table.md", "table.csv", "fidelity.md", "fidelity.csv", "comparison.md", "comparison.csv"}
    assert names | {"comparison.png", "metrics"} == {p.name for p in out.iterdir()}
    assert table == (out / "table.md").read_text() and "Holm" in table
    both = pd.read_csv(out / "comparison.csv")
    assert set(both["comparison"]) == {"CAE - CVAE", "ours - paper"}
    assert {"difference", "low", "high", "p", "p_holm", "verdict", "seeds_needed", "note"} <= set(both.columns)
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_a_study_of_one_family_has_no_family_comparison_but_every_output(tmp_path):
    params = _inputs(tmp_path)
    one = dataclasses.replace(params, study=dataclasses.replace(params.study, models=["cvae"]))
    run_tables(one, tmp_path / "evaluation", tmp_path / "reference.json", tmp_path / "results")
    both = pd.read_csv(tmp_path / "results" / "comparison.csv")
    assert set(both["comparison"]) == {"ours - paper"}


def test_a_failure_part_way_leaves_every_old_output_as_it_was(tmp_path, monkeypatch):
    params = _inputs(tmp_path)
    out = tmp_path / "results"
    run_tables(params, tmp_path / "evaluation", tmp_path / "reference.json", out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = {c: {s: {**m, "fid": m["fid"] + 100} for s, m in runs.items()} for c, runs in SEEDS.items()}
    _inputs(tmp_path / "new", changed)
    written = []
    real = files.write_atomic

    def dies_on_the_fifth(path, data):  # a full disk, or a kill, while the set is being staged
        if len(written) == 4:
            raise files.storage_error(OSError(28, "No space left on device"), path)
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(files, "write_atomic", dies_on_the_fifth)
    with pytest.raises(files.StorageError, match="no space left"):
        run_tables(params, tmp_path / "new" / "evaluation", tmp_path / "reference.json", out)
    assert len(written) == 4  # four new files were staged ...
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # ... and none replaced an old one
    assert not list(out.glob(".staging-*"))


def test_a_staging_folder_left_by_a_killed_run_is_removed(tmp_path):
    (tmp_path / ".staging-999999999").mkdir()  # no such process: pids stop far below
    (tmp_path / f".staging-{os.getpid()}").mkdir()
    files.write_together({tmp_path / "a.txt": "a"}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_the_forest_plot_has_one_panel_per_compared_metric(monkeypatch):
    cae = {"fid": [770.0, 760.0, 780.0], "gen_accuracy": [1.0, 1.0, 1.0]}
    cvae = {"fid": [750.0, 745.0, 755.0], "gen_accuracy": [0.98, 0.99, 0.985]}
    frame = family_comparison(_families(cae, cvae), PARAMS)
    drawn = []
    real = compare.figures.forest
    monkeypatch.setattr(compare.figures, "forest", lambda panels, *a: drawn.append(panels) or real(panels, *a))
    assert compare.forest_plot(frame, PARAMS)[:4] == b"\x89PNG"
    (panels,) = drawn
    assert [title.split("\n")[0] for title in panels] == ["Generated Images Accuracy", "FID"]
