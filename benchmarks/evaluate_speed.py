"""How long evaluation takes: the classifier stage, the reference stage (cold cache), and one seed.

    uv run python benchmarks/evaluate_speed.py [--classifier models/classifier.pt] [--models models/cae-8 ...]

Without --classifier it trains one (the classifier stage, timed). Without --models it trains each kind
for one epoch (the train stage, untimed; evaluation costs the same for any weights) into a temporary
MLflow store. Seed evaluations run after the reference stage has cached the test set's statistics,
and include logging to MLflow (with --models, to those models' runs, as the stage would). Everything
else is written under a temporary folder; params come from --params (default params.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from digitgen.classifier import run_classifier
from digitgen.evaluate import ConfigEvaluation, run_reference
from digitgen.params import load_params
from digitgen.train import run_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--classifier", type=Path, help="trained weights to reuse instead of timing the stage")
    parser.add_argument("--models", type=Path, nargs="+", help="trained configurations (folders named <kind>-<dim>)")
    args = parser.parse_args()
    params = load_params(args.params)
    tmp = Path(tempfile.mkdtemp(prefix="digitgen-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    print(f"torch threads: {torch.get_num_threads()}, work folder: {tmp}")

    classifier = args.classifier
    if classifier is None:
        classifier = tmp / "classifier.pt"
        started = time.perf_counter()
        metrics = run_classifier(params.classifier, args.data, classifier, tmp / "classifier.json")
        print(
            f"classifier stage: {time.perf_counter() - started:.1f} s "
            f"(test accuracy {metrics['test_accuracy']:.4f}, {params.classifier.epochs} epochs)"
        )

    started = time.perf_counter()
    reference = run_reference(params.evaluate, classifier, args.data, tmp / "reference.json", tmp / "cache")
    print(
        f"reference stage, cold cache: {time.perf_counter() - started:.1f} s "
        f"(fid {reference['fid']:.3f}, inception_score {reference['inception_score']:.3f}, "
        f"gen_accuracy {reference['gen_accuracy']:.4f})"
    )

    models = args.models
    if models is None:
        one_epoch = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=1))
        models = [tmp / "models" / f"{kind}-8" for kind in ("cae", "cvae")]
        for folder in models:
            run_train(
                one_epoch,
                folder.name.split("-")[0],
                8,
                args.data,
                folder,
                tmp / "histories" / folder.name,
                tmp / "checkpoints" / folder.name,
            )

    for folder in map(Path, models):
        kind, latent_dim = folder.name.split("-")
        started = time.perf_counter()
        evaluation = ConfigEvaluation.load(
            params.evaluate,
            params.tracking.experiment,
            kind,
            int(latent_dim),
            folder,
            classifier,
            args.data,
            tmp / "cache",
        )
        print(f"{folder.name}: setup (classifier, data) {time.perf_counter() - started:.1f} s")
        for seed in evaluation.seeds():
            started = time.perf_counter()
            evaluation.evaluate(seed)
            print(
                f"{folder.name} seed{seed}: {time.perf_counter() - started:.1f} s per seed evaluation "
                f"({params.evaluate.n_generated} generated, {params.evaluate.sampler} sampler)"
            )


if __name__ == "__main__":
    main()
