"""The ``pleas-jax`` command: a thin argparse layer over the libraries.

Each subcommand is one ``register`` function that adds its parser and sets
``func``; :data:`SUBCOMMANDS` lists them. To add a subcommand, write its
register function and append it there. ``func(args) -> int`` returns the exit
status; library errors (:func:`_user_errors`) become one line
``pleas-jax: error: ...`` on stderr with exit status 2, never a traceback.

Commands: ``train``, ``merge``, ``eval`` (over :mod:`pleas_jax.workflow`) and
``demo`` (over :mod:`pleas_jax.demo`) here; ``convert``, ``convert-tree`` and
``export`` (over :mod:`converters`) in :mod:`pleas_jax.cli_torch`.
Heavy imports (torch, orbax, the converters) happen inside the commands so
that torch stays optional.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pleas_jax import cli_torch
from pleas_jax.cli_base import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    PROG,
    CommandError,
    crop_arg,
    positive,
    print_json,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [CommandError, OSError]
    from pleas_jax.checkpoint import CheckpointError
    from pleas_jax.data import DataError
    from pleas_jax.workflow import RunError

    errors += [CheckpointError, DataError, RunError]
    if "converters" in sys.modules:  # only once a command has needed torch
        errors.append(sys.modules["converters"].ConversionError)
    return tuple(errors)


# ------------------------------------------------------------------- train
def _register_train(sub: argparse._SubParsersAction) -> None:
    from pleas_jax.models import ARCHITECTURES

    p = sub.add_parser(
        "train",
        help="train a source model on a data spec and save it as a checkpoint",
        description=(
            "Train a ResNet from a seeded initialisation (SGD with Nesterov momentum, cosine "
            "schedule, weight decay) on the training split of a data spec, print the test "
            "accuracy as JSON and save a checkpoint whose metadata records the data, image size, "
            "normalisation, recipe, test accuracy and this command. Data specs: digits, "
            "mnist5k, npz:PATH, folder:PATH, tfds:NAME[/CONFIG][:SPLIT], each optionally with a "
            "label subset such as mnist5k[0-4]."
        ),
    )
    p.add_argument("--arch", default="resnet20", choices=ARCHITECTURES, help="(default resnet20)")
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="base width (default: 16 for resnet20, 64 for the ImageNet ResNets)",
    )
    p.add_argument("--data", required=True, help="data spec, e.g. 'mnist5k[0-4]'")
    p.add_argument(
        "--image-size", type=int, default=32, help="images are resized to this (default 32)"
    )
    p.add_argument("--epochs", type=int, default=8, help="(default 8)")
    p.add_argument(
        "--seed", type=int, default=0, help="initialisation and shuffling seed (default 0)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="(default 128)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="(default 5e-4)")
    p.add_argument("--augment", action="store_true", help="random crops (and flips for RGB)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    positive(args, "width", "image_size", "epochs", "batch_size")
    if args.seed < 0:
        raise CommandError(f"--seed must be >= 0, got {args.seed}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CommandError(f"--lr must be a positive number, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise CommandError(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    info = workflow.train_checkpoint(
        args.out,
        data=args.data,
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        augment=args.augment,
        image_size=args.image_size,
        overwrite=args.overwrite,
        progress=True,
        command=args.command_line,
    )
    print_json(
        {
            "checkpoint": args.out,
            "data": args.data,
            "test_accuracy": round(info["test_accuracy"], 6),
            "test_examples": info["test_examples"],
        }
    )
    return 0


# ------------------------------------------------------------------- merge
def _register_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge two checkpoints (PLeaS) into one of a given compute budget",
        description=(
            "Merge checkpoints A and B of the same architecture: permutation matching, partial "
            "merging under the budget, least squares and BatchNorm statistics, all on the first "
            "--images images of a seeded shuffle of the data's training split (read at A's image "
            "size and normalisation). Writes the merged checkpoint (a backbone with heads 'a' and "
            "'b' for different label spaces) whole or not at all, and the merge report."
        ),
    )
    p.add_argument("--a", required=True, metavar="DIR", help="checkpoint of model A")
    p.add_argument("--b", required=True, metavar="DIR", help="checkpoint of model B")
    p.add_argument("--data", required=True, help="data spec whose training images the merge sees")
    p.add_argument(
        "--budget",
        type=float,
        required=True,
        help="compute relative to one model, in [1, 2] (1: fully merged, 2: ensemble)",
    )
    p.add_argument(
        "--matching",
        default="activation",
        choices=("activation", "weight", "identity"),
        help="activation statistics, Git Re-Basin weight matching, or none (default activation)",
    )
    p.add_argument(
        "--ratios",
        default="uniform",
        choices=("uniform", "zip", "optimized"),
        help="how the budget is spread over groups (default uniform)",
    )
    p.add_argument(
        "--unit-multiple",
        type=int,
        default=None,
        metavar="M",
        help="round each group's separate units down to a multiple of M (8 suits CPUs "
        "and tensor cores; may spend less than the budget)",
    )
    p.add_argument(
        "--least-squares",
        default="closed_form",
        choices=("closed_form", "gd", "none"),
        help="refit layers in closed form, by gradient descent, or not (default closed_form)",
    )
    p.add_argument(
        "--heads",
        default="auto",
        choices=("auto", "shared", "separate"),
        help="auto: separate heads when A and B were trained on different classes",
    )
    p.add_argument("--images", type=int, default=1000, help="training images used (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="(default 250)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="read the images at this size instead of the one the checkpoints record",
    )
    _crop_argument(p, "read the merge images (recorded in the merged checkpoint)")
    p.add_argument(
        "--gd-steps", type=int, default=400, help="steps of --least-squares gd (default 400)"
    )
    p.add_argument(
        "--matching-dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="compute dtype of the activation-matching pass (default: the models' own; "
        "bfloat16 accumulates in float32)",
    )
    p.add_argument(
        "--matching-precision",
        default="highest",
        choices=("highest", "bf16_3x", "bfloat16"),
        help="matmul precision of the activation-matching moments (default highest; "
        "bf16_3x as for --ls-precision)",
    )
    p.add_argument(
        "--ls-precision",
        default="highest",
        choices=("highest", "bf16_3x", "bfloat16"),
        help="matmul precision of the least-squares sums (default highest: fp32; "
        "bf16_3x: bf16 tensor-core products with ~fp32 accuracy, for GPUs/TPUs)",
    )
    p.add_argument("--out", required=True, help="merged checkpoint directory to create")
    p.add_argument(
        "--report",
        default=None,
        help="also write the merge report to this JSON file (an existing one only with --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint")
    p.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    positive(args, "images", "batch_size", "gd_steps", "unit_multiple", "image_size")
    report = workflow.merge_checkpoints(
        args.a,
        args.b,
        args.out,
        data=args.data,
        budget=args.budget,
        matching=args.matching,
        ratios=args.ratios,
        unit_multiple=args.unit_multiple,
        least_squares=None if args.least_squares == "none" else args.least_squares,
        heads=args.heads,
        images=args.images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        crop=args.crop,  # "default": A's own (workflow.MODEL_CROP)
        gd_steps=args.gd_steps,
        matching_dtype=args.matching_dtype,
        matching_precision=args.matching_precision,
        ls_precision=args.ls_precision,
        report=args.report,
        overwrite=args.overwrite,
        progress=True,
        command=args.command_line,
    )
    print_json(
        {
            "checkpoint": args.out,
            "heads": report["heads"],
            "images": report["images"],
            "budget": report["budget"],
            "achieved_budget": round(report["achieved_budget"], 4),
            "macs": report["macs"],
            "macs_source": report["macs_source"],
            "params": report["params"],
            "seconds": round(sum(report["seconds"].values()), 2),
            **({"report": args.report} if args.report else {}),
        }
    )
    return 0


def _crop_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--crop",
        type=crop_arg,
        default="default",
        metavar="F|none",
        help=f"how to {what}: resize the shorter side to size/F and take the central square "
        "(torchvision's evaluation: F=0.875), or 'none' to resize whole images (default: as "
        "the checkpoint records, 0.875 for a converted ImageNet model)",
    )


# -------------------------------------------------------------------- eval
def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="print a checkpoint's test accuracy on a data spec as JSON",
        description=(
            "Evaluate a checkpoint on the test split of a data spec, read at the checkpoint's "
            "image size with its training normalisation; prints JSON with the accuracy. A merge "
            "with separate label spaces needs --head a or --head b (and that head's task)."
        ),
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory")
    p.add_argument("--data", required=True, help="data spec, e.g. 'mnist5k[5-9]'")
    p.add_argument(
        "--head",
        choices=("a", "b"),
        default=None,
        help="which source model's head reads a merged backbone",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="override the checkpoint's image size"
    )
    _crop_argument(p, "read the test images")
    p.add_argument("--batch-size", type=int, default=250, help="(default 250)")
    p.add_argument(
        "--any-classes",
        action="store_true",
        help="score even when the data's classes (original labels) differ from those the "
        "checkpoint records it was trained on",
    )
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from pleas_jax import workflow

    positive(args, "image_size", "batch_size")
    model = workflow.load_model(args.checkpoint)
    dataset = workflow.dataset_for(model, args.data, image_size=args.image_size, crop=args.crop)
    acc = workflow.evaluate(
        model,
        dataset,
        head=args.head,
        batch_size=args.batch_size,
        check_classes=not args.any_classes,
    )
    print_json(
        {
            "checkpoint": args.checkpoint,
            "data": args.data,
            "head": args.head,
            "accuracy": round(acc, 6),
            "examples": len(dataset.y_test),
            # How the images were read (Model.image_size, Model.crop).
            "image_size": int(dataset.x_test.shape[1]),
            "crop": workflow.crop_for(model, args.crop),
        }
    )
    return 0


# -------------------------------------------------------------------- demo
def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="PLeaS against its baselines on two pairs of MNIST ResNet-20s (what `make demo` runs)",
        description=(
            "Merge two pairs of ResNet-20 (width 16) on the bundled MNIST images: one task with "
            "two seeds, and digits 0-4 against 5-9 (separate heads). Methods: weight averaging, "
            "Git Re-Basin, activation matching (all with BatchNorm recompute), ZipIt!-style "
            "partial merging, PLeaS and PLeaS-GD, at budgets 1, 1.25, 1.5 and 2, against the "
            "source models and their ensemble. Source checkpoints come from the repository's "
            "demo/checkpoints, else the cache, else are trained. Prints a table; writes "
            "results.json and accuracy_vs_budget.png to --out."
        ),
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the four source models from scratch (into --cache)",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument(
        "--cache",
        default=None,
        help="cache directory (default $PLEAS_JAX_CACHE or ~/.cache/pleas-jax)",
    )
    p.add_argument(
        "--checkpoints",
        default=None,
        help="directory of shipped source checkpoints (default the repository's demo/checkpoints)",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import time

    from pleas_jax import demo

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out}: exists and is not a directory")
    results = demo.run(
        demo.DemoConfig(),
        out=out,
        shipped=args.checkpoints or demo.REPO_CHECKPOINTS,
        cache=args.cache,
        retrain=args.retrain,
        progress=True,
        log=lambda s: print(f"demo: {s}", flush=True),
    )
    print()
    print(demo.format_table(results), end="")
    print()
    print(
        f"demo: wrote {results['files']['results']} and {results['files']['plot']} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return 0


# ------------------------------------------------------------------ parser
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_train,
    _register_merge,
    _register_eval,
    cli_torch.register_convert,
    cli_torch.register_convert_tree,
    cli_torch.register_export,
    _register_demo,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``pleas-jax`` parser with every registered subcommand."""
    from pleas_jax import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="PLeaS model merging (permute, then least squares) in JAX/Flax.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    cache_help = (
        "keep compiled programs in DIR, so that a later run on models of the same shapes "
        "skips most compilation (a directory only you can write; pleas_jax.compile_cache)"
    )
    parser.add_argument("--compile-cache", metavar="DIR", default=None, help=cache_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(sub)
    for command in sub.choices.values():
        # Also after the command; SUPPRESS keeps one given before it.
        command.add_argument(
            "--compile-cache", metavar="DIR", default=argparse.SUPPRESS, help=cache_help
        )
    return parser


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pleas-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The command's usage, which lists the options it does take.
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    # Recorded in the checkpoints a command writes, so they say how they were made.
    args.command_line = shlex.join([PROG, *argv])
    try:
        if args.compile_cache is not None:
            from pleas_jax import compile_cache

            try:
                compile_cache.enable(args.compile_cache)
            except ValueError as e:
                raise CommandError(str(e)) from e
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def entry() -> None:
    """The ``pleas-jax`` program: :func:`main`, then its exit status.

    After an interrupt the process ends at once (``os._exit``): XLA may still
    be compiling or running on its own threads, and tearing the interpreter
    down under them crashed it (a segmentation fault after "interrupted" in
    2 of 5 merges interrupted by hand). Every file a command writes has been
    removed or renamed into place by then; only the standard streams need
    flushing.
    """
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
