"""The `digitgen` command: parse arguments, load params, call one stage function (thin: no logic here)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from digitgen.params import (
    LABEL_CVAE,
    MODEL_KINDS,
    PCVAE,
    DigitgenError,
    ParamsError,
    config_name,
    load_params,
    override,
    train_section,
)
from digitgen.stopping import stopped_by_signals


def _download(args, params) -> None:
    from digitgen.data import download

    download(params.data.mirrors, args.out)


def _split(args, params) -> None:
    from digitgen.data import run_split

    counts = run_split(params.data, args.raw, args.out, args.counts)
    print(json.dumps({name: c["total"] for name, c in counts.items()}))


def _train(args, params) -> None:
    from digitgen.files import folder_lock

    _check_configuration(args, params)
    section = train_section(args.model)
    train_params = {
        "train": params.train,
        "label_cvae.train": params.label_cvae.train,
        "pcvae.train": params.pcvae.train,
    }[section]
    if args.seeds is not None:
        override(train_params, section, "--seeds", seeds=args.seeds)
    if args.device is not None:
        override(train_params, section, "--device", device=args.device)
    name = config_name(args.model, args.latent_dim)
    checkpoints = args.checkpoints or Path("checkpoints") / name
    with folder_lock(checkpoints, "trainer"):  # a second trainer stops at once, not after its imports
        from digitgen.train import run_train

        run_train(
            params,
            args.model,
            args.latent_dim,
            args.data,
            args.out or Path("models") / name,
            args.history or Path("histories") / name,
            checkpoints,
            args.device,
            args.seeds,
            args.params,
        )


def _label_cvae_figures(args, params) -> None:
    from digitgen.latent import run_label_cvae_figures

    models = args.models or Path("models") / config_name(LABEL_CVAE, params.label_cvae.latent_dim)
    for path in run_label_cvae_figures(params.label_cvae.figures, models, args.data, args.out):
        print(path)


def _generate(args, params) -> None:
    from digitgen.serving import run_generate

    count = run_generate(args.model, args.out, args.digit, args.n, args.digits, args.same_style, args.seed)
    print(f"wrote {count} images to {args.out}")


def _print_rows(header: tuple[str, ...], rows) -> None:
    print("\t".join(header))
    for name, digit, probability in rows:
        print(f"{name}\t{'' if digit is None else digit}\t{'' if probability is None else f'{probability:.4f}'}")


def _classify(args, params) -> None:
    from digitgen.serving import run_classify

    _print_rows(("image", "digit", "probability"), run_classify(args.model, args.images))


def _reconstruct(args, params) -> None:
    from digitgen.serving import run_reconstruct

    _print_rows(("image", "digit", "probability"), run_reconstruct(args.model, args.images, args.out, args.labels))


def _validate(args, params) -> None:
    from digitgen.serving import run_validate

    _print_rows(("image", "label", "probability"), run_validate(args.model, args.images, args.labels))


def _classifier(args, params) -> None:
    from digitgen.classifier import run_classifier

    print(json.dumps(run_classifier(params.classifier, args.data, args.out, args.metrics)))


def _reference(args, params) -> None:
    from digitgen.evaluate import run_reference

    print(json.dumps(run_reference(params.evaluate, args.classifier, args.data, args.out, args.cache)))


def _evaluate(args, params) -> None:
    _check_configuration(args, params)  # before the slow imports
    from digitgen.evaluate import run_evaluate

    name = config_name(args.model, args.latent_dim)
    run_evaluate(
        params.evaluate,
        params.tracking.experiment,
        args.model,
        args.latent_dim,
        args.models or Path("models") / name,
        args.classifier,
        args.data,
        args.out,
        args.cache,
    )


def _tables(args, params) -> None:
    from digitgen.compare import run_tables

    print(run_tables(params, args.evaluation, args.reference, args.out))


def _aggregate(args, params) -> None:
    from digitgen.aggregate import run_aggregate

    run_aggregate(params, args.evaluation, args.histories, args.models, args.data, args.out)


def _check_regression(args, params) -> int:
    from digitgen.regression import run_check_regression

    return (
        0
        if run_check_regression(
            args.metrics, args.baseline, args.thresholds, args.pipeline_params, args.baseline_params
        )
        else 1
    )


def _compare(args, params) -> None:
    from digitgen.revisions import run_compare

    print(run_compare(args.revisions, args.pipeline, args.markdown), end="")


def _check_configuration(args, params) -> None:
    """--latent-dim under the rule params.yaml's latent sizes follow (study.latent_dims, label_cvae.latent_dim,
    pcvae.latent_dims)."""
    if isinstance(args.latent_dim, str):
        key = {LABEL_CVAE: "label_cvae.latent_dim", PCVAE: "pcvae.latent_dims"}
        raise ParamsError(
            f"--latent-dim {args.latent_dim}: expected an integer, a latent size of "
            f"{key.get(args.model, 'study.latent_dims')} in params.yaml"
        )
    if args.model == LABEL_CVAE:
        override(params.label_cvae, "label_cvae", "--latent-dim", latent_dim=args.latent_dim)
    elif args.model == PCVAE:
        override(params.pcvae, "pcvae", "--latent-dim", latent_dims=[args.latent_dim])
    else:
        override(params.study, "study", "--latent-dim", latent_dims=[args.latent_dim])


DESCRIPTION = """\
Conditional digit generation on MNIST: the study's joint CAE and CVAE, reproduced with DVC and MLflow.

