"""The `digitgen` command: parse arguments, load params, call one stage function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from digitgen.params import MODEL_KINDS, DigitgenError, load_params


def _download(args, params) -> None:
    from digitgen.data import download

    download(params.data.mirrors, args.out)


def _split(args, params) -> None:
    from digitgen.data import run_split

    counts = run_split(params.data, args.raw, args.out, args.counts)
    print(json.dumps({name: c["total"] for name, c in counts.items()}))


def _train(args, params) -> None:
    import dataclasses

    from digitgen.train import config_name, run_train

    if args.seeds is not None:
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, seeds=args.seeds))
    name = config_name(args.model, args.latent_dim)
    run_train(params, args.model, args.latent_dim, args.data, args.out or Path("models") / name,
              args.history or Path("histories") / name, args.checkpoints or Path("checkpoints") / name, args.device)


def _classifier(args, params) -> None:
    from digitgen.classifier import run_classifier

    print(json.dumps(run_classifier(params.classifier, args.data, args.out, args.metrics)))


def _reference(args, params) -> None:
    from digitgen.evaluate import run_reference

    print(json.dumps(run_reference(params.evaluate, args.classifier, args.data, args.out, args.cache)))


def _evaluate(args, params) -> None:
    from digitgen.evaluate import run_evaluate
    from digitgen.train import config_name

    name = config_name(args.model, args.latent_dim)
    run_evaluate(params.evaluate, args.model, args.latent_dim, args.models or Path("models") / name,
                 args.classifier, args.data, args.out, args.cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitgen", description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("download", help="stage download: the four MNIST files, MD5-checked")
    p.add_argument("--out", type=Path, default=Path("data/raw"))
    p.set_defaults(func=_download)

    p = sub.add_parser("split", help="stage split: train/val/test tensors and class counts")
    p.add_argument("--raw", type=Path, default=Path("data/raw"))
    p.add_argument("--out", type=Path, default=Path("data/prepared"))
    p.add_argument("--counts", type=Path, default=Path("results/split_counts.json"))
    p.set_defaults(func=_split)

    p = sub.add_parser("train", help="stage train: every seed of one configuration, tracked in MLflow")
    p.add_argument("--model", required=True, choices=MODEL_KINDS)
    p.add_argument("--latent-dim", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", help="override params' train.seeds")
    p.add_argument("--device", help="override params' train.device (auto, cpu, cuda, ...)")
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--out", type=Path, help="default: models/<model>-<latent_dim>")
    p.add_argument("--history", type=Path, help="default: histories/<model>-<latent_dim>")
    p.add_argument("--checkpoints", type=Path, help="default: checkpoints/<model>-<latent_dim>")
    p.set_defaults(func=_train)

    p = sub.add_parser("classifier", help="stage classifier: the separate CNN that judges generated digits")
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--out", type=Path, default=Path("models/classifier.pt"))
    p.add_argument("--metrics", type=Path, default=Path("results/classifier.json"))
    p.set_defaults(func=_classifier)

    fidelity_cache = "torch-fidelity's cache of real-data features (default: fidelity_cache)"
    p = sub.add_parser("reference", help="stage reference: the metrics of real digits (floor and ceiling)")
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--classifier", type=Path, default=Path("models/classifier.pt"))
    p.add_argument("--out", type=Path, default=Path("results/reference.json"))
    p.add_argument("--cache", type=Path, default=Path("fidelity_cache"), help=fidelity_cache)
    p.set_defaults(func=_reference)

    p = sub.add_parser("evaluate", help="stage evaluate: the study's metrics for every seed of one configuration")
    p.add_argument("--model", required=True, choices=MODEL_KINDS)
    p.add_argument("--latent-dim", type=int, required=True)
    p.add_argument("--models", type=Path, help="default: models/<model>-<latent_dim>")
    p.add_argument("--classifier", type=Path, default=Path("models/classifier.pt"))
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--out", type=Path, default=Path("results/evaluation"))
    p.add_argument("--cache", type=Path, default=Path("fidelity_cache"), help=fidelity_cache)
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        args.func(args, params)
    except (DigitgenError, FileNotFoundError) as err:
        print(f"digitgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"digitgen {args.command}: interrupted; finished epochs are checkpointed, "
              "run the same command (or `dvc repro`) to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
