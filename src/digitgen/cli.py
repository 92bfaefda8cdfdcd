"""The `digitgen` command: parse arguments, load params, call one stage function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from digitgen.params import LABEL_CVAE, MODEL_KINDS, DigitgenError, load_params


def _download(args, params) -> None:
    from digitgen.data import download

    download(params.data.mirrors, args.out)


def _split(args, params) -> None:
    from digitgen.data import run_split

    counts = run_split(params.data, args.raw, args.out, args.counts)
    print(json.dumps({name: c["total"] for name, c in counts.items()}))


def _train(args, params) -> None:
    from digitgen.train import config_name, run_train

    name = config_name(args.model, args.latent_dim)
    run_train(params, args.model, args.latent_dim, args.data, args.out or Path("models") / name,
              args.history or Path("histories") / name, args.checkpoints or Path("checkpoints") / name, args.device,
              args.seeds)


def _label_cvae_figures(args, params) -> None:
    from digitgen.latent import run_label_cvae_figures
    from digitgen.train import config_name

    models = args.models or Path("models") / config_name(LABEL_CVAE, params.label_cvae.latent_dim)
    for path in run_label_cvae_figures(params.label_cvae.figures, models, args.data, args.out):
        print(path)


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
    p.add_argument("--model", required=True, choices=[*MODEL_KINDS, LABEL_CVAE])
    p.add_argument("--latent-dim", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", help="override params' train.seeds (label_cvae: label_cvae.train.seeds)")
    p.add_argument("--device", help="override params' train.device (auto, cpu, cuda, ...)")
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--out", type=Path, help="default: models/<model>-<latent_dim>")
    p.add_argument("--history", type=Path, help="default: histories/<model>-<latent_dim>")
    p.add_argument("--checkpoints", type=Path, help="default: checkpoints/<model>-<latent_dim>")
    p.set_defaults(func=_train)

    p = sub.add_parser("label-cvae-figures",
                       help="stage label_cvae_figures: style vs identity, latent scatter, latent plane, samples")
    p.add_argument("--models", type=Path, help="the trained label CVAE's folder (default: models/label_cvae-<latent_dim>)")
    p.add_argument("--data", type=Path, default=Path("data/prepared"))
    p.add_argument("--out", type=Path, default=Path("results/label_cvae"))
    p.set_defaults(func=_label_cvae_figures)
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
