"""Size the CI gate's tolerances from the spread over seeds of a smoke-sized run.

    uv run python benchmarks/smoke_spread.py pipelines/spread/results/evaluation --gate-seeds 2

Reads every configuration's per-seed metrics from a run of the smoke pipeline's params with many seeds
(e.g. seeds [0..5]), and prints per metric: the largest standard deviation over seeds, the standard
deviation of a mean over --gate-seeds seeds (what the gate compares), and a tolerance of `--sigmas`
times that, absolute for accuracies and relative to the mean for the rest.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

RELATIVE = ("fid", "inception_score", "reconstruction_error", "reconstruction_error_image_only", "loss")
GATED = ("gen_accuracy", "classification_accuracy", *RELATIVE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluation", type=Path, help="results/evaluation of the many-seed run")
    parser.add_argument("--gate-seeds", type=int, default=2, help="seeds the smoke pipeline averages")
    parser.add_argument("--sigmas", type=float, default=3.0)
    args = parser.parse_args()

    rows = []
    for path in sorted(args.evaluation.glob("*.json")):
        seeds = pd.DataFrame.from_dict(json.loads(path.read_text())["seeds"], orient="index")
        for metric in GATED:
            if metric in seeds:
                std = seeds[metric].std(ddof=1)
                rows.append(
                    {
                        "configuration": path.stem,
                        "metric": metric,
                        "seeds": len(seeds),
                        "mean": seeds[metric].mean(),
                        "std": std,
                        "relative_std": std / abs(seeds[metric].mean()),
                    }
                )
    frame = pd.DataFrame(rows)
    summary = []
    for metric in GATED:
        of_metric = frame[frame.metric == metric]
        kind = "rel" if metric in RELATIVE else "abs"
        spread = of_metric["relative_std" if kind == "rel" else "std"].max()
        of_mean = spread / math.sqrt(args.gate_seeds)
        summary.append(
            {
                "metric": metric,
                "kind": kind,
                "max std over seeds": round(spread, 4),
                f"std of a {args.gate_seeds}-seed mean": round(of_mean, 4),
                f"tolerance ({args.sigmas:g} sigma)": round(args.sigmas * of_mean, 4),
                "worst configuration": of_metric.loc[
                    of_metric["relative_std" if kind == "rel" else "std"].idxmax(), "configuration"
                ],
            }
        )
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print()
    print(pd.DataFrame(summary).to_string(index=False))


if __name__ == "__main__":
    main()