Use a trained model (a file such as models/cvae-16/seed0.pt, or an MLflow URI: runs:/<run_id>,
models:/digitgen@champion):
  generate             images from digits alone, as one PNG row of 28-pixel tiles
  classify             the digit each image shows, from the image alone
  reconstruct          reconstructions (one PNG row) and predicted digits
  validate             the probability that each image's given label is right

Pipeline stages (what `dvc repro` runs; see dvc.yaml):
  download             the four MNIST files, MD5-checked
  split                train/val/test tensors and class counts
  train                every seed of one configuration, tracked in MLflow
  label-cvae-figures   the label CVAE's pictures: style vs identity, latent scatter and plane, samples
  classifier           the separate CNN that judges generated digits
  reference            the metrics of real digits (floor and ceiling)
  evaluate             the study's five metrics for every seed of one configuration
  tables               mean ± std over seeds, Table 1, CAE against CVAE and ours against the paper, tested
  aggregate            curves, figures, the champion, MLflow summaries

Maintenance and CI:
  check-regression     the CI gate: fresh smoke metrics against the committed baseline
  compare              Table 1 in the workspace against git revisions or DVC experiments, CAE beside CVAE

`digitgen COMMAND --help` describes a command's options."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default shown after its help (options without one say so)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
        return f"{action.help} (default: %(default)s)" if shown else action.help or ""


def _command(sub, name: str, func, help: str, needs_params: bool = True) -> argparse.ArgumentParser:
    """A subcommand; those that read params.yaml also take --params after their name."""
    p = sub.add_parser(name, description=help, formatter_class=_HelpFormatter)
    p.set_defaults(func=func, needs_params=needs_params)
    if needs_params:
        p.add_argument(
            "--params",
            type=Path,
            default=argparse.SUPPRESS,
            help="params file (default: params.yaml, or the --params given before the command)",
        )
    return p


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a model file (models/cvae-16/seed0.pt) or an MLflow URI (runs:/<run_id>, models:/digitgen@champion)",
    )


def _integer_or_text(value: str) -> int | str:
    """--latent-dim as an integer, or as given: a stage's --latent-dim comes from params.yaml's grid, whose own
    check then names the key (argparse would print its usage and never name params.yaml)."""
    try:
        return int(value)
    except ValueError:
        return value


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """The configuration a stage works on: model kind and latent size (models/<model>-<latent_dim>)."""
    p.add_argument("--model", required=True, choices=[*MODEL_KINDS, LABEL_CVAE, PCVAE], help="the model kind")
    p.add_argument(
        "--latent-dim",
        type=_integer_or_text,
        required=True,
        help="the latent size: one of study.latent_dims (label_cvae: label_cvae.latent_dim; pcvae: pcvae.latent_dims)",
    )


