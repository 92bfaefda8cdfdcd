"""The CI gate: fresh smoke-pipeline metrics against the committed baseline, within measured tolerances.

Each metric's direction (higher or lower is better) comes from `digitgen.evaluate.METRICS`; the
thresholds file gives each metric's allowed worsening, absolute (`abs`) or relative to the baseline
(`rel`). A metric the baseline has and the fresh run lacks is a failure, never a pass. Under GitHub
Actions the verdict also goes to the job's summary page ($GITHUB_STEP_SUMMARY), where CI users look.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from digitgen.evaluate import METRICS
from digitgen.params import DigitgenError, read_yaml


@dataclass(frozen=True)
class Verdict:
    configuration: str
    metric: str
    direction: str
    baseline: float
    new: float | None
    allowed: float  # the worst value that still passes
    verdict: str  # ok | improved | REGRESSED | MISSING

    @property
    def failed(self) -> bool:
        return self.verdict in ("REGRESSED", "MISSING")


def load_thresholds(path: Path) -> dict[str, tuple[str, float]]:
    """{metric: ("abs" | "rel", tolerance)}, checked against the declared metrics."""
    raw = read_yaml(path) or {}
    thresholds = {}
    for metric, rule in raw.items():
        if metric not in METRICS:
            raise DigitgenError(f"{path}: {metric} is not a metric; known: {', '.join(METRICS)}")
        if not (
            isinstance(rule, dict)
            and len(rule) == 1
            and next(iter(rule)) in ("abs", "rel")
            and isinstance(next(iter(rule.values())), (int, float))
            and next(iter(rule.values())) >= 0
        ):
            raise DigitgenError(f"{path}: {metric} must be {{abs: <tolerance>}} or {{rel: <fraction>}}, got {rule!r}")
        ((kind, value),) = rule.items()
        thresholds[metric] = (kind, float(value))
    return thresholds


def _load_summary(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise DigitgenError(
            f"{what} {path} not found; run the smoke pipeline first (`uv run dvc repro pipelines/smoke/dvc.yaml`)"
        )
    try:
        summary = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise DigitgenError(
            f"{what} {path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
            "regenerate it (`uv run dvc repro pipelines/smoke/dvc.yaml`)"
        ) from None
    shape_ok = isinstance(summary, dict) and all(
        isinstance(metrics, dict)
        and all(isinstance(entry, dict) and isinstance(entry.get("mean"), (int, float)) for entry in metrics.values())
        for metrics in summary.values()
    )
    if not shape_ok:
        raise DigitgenError(
            f'{what} {path} is not a metrics summary ({{configuration: {{metric: {{"mean": number, '
            "...}}}); give the tables stage's summary.json"
        )
    return summary


def compare(baseline: dict, current: dict, thresholds: dict[str, tuple[str, float]]) -> list[Verdict]:
    verdicts = []
    for config, metrics in baseline.items():
        for metric, (kind, tolerance) in thresholds.items():
            if metric not in metrics:
                continue  # the baseline never had it (e.g. a metric added since); nothing to regress from
            base = metrics[metric]["mean"]
            slack = tolerance * abs(base) if kind == "rel" else tolerance
            sign = 1 if METRICS[metric] == "higher" else -1  # +1: bigger is better
            allowed = base - sign * slack
            entry = current.get(config, {}).get(metric)
            if entry is None:
                verdict, new = "MISSING", None
            else:
                new = entry["mean"]
                change = sign * (new - base)  # positive = better
                verdict = "REGRESSED" if change < -slack else "improved" if change > slack else "ok"
            verdicts.append(Verdict(config, metric, METRICS[metric], base, new, allowed, verdict))
    return verdicts


def _table(verdicts: list[Verdict]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "configuration": v.configuration,
                "metric": v.metric,
                "better": v.direction,
                "baseline": f"{v.baseline:.4g}",
                "new": "-" if v.new is None else f"{v.new:.4g}",
                "allowed": f"{'>=' if v.direction == 'higher' else '<='} {v.allowed:.4g}",
                "verdict": v.verdict,
            }
            for v in verdicts
        ]
    )


def render(verdicts: list[Verdict]) -> str:
    return _table(verdicts).to_string(index=False)


def headline(verdicts: list[Verdict]) -> str:
    """The one line that says how the gate ended."""
    failed = [v for v in verdicts if v.failed]
    improved = [v for v in verdicts if v.verdict == "improved"]
    if failed:
        return f"REGRESSION: {len(failed)} of {len(verdicts)} checks failed: " + ", ".join(
            f"{v.configuration} {v.metric} ({v.verdict})" for v in failed
        )
    return f"no regression: {len(verdicts)} checks passed" + (
        f", {len(improved)} improved past tolerance (refresh the baseline to keep the gain)" if improved else ""
    )


def write_step_summary(verdicts: list[Verdict], path: Path, hint: str = "") -> None:
    """The verdict as GitHub-flavoured markdown, appended to the job summary: failures first, then the rest."""
    table = _table(sorted(verdicts, key=lambda v: not v.failed))
    note = f"{hint}\n\n" if hint else ""
    with open(path, "a") as summary:
        summary.write(
            f"## Metrics regression gate\n\n**{headline(verdicts)}**\n\n{note}{table.to_markdown(index=False)}\n"
        )


def params_differences(baseline_params: Path, params: Path) -> list[str]:
    """The params whose values differ from those the baseline was made with (its sidecar file, written beside it
    when it is refreshed), as "train.epochs 2 (baseline 8)"; params only one side has are left out."""
    if not Path(baseline_params).is_file() or not Path(params).is_file():
        return []
    from digitgen.tracking import flatten  # only here: the gate itself needs no MLflow

    old, new = flatten(read_yaml(baseline_params) or {}), flatten(read_yaml(params) or {})
    return [
        f"{key} {new[key]} (baseline {old[key]})" for key in sorted(old.keys() & new.keys()) if old[key] != new[key]
    ]


def params_hint(differences: list[str], baseline_params: Path) -> str:
    return (
        f"params differ from the baseline's ({baseline_params}): {', '.join(differences)}; the metrics moved with "
        "them, so rerun with the baseline's params (`dvc exp apply`/`git checkout` them back) or, if the change is "
        "meant, refresh the baseline"
        if differences
        else ""
    )


def run_check_regression(
    metrics_path: Path, baseline_path: Path, thresholds_path: Path, params_path: Path, baseline_params_path: Path
) -> bool:
    """Print the verdict table, a summary line and which params differ from the baseline's; True when nothing
    regressed or went missing."""
    verdicts = compare(
        _load_summary(baseline_path, "baseline"),
        _load_summary(metrics_path, "metrics"),
        load_thresholds(thresholds_path),
    )
    hint = params_hint(params_differences(baseline_params_path, params_path), baseline_params_path)
    print(render(verdicts))
    print(headline(verdicts))
    if hint:
        print(hint)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        write_step_summary(verdicts, Path(os.environ["GITHUB_STEP_SUMMARY"]), hint)
    return not any(v.failed for v in verdicts)