# every --data
PREPARED: dict[str, Any] = {"type": Path, "default": Path("data/prepared"), "help": "the prepared split"}


def _judge_arguments(p: argparse.ArgumentParser) -> None:
    """What scoring reads: the prepared data, the separate classifier and torch-fidelity's feature cache."""
    p.add_argument("--data", **PREPARED)
    p.add_argument("--classifier", type=Path, default=Path("models/classifier.pt"), help="the separate classifier")
    p.add_argument(
        "--cache", type=Path, default=Path("fidelity_cache"), help="torch-fidelity's cache of real-data features"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitgen", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--version", action="version", version=f"digitgen {importlib.metadata.version('digitgen')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of the commands above")

    # Using a model
    images_help = "PNG files: 28 x 28 grayscale, or a row/grid of 28 x 28 tiles as generate writes"
    p = _command(sub, "generate", _generate, "images from digits alone, as one PNG row of 28-pixel tiles", False)
    _model_argument(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--digit", type=int, help="the digit to draw n times")
    what.add_argument("--digits", help="a digit string such as 2026, one tile per character")
    p.add_argument("-n", type=int, help="images of --digit (none given: 1; at most 10,000, one PNG row)")
    p.add_argument("--same-style", action="store_true", help="one style noise for every image")
    p.add_argument("--seed", type=int, help="seed of the style noise (none given: a fresh draw)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")

    p = _command(sub, "classify", _classify, "the digit each image shows, from the image alone", False)
    _model_argument(p)
    p.add_argument("images", type=Path, nargs="+", help=images_help)

    p = _command(sub, "reconstruct", _reconstruct, "reconstructions (one PNG row) and predicted digits", False)
    _model_argument(p)
    p.add_argument("images", type=Path, nargs="+", help=images_help)
    p.add_argument("--labels", type=int, nargs="+", help="one digit per image, to reconstruct with image and label")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")

    p = _command(sub, "validate", _validate, "the probability that each image's given label is right", False)
    _model_argument(p)
    p.add_argument("images", type=Path, nargs="+", help=images_help)
    p.add_argument("--labels", type=int, nargs="+", required=True, help="one digit per image")

    # Pipeline stages
    p = _command(sub, "download", _download, "stage download: the four MNIST files, MD5-checked")
    p.add_argument("--out", type=Path, default=Path("data/raw"), help="where the files go")

    p = _command(sub, "split", _split, "stage split: train/val/test tensors and class counts")
    p.add_argument("--raw", type=Path, default=Path("data/raw"), help="the downloaded MNIST files")
    p.add_argument("--out", type=Path, default=Path("data/prepared"), help="where the split goes")
    p.add_argument("--counts", type=Path, default=Path("results/split_counts.json"), help="class counts per split")

    p = _command(sub, "train", _train, "stage train: every seed of one configuration, tracked in MLflow")
    _config_arguments(p)
    p.add_argument(
        "--seeds", type=int, nargs="+", help="override params' train.seeds (label_cvae: label_cvae.train.seeds)"
    )
    p.add_argument("--device", help="override params' train.device (auto, cpu, cuda, ...)")
    p.add_argument("--data", **PREPARED)
    p.add_argument("--out", type=Path, help="the models' folder (none given: models/<model>-<latent_dim>)")
    p.add_argument("--history", type=Path, help="the histories' folder (none given: histories/<model>-<latent_dim>)")
    p.add_argument(
        "--checkpoints", type=Path, help="the checkpoints' folder (none given: checkpoints/<model>-<latent_dim>)"
    )

    p = _command(
        sub,
        "label-cvae-figures",
        _label_cvae_figures,
        "stage label_cvae_figures: style vs identity, latent scatter, latent plane, samples",
    )
    p.add_argument(
        "--models", type=Path, help="the trained label CVAE's folder (none given: models/label_cvae-<latent_dim>)"
    )
    p.add_argument("--data", **PREPARED)
    p.add_argument("--out", type=Path, default=Path("results/label_cvae"), help="where the figures go")

    p = _command(sub, "classifier", _classifier, "stage classifier: the separate CNN that judges generated digits")
    p.add_argument("--data", **PREPARED)
    p.add_argument("--out", type=Path, default=Path("models/classifier.pt"), help="the classifier's weights")
    p.add_argument("--metrics", type=Path, default=Path("results/classifier.json"), help="its test accuracy")

    p = _command(sub, "reference", _reference, "stage reference: the metrics of real digits (floor and ceiling)")
    _judge_arguments(p)
    p.add_argument("--out", type=Path, default=Path("results/reference.json"), help="the reference metrics")

    p = _command(sub, "evaluate", _evaluate, "stage evaluate: the study's metrics for every seed of one configuration")
    _config_arguments(p)
    _judge_arguments(p)
    p.add_argument("--models", type=Path, help="the trained seeds' folder (none given: models/<model>-<latent_dim>)")
    p.add_argument("--out", type=Path, default=Path("results/evaluation"), help="where <config>.json goes")

    p = _command(
        sub,
        "tables",
        _tables,
        "stage tables: mean ± std over seeds, Table 1, CAE against CVAE and ours against the paper, tested",
    )
    p.add_argument("--evaluation", type=Path, default=Path("results/evaluation"), help="the evaluations")
    p.add_argument(
        "--reference",
        type=Path,
        default=Path("results/reference.json"),
        help="the reference stage's points, for the companion table",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="where the results go")

    p = _command(sub, "aggregate", _aggregate, "stage aggregate: curves, figures, the champion, MLflow summaries")
    p.add_argument("--evaluation", type=Path, default=Path("results/evaluation"), help="the evaluations")
    p.add_argument("--histories", type=Path, default=Path("histories"), help="the training histories")
    p.add_argument("--models", type=Path, default=Path("models"), help="the trained models")
    p.add_argument("--data", **PREPARED)
    p.add_argument(
        "--out", type=Path, default=Path("results"), help="where the results go (the tables stage's are read there)"
    )

    # Maintenance and CI
    smoke = Path("pipelines/smoke")
    p = _command(
        sub, "check-regression", _check_regression, "CI gate: fresh smoke metrics against the committed baseline", False
    )
    p.add_argument(
        "--metrics",
        type=Path,
        default=smoke / "results" / "summary.json",
        help="the fresh run's summary of every metric",
    )
    p.add_argument("--baseline", type=Path, default=smoke / "baseline.json", help="the committed baseline")
    p.add_argument(
        "--thresholds", type=Path, default=smoke / "thresholds.yaml", help="the allowed worsening per metric"
    )
    p.add_argument(
        "--pipeline-params", type=Path, default=smoke / "params.yaml", help="the params the fresh run was made with"
    )
    p.add_argument(
        "--baseline-params",
        type=Path,
        default=smoke / "baseline.params.yaml",
        help="the params the baseline was made with (named when they differ)",
    )

    p = _command(
        sub,
        "compare",
        _compare,
        "Table 1's means in the workspace against git revisions or DVC experiments (none given: HEAD), CAE beside "
        "CVAE per latent size, changes from the first marked",
        False,
    )
    p.add_argument("revisions", nargs="*", metavar="REV_OR_EXP", help="git revisions or DVC experiment names")
    p.add_argument(
        "--pipeline", type=Path, default=Path("."), help="the pipeline's folder (the smoke one: pipelines/smoke)"
    )
    p.add_argument("--markdown", action="store_true", help="markdown, for a pull request or $GITHUB_STEP_SUMMARY")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params) if args.needs_params else None
        with stopped_by_signals(die_with_parent=bool(os.environ.get("DVC_STAGE"))):  # a stage stops with its dvc
            status = args.func(args, params)
    except (DigitgenError, FileNotFoundError) as err:
        print(f"digitgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not print a traceback while we exit
        resume = "; finished epochs are checkpointed, run the same command (or `dvc repro`) to resume"
        print(f"digitgen {args.command}: interrupted{resume if args.command == 'train' else ''}", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
